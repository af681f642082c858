"""The benchmark: jit-compiled Flax forward vs torch eager vs torch.compile, same weights, same batch.

A program, not a test: fixed seed, dropout off, the first call (compilation) timed on its own,
untimed warm-ups, then `repeats` timed calls each ended by `block_until_ready()` (JAX) or a
synchronize (CUDA); the median is reported, with min and max as the spread. Speed is given as
tokens/s and as a ratio to torch eager measured in the same run.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, StateDict

from .harness import _split_bytes, build_flax, build_torch, float32_matmuls, token_batch, versions
from .table import Progress, format_table

BACKENDS = ("flax-jit", "torch-eager", "torch-compile")


@dataclasses.dataclass
class Timing:
    backend: str
    first_call_s: float  # compilation (and tracing) plus one run
    times_s: list[float]
    tokens: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s


@dataclasses.dataclass
class BenchReport:
    config: GPTConfig
    model: str
    batch: int
    seq: int
    repeats: int
    warmup: int
    precision: str
    device: str
    timings: list[Timing]
    id_check_s: float  # median host-side token-id check (both twins run it before each forward)
    memory: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per mesh, see _shard

    def _baseline(self) -> Timing | None:
        return next((t for t in self.timings if t.backend == "torch-eager"), None)

    def speedup(self, t: Timing) -> float | None:
        base = self._baseline()
        return base.median_s / t.median_s if base else None

    def format_table(self) -> str:
        rows = []
        for t in self.timings:
            sp = self.speedup(t)
            rows.append((t.backend, t.first_call_s * 1e3, t.median_s * 1e3, min(t.times_s) * 1e3,
                         max(t.times_s) * 1e3, t.tokens_per_s, "-" if sp is None else f"{sp:.2f}x"))
        head = (f"{self.model} {_describe(self.config)}, batch {self.batch} x {self.seq} tokens, "
                f"{self.device}, matmuls {self.precision.split(' ')[0]}, median of {self.repeats}")
        table = format_table(
            ["backend", "first call ms", "median ms", "min ms", "max ms", "tokens/s", "vs torch eager"], rows
        )
        flax = next((t for t in self.timings if t.backend == "flax-jit"), None)
        share = f" = {self.id_check_s / flax.median_s:.2%} of the flax-jit forward" if flax else ""
        check = f"host-side token-id check before dispatch: {self.id_check_s * 1e6:.1f} µs{share}"
        lines = [head, table, check]
        if self.memory:
            lines.append(format_table(
                ["mesh", "param bytes on one device, unsharded", "sharded: most on a device", "fraction",
                 "split params: unsharded", "split params: most on a device", "fraction"],
                [(m["mesh"], m["unsharded_bytes"], m["sharded_bytes_per_device"],
                  f"{m['sharded_bytes_per_device'] / m['unsharded_bytes']:.3f}", m["split_unsharded_bytes"],
                  m["split_bytes_per_device"], f"{m['split_bytes_per_device'] / m['split_unsharded_bytes']:.3f}")
                 for m in self.memory]))
            lines.append("(simulated devices share this machine's cores: sharded timings measure the "
                         "program, not a speed-up)" if jax.devices()[0].platform == "cpu" else "")
        return "\n".join(line for line in lines if line)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model,
            "batch": self.batch,
            "seq": self.seq,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "matmul_precision": self.precision,
            "device": self.device,
            "id_check_s": self.id_check_s,
            "memory": self.memory,
            "results": [
                {"backend": t.backend, "first_call_s": t.first_call_s, "median_s": t.median_s,
                 "min_s": min(t.times_s), "max_s": max(t.times_s), "times_s": t.times_s,
                 "tokens_per_s": t.tokens_per_s, "speedup_vs_torch_eager": self.speedup(t)}
                for t in self.timings
            ],
            "versions": versions(),
        }



def _describe(cfg: GPTConfig) -> str:
    return f"(emb {cfg.emb_dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size})"


def _time(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> float:
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def _shard(fm, text: str, memory: list[dict[str, Any]]):
    """A sharded copy of `fm` on mesh `text`, its forward, and its parameter memory per device."""
    from gpt_flax import sharding

    mesh = sharding.make_mesh(text)
    copy = build_flax("gpt", fm.cfg, seed=0)
    gpt_flax.load_state_dict(copy, gpt_flax.state_dict(fm))
    copy.eval()
    plan = sharding.shard_model(copy, mesh)
    split = {p for p, spec in plan.specs.items() if any(a is not None for a in spec)}
    split_total, split_most = _split_bytes(copy, split)
    memory.append({"mesh": text, "unsharded_bytes": sum(v.nbytes for v in gpt_flax.state_dict(fm).values()),
                   "sharded_bytes_per_device": max(sharding.param_bytes_per_device(copy).values()),
                   "split_unsharded_bytes": split_total, "split_bytes_per_device": split_most,
                   "replicated_for_divisibility": plan.describe()})
    forward = gpt_flax.jit_forward(copy)
    return (lambda ids: forward(sharding.shard_batch(ids, mesh))), jax.block_until_ready


def _forwards(model: str, cfg: GPTConfig, seed: int, backends: tuple[str, ...], options: dict[str, Any],
              weights: StateDict | None, meshes: list[str], memory: list[dict[str, Any]]):
    """Each backend's forward on the CPU, all on the same weights (`weights`, or torch's init)."""
    tm = build_torch(model, cfg, seed=seed, **options).eval()
    if weights is not None:
        gpt_torch.load_state_dict(tm, weights)
    out: dict[str, tuple[Callable[[np.ndarray], Any], Callable[[Any], Any]]] = {}
    if "flax-jit" in backends:
        fm = build_flax(model, cfg, seed=seed, **options)
        gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
        fm.eval()
        out["flax-jit"] = (gpt_flax.jit_forward(fm, device=jax.devices("cpu")[0]), jax.block_until_ready)
        for text in meshes:
            out[f"flax-jit@{text}"] = _shard(fm, text, memory)

    def torch_forward(module):
        def forward(ids: np.ndarray):
            with torch.inference_mode():
                return module(torch.from_numpy(ids))
        return forward

    no_sync = lambda x: x  # noqa: E731 - torch CPU ops return when done
    if "torch-eager" in backends:
        out["torch-eager"] = (torch_forward(tm), no_sync)
    if "torch-compile" in backends:
        out["torch-compile"] = (torch_forward(torch.compile(tm)), no_sync)
    return out


def run_bench(
    cfg: GPTConfig,
    *,
    model: str = "gpt",
    batch: int = 2,
    seq: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    backends: tuple[str, ...] = BACKENDS,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    weights: StateDict | None = None,
    meshes: list[str] | None = None,
    progress: bool = True,
) -> BenchReport:
    """Time each backend's forward on one random batch; see the module docstring for the method."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    ids = token_batch(cfg, batch, seq, seed)
    # Data-dependent checks are skipped inside torch.compile's graph; make them once here.
    gpt_torch.model.check_ids(torch.from_numpy(ids), cfg)
    meshes = list(meshes or [])
    if meshes and ("flax-jit" not in backends or model != "gpt"):
        raise ValueError("meshes need the flax-jit backend and the gpt model")
    memory: list[dict[str, Any]] = []
    order = [b for b in backends if b == "flax-jit"] + [f"flax-jit@{m}" for m in meshes] + [
        b for b in backends if b != "flax-jit"]
    prog = Progress(len(order) + 1, enabled=progress)
    with prog.step(f"building {model} twins on {_describe(cfg)}" + (f", sharding on {', '.join(meshes)}" if meshes else "")):
        forwards = _forwards(model, cfg, seed, backends, options or {}, weights, meshes, memory)
    timings = []
    with float32_matmuls() as precision:
        for name in order:
            forward, sync = forwards[name]
            with prog.step(f"{name}: first call, {warmup} warm-up, {repeats} timed"):
                first = _time(lambda: forward(ids), sync)
                for _ in range(warmup):
                    sync(forward(ids))
                times = [_time(lambda: forward(ids), sync) for _ in range(repeats)]
            timings.append(Timing(name, first, times, batch * seq))
    device = f"CPU, {torch.get_num_threads()} torch threads"
    return BenchReport(cfg, model, batch, seq, repeats, warmup, precision, device, timings,
                       _time_id_check(ids, cfg), memory)


def _time_id_check(ids: np.ndarray, cfg: GPTConfig, calls: int = 200) -> float:
    """Median cost of the Flax twin's host-side id check (shape, dtype, min/max) on this batch."""
    check = gpt_flax.model.check_ids
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        check(ids, cfg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
