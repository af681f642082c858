"""The benchmark: the jitted Flax forward vs torch eager vs torch.compile on the same weights and
batches, measured against what this machine can do, in the same run.

A program, not a test. Method:
- Forward: for every dtype x batch x sequence length of the grid, each backend is called once
  (compilation, timed on its own), `warmup` more times untimed, then `repeats` times, each call
  ended by `block_until_ready()` (torch on the CPU returns when done). Median, min and max.
- Roofline references, measured in the same run: this machine's GEMM throughput (a 2048^3
  matmul in XLA and in torch, per dtype, each call a sample, sampled before and after the
  forwards; the reference is the best sample of either library, since interference only slows a
  GEMM, with the medians beside it) and its read bandwidth (a jitted sum over 512 MiB, the better
  of XLA and torch). A forward's achieved FLOP/s (gpt_spec.flops.forward_flops: every matmul, the
  full T x T attention matmuls included, the masked half too) is reported as a fraction of that
  GEMM throughput.
- Decoding (`decode` > 0): greedy generation of `decode` new tokens with the KV cache over a grid
  of batch sizes and prompt lengths (the Flax twin in every cell, the torch twin at batch 1), and
  at batch 1 from an 8-token prompt without the cache (the book's loop, re-running the whole
  sequence per token: timed over `decode_uncached` tokens only). A cached generation's time less
  that of a 1-token generation from the same prompt (the prefill and the first pick) is the time
  of its `decode - 1` decoding steps. Limits: a step reads every weight once and each row's cache
  (tokens/s <= read bandwidth x batch / bytes per step) and does 2 FLOPs per weight and cached
  value per row (tokens/s <= GEMM throughput / FLOPs per token); the lower one binds.

Long on purpose: run_bench is one sequence (build, sample the GEMM, time each cell, decode, sample
again) whose steps share the twins and the progress; the references are in roofline.py and the
decoding figures in decoding.py.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, ModelKind
from gpt_spec.checks import DTYPES, check_dtype
from gpt_spec.flops import forward_flops
from parity_tests.environment import versions
from parity_tests.mesh import split_bytes
from parity_tests.progress import Progress, Steps, silent
from parity_tests.twins import build_flax, build_torch, float32_matmuls, token_batch

from . import profile
from .decoding import DECODE_BATCHES, DECODE_PROMPT, DECODE_PROMPTS, DecodeTiming, decode_limits
from .roofline import (
    GEMM_N,
    READ_BYTES,
    best_gemm,
    cpu_description,
    gemm_flops,
    hugepages,
    read_bandwidth,
    time_call,
)

BACKENDS = ("flax-jit", "torch-eager", "torch-compile")


# --- what the machine can do -------------------------------------------------------------------


# --- results -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    backend: str
    dtype: str
    batch: int
    seq: int
    first_call_s: float  # compilation (and tracing) plus one run
    times_s: list[float]
    flops: int  # of one forward, counted analytically

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.median_s


@dataclasses.dataclass
class BenchReport:
    config: GPTConfig
    model: str
    repeats: int
    warmup: int
    precision: str
    device: str
    gemm: dict[str, dict[str, list[float]]]  # dtype -> {"xla": samples, "torch": samples}, FLOP/s
    gemm_n: int
    timings: list[Timing]
    id_check_s: float  # median host-side token-id check (both twins run it before each forward)
    read_bw: dict[str, float] = dataclasses.field(default_factory=dict)  # bytes/s, see read_bandwidth
    decode: list[DecodeTiming] = dataclasses.field(default_factory=list)
    memory: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per mesh, see _shard
    cpu: str = ""  # model name and vector extensions (see cpu_description)
    hugepages: str = ""  # see hugepages()
    notes: list[str] = dataclasses.field(default_factory=list)
    traces: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # dtype -> twin -> path

    def gemm_throughput(self, dtype: str) -> float:
        """The machine's GEMM FLOP/s in `dtype`: the best sample of either library."""
        return best_gemm(self.gemm[dtype])

    def fraction_of_gemm(self, t: Timing) -> float:
        return t.flops_per_s / self.gemm_throughput(t.dtype)

    def _same_cell(self, t: Timing, backend: str) -> Timing | None:
        return next(
            (
                u
                for u in self.timings
                if u.backend == backend and (u.dtype, u.batch, u.seq) == (t.dtype, t.batch, t.seq)
            ),
            None,
        )

    def speedup(self, t: Timing, over: str = "torch-eager") -> float | None:
        base = self._same_cell(t, over)
        return base.median_s / t.median_s if base else None

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "matmul_precision": self.precision,
            "device": self.device,
            "gemm_flops_per_s": {
                dtype: {
                    "throughput": self.gemm_throughput(dtype),
                    "reference": "the best sample of either library",
                    "n": self.gemm_n,
                    **{lib: {"median": statistics.median(v), "samples": v} for lib, v in s.items()},
                }
                for dtype, s in self.gemm.items()
            },
            "read_bytes_per_s": {**self.read_bw, "throughput": max(self.read_bw.values())} if self.read_bw else None,
            "id_check_s": self.id_check_s,
            "memory": self.memory,
            "results": [
                {
                    "backend": t.backend,
                    "dtype": t.dtype,
                    "batch": t.batch,
                    "seq": t.seq,
                    "first_call_s": t.first_call_s,
                    "median_s": t.median_s,
                    "min_s": min(t.times_s),
                    "max_s": max(t.times_s),
                    "times_s": t.times_s,
                    "tokens_per_s": t.tokens_per_s,
                    "flops": t.flops,
                    "flops_per_s": t.flops_per_s,
                    "fraction_of_gemm": self.fraction_of_gemm(t),
                    "speedup_vs_torch_eager": self.speedup(t),
                    "speedup_vs_torch_compile": self.speedup(t, "torch-compile"),
                }
                for t in self.timings
            ],
            "decode": [
                {
                    "twin": d.twin,
                    "dtype": d.dtype,
                    "kv_cache": d.cache,
                    "batch": d.batch,
                    "prompt_tokens": d.prompt,
                    "new_tokens": d.new_tokens,
                    "first_call_s": d.first_call_s,
                    "prefill_s": d.prefill_s,
                    "time_s": d.time_s,
                    "steps": d.steps,
                    "tokens_per_s": d.tokens_per_s,
                    "limit_bandwidth_tokens_per_s": d.limit_bandwidth,
                    "limit_compute_tokens_per_s": d.limit_compute,
                    "limit_tokens_per_s": d.limit_tokens_per_s,
                    "binds": d.binds,
                    "fraction_of_limit": d.fraction_of_limit,
                }
                for d in self.decode
            ],
            "cpu": self.cpu,
            "malloc": self.hugepages,
            "notes": self.notes,
            "traces": self.traces,
            "versions": versions(),
        }


