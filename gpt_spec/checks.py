"""The twins' checks, one import away: both twins call these, so both refuse the same input with the
same words.

torch raises IndexError on an out-of-range id while JAX clamps it and returns plausible logits;
each twin reduces its input to (shape, dtype, min, max) and calls `check_token_ids`. The checks of
what fits in memory (`gpt_spec.limits`) and of a state dict (`gpt_spec.tensors`) live beside what
they measure and are imported here, so a twin takes every check from this module.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TypeVar

import numpy as np

from .config import GPTConfig
from .limits import check_cache_fits, check_model_fits, check_output_fits
from .randomness import check_seed
from .tensors import check_state_dict

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """What generation knows of a model that has no GPTConfig (any model with the book's interface:
    ids (batch, seq) -> logits (batch, seq, vocab)): its vocabulary and context sizes, each None
    when the model does not tell (then the ids' values, or the window, go unchecked)."""

    vocab_size: int | None
    context_length: int | None


def check_token_ids(
    shape: tuple[int, ...],
    dtype_kind: str,
    dtype_name: str,
    lo: int | None,
    hi: int | None,
    cfg: GPTConfig | ModelLimits,
    *,
    check_length: bool = True,
) -> None:
    """Raise ValueError unless the ids are a non-empty (batch, seq_len) integer batch the model accepts.

    `dtype_kind` is numpy's kind letter ('i', 'u', 'b', 'f', ...); every integer dtype is
    accepted (the twins convert where their framework needs it). `lo`/`hi` are the smallest and
    largest id, exact (uint64 included), or None when the values are not known on the host
    (inside a JAX trace). Prompts for generation pass `check_length=False`: generation crops them
    to the context. A `ModelLimits` size that is None is not checked.
    """
    if len(shape) != 2:
        raise ValueError(f"token ids must have shape (batch, seq_len), got shape {tuple(shape)}")
    if dtype_kind not in ("i", "u"):
        raise ValueError(f"token ids must be integers, got dtype {dtype_name}")
    batch, seq_len = shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"token ids must be non-empty, got shape {tuple(shape)}")
    if check_length and cfg.context_length is not None and seq_len > cfg.context_length:
        raise ValueError(f"sequence length {seq_len} exceeds context_length {cfg.context_length}")
    if cfg.vocab_size is None:
        return
    if lo is not None and lo < 0:
        raise ValueError(f"token id {lo} is out of range [0, {cfg.vocab_size}) (vocab_size)")
    if hi is not None and hi >= cfg.vocab_size:
        raise ValueError(f"token id {hi} is out of range [0, {cfg.vocab_size}) (vocab_size)")


def check_id_dtype(dtype_name: str, vocab_size: int) -> None:
    """Generation writes new ids in the prompt's dtype: refuse a dtype that cannot hold every id of
    the vocabulary (it would wrap them, e.g. id 35000 as int16 -30536)."""
    if np.iinfo(dtype_name).max < vocab_size - 1:
        raise ValueError(
            f"token ids of dtype {dtype_name} cannot hold every id of the vocabulary (up to "
            f"{vocab_size - 1}, vocab_size {vocab_size}): generation would wrap them; pass int32 "
            "or int64 ids"
        )


def check_logits(shape: tuple[int, ...], batch: int, seq_len: int, vocab_size: int | None) -> None:
    """What generation needs of any model's output: (batch, seq_len, vocab) logits for (batch,
    seq_len) ids, over the vocabulary the model's embedding takes (a larger head would make ids
    the next step cannot embed: torch raises, JAX clamps)."""
    if len(shape) != 3 or tuple(shape[:2]) != (batch, seq_len) or shape[2] == 0:
        raise ValueError(
            "the model must return logits of shape (batch, seq_len, vocab_size) for ids of shape (batch, seq_len)"
        )
    if vocab_size is not None and shape[2] != vocab_size:
        raise ValueError(
            f"the model returned logits over {shape[2]} ids, but its vocabulary holds {vocab_size} (vocab_size)"
        )


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_generation(
    prompt_len: int, max_new_tokens: object, context_size: object, cfg: GPTConfig | ModelLimits
) -> tuple[int, int]:
    """Check generate_text_simple's arguments; return (max_new_tokens, context_size) as ints.

    The book's loop feeds the model the last `context_size` tokens at each step; it fails only if
    such a window ever outgrows the model's context_length. That is known before the first step,
    so both twins refuse it up front, with the message the forward would give.
    """
    max_new_tokens = _count("max_new_tokens", max_new_tokens, 0)
    context_size = _count("context_size", context_size, 1)
    if max_new_tokens and cfg.context_length is not None:
        longest = min(context_size, prompt_len + max_new_tokens - 1)
        if longest > cfg.context_length:
            first = min(context_size, max(prompt_len, cfg.context_length + 1))
            raise ValueError(f"sequence length {first} exceeds context_length {cfg.context_length}")
    return max_new_tokens, context_size


