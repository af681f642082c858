"""Build both twins from one config, move weights with the production converters, compare per backend.

Inputs are made once in numpy; torch runs in `eval()` (or `train()` at drop_rate 0) under
`no_grad()`; JAX runs the jitted forward; matmuls are pinned to full float32 on both sides.
Every stage of the forward is compared (embeddings, each block, final norm, logits), so a report
names the first stage where the twins part.
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
from gpt_spec import GPTConfig, StateDict, check_dtype
from gpt_spec.checkpoint import Checkpoint, infer_config, load_checkpoint

from .compare import Comparison, compare
from .table import Progress, format_table
from .tolerances import (
    ADAMW_FLIP_ENVELOPE,
    ADAMW_NOISE_ONLY,
    ADAMW_OUTLIER_FRACTION,
    ADAMW_WEIGHTS,
    BF16_FORWARD,
    FP32_FORWARD,
    GRADS,
    LOSS,
    Bound,
)

MODELS = {"gpt": "GPTModel", "dummy": "DummyGPTModel"}
MODEL_KINDS = {cls: kind for kind, cls in MODELS.items()}
DIRECTIONS = ("torch->flax", "flax->torch")
MODES = ("eval", "train")
DTYPE_BOUNDS = {"float32": FP32_FORWARD, "bfloat16": BF16_FORWARD}  # each tier's bound


def _model_class(module: Any, kind: str):
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known models: {', '.join(MODELS)}")
    return getattr(module, MODELS[kind])


def build_torch(kind: str, cfg: GPTConfig, *, seed: int, **options: Any) -> torch.nn.Module:
    """The torch twin with torch's own init under `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return _model_class(gpt_torch, kind)(cfg, **options)


def build_flax(kind: str, cfg: GPTConfig, *, seed: int, **options: Any) -> nnx.Module:
    """The Flax twin with its torch-like init from `nnx.Rngs(seed)`."""
    return _model_class(gpt_flax, kind)(cfg, **options, rngs=nnx.Rngs(seed))


def build_pair(kind: str, cfg: GPTConfig, *, source: str, seed: int = 0, mode: str = "eval",
               **options: Any) -> tuple[torch.nn.Module, nnx.Module]:
    """(torch twin, flax twin) holding the same weights: the `source` twin's own init, copied
    into the other by the production converters."""
    if source not in ("torch", "flax"):
        raise ValueError(f"source must be torch or flax, got {source!r}")
    tm = build_torch(kind, cfg, seed=seed, **options)
    fm = build_flax(kind, cfg, seed=seed, **options)
    if source == "torch":
        gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    else:
        gpt_torch.load_state_dict(tm, gpt_flax.state_dict(fm))
    set_mode(tm, mode)
    set_mode(fm, mode)
    return tm, fm


def read_checkpoint(path: str, *, config: GPTConfig | None = None) -> Checkpoint:
    """Any checkpoint the twins read: canonical or HF GPT-2 safetensors (a file or an HF snapshot
    directory), or a torch.save state dict (.pth/.pt, read with weights_only=True)."""
    if str(path).endswith((".pth", ".pt")):
        sd = gpt_torch.read_torch_file(path)
        return Checkpoint(sd, config or infer_config(sd, source=f"checkpoint {path!r}"), layout="torch.save")
    return load_checkpoint(path, config=config)


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


def _numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.detach().float().cpu().numpy()
    return np.asarray(tree)


def run_torch(model: torch.nn.Module, ids: np.ndarray, device: str = "cpu", *,
              activations: bool = False) -> Any:
    """Logits (or every stage's output) as numpy, computed on `device` under no_grad."""
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    with torch.no_grad():
        return _numpy(model(torch.from_numpy(ids).to(device), return_activations=activations))


def run_flax(model: nnx.Module, ids: np.ndarray, device: jax.Device | None = None, *,
             jit: bool = True, activations: bool = False) -> Any:
    """Logits (or every stage's output) as numpy: jitted by default, or op by op."""
    if jit:
        return _numpy(gpt_flax.jit_forward(model, device=device, return_activations=activations)(ids))
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        return _numpy(model(ids, return_activations=activations))