def describe_config(cfg: GPTConfig) -> str:
    return f"(emb {cfg.emb_dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size})"


# --- the runs ------------------------------------------------------------------------------------


def _shard(fm, text: str, memory: list[dict[str, Any]]):
    """A sharded copy of `fm` on mesh `text`, its forward, and its parameter memory per device."""
    from gpt_flax import sharding

    mesh = sharding.make_mesh(text)
    twin = build_flax(ModelKind.GPT, fm.cfg, seed=0)
    gpt_flax.load_state_dict(twin, gpt_flax.state_dict(fm))
    twin.eval()
    plan = sharding.shard_model(twin, mesh)
    split = {p for p, spec in plan.specs.items() if any(a is not None for a in spec)}
    split_total, split_most = split_bytes(twin, split)
    memory.append(
        {
            "mesh": text,
            "unsharded_bytes": sum(v.nbytes for v in gpt_flax.state_dict(fm).values()),
            "sharded_bytes_per_device": max(sharding.param_bytes_per_device(twin).values()),
            "split_unsharded_bytes": split_total,
            "split_bytes_per_device": split_most,
            "replicated_for_divisibility": plan.describe(),
        }
    )
    forward = gpt_flax.jit_forward(twin)
    return (lambda ids: forward(sharding.shard_batch(ids, mesh))), jax.block_until_ready


@dataclasses.dataclass
class _Twins:
    torch: torch.nn.Module
    flax: Any


