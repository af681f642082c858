"""Build both twins from one config, move weights with the production converters, compare per backend.

Inputs are made once in numpy; torch runs in `eval()` (or `train()` at drop_rate 0) under
`no_grad()`; JAX runs the jitted forward; matmuls are pinned to full float32 on both sides.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import platform
from collections.abc import Iterator, Sequence
from typing import Any

import flax
import jax
import numpy as np
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig

from .compare import Comparison, compare
from .table import Progress, format_table
from .tolerances import FP32_DUMMY_LOGITS, Bound

MODELS = {"dummy": ("DummyGPTModel", FP32_DUMMY_LOGITS)}
DIRECTIONS = ("torch->flax", "flax->torch")
MODES = ("eval", "train")


def _model_class(module: Any, kind: str):
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known models: {', '.join(MODELS)}")
    return getattr(module, MODELS[kind][0])


def build_torch(kind: str, cfg: GPTConfig, *, seed: int, **options: Any) -> torch.nn.Module:
    """The torch twin with torch's own init under `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return _model_class(gpt_torch, kind)(cfg, **options)


def build_flax(kind: str, cfg: GPTConfig, *, seed: int, **options: Any) -> nnx.Module:
    """The Flax twin with its torch-like init from `nnx.Rngs(seed)`."""
    return _model_class(gpt_flax, kind)(cfg, **options, rngs=nnx.Rngs(seed))


