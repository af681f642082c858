"""Checks on token-id batches shared by both twins, so both refuse the same input with the same words.

torch raises IndexError on an out-of-range id while JAX clamps it and returns plausible logits;
each twin reduces its input to (shape, dtype, min, max) and calls `check_token_ids`.
"""

from __future__ import annotations

from .config import GPTConfig


def check_token_ids(
    shape: tuple[int, ...],
    dtype_kind: str,
    dtype_name: str,
    lo: int | None,
    hi: int | None,
    cfg: GPTConfig,
) -> None:
    """Raise ValueError unless the ids are a non-empty (batch, seq_len) integer batch the model accepts.

    `dtype_kind` is numpy's kind letter ('i', 'u', 'b', 'f', ...). `lo`/`hi` are the smallest and
    largest id, or None when the values are not known on the host (inside a JAX trace).
    """
    if len(shape) != 2:
        raise ValueError(f"token ids must have shape (batch, seq_len), got shape {tuple(shape)}")
    if dtype_kind not in ("i", "u"):
        raise ValueError(f"token ids must be integers, got dtype {dtype_name}")
    batch, seq_len = shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"token ids must be non-empty, got shape {tuple(shape)}")
    if seq_len > cfg.context_length:
        raise ValueError(
            f"sequence length {seq_len} exceeds context_length {cfg.context_length}"
        )
    if lo is not None and lo < 0:
        raise ValueError(f"token id {lo} is out of range [0, {cfg.vocab_size}) (vocab_size)")
    if hi is not None and hi >= cfg.vocab_size:
        raise ValueError(f"token id {hi} is out of range [0, {cfg.vocab_size}) (vocab_size)")