def _build_twins(
    model: str,
    cfg: GPTConfig,
    seed: int,
    dtypes: tuple[str, ...],
    options: Mapping[str, Any],
    weights: Mapping[str, np.ndarray] | None,
) -> dict[str, _Twins]:
    """Both twins per dtype, all on the same weights (`weights`, or torch's init), in eval mode."""
    tm = build_torch(model, cfg, seed=seed, **options).eval()
    if weights is not None:
        gpt_torch.load_state_dict(tm, weights)
    sd = gpt_torch.state_dict(tm)
    out = {}
    for dtype in dtypes:
        fm = build_flax(model, cfg, seed=seed, **options)
        gpt_flax.load_state_dict(fm, sd)
        fm.eval()
        twin = tm if dtype == "float32" else gpt_torch.cast(copy.deepcopy(tm), dtype)
        out[dtype] = _Twins(twin, gpt_flax.cast(fm, dtype))
    return out


def _forwards(twins: _Twins, backends: tuple[str, ...]):
    def torch_forward(module):
        def forward(ids: np.ndarray):
            with torch.inference_mode():
                return module(torch.from_numpy(ids))

        return forward

    no_sync = lambda x: x  # noqa: E731 - torch CPU ops return when done
    out: dict[str, tuple[Callable[[np.ndarray], Any], Callable[[Any], Any]]] = {}
    if "flax-jit" in backends:
        out["flax-jit"] = (gpt_flax.jit_forward(twins.flax, device=jax.devices("cpu")[0]), jax.block_until_ready)
    if "torch-eager" in backends:
        out["torch-eager"] = (torch_forward(twins.torch), no_sync)
    if "torch-compile" in backends:
        out["torch-compile"] = (torch_forward(torch.compile(twins.torch)), no_sync)
    return out


def _time_decode(
    twins: _Twins,
    cfg: GPTConfig,
    model: str,
    dtype: str,
    decode: int,
    decode_uncached: int,
    batches: list[int],
    prompts: list[int],
    read_bw: float,
    gemm: float,
    repeats: int,
    prog: Steps,
) -> list[DecodeTiming]:
    def cached(twin: str, prompt: np.ndarray):
        if twin == "torch":
            tprompt = torch.from_numpy(prompt)
            return lambda n: gpt_torch.generate_text_simple_cached(twins.torch, tprompt, n)
        return lambda n: gpt_flax.generate_text_simple_cached(twins.flax, prompt, n).block_until_ready()

    out = []
    for batch in batches:
        for n_prompt in prompts:
            prompt = token_batch(cfg, batch, n_prompt, seed=7)
            for twin in ("torch", "flax") if batch == 1 else ("flax",):
                run = cached(twin, prompt)
                with prog.step(
                    f"decode {dtype} {twin} with KV cache, batch {batch}, prompt {n_prompt}: {decode} tokens "
                    f"(first call, {repeats} timed) and 1 token (the prefill)",
                    phase="cached decoding grid",
                ):
                    with torch.inference_mode():
                        first = time_call(lambda: run(decode), lambda x: x)
                        run(1)  # compiles the 1-token generation's own shapes
                        prefill = statistics.median([time_call(lambda: run(1), lambda x: x) for _ in range(repeats)])
                        whole = statistics.median([time_call(lambda: run(decode), lambda x: x) for _ in range(repeats)])
                limits = decode_limits(cfg, model, dtype, batch, n_prompt, decode, read_bw, gemm)
                steps = decode - 1
                # Two medians' difference: with few steps, noise can make it zero or negative.
                steps_s = whole - prefill if whole > prefill else None
                out.append(
                    DecodeTiming(twin, dtype, True, batch, n_prompt, decode, first, steps_s, steps, prefill, *limits)
                )
    prompt = token_batch(cfg, 1, DECODE_PROMPT, seed=7)
    n = min(decode, decode_uncached)
    uncached = {
        "torch": lambda: gpt_torch.generate_text_simple(twins.torch, torch.from_numpy(prompt), n, cfg.context_length),
        "flax": lambda: gpt_flax.generate_text_simple(twins.flax, prompt, n, cfg.context_length).block_until_ready(),
    }
    for twin, run_uncached in uncached.items():
        with prog.step(f"decode {dtype} {twin} without KV cache: {n} tokens, first call + {repeats} timed"):
            with torch.inference_mode():
                first = time_call(run_uncached, lambda x: x)
                time_s = statistics.median([time_call(run_uncached, lambda x: x) for _ in range(repeats)])
        limits = decode_limits(cfg, model, dtype, 1, DECODE_PROMPT, n, read_bw, gemm)
        out.append(DecodeTiming(twin, dtype, False, 1, DECODE_PROMPT, n, first, time_s, n, None, *limits))
    return out


