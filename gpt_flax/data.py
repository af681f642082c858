"""The book's chapter-2 data pipeline as chapter 5 trains with it: GPTDatasetV1 and
create_dataloader_v1, the windows computed once in gpt_spec.data for both twins."""

from __future__ import annotations

from collections.abc import Sequence

from gpt_spec import get_tokenizer
from gpt_spec.data import BatchLoader, GPTDatasetV1, check_loader_args


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    *,
    seed: int = 0,
    orders: Sequence[Sequence[int]] | None = None,
) -> BatchLoader:
    """The book's create_dataloader_v1: the GPT-2 tokenizer, GPTDatasetV1, a loader of numpy int64
    batches (host memory; the jitted steps put them on the device). JAX keeps no global generator:
    a shuffled pass draws from numpy's seeded with `seed`, or, with `orders` (the torch twin's
    `loader.sampler.orders`), replays the torch twin's passes in turn. `num_workers` is checked as
    torch's and otherwise unused: the batches are slices of arrays already in memory."""
    batch_size, _ = check_loader_args(batch_size, num_workers)
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    return BatchLoader(dataset, batch_size, shuffle, drop_last, seed=seed, orders=orders)


__all__ = ["GPTDatasetV1", "create_dataloader_v1"]
