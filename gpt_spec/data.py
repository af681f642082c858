"""The book's chapter-5 data, framework-free: the text, its train/validation split, the windows of
token ids GPTDatasetV1 makes of it, and a loader of batches of those windows whose order can be
replayed (so the Flax twin takes the very batches, in the very order, the torch twin's DataLoader
drew).
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import numpy as np

# Edith Wharton, "The Verdict" (1908, public domain): the text the book trains on in chapter 5.
THE_VERDICT = "the-verdict.txt"
THE_VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


def the_verdict() -> str:
    """The book's training text, bundled with this package and checked against its sha256."""
    raw = resources.files("gpt_spec").joinpath("texts", THE_VERDICT).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != THE_VERDICT_SHA256:
        raise ValueError(f"{THE_VERDICT}: sha256 {digest}, expected {THE_VERDICT_SHA256}")
    return raw.decode("utf-8")


def split_text(text: str, train_ratio: float = 0.90) -> tuple[str, str]:
    """The book's split: the first `train_ratio` of the characters train, the rest validate."""
    check_text("text", text)
    if isinstance(train_ratio, bool) or not isinstance(train_ratio, int | float) or not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be a number in (0, 1), got {train_ratio!r}")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def check_text(name: str, value: Any) -> str:
    """Text the tokenizer encodes: a str (bytes must be decoded first: the encoding is the caller's)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    return value


def check_integer(name: str, value: Any, minimum: int) -> int:
    """An integer argument of the chapter-5 pipeline and loop (not a bool), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def token_windows(token_ids: Sequence[int], max_length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTDatasetV1's windows: input i is token_ids[s:s + max_length] for s = i * stride, its target
    the same window one token on; (n_windows, max_length) int64 arrays each.

    The book's loop, `range(0, len(token_ids) - max_length, stride)`, so a text needs at least
    max_length + 1 tokens (the book asserts it; here a ValueError says so)."""
    max_length = check_integer("max_length", max_length, 1)
    stride = check_integer("stride", stride, 1)
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one sequence, got shape {ids.shape}")
    if len(ids) <= max_length:
        raise ValueError(
            f"the text has {len(ids)} tokens: windows of max_length {max_length} need at least {max_length + 1}"
        )
    starts = np.arange(0, len(ids) - max_length, stride)
    offsets = np.arange(max_length)
    return ids[starts[:, None] + offsets], ids[starts[:, None] + offsets + 1]


class GPTDatasetV1:
    """The book's GPTDatasetV1 without torch: the text's windows as numpy int64 arrays; item i is
    (input_ids[i], target_ids[i]). The tokenizer encodes with `<|endoftext|>` allowed, as the book's."""

    def __init__(self, txt: str, tokenizer: Any, max_length: int, stride: int):
        token_ids = tokenizer.encode(check_text("txt", txt), allowed_special={"<|endoftext|>"})
        self.input_ids, self.target_ids = token_windows(token_ids, max_length, stride)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        return self.input_ids[idx], self.target_ids[idx]


def check_loader_args(batch_size: Any, num_workers: Any) -> tuple[int, int]:
    """The loader arguments both twins check alike (torch's DataLoader takes what passes)."""
    return check_integer("batch_size", batch_size, 1), check_integer("num_workers", num_workers, 0)


class BatchLoader:
    """Batches of a dataset's windows as (inputs, targets) numpy int64 arrays, as torch's DataLoader
    gives them: `len()` batches per pass, the last one short unless `drop_last`.

    Each pass (each `iter()`) takes an order of the windows: with `orders`, the next of those
    (a list the torch twin's sampler fills as its DataLoader draws them, so a pass here is the
    pass there; running out is an error, never a silent new order); else, with `shuffle`, a
    permutation drawn from numpy's generator seeded with `seed` (the i-th pass the same for the
    same seed); else 0, 1, 2, ...
    """

    def __init__(
        self,
        dataset: GPTDatasetV1,
        batch_size: int = 1,
        shuffle: bool = False,
        drop_last: bool = False,
        *,
        seed: int = 0,
        orders: Sequence[Sequence[int]] | None = None,
    ):
        if orders is not None and not shuffle:
            raise ValueError("orders replay a shuffled loader's passes: pass shuffle=True with them")
        self.dataset = dataset
        self.batch_size = check_integer("batch_size", batch_size, 1)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.orders = orders
        self.passes = 0  # iterations started
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> np.ndarray:
        n = len(self.dataset)
        if self.orders is not None:
            if self.passes >= len(self.orders):
                raise RuntimeError(
                    f"pass {self.passes + 1} over the data, but only {len(self.orders)} orders were "
                    "recorded to replay: the two training loops did not iterate alike"
                )
            order = np.asarray(self.orders[self.passes], dtype=np.int64)
            if sorted(order.tolist()) != list(range(n)):
                raise ValueError(f"order {self.passes} is not a permutation of the dataset's {n} windows")
            return order
        return self._rng.permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = self._order()
        self.passes += 1
        stop = len(self) * self.batch_size if self.drop_last else len(order)
        for lo in range(0, stop, self.batch_size):
            batch = order[lo : lo + self.batch_size]
            yield self.dataset.input_ids[batch], self.dataset.target_ids[batch]


__all__ = [
    "THE_VERDICT",
    "THE_VERDICT_SHA256",
    "BatchLoader",
    "GPTDatasetV1",
    "check_integer",
    "check_loader_args",
    "check_text",
    "split_text",
    "the_verdict",
    "token_windows",
]