def _check_grid(batches: list[int], seqs: list[int], dtypes: tuple[str, ...], cfg: GPTConfig) -> None:
    if not batches or not seqs:
        raise ValueError("the grid needs at least one batch size and one sequence length")
    bad = [s for s in seqs if s > cfg.context_length]
    if bad:
        raise ValueError(f"sequence length {bad[0]} exceeds context_length {cfg.context_length}")
    if not dtypes:
        raise ValueError(f"the grid needs at least one dtype of {', '.join(DTYPES)}")
    for d in dtypes:
        check_dtype(d, DTYPES)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """The benchmark's grid (batch sizes x sequence lengths x dtypes, per backend), its timing
    (calls timed, warm-up calls, the GEMM reference's size) and the decoding grid (`decode` new
    tokens, 0 for none, over batch sizes x prompt lengths)."""

    model: str = ModelKind.GPT
    batches: Sequence[int] = (4,)
    seqs: Sequence[int] = (256,)
    dtypes: Sequence[str] = ("float32",)
    repeats: int = 5
    warmup: int = 1
    backends: Sequence[str] = BACKENDS
    seed: int = 0
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    decode: int = 0
    decode_uncached: int = 32
    decode_batches: Sequence[int] = DECODE_BATCHES
    decode_prompts: Sequence[int] = DECODE_PROMPTS
    decode_repeats: int = 1
    gemm_n: int = GEMM_N
    profile: str | None = None  # a folder: traces of both twins there (parity_bench/profile.py)