def set_mode(model: Any, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    model.eval() if mode == "eval" else model.train()


@dataclasses.dataclass(frozen=True)
class Backend:
    framework: str  # "torch" or "flax"
    device: Any  # a torch device string or a jax.Device

    @property
    def label(self) -> str:
        if self.framework == "flax":
            return f"flax/{self.device.platform}:{self.device.id}"
        return f"torch/{self.device}"


def discover_backends() -> tuple[list[Backend], list[tuple[str, str]]]:
    """Every backend this machine has, and each absent one with the reason it is skipped."""
    present: list[Backend] = []
    skipped: list[tuple[str, str]] = []
    for plat in ("cpu", "gpu", "tpu"):
        try:
            devices = jax.devices(plat)
        except RuntimeError:
            skipped.append((f"flax/{plat}", f"JAX {jax.__version__} sees no {plat.upper()} device"))
            continue
        present.extend(Backend("flax", d) for d in devices[:1])
    present.append(Backend("torch", "cpu"))
    if torch.cuda.is_available():
        present.append(Backend("torch", "cuda:0"))
    else:
        skipped.append(("torch/cuda", f"torch {torch.__version__} sees no CUDA device"))
    return present, skipped


@contextlib.contextmanager
def float32_matmuls() -> Iterator[str]:
    """Full-float32 matmuls on both sides: no TF32 on GPU, no bfloat16 passes on TPU."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with jax.default_matmul_precision("float32"):
            yield "float32 (jax.default_matmul_precision('float32'), torch 'highest')"
    finally:
        torch.set_float32_matmul_precision(before)


def run_torch(model: torch.nn.Module, ids: np.ndarray, device: str = "cpu") -> np.ndarray:
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    with torch.no_grad():
        return model(torch.from_numpy(ids).to(device)).float().cpu().numpy()


def run_flax(model: nnx.Module, ids: np.ndarray, device: jax.Device | None = None, *, jit: bool = True) -> np.ndarray:
    if jit:
        return np.asarray(gpt_flax.jit_forward(model, device=device)(ids))
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        return np.asarray(model(ids))


def run_backend(backend: Backend, model: Any, ids: np.ndarray) -> np.ndarray:
    if backend.framework == "torch":
        return run_torch(model, ids, backend.device)
    return run_flax(model, ids, backend.device)


@dataclasses.dataclass
class ParityRow:
    direction: str
    reference: str
    candidate: str
    comparison: Comparison


@dataclasses.dataclass
class ParityReport:
    config: GPTConfig
    model: str
    mode: str
    batch: int
    seq: int
    seed: int
    precision: str
    rows: list[ParityRow]
    skipped: list[tuple[str, str]]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.comparison.passed for r in self.rows)

    def failures(self) -> list[str]:
        return [f"{r.direction} {r.candidate}: {r.comparison.describe()}" for r in self.rows if not r.comparison.passed]

    def format_table(self) -> str:
        rows = [
            (r.direction, r.reference, r.candidate, r.comparison.max_abs, r.comparison.max_rel,
             f"{r.comparison.bound.atol:g}+{r.comparison.bound.rtol:g}|ref|",
             "pass" if r.comparison.passed else "FAIL")
            for r in self.rows
        ]
        table = format_table(
            ["direction", "reference", "candidate", "max |Δ|", "max rel |Δ|", "bound", "result"], rows
        )
        lines = [table]
        lines += [f"skipped {label}: {reason}" for label, reason in self.skipped]
        lines += [f"  {f}" for f in self.failures()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model,
            "mode": self.mode,
            "batch": self.batch,
            "seq": self.seq,
            "seed": self.seed,
            "matmul_precision": self.precision,
            "passed": self.passed,
            "rows": [
                {"direction": r.direction, "reference": r.reference, "candidate": r.candidate,
                 **r.comparison.to_json()}
                for r in self.rows
            ],
            "skipped": [{"backend": b, "reason": why} for b, why in self.skipped],
            "versions": versions(),
        }

    def write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
    }


def token_batch(cfg: GPTConfig, batch: int, seq: int, seed: int) -> np.ndarray:
    """Random ids in [0, vocab_size), made once in numpy and fed to both twins."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int64)


def run_parity(
    cfg: GPTConfig,
    *,
    model: str = "dummy",
    batch: int = 2,
    seq: int | None = None,
    seed: int = 0,
    mode: str = "eval",
    directions: Sequence[str] = DIRECTIONS,
    bound: Bound | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = False,
) -> ParityReport:
    """Build each direction's source twin, copy its weights into the other, compare logits per backend.

    The reference is the source twin on CPU; the candidates are the target twin on every device
    of its framework. Train mode is compared only at drop_rate 0 (the twins draw dropout masks
    from different generators).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(MODELS)}")
    seq = min(cfg.context_length, 128) if seq is None else seq
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "train" and cfg.drop_rate != 0:
        raise ValueError(
            f"train-mode parity needs drop_rate 0, got {cfg.drop_rate}: the twins draw dropout "
            "masks from different generators"
        )
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {d!r}")
    bound = bound or MODELS[model][1]
    options = options or {}
    ids = token_batch(cfg, batch, seq, seed)
    backends, skipped = discover_backends()
    cpu = {"torch": Backend("torch", "cpu"), "flax": Backend("flax", jax.devices("cpu")[0])}
    steps = sum(1 + sum(b.framework == d.split("->")[1] for b in backends) for d in directions)
    prog = Progress(steps, enabled=progress)
    rows: list[ParityRow] = []
    with float32_matmuls() as precision:
        for direction in directions:
            source, target = direction.split("->")
            src_model, dst_model = _twins(model, cfg, seed, source, options)
            set_mode(src_model, mode)
            set_mode(dst_model, mode)
            with prog.step(f"{direction}: {cpu[source].label} reference"):
                reference = run_backend(cpu[source], src_model, ids)
            for backend in backends:
                if backend.framework != target:
                    continue
                with prog.step(f"{direction}: {backend.label}"):
                    out = run_backend(backend, dst_model, ids)
                cmp = compare("logits", reference, out, bound)
                rows.append(ParityRow(direction, cpu[source].label, backend.label, cmp))
    return ParityReport(cfg, model, mode, batch, seq, seed, precision, rows, skipped)


def _twins(kind: str, cfg: GPTConfig, seed: int, source: str, options: dict[str, Any]):
    """(source, target) twins: the source with its own init, the target loaded from it."""
    tm = build_torch(kind, cfg, seed=seed, **options)
    fm = build_flax(kind, cfg, seed=seed, **options)
    if source == "torch":
        gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
        return tm, fm
    gpt_torch.load_state_dict(tm, gpt_flax.state_dict(fm))
    return fm, tm
