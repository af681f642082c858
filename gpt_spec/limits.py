"""How big a model or a generation may be: the ceiling of every size, and what fits in memory.

Both twins call these before they allocate, so both refuse the same too-large request with the
same ValueError, where the framework alone would abort the interpreter (XLA's checks) or raise
RuntimeError from deep inside an allocation. The memory estimate is one function of the config,
the same in both twins, so they refuse alike.

`available_memory` is looked up at each call (monkeypatch `gpt_spec.limits.available_memory` to
test a small machine without allocating anything).
"""

from __future__ import annotations

import os

import numpy as np

from .models import FinalNorm, ModelClass, check_model

# Token ids and positions are int32 in JAX (64-bit types are off by default): no size, id or
# position may exceed this. GPTConfig refuses any integer field beyond it.
MAX_SIZE = 2**31 - 1
MAX_SIZE_TEXT = "2147483647 (2**31 - 1: token ids and positions are int32 in JAX)"
FLOAT32_BYTES = 4


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have now, or None when unknown.

    Linux's MemAvailable (what can be allocated without swapping), else the physical memory.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def format_bytes(n: int) -> str:
    """1.3 PB, 22 GB, 512 B: decimal units, three significant digits."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB"):
        if value < 1000 or unit == "ZB":
            return f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """An exact count below a million (12,345), else three significant digits (3.2e14)."""
    if n < 1_000_000:
        return f"{n:,}"
    mantissa, exponent = f"{n:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def n_parameters(model: str, cfg, *, final_norm: str = FinalNorm.DUMMY) -> int:
    """Parameters of `model` (GPTModel or DummyGPTModel) built with `cfg`, in closed form (the
    sizes may be far too large to list): the sum over gpt_spec.layout.model_shapes."""
    e, v, c = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    embeddings_and_head = v * e + c * e + v * e
    if check_model(model) == ModelClass.DUMMY_GPT_MODEL:
        return embeddings_and_head + (2 * e if final_norm == FinalNorm.LAYER_NORM else 0)
    # Per block: W_query, W_key, W_value (+ biases), out_proj, ff (e -> 4e -> e), norm1, norm2.
    block = 4 * e * e + e + (3 * e if cfg.qkv_bias else 0) + 8 * e * e + 5 * e + 4 * e
    return embeddings_and_head + cfg.n_layers * block + 2 * e


# What each block costs beyond its parameters: its Python objects (modules, dicts, variables),
# measured at about 35 kB (torch) and 45 kB (Flax) for a TransformerBlock and 1-2 kB for a
# DummyTransformerBlock, rounded up. A DummyGPTModel's parameters do not grow with n_layers, so
# without this a config of 2**31 - 1 dummy blocks passed the check and then never finished building.
BLOCK_BYTES: dict[str, int] = {ModelClass.GPT_MODEL: 64_000, ModelClass.DUMMY_GPT_MODEL: 4_000}


def model_bytes(model: str, cfg, *, final_norm: str = FinalNorm.DUMMY) -> tuple[int, int]:
    """(parameters, bytes) a model needs once built, the same estimate for both twins: float32
    parameters, for GPTModel the torch twin's causal-mask buffers (one float32 (context_length,
    context_length) per block; the Flax twin builds its mask per call, but both twins count it,
    so both refuse alike), and each block's objects (BLOCK_BYTES)."""
    params = n_parameters(model, cfg, final_norm=final_norm)
    masks = cfg.n_layers * cfg.context_length**2 if model == ModelClass.GPT_MODEL else 0
    return params, (params + masks) * FLOAT32_BYTES + cfg.n_layers * BLOCK_BYTES[model]


def check_model_fits(model: str, cfg, *, final_norm: str = FinalNorm.DUMMY) -> None:
    """Refuse to build a model the memory available now cannot hold (skipped when unknown)."""
    params, needed = model_bytes(model, cfg, final_norm=final_norm)
    available = available_memory()
    if available is not None and needed > available:
        masks = ", causal masks" if model == ModelClass.GPT_MODEL else ""
        raise ValueError(
            f"{model} with {format_count(params)} parameters needs {format_bytes(needed)} (float32 "
            f"parameters{masks} and {format_bytes(BLOCK_BYTES[model])} per block) to build; "
            f"{format_bytes(available)} of memory is available"
        )


def check_output_fits(batch: int, prompt_len: int, max_new_tokens: int, dtype_name: str) -> None:
    """Refuse a generation whose output, (batch, prompt + max_new_tokens) ids of the prompt's
    dtype, is longer than a position can count or cannot fit in the memory available now."""
    length = prompt_len + max_new_tokens
    if length > MAX_SIZE:
        raise ValueError(
            f"a prompt of {prompt_len} and {max_new_tokens} new tokens make {length} tokens, more than {MAX_SIZE_TEXT}"
        )
    needed = batch * length * np.dtype(dtype_name).itemsize
    available = available_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"generating {max_new_tokens} new tokens at batch {batch} needs {format_bytes(needed)} "
            f"for the output ids alone ({batch} x {length} {dtype_name}); {format_bytes(available)} "
            "of memory is available"
        )


def check_cache_fits(batch: int, slots: int, cfg, itemsize: int) -> None:
    """Refuse a KV cache (keys and values of every block, batch x slots x emb_dim of `itemsize`
    bytes each) the memory available now cannot hold, before either framework allocates it."""
    needed = 2 * cfg.n_layers * batch * slots * cfg.emb_dim * itemsize
    available = available_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"a KV cache of batch {batch} x {slots} positions needs {format_bytes(needed)} (keys and values "
            f"of {cfg.n_layers} blocks, {cfg.emb_dim} wide, {itemsize} bytes each); {format_bytes(available)} "
            "of memory is available"
        )
