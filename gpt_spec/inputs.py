"""Checks on inputs shared by both twins, so both refuse the same input with the same words.

torch raises IndexError on an out-of-range id while JAX clamps it and returns plausible logits;
each twin reduces its input to (shape, dtype, min, max) and calls `check_token_ids`.
"""

from __future__ import annotations

import numbers

from .config import GPTConfig


def check_token_ids(
    shape: tuple[int, ...],
    dtype_kind: str,
    dtype_name: str,
    lo: int | None,
    hi: int | None,
    cfg: GPTConfig,
    *,
    check_length: bool = True,
) -> None:
    """Raise ValueError unless the ids are a non-empty (batch, seq_len) integer batch the model accepts.

    `dtype_kind` is numpy's kind letter ('i', 'u', 'b', 'f', ...). `lo`/`hi` are the smallest and
    largest id, or None when the values are not known on the host (inside a JAX trace). Prompts
    for generation pass `check_length=False`: generation crops them to the context.
    """
    if len(shape) != 2:
        raise ValueError(f"token ids must have shape (batch, seq_len), got shape {tuple(shape)}")
    if dtype_kind not in ("i", "u"):
        raise ValueError(f"token ids must be integers, got dtype {dtype_name}")
    batch, seq_len = shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"token ids must be non-empty, got shape {tuple(shape)}")
    if check_length and seq_len > cfg.context_length:
        raise ValueError(f"sequence length {seq_len} exceeds context_length {cfg.context_length}")
    if lo is not None and lo < 0:
        raise ValueError(f"token id {lo} is out of range [0, {cfg.vocab_size}) (vocab_size)")
    if hi is not None and hi >= cfg.vocab_size:
        raise ValueError(f"token id {hi} is out of range [0, {cfg.vocab_size}) (vocab_size)")


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_generation(prompt_len: int, max_new_tokens: object, context_size: object,
                     cfg: GPTConfig) -> tuple[int, int]:
    """Check generate_text_simple's arguments; return (max_new_tokens, context_size) as ints.

    The book's loop feeds the model the last `context_size` tokens at each step; it fails only if
    such a window ever outgrows the model's context_length. That is known before the first step,
    so both twins refuse it up front, with the message the forward would give.
    """
    max_new_tokens = _count("max_new_tokens", max_new_tokens, 0)
    context_size = _count("context_size", context_size, 1)
    if max_new_tokens:
        longest = min(context_size, prompt_len + max_new_tokens - 1)
        if longest > cfg.context_length:
            first = min(context_size, max(prompt_len, cfg.context_length + 1))
            raise ValueError(f"sequence length {first} exceeds context_length {cfg.context_length}")
    return max_new_tokens, context_size


def check_targets(input_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    """Next-token targets pair one-to-one with the inputs."""
    if tuple(target_shape) != tuple(input_shape):
        raise ValueError(
            f"targets have shape {tuple(target_shape)}, expected the inputs' shape {tuple(input_shape)}"
        )


DTYPES = ("float32", "bfloat16")  # the tiers both twins run in (see each twin's cast)


def check_dtype(dtype: object) -> str:
    """Refuse a dtype name neither twin casts to; return it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def check_cache_room(cached: int, new: int, cfg: GPTConfig) -> None:
    """A KV cache holds at most context_length positions (it does not slide)."""
    if cached + new > cfg.context_length:
        raise ValueError(
            f"sequence length {cached + new} exceeds context_length {cfg.context_length} "
            f"({cached} cached + {new} new tokens; the KV cache does not slide: reset it)"
        )


def check_cached_generation(prompt_len: int, max_new_tokens: object, context_size: object,
                            cfg: GPTConfig) -> tuple[int, int]:
    """Check generate_text_simple_cached's arguments; return (max_new_tokens, context_size).

    `context_size` None means cfg.context_length. The prompt is cropped to its last context_size
    tokens and then every token stays in the cache, so the result equals generate_text_simple's
    only while the window never has to slide: refused up front otherwise.
    """
    context_size = cfg.context_length if context_size is None else context_size
    max_new_tokens, context_size = check_generation(prompt_len, max_new_tokens, context_size, cfg)
    fed = min(prompt_len, context_size) + max(max_new_tokens - 1, 0)
    if max_new_tokens and fed > min(context_size, cfg.context_length):
        raise ValueError(
            f"cached generation would hold {fed} tokens, more than context_size "
            f"{min(context_size, cfg.context_length)}: the KV cache does not slide; use "
            "generate_text_simple, or fewer new tokens"
        )
    return max_new_tokens, context_size