def check_targets(input_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    """Next-token targets pair one-to-one with the inputs."""
    if tuple(target_shape) != tuple(input_shape):
        raise ValueError(f"targets have shape {tuple(target_shape)}, expected the inputs' shape {tuple(input_shape)}")


DTYPES = ("float32", "bfloat16")  # the tiers both twins run, train and are timed in (see each twin's cast)
# ... and those they compute a forward in: float16 too (no training tier: without loss scaling its
# gradients underflow).
FORWARD_DTYPES = (*DTYPES, "float16")


def check_dtype(dtype: object, allowed: tuple[str, ...] = FORWARD_DTYPES) -> str:
    """Refuse a dtype name neither twin casts to (or not `allowed` here); return it."""
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return dtype


def check_trainable(dtype: str) -> None:
    """Refuse an optimizer for parameters of a forward-only tier (float16)."""
    if dtype not in DTYPES:
        raise ValueError(
            f"a {dtype} model does not train here ({dtype} is a forward-only tier: without loss scaling "
            f"its gradients underflow): cast it to {' or '.join(DTYPES)} first"
        )


def check_kv_cache(batch_size: object, max_len: object, cfg: GPTConfig) -> tuple[int | None, int]:
    """Check reset_kv_cache's arguments; return (batch_size, or None for the first cached call's
    batch; max_len, default context_length)."""
    if batch_size is not None:
        batch_size = _count("batch_size", batch_size, 1)
    if max_len is None:
        return batch_size, cfg.context_length
    max_len = _count("max_len", max_len, 1)
    if max_len > cfg.context_length:
        raise ValueError(f"max_len {max_len} exceeds context_length {cfg.context_length}")
    return batch_size, max_len


def check_cache_call(cached_batch: int | None, batch: int, num_tokens: int, slots: int) -> None:
    """A cached call's batch must be the one its KV cache holds (None: not allocated yet, any batch)
    and its new tokens must fit in the cache's slots."""
    if cached_batch is not None and cached_batch != batch:
        raise ValueError(f"the KV cache holds batch size {cached_batch}, got {batch}: reset it")
    if num_tokens > slots:
        raise ValueError(f"{num_tokens} new tokens do not fit in the KV cache's {slots} slots")


def check_cache_dropout(rate: float) -> None:
    """Refuse a cached call while a dropout drops (`rate` > 0: train mode). The twins' caches attend
    over differently shaped key sets (torch the filled slots, Flax all of them, masked), so the same
    element index falls on different weights and no dropout mask can be the other twin's; and a KV
    cache serves inference."""
    if rate > 0:
        raise ValueError(
            f"a cached call with dropout on (train mode, drop rate {rate:g}): the KV cache is for "
            "inference; call model.eval() first"
        )


def unpickable_logits(step: int, row: int) -> ValueError:
    """The refusal of a generation step whose logits give no token to pick: a NaN or +inf among them
    (softmax and sampling turn it into NaN, argmax into an arbitrary token) or nothing but -inf."""
    return ValueError(
        f"the logits of generation step {step} (batch row {row}) hold NaN or +inf, or nothing but -inf: "
        "no token to pick (weights that hold NaN, or a forward that overflowed)"
    )


def bad_device(device: object, known: bool) -> ValueError:
    """The refusal of a `device` argument: not a device or a device name (`known` False), or a name
    of no device this framework has here."""
    if known:
        return ValueError(f"device {device!r} names no device this framework has here")
    return ValueError(
        f"device must be a device or a device name such as 'cpu', got {device!r} ({type(device).__name__})"
    )


def foreign_optimizer() -> ValueError:
    """The refusal of an optimizer that does not hold the model's own parameters."""
    return ValueError("the optimizer does not hold this model's parameters: make one with adamw(model)")


def stale_optimizer(made_for: str, now: str) -> ValueError:
    """The refusal of an optimizer made before the model was cast to another dtype."""
    return ValueError(
        f"the optimizer was made for this model's {made_for} parameters, which are {now} now: "
        "make a new one with adamw(model) after cast"
    )


def check_last_only(last_only: bool, return_activations: bool) -> None:
    """The forward's `last_only` (logits at the last position only) cannot give every stage's
    activations, which are kept for every position."""
    if last_only and return_activations:
        raise ValueError("last_only and return_activations cannot be combined: the activations cover every position")


def check_cache_room(cached: int, new: int, cfg: GPTConfig, max_len: int | None = None) -> None:
    """A cached call may take its positions up to context_length (position embeddings end there,
    whether or not the cache slides) and up to the `max_len` reset_kv_cache gave it. Without
    cfg.kv_window_size the cache holds every position and never slides; with it, the cache keeps
    the last kv_window_size positions, so no call may bring more new tokens than that."""
    window = cfg.kv_window_size
    if cached + new > cfg.context_length:
        why = "the KV cache does not slide" if window is None else "the KV cache's window slides, its positions do not"
        raise ValueError(
            f"sequence length {cached + new} exceeds context_length {cfg.context_length} "
            f"({cached} cached + {new} new tokens; {why}: reset it)"
        )
    if max_len is not None and cached + new > max_len:
        raise ValueError(
            f"sequence length {cached + new} exceeds the KV cache's max_len {max_len} "
            f"({cached} cached + {new} new tokens; reset it with a larger max_len)"
        )
    if window is not None and new > window:
        raise ValueError(
            f"{new} new tokens do not fit in the KV cache's window of {window} positions "
            f"(kv_window_size): feed at most {window} tokens per cached call"
        )


def default_context_size(
    prompt_len: int, max_new_tokens: object, context_size: _T | None, cfg: GPTConfig | ModelLimits
) -> _T | int:
    """`context_size` None means the model's context_length, or, where the model does not tell
    it, the whole sequence (nothing is cropped)."""
    if context_size is not None:
        return context_size
    if cfg.context_length is not None:
        return cfg.context_length
    return max(prompt_len + _count("max_new_tokens", max_new_tokens, 0) - 1, 1)


def check_cached_generation(
    prompt_len: int, max_new_tokens: object, context_size: object, cfg: GPTConfig | ModelLimits
) -> tuple[int, int]:
    """Check generate_text_simple_cached's arguments; return (max_new_tokens, context_size).

    `context_size` None means cfg.context_length (see `default_context_size`). The prompt is
    cropped to its last context_size tokens and fed once, then one token per step. Without
    cfg.kv_window_size every token stays in the cache, so the result equals generate_text_simple's
    only while the window never has to slide: refused up front otherwise. With it (the book's
    sliding cache) the cache keeps the last kv_window_size positions: the cropped prompt must fit
    in that window, and the positions, which do not slide, must stay within context_length.
    """
    context_size = default_context_size(prompt_len, max_new_tokens, context_size, cfg)
    max_new_tokens, context_size = check_generation(prompt_len, max_new_tokens, context_size, cfg)
    prompt = min(prompt_len, context_size)
    fed = prompt + max(max_new_tokens - 1, 0)
    if not max_new_tokens:
        return max_new_tokens, context_size
    if not isinstance(cfg, GPTConfig) or cfg.kv_window_size is None:
        room = context_size if cfg.context_length is None else min(context_size, cfg.context_length)
        if fed > room:
            raise ValueError(
                f"cached generation would hold {fed} tokens, more than context_size {room}: the KV "
                "cache does not slide; use generate_text_simple, or fewer new tokens"
            )
        return max_new_tokens, context_size
    window = cfg.kv_window_size
    if prompt > window:
        raise ValueError(
            f"the prompt's {prompt} tokens do not fit in the KV cache's window of {window} positions "
            f"(kv_window_size): crop it with a context_size of at most {window}"
        )
    if fed > cfg.context_length:
        raise ValueError(
            f"cached generation would need {fed} positions, more than context_length {cfg.context_length}: "
            "the KV cache's window slides, its positions do not; use generate_text_simple, or fewer "
            "new tokens"
        )
    return max_new_tokens, context_size


def _real(name: str, value: object) -> float:
    """`value` as a float (inf for an int too large for one); ValueError unless it is a real number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _non_negative(name: str, value: object, minimum: float = 0.0, why: str = "") -> float:
    number = _real(name, value)
    if not math.isfinite(number) or number < minimum:
        bound = f">= {minimum:g}{why}" if minimum else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def check_sampling(
    temperature: object, top_k: object, eos_id: object, parity_seed: object, vocab_size: int | None
) -> tuple[float, int | None, int | None]:
    """Check the book's generate's sampling arguments; return (temperature, top_k, eos_id).

    temperature 0 is greedy; top_k keeps the k largest logits (1 <= k <= vocab_size); eos_id, an id
    of the vocabulary, stops generation. parity_seed is None or an integer in [0, 2**32)."""
    temperature = _non_negative("temperature", temperature)
    if top_k is not None:
        top_k = _count("top_k", top_k, 1)
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"top_k must be <= vocab_size {vocab_size}, got {top_k}")
    if eos_id is not None:
        eos_id = _count("eos_id", eos_id, 0)
        if vocab_size is not None and eos_id >= vocab_size:
            raise ValueError(f"eos_id must be < vocab_size {vocab_size}, got {eos_id}")
    if parity_seed is not None:
        check_seed(parity_seed)
    return temperature, top_k, eos_id


# eps below float32's smallest normal is 0 in float32 (XLA flushes subnormals; torch keeps them), and
# Adam divides 0 by eps wherever a gradient is 0: NaN weights in one twin, or in both.
ADAM_MIN_EPS = float(np.finfo(np.float32).tiny)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_adamw(
    lr: object, weight_decay: object, betas: object, eps: object
) -> tuple[float, float, tuple[float, float], float]:
    """Both twins' `adamw` call this first, so both refuse the same arguments with the same words
    (torch.optim's own checks and optax's, which has none, differ): lr and weight_decay finite
    real numbers >= 0, eps finite and at least float32's smallest normal, betas a pair of finite
    real numbers each in [0, 1), and the step's scalars within float32's range. numpy scalars are
    real numbers; bools, None and strings are not.
    Returns (lr, weight_decay, betas, eps) as Python floats."""
    lr = _non_negative("lr", lr)
    weight_decay = _non_negative("weight_decay", weight_decay)
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    pair = []
    for i, beta in enumerate(betas):
        name = f"betas[{i}]"
        number = _real(name, beta)
        if not 0.0 <= number < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
        pair.append(number)
    eps = _non_negative("eps", eps, ADAM_MIN_EPS, " (float32's smallest normal)")
    # The update's scalars are float32 in both frameworks: past float32's range torch raises
    # RuntimeError mid-step and optax turns every weight inf. The first step's size is the largest.
    if lr / (1.0 - pair[0]) > FLOAT32_MAX:
        raise ValueError(
            f"lr / (1 - betas[0]), Adam's first step size, must be at most {FLOAT32_MAX!r} "
            f"(float32's largest), got {lr / (1.0 - pair[0])!r}"
        )
    if lr * weight_decay > FLOAT32_MAX:
        raise ValueError(
            f"lr * weight_decay must be at most {FLOAT32_MAX!r} (float32's largest), got {lr * weight_decay!r}"
        )
    return lr, weight_decay, (pair[0], pair[1]), eps


__all__ = [
    "ADAM_MIN_EPS",
    "DTYPES",
    "FORWARD_DTYPES",
    "ModelLimits",
    "bad_device",
    "check_adamw",
    "check_cache_call",
    "check_cache_dropout",
    "check_cache_fits",
    "check_cache_room",
    "check_cached_generation",
    "check_dtype",
    "check_generation",
    "check_id_dtype",
    "check_kv_cache",
    "check_last_only",
    "check_logits",
    "check_model_fits",
    "check_output_fits",
    "check_sampling",
    "check_state_dict",
    "check_targets",
    "check_token_ids",
    "check_trainable",
    "default_context_size",
    "foreign_optimizer",
    "stale_optimizer",
    "unpickable_logits",
]
