"""The book's chapter-2 data pipeline as chapter 5 trains with it: GPTDatasetV1 and
create_dataloader_v1, the windows computed once in gpt_spec.data for both twins."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from gpt_spec import data as spec_data
from gpt_spec import get_tokenizer
from gpt_spec.data import check_loader_args


class GPTDatasetV1(Dataset):
    """The book's GPTDatasetV1: windows of `max_length` token ids every `stride` tokens, each with
    its target one token on, as int64 tensors."""

    def __init__(self, txt: str, tokenizer: Any, max_length: int, stride: int):
        windows = spec_data.GPTDatasetV1(txt, tokenizer, max_length, stride)
        self.input_ids = list(torch.from_numpy(windows.input_ids))
        self.target_ids = list(torch.from_numpy(windows.target_ids))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


class RecordingRandomSampler(RandomSampler):
    """RandomSampler, as DataLoader(shuffle=True) builds it (torch's global generator, drawn from
    when a pass begins), that also keeps each pass's order in `orders`: what the Flax twin's
    loader replays to take the very same batches."""

    def __init__(self, data_source: Dataset):
        super().__init__(data_source)  # type: ignore[arg-type]
        self.orders: list[list[int]] = []

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        self.orders.append(order)
        yield from order


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """The book's create_dataloader_v1: the GPT-2 tokenizer, GPTDatasetV1, a DataLoader. Shuffled,
    its sampler is a RecordingRandomSampler, which draws as DataLoader(shuffle=True)'s does (the
    book's order for the same torch.manual_seed) and keeps the orders (`loader.sampler.orders`)."""
    batch_size, num_workers = check_loader_args(batch_size, num_workers)
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    sampler = RecordingRandomSampler(dataset) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers)


__all__ = ["GPTDatasetV1", "RecordingRandomSampler", "create_dataloader_v1"]