def run_bench(
    cfg: GPTConfig,
    opts: BenchOptions = BenchOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    meshes: Sequence[str] | None = None,
    progress: Progress = silent,
) -> BenchReport:
    """Time each backend's forward over the grid (and decoding if `decode`); see the module docstring."""
    model, batches, seqs, dtypes = opts.model, opts.batches, opts.seqs, tuple(opts.dtypes)
    repeats, warmup, backends, seed, options = (
        opts.repeats,
        opts.warmup,
        tuple(opts.backends),
        opts.seed,
        opts.model_options,
    )
    decode, decode_uncached, decode_repeats, gemm_n = (
        opts.decode,
        opts.decode_uncached,
        opts.decode_repeats,
        opts.gemm_n,
    )
    decode_batches, decode_prompts = opts.decode_batches, opts.decode_prompts
    for name, value, least in [
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
        ("decode", decode, 0),
        ("decode_uncached", decode_uncached, 1),
        ("decode_repeats", decode_repeats, 1),
        ("gemm_n", gemm_n, 1),
    ]:
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    batches, seqs, dtypes = list(batches), list(seqs), tuple(dict.fromkeys(dtypes))
    _check_grid(batches, seqs, dtypes, cfg)
    meshes = list(meshes or [])
    if meshes and ("flax-jit" not in backends or model != ModelKind.GPT):
        raise ValueError("meshes need the flax-jit backend and the gpt model")
    notes: list[str] = []
    decode_batches, decode_prompts = list(dict.fromkeys(decode_batches)), list(dict.fromkeys(decode_prompts))
    if decode == 1:
        raise ValueError(
            "decode must be 0 (off) or at least 2, got 1: the first new token comes with the prefill, "
            "so a 1-token generation leaves no decoding step to time"
        )
    if decode:
        if model != ModelKind.GPT:
            raise ValueError("decoding needs the gpt model (the dummy model has no KV cache)")
        if DECODE_PROMPT + decode - 1 > cfg.context_length:
            raise ValueError(
                f"decoding {decode} tokens after a {DECODE_PROMPT}-token prompt exceeds "
                f"context_length {cfg.context_length}"
            )
        if not decode_batches or not decode_prompts or min(decode_batches + decode_prompts) < 1:
            raise ValueError("the decoding grid needs positive batch sizes and prompt lengths")
        fits = [p for p in decode_prompts if p + decode - 1 <= cfg.context_length]
        if len(fits) < len(decode_prompts):
            left_out = ", ".join(str(p) for p in decode_prompts if p not in fits)
            notes.append(
                f"decoding grid: prompt(s) {left_out} left out: with {decode} new tokens they pass "
                f"context_length {cfg.context_length}"
            )
        decode_prompts = fits or [DECODE_PROMPT]
    cells = [(d, b, s) for d in dtypes for b in batches for s in seqs]
    n_steps = (
        3
        + len(cells) * len(backends)
        + len(meshes) * len(batches) * len(seqs) * ("float32" in dtypes)
        + (1 + len(dtypes) * (2 + len(decode_prompts) * (len(decode_batches) + (1 in decode_batches))) if decode else 0)
        + (len(dtypes) if opts.profile else 0)
    )
    prog = progress(n_steps)
    with prog.step(f"building {model} twins on {describe_config(cfg)} in {', '.join(dtypes)}"):
        twins = _build_twins(model, cfg, seed, dtypes, options or {}, weights)
        forwards = {d: _forwards(twins[d], backends) for d in dtypes}
        memory: list[dict[str, Any]] = []
        if meshes and "float32" in dtypes:
            for text in meshes:
                forwards["float32"][f"flax-jit@{text}"] = _shard(twins["float32"].flax, text, memory)
    gemm: dict[str, dict[str, list[float]]] = {d: {"xla": [], "torch": []} for d in dtypes}

    def sample_gemm(when: str):
        with prog.step(f"GEMM throughput, {gemm_n}^3 matmul in XLA and torch, {', '.join(dtypes)} ({when})"):
            for d in dtypes:
                for lib, values in gemm_flops(d, gemm_n).items():
                    gemm[d][lib] += values

    timings = []
    with float32_matmuls() as precision:
        sample_gemm("before the forwards")
        for dtype, batch, seq in cells:
            ids = token_batch(cfg, batch, seq, seed)
            # Data-dependent checks are skipped inside torch.compile's graph; make them once here.
            gpt_torch.model.check_ids(torch.from_numpy(ids), cfg)
            for name, (forward, sync) in forwards[dtype].items():
                with prog.step(
                    f"{dtype} {batch}x{seq} {name}: first call, {warmup} warm-up, {repeats} timed", phase="forward grid"
                ):
                    first = time_call(lambda: forward(ids), sync)
                    for _ in range(warmup):
                        sync(forward(ids))
                    times = [time_call(lambda: forward(ids), sync) for _ in range(repeats)]
                flops = forward_flops(cfg, batch, seq, ModelKind(model).model_class)
                timings.append(Timing(name, dtype, batch, seq, first, times, flops))
        sample_gemm("after the forwards")
        read_bw: dict[str, float] = {}
        decoded: list[DecodeTiming] = []
        if decode:
            with prog.step(f"read bandwidth: sum over {READ_BYTES >> 20} MiB in XLA and torch"):
                read_bw = read_bandwidth()
            for dtype in dtypes:
                decoded += _time_decode(
                    twins[dtype],
                    cfg,
                    model,
                    dtype,
                    decode,
                    decode_uncached,
                    decode_batches,
                    decode_prompts,
                    max(read_bw.values()),
                    best_gemm(gemm[dtype]),
                    decode_repeats,
                    prog,
                )
            unmeasured = sum(d.time_s is None for d in decoded)
            if unmeasured:
                notes.append(
                    f"cached decoding: the steps after the prefill took no measurable time in {unmeasured} "
                    f"cell(s) (a {decode}-token generation timed no longer than a 1-token one), so they have "
                    "no rate; more new tokens time more steps"
                )
        traces: dict[str, dict[str, str]] = {}
        for dtype in dtypes if opts.profile else ():
            with prog.step(f"traces of both twins, {dtype} {batches[0]}x{seqs[0]}" + (", decoding" if decode else "")):
                ids = token_batch(cfg, batches[0], seqs[0], seed)
                traces[dtype] = profile.write_traces(opts.profile or "", twins[dtype], dtype, ids, decode)
    device = f"CPU, {torch.get_num_threads()} torch threads"
    check_ids = token_batch(cfg, batches[0], seqs[0], seed)
    return BenchReport(
        cfg,
        model,
        repeats,
        warmup,
        precision,
        device,
        gemm,
        gemm_n,
        timings,
        _time_id_check(check_ids, cfg),
        read_bw,
        decoded,
        memory,
        cpu_description(),
        hugepages(),
        notes,
        traces,
    )


def _time_id_check(ids: np.ndarray, cfg: GPTConfig, calls: int = 200) -> float:
    """Median cost of the Flax twin's host-side id check (shape, dtype, min/max) on this batch."""
    check = gpt_flax.model.check_ids
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        check(ids, cfg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