def run_backend(backend: Backend, model: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    if backend.framework == "torch":
        return run_torch(model, ids, backend.device, activations=True)
    return run_flax(model, ids, backend.device, activations=True)


def compare_stages(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                   bound: Bound) -> list[Comparison]:
    """One comparison per forward stage, in the reference's order (jax.jit returns dicts sorted)."""
    if set(reference) != set(candidate):
        raise ValueError(f"stages differ: {sorted(candidate)} vs reference {sorted(reference)}")
    return [compare(name, reference[name], candidate[name], bound) for name in reference]


@dataclasses.dataclass
class ParityRow:
    direction: str
    reference: str
    candidate: str
    stages: list[Comparison]  # drop_emb, trf_blocks.0, ..., final_norm, out_head (the logits)

    @property
    def logits(self) -> Comparison:
        return self.stages[-1]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.stages)

    @property
    def first_failure(self) -> Comparison | None:
        return next((c for c in self.stages if not c.passed), None)


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
    dtype: str = "float32"

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def failures(self) -> list[str]:
        out = []
        for r in self.rows:
            first = r.first_failure
            if first is not None:
                out.append(f"{r.direction} {r.candidate}: first stage past its bound: {first.describe()}")
        return out

    def format_table(self) -> str:
        rows = [
            (r.direction, r.reference, r.candidate, r.logits.max_abs, r.logits.max_rel,
             max(c.max_abs for c in r.stages), r.logits.bound.describe(),
             "pass" if r.passed else "FAIL")
            for r in self.rows
        ]
        table = format_table(
            ["direction", "reference", "candidate", "logits max |Δ|", "max rel |Δ|",
             "any stage max |Δ|", "bound", "result"], rows,
        )
        lines = [table]
        lines += [f"skipped {label}: {reason}" for label, reason in self.skipped]
        lines += [f"  {f}" for f in self.failures()]
        return "\n".join(lines)

    def format_layers(self) -> str:
        """Max |Δ| of every stage (rows) for every backend compared (columns)."""
        headers = ["stage"] + [f"{r.direction} {r.candidate}" for r in self.rows] + ["result"]
        rows = []
        for i, name in enumerate(c.name for c in self.rows[0].stages):
            cells = [r.stages[i] for r in self.rows]
            rows.append([name, *(c.max_abs for c in cells),
                         "pass" if all(c.passed for c in cells) else "FAIL"])
        return format_table(headers, rows)

    def plot(self, path: str) -> None:
        """Max |Δ| per stage on a log scale, one line per backend, with each stage's bound."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [c.name for c in self.rows[0].stages]
        x = np.arange(len(names))
        nonzero = [c.max_abs for r in self.rows for c in r.stages if c.max_abs > 0]
        floor = min(nonzero, default=1e-7) / 10  # where exact agreement (|Δ| = 0) is drawn
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.2))
        for r in self.rows:
            values = np.array([c.max_abs for c in r.stages])
            ax.plot(x, np.where(values > 0, values, np.nan), marker="o", label=f"{r.direction} {r.candidate}")
            zero = values == 0
            if zero.any():
                ax.scatter(x[zero], np.full(zero.sum(), floor), marker="v", color="black", zorder=3)
        if any(c.max_abs == 0 for r in self.rows for c in r.stages):
            ax.scatter([], [], marker="v", color="black", label="|Δ| = 0 (bit-identical)")
        ax.plot(x, [c.largest_allowed for c in self.rows[0].stages], color="grey", linestyle="--",
                label="bound at the largest |reference|")
        ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("max |Δ| between twins")
        ax.set_title(f"{self.model} {self.mode} {self.dtype}, batch {self.batch} x {self.seq}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model,
            "mode": self.mode,
            "dtype": self.dtype,
            "batch": self.batch,
            "seq": self.seq,
            "seed": self.seed,
            "matmul_precision": self.precision,
            "passed": self.passed,
            "rows": [
                {"direction": r.direction, "reference": r.reference, "candidate": r.candidate,
                 "passed": r.passed,
                 "first_failure": r.first_failure.name if r.first_failure else None,
                 "logits": r.logits.to_json(),
                 "stages": [c.to_json() for c in r.stages]}
                for r in self.rows
            ],
            "skipped": [{"backend": b, "reason": why} for b, why in self.skipped],
            "versions": versions(),
        }


def write_json(data: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
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


def _check_args(model: str, mode: str, cfg: GPTConfig) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join(MODELS)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "train" and cfg.drop_rate != 0:
        raise ValueError(
            f"train-mode parity needs drop_rate 0, got {cfg.drop_rate}: the twins draw dropout "
            "masks from different generators"
        )


def run_parity(
    cfg: GPTConfig,
    *,
    model: str = "gpt",
    batch: int = 2,
    seq: int | None = None,
    seed: int = 0,
    mode: str = "eval",
    directions: Sequence[str] = DIRECTIONS,
    bound: Bound | None = None,
    options: dict[str, Any] | None = None,
    weights: StateDict | None = None,
    progress: bool = False,
    dtype: str = "float32",
) -> ParityReport:
    """Build each direction's source twin, copy its weights into the other, compare every stage.

    The reference is the source twin on CPU; the candidates are the target twin on every device
    of its framework. Train mode is compared only at drop_rate 0 (the twins draw dropout masks
    from different generators). With `weights` (a checkpoint's state dict) both twins hold those
    instead of an init. With `dtype` "bfloat16" both twins run cast to bfloat16 (the weights
    rounded identically) and the bound defaults to that tier's.
    """
    _check_args(model, mode, cfg)
    bound = DTYPE_BOUNDS[check_dtype(dtype)] if bound is None else bound
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {d!r}")
    seq = min(cfg.context_length, 128) if seq is None else seq
    ids = token_batch(cfg, batch, seq, seed)
    backends, skipped = discover_backends()
    cpu = {"torch": Backend("torch", "cpu"), "flax": Backend("flax", jax.devices("cpu")[0])}
    steps = 1 + sum(1 + sum(b.framework == d.split("->")[1] for b in backends) for d in directions)
    prog = Progress(steps, enabled=progress)
    rows: list[ParityRow] = []
    with float32_matmuls() as precision:
        with prog.step("building both twins, each with its own init"):
            twin = {"torch": build_torch(model, cfg, seed=seed, **(options or {})),
                    "flax": build_flax(model, cfg, seed=seed, **(options or {}))}
            if weights is not None:
                own = {"torch": weights, "flax": weights}
            else:
                own = {"torch": gpt_torch.state_dict(twin["torch"]), "flax": gpt_flax.state_dict(twin["flax"])}
            for m in twin.values():
                set_mode(m, mode)
            gpt_torch.cast(twin["torch"], dtype)  # loads below round into this dtype
            gpt_flax.cast(twin["flax"], dtype)
        load = {"torch": gpt_torch.load_state_dict, "flax": gpt_flax.load_state_dict}
        for direction in directions:
            source, target = direction.split("->")
            with prog.step(f"{direction}: copy {source}'s init into both, {cpu[source].label} reference"):
                load[source](twin[source], own[source])  # back to its own init after an earlier direction
                load[target](twin[target], own[source])
                reference = run_backend(cpu[source], twin[source], ids)
            for backend in backends:
                if backend.framework != target:
                    continue
                with prog.step(f"{direction}: {backend.label}"):
                    out = run_backend(backend, twin[target], ids)
                rows.append(ParityRow(direction, cpu[source].label, backend.label,
                                      compare_stages(reference, out, bound)))
    return ParityReport(cfg, model, mode, batch, seq, seed, precision, rows, skipped, dtype)


# --- training: loss, gradients and AdamW steps ---------------------------------------------------


@dataclasses.dataclass
class WeightCheck:
    """The twins' weights after `step` AdamW steps, judged by the rule in tolerances.py."""

    step: int
    tensors: list[Comparison]  # against ADAMW_WEIGHTS, per parameter
    envelope: float  # ADAMW_FLIP_ENVELOPE * lr * step
    allowed_outliers: int

    @property
    def n_elements(self) -> int:
        return sum(c.size for c in self.tensors)

    @property
    def n_outliers(self) -> int:
        """Elements past ADAMW_WEIGHTS, not counting the noise-only parameters."""
        return sum(c.n_beyond for c in self.tensors if not _noise_only(c.name))

    @property
    def max_abs(self) -> float:
        return max(c.max_abs for c in self.tensors)

    @property
    def passed(self) -> bool:
        finite = all(not c.problem for c in self.tensors)
        return finite and self.n_outliers <= self.allowed_outliers and self.max_abs <= self.envelope

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "passed": self.passed, "max_abs": self.max_abs,
                "envelope": self.envelope, "n_outliers": self.n_outliers,
                "allowed_outliers": self.allowed_outliers, "n_elements": self.n_elements,
                "tensors": [c.to_json() for c in self.tensors]}


