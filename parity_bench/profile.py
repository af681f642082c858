"""Traces for speed work: what `bench --profile DIR` writes beside its timings.

Per dtype, the first cell of the grid: the jitted Flax forward (and cached decoding, with
--decode) under `jax.profiler.trace`, which writes TensorBoard's profile plugin layout
(DIR/flax-DTYPE/plugins/profile/RUN/HOST.xplane.pb) and a Perfetto trace beside it
(perfetto_trace.json.gz); the torch twin's eager forward (and decoding) under `torch.profiler`, as a
Chrome trace (DIR/torch-DTYPE.json) that Perfetto and chrome://tracing open. Each is compiled and
warmed before it is traced, so the traces show the steady state the timings measure; the calls are
marked `forward` and `decode` (TraceAnnotation, record_function).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

import gpt_flax
import gpt_torch
from parity_tests.twins import token_batch

CALLS = 3  # forward calls traced per twin and dtype
DECODE_PROMPT = 8  # decoding's prompt, as the timed uncached loop's


def trace_files(folder: str | os.PathLike[str], dtype: str) -> dict[str, Path]:
    """Where `bench --profile` puts each twin's trace of `dtype` (the Flax one is a folder)."""
    return {"flax": Path(folder) / f"flax-{dtype}", "torch": Path(folder) / f"torch-{dtype}.json"}


def write_traces(
    folder: str | os.PathLike[str], twins: Any, dtype: str, ids: np.ndarray, decode: int
) -> dict[str, str]:
    """Trace both twins (`twins.torch`, `twins.flax`, in `dtype`) on `ids`, and `decode` new tokens
    with the KV cache if > 0; returns what was written, by twin."""
    where = trace_files(folder, dtype)
    flax_forward = gpt_flax.jit_forward(twins.flax, device=jax.devices("cpu")[0])
    prompt = token_batch(twins.flax.cfg, 1, DECODE_PROMPT, seed=7)
    jax.block_until_ready(flax_forward(ids))  # compiled and warmed outside the trace
    if decode:
        gpt_flax.generate_text_simple_cached(twins.flax, prompt, decode).block_until_ready()
    with jax.profiler.trace(where["flax"], create_perfetto_trace=True):
        with jax.profiler.TraceAnnotation("forward"):
            for _ in range(CALLS):
                jax.block_until_ready(flax_forward(ids))
        if decode:
            with jax.profiler.TraceAnnotation("decode"):
                gpt_flax.generate_text_simple_cached(twins.flax, prompt, decode).block_until_ready()
    tids, tprompt = torch.from_numpy(ids), torch.from_numpy(prompt)
    with torch.inference_mode():
        twins.torch(tids)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            with torch.profiler.record_function("forward"):
                for _ in range(CALLS):
                    twins.torch(tids)
            if decode:
                with torch.profiler.record_function("decode"):
                    gpt_torch.generate_text_simple_cached(twins.torch, tprompt, decode)
    prof.export_chrome_trace(str(where["torch"]))
    return {twin: str(path) for twin, path in where.items()}


def check_profile_dir(folder: str) -> None:
    """Refuse, before any work, a folder the traces cannot go to or that holds earlier ones."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--profile {folder!r} is a file, not a folder")
    if os.path.isdir(folder) and any(name.startswith(("flax-", "torch-")) for name in os.listdir(folder)):
        raise ValueError(f"--profile {folder!r} already holds traces: choose another folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--profile {folder!r}: {e.strerror}") from None


__all__ = ["CALLS", "check_profile_dir", "trace_files", "write_traces"]