def _noise_only(name: str) -> bool:
    return name.endswith(ADAMW_NOISE_ONLY)


@dataclasses.dataclass
class TrainingReport:
    config: GPTConfig
    model: str
    batch: int
    seq: int
    lr: float
    weight_decay: float
    precision: str
    loss: Comparison
    grads: list[Comparison]
    step_losses: list[tuple[float, float]]  # (torch, flax) loss at each step, before its update
    weights: list[WeightCheck]

    @property
    def noise_grads_ok(self) -> bool:
        """Gradients zero in exact arithmetic agree and are at the rounding floor in both twins,
        which is why their AdamW updates are held to the envelope only."""
        return all(c.passed and c.ref_max + c.max_abs <= GRADS.atol
                   for c in self.grads if _noise_only(c.name))

    @property
    def passed(self) -> bool:
        return (self.loss.passed and all(g.passed for g in self.grads) and self.noise_grads_ok
                and all(w.passed for w in self.weights))

    def format_table(self) -> str:
        signal = [c for c in self.grads if not _noise_only(c.name)]
        noise = [c for c in self.grads if _noise_only(c.name)]
        worst = max(signal, key=lambda c: c.max_rel)
        rows = [
            ("loss", self.loss.max_abs, LOSS.describe(), "pass" if self.loss.passed else "FAIL"),
            (f"gradients, {len(signal)} tensors (largest max|Δ|/max|g|: {worst.max_rel:.2g}, "
             f"{worst.name.removeprefix('grad ')})", max(c.max_abs for c in signal),
             GRADS.describe(), "pass" if all(c.passed for c in signal) else "FAIL"),
        ]
        if noise:
            rows.append((f"gradients zero in exact arithmetic, {len(noise)} tensors (max |g| "
                         f"{max(c.ref_max for c in noise):.2g})", max(c.max_abs for c in noise),
                         f"|g| and |Δ| <= {GRADS.atol:g}", "pass" if self.noise_grads_ok else "FAIL"))
        for w in self.weights:
            rows.append((f"weights after {w.step} AdamW step(s): {w.n_outliers} of {w.n_elements} "
                         f"elements past the bound (<= {w.allowed_outliers})", w.max_abs,
                         f"{ADAMW_WEIGHTS.describe()}, all <= {w.envelope:.2g}",
                         "pass" if w.passed else "FAIL"))
        lines = [format_table(["what", "max |Δ|", "bound", "result"], rows)]
        lines += [f"  {g.describe()}" for g in self.grads if not g.passed]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "model": self.model, "batch": self.batch,
                "seq": self.seq, "lr": self.lr, "weight_decay": self.weight_decay,
                "matmul_precision": self.precision, "passed": self.passed,
                "noise_only_gradients_at_rounding_floor": self.noise_grads_ok,
                "loss": self.loss.to_json(), "grads": [g.to_json() for g in self.grads],
                "step_losses": [list(p) for p in self.step_losses],
                "weights": [w.to_json() for w in self.weights], "versions": versions()}


def _weights_check(step: int, ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], lr: float,
                   outlier_fraction: float) -> WeightCheck:
    tensors = [compare(name, ref[name], cand[name], ADAMW_WEIGHTS) for name in ref]
    n = sum(v.size for k, v in ref.items() if not _noise_only(k))
    return WeightCheck(step, tensors, ADAMW_FLIP_ENVELOPE * lr * step, int(outlier_fraction * n))


def run_training_parity(
    cfg: GPTConfig,
    *,
    model: str = "gpt",
    batch: int = 2,
    seq: int = 16,
    steps: int = 10,
    seed: int = 0,
    lr: float = 4e-4,
    weight_decay: float = 0.1,
    outlier_fraction: float = ADAMW_OUTLIER_FRACTION,
    weights: StateDict | None = None,
    progress: bool = False,
) -> TrainingReport:
    """Loss and every gradient on one batch, then `steps` AdamW steps on fresh batches in both twins.

    Both twins train in train() mode at drop_rate 0 from the torch twin's init (or `weights`).
    Inputs and next-token targets are windows of random ids, as the book's data loader makes them.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = cfg.replace(drop_rate=0.0)
    prog = Progress(2 + steps, enabled=progress)
    rng = np.random.default_rng(seed)

    def next_batch():
        data = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int64)
        return data[:, :-1], data[:, 1:]

    with float32_matmuls() as precision:
        with prog.step("building both twins"):
            tm, fm = build_pair(model, cfg, source="torch", seed=seed, mode="train")
            if weights is not None:
                gpt_torch.load_state_dict(tm, weights)
                gpt_flax.load_state_dict(fm, weights)
        with prog.step("loss and gradients"):
            x, y = next_batch()
            t_loss, t_grads = gpt_torch.loss_and_grads(tm, torch.from_numpy(x), torch.from_numpy(y))
            f_loss, f_grads = gpt_flax.loss_and_grads(fm, x, y)
        loss = compare("loss", np.float64(t_loss), np.float64(f_loss), LOSS)
        grads = [compare(f"grad {name}", t_grads[name], f_grads[name], GRADS) for name in t_grads]
        t_opt, f_opt = gpt_torch.adamw(tm, lr=lr, weight_decay=weight_decay), gpt_flax.adamw(fm, lr=lr, weight_decay=weight_decay)
        step_losses, weights = [], []
        for step in range(1, steps + 1):
            with prog.step(f"AdamW step {step}"):
                x, y = next_batch()
                step_losses.append((gpt_torch.train_step(tm, t_opt, torch.from_numpy(x), torch.from_numpy(y)),
                                    gpt_flax.train_step(fm, f_opt, x, y)))
            if step in (1, steps):
                weights.append(_weights_check(step, gpt_torch.state_dict(tm), gpt_flax.state_dict(fm),
                                              lr, outlier_fraction))
    return TrainingReport(cfg, model, batch, seq, lr, weight_decay, precision, loss, grads,
                          step_losses, weights)


# --- sharding: the Flax twin on a device mesh against itself on one device ----------------------


@dataclasses.dataclass
class MeshRow:
    mesh: str
    logits: Comparison
    tokens_equal: bool  # greedy generation, 4 tokens from each row's first 2
    grads: list[Comparison]
    weights: WeightCheck
    bytes_per_device: int  # the most parameter bytes any device holds
    bytes_total: int  # all parameters, as one device holds them
    bytes_split_per_device: int  # of the parameters a rule split: the most any device holds
    bytes_split_total: int
    notes: list[str]

    @property
    def passed(self) -> bool:
        return (self.logits.passed and self.tokens_equal and all(g.passed for g in self.grads)
                and self.weights.passed)


@dataclasses.dataclass
class ShardingReport:
    config: GPTConfig
    batch: int
    seq: int
    precision: str
    rows: list[MeshRow]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def format_table(self) -> str:
        rows = [
            (r.mesh, r.logits.max_abs, "same" if r.tokens_equal else "DIFFER", max(g.max_abs for g in r.grads), r.weights.max_abs,
             f"{r.bytes_per_device / r.bytes_total:.3f}", f"{r.bytes_split_per_device / r.bytes_split_total:.3f}",
             "pass" if r.passed else "FAIL")
            for r in self.rows
        ]
        lines = [format_table(["mesh (data x model)", "logits max |Δ|", "greedy tokens", "grads max |Δ|",
                               "weights after AdamW max |Δ|", "param bytes/device", "split params bytes/device",
                               "result"], rows)]
        lines.append("bytes/device: the largest share of one device, as a fraction of the unsharded parameters")
        for r in self.rows:
            lines += [f"  {r.mesh}: {n}" for n in r.notes]
            lines += [f"  {r.mesh}: {c.describe()}" for c in [r.logits, *r.grads] if not c.passed]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "batch": self.batch, "seq": self.seq,
                "matmul_precision": self.precision, "passed": self.passed,
                "meshes": [{"mesh": r.mesh, "passed": r.passed, "logits": r.logits.to_json(),
                            "generated_tokens_equal": r.tokens_equal,
                            "grads": [g.to_json() for g in r.grads], "weights": r.weights.to_json(),
                            "param_bytes_per_device": r.bytes_per_device, "param_bytes_total": r.bytes_total,
                            "split_param_bytes_per_device": r.bytes_split_per_device,
                            "split_param_bytes_total": r.bytes_split_total, "notes": r.notes}
                           for r in self.rows],
                "devices": [str(d) for d in jax.devices()], "versions": versions()}


def _flax_step_results(fm, opt, x, y, ids):
    """Logits, greedy tokens, gradients and the weights after one AdamW step of a Flax model."""
    logits = np.asarray(gpt_flax.jit_forward(fm)(ids))
    fm.eval()
    tokens = np.asarray(gpt_flax.generate_text_simple(fm, ids[:, :2], 4, fm.cfg.context_length))
    fm.train()
    _, grads = gpt_flax.loss_and_grads(fm, x, y)
    gpt_flax.train_step(fm, opt, x, y)
    return logits, tokens, grads, gpt_flax.state_dict(fm)


def run_sharding_parity(
    cfg: GPTConfig,
    meshes: Sequence[str],
    *,
    batch: int = 8,
    seq: int = 16,
    seed: int = 0,
    lr: float = 4e-4,
    weights: StateDict | None = None,
    progress: bool = False,
) -> ShardingReport:
    """For each mesh: the Flax twin's logits, gradients and weights after one AdamW step, sharded,
    against the same model on one device (train mode at drop_rate 0, float32 matmuls)."""
    from gpt_flax import sharding

    cfg = cfg.replace(drop_rate=0.0)
    seq = min(seq, cfg.context_length - 1) if cfg.context_length > 1 else 1
    prog = Progress(1 + len(meshes), enabled=progress)
    data = token_batch(cfg, batch, seq + 1, seed)
    x, y = data[:, :-1], data[:, 1:]
    rows = []
    with float32_matmuls() as precision:
        with prog.step("one device: logits, gradients, one AdamW step"):
            fm = build_flax("gpt", cfg, seed=seed)
            if weights is not None:
                gpt_flax.load_state_dict(fm, weights)
            start = gpt_flax.state_dict(fm)
            fm.train()
            ref_logits, ref_tokens, ref_grads, ref_after = _flax_step_results(fm, gpt_flax.adamw(fm, lr=lr), x, y, x)
            total = sum(v.nbytes for v in start.values())
        for text in meshes:
            with prog.step(f"mesh {text}: shard, logits, gradients, one AdamW step"):
                mesh = sharding.make_mesh(text)
                fm = build_flax("gpt", cfg, seed=seed)
                gpt_flax.load_state_dict(fm, start)
                fm.train()
                opt = gpt_flax.adamw(fm, lr=lr)
                plan = sharding.shard_model(fm, mesh, opt)
                per_device = sharding.param_bytes_per_device(fm)
                split = {p for p, s in plan.specs.items() if any(a is not None for a in s)}
                split_total, split_most = _split_bytes(fm, split)
                xs, ys = sharding.shard_batch(x, mesh), sharding.shard_batch(y, mesh)
                logits, tokens, grads, after = _flax_step_results(fm, opt, xs, ys, xs)
            notes = plan.describe()
            if xs.sharding.spec[0] is None and mesh.shape["data"] > 1:
                notes.append(f"batch {batch} not divisible by data axis {mesh.shape['data']}: replicated")
            rows.append(MeshRow(
                text, compare("logits", ref_logits, logits, FP32_FORWARD), bool(np.array_equal(tokens, ref_tokens)),
                [compare(f"grad {k}", ref_grads[k], grads[k], GRADS) for k in ref_grads],
                _weights_check(1, ref_after, after, lr, ADAMW_OUTLIER_FRACTION),
                max(per_device.values()), total, split_most, split_total, notes,
            ))
    return ShardingReport(cfg, batch, seq, precision, rows)


def _split_bytes(model: nnx.Module, split_paths: set[str]) -> tuple[int, int]:
    """(total bytes, most bytes on one device) of the parameters a partition rule split."""
    total, per_device = 0, {}
    for keys, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "/".join(map(str, keys)) not in split_paths:
            continue
        value = var[...]
        total += value.nbytes
        for shard in value.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return total, max(per_device.values(), default=0)
