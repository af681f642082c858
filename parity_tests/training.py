"""Training parity: the loss, every gradient, and the weights after AdamW steps in both twins."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, ModelKind
from gpt_spec.checks import check_dtype

from .compare import Comparison, compare
from .environment import versions
from .progress import Progress, silent
from .tolerances import (
    ADAMW_FLIP_ENVELOPE,
    ADAMW_NOISE_ONLY,
    ADAMW_OUTLIER_FRACTION,
    ADAMW_WEIGHTS,
    BF16_ADAMW_ENVELOPE_RTOL,
    BF16_ADAMW_FLIP_ENVELOPE,
    BF16_ADAMW_OUTLIERS_PER_STEP,
    BF16_ADAMW_WEIGHTS,
    BF16_GRADS,
    BF16_LOSS,
    GRADS,
    LOSS,
    Bound,
)
from .twins import build_pair, float32_matmuls


@dataclasses.dataclass(frozen=True)
class TrainingBounds:
    """What one dtype tier holds training to (tolerances.py has the figures behind each)."""

    loss: Bound
    grads: Bound
    weights: Bound
    outlier_fraction: float  # of all elements may pass `weights` after a step...
    outliers_grow: bool  # ... times the steps taken (bfloat16), or flat (float32)
    flip_envelope: float  # times lr, and envelope_rtol times |w|, per step: what no element may pass
    envelope_rtol: float

    def envelope(self, lr: float, step: int) -> Bound:
        return Bound(
            atol=self.flip_envelope * lr * step,
            rtol=self.envelope_rtol * step,
            measured="an update's sign flipped and, in bfloat16, a rounding the other way, per step",
        )


TRAINING_BOUNDS = {
    "float32": TrainingBounds(LOSS, GRADS, ADAMW_WEIGHTS, ADAMW_OUTLIER_FRACTION, False, ADAMW_FLIP_ENVELOPE, 0.0),
    "bfloat16": TrainingBounds(
        BF16_LOSS,
        BF16_GRADS,
        BF16_ADAMW_WEIGHTS,
        BF16_ADAMW_OUTLIERS_PER_STEP,
        True,
        BF16_ADAMW_FLIP_ENVELOPE,
        BF16_ADAMW_ENVELOPE_RTOL,
    ),
}


@dataclasses.dataclass
class WeightCheck:
    """The twins' weights after `step` AdamW steps, judged by the rule in tolerances.py."""

    step: int
    tensors: list[Comparison]  # against the tier's weights bound (ADAMW_WEIGHTS in float32), per parameter
    envelope: Bound  # what no element may pass (see TrainingBounds.envelope)
    past_envelope: int  # elements past it
    allowed_outliers: int
    bound: Bound = ADAMW_WEIGHTS

    @property
    def n_elements(self) -> int:
        return sum(c.size for c in self.tensors)

    @property
    def n_outliers(self) -> int:
        """Elements past ADAMW_WEIGHTS, not counting the noise-only parameters."""
        return sum(c.n_beyond for c in self.tensors if not noise_only(c.name))

    @property
    def max_abs(self) -> float:
        return max(c.max_abs for c in self.tensors)

    @property
    def passed(self) -> bool:
        finite = all(not c.problem for c in self.tensors)
        return finite and self.n_outliers <= self.allowed_outliers and self.past_envelope == 0

    def first_tensor(self) -> Comparison | None:
        """Where a failed check fails: the first parameter in model order with a non-finite value or
        more elements past the bound than its share of the allowance, else the first with any such
        element, else (past the envelope only) the furthest off. The share keeps the blame off a
        large tensor's few rounding-floor outliers when the excess lies elsewhere."""
        if self.passed:
            return None
        counted = [c for c in self.tensors if not noise_only(c.name)]
        share = self.allowed_outliers / max(1, sum(c.size for c in counted))
        over = (c for c in self.tensors if c.problem or (not noise_only(c.name) and c.n_beyond > share * c.size))
        return next(over, next((c for c in counted if c.n_beyond), max(self.tensors, key=lambda c: c.margin)))

    def verdict(self) -> str:
        return (
            f"{self.n_outliers} elements past the bound (<= {self.allowed_outliers}), "
            f"{self.past_envelope} past the envelope"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "passed": self.passed,
            "max_abs": self.max_abs,
            "bound": self.bound.describe(),
            "envelope": self.envelope.describe(),
            "past_envelope": self.past_envelope,
            "n_outliers": self.n_outliers,
            "allowed_outliers": self.allowed_outliers,
            "n_elements": self.n_elements,
            "tensors": [c.to_json() for c in self.tensors],
        }


def noise_only(name: str) -> bool:
    return name.endswith(ADAMW_NOISE_ONLY)


@dataclasses.dataclass
class TrainedSide:
    """What one twin computed in a training check: the loss and gradients on the first batch, the
    loss at each step, and its weights after each step checked."""

    loss: float = 0.0
    grads: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    losses: list[float] = dataclasses.field(default_factory=list)
    states: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainingReport:
    config: GPTConfig
    model: str
    batch: int
    seq: int
    lr: float
    weight_decay: float
    precision: str
    dtype: str
    loss: Comparison
    grads: list[Comparison]
    step_losses: list[tuple[float, float]]  # (torch, flax) loss at each step, before its update
    weights: list[WeightCheck]
    sides: dict[str, TrainedSide] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def bounds(self) -> TrainingBounds:
        return TRAINING_BOUNDS[self.dtype]

    @property
    def noise_grads_ok(self) -> bool:
        """Gradients zero in exact arithmetic agree and are at the rounding floor in both twins,
        which is why their AdamW updates are held to the envelope only."""
        floor = self.bounds.grads.atol
        return all(c.passed and c.ref_max + c.max_abs <= floor for c in self.grads if noise_only(c.name))

    @property
    def passed(self) -> bool:
        return (
            self.loss.passed
            and all(g.passed for g in self.grads)
            and self.noise_grads_ok
            and all(w.passed for w in self.weights)
        )

    def first_failure(self) -> tuple[str, float, str] | None:
        """(name, |Δ|/allowed, description) of the first evidence to fail, in the order it was taken:
        the loss, each gradient in model order, then the weights after each step checked, each
        parameter in model order ("weights trf_blocks.0.norm1.scale after step 1"); None if all pass."""
        for c in (self.loss, *self.grads):
            if not c.passed:
                return c.name, c.margin, c.describe()
        if not self.noise_grads_ok:
            return (
                "gradients zero in exact arithmetic",
                float("nan"),
                "a gradient zero in exact arithmetic is not noise",
            )
        for w in self.weights:
            worst = w.first_tensor()
            if worst is not None:
                return (
                    f"weights {worst.name} after step {w.step}",
                    worst.margin,
                    f"{worst.describe()}; step {w.step}: {w.verdict()}",
                )
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model,
            "batch": self.batch,
            "seq": self.seq,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "matmul_precision": self.precision,
            "dtype": self.dtype,
            "passed": self.passed,
            "noise_only_gradients_at_rounding_floor": self.noise_grads_ok,
            "first_failure": dict(zip(("name", "margin", "describe"), found, strict=True))
            if (found := self.first_failure())
            else None,
            "loss": self.loss.to_json(),
            "grads": [g.to_json() for g in self.grads],
            "step_losses": [list(p) for p in self.step_losses],
            "weights": [w.to_json() for w in self.weights],
            "versions": versions(),
        }


def weights_check(
    step: int,
    ref: dict[str, np.ndarray],
    cand: dict[str, np.ndarray],
    lr: float,
    outlier_fraction: float | None = None,
    *,
    dtype: str = "float32",
) -> WeightCheck:
    """The twins' weights after `step` AdamW steps at `lr`, under the `dtype` tier's rule;
    `outlier_fraction` overrides the tier's (0: every element within the bound)."""
    bounds = TRAINING_BOUNDS[dtype]
    if outlier_fraction is None:
        outlier_fraction = bounds.outlier_fraction * (step if bounds.outliers_grow else 1)
    tensors = [compare(name, ref[name], cand[name], bounds.weights) for name in ref]
    envelope = bounds.envelope(lr, step)
    # A count, not a second full comparison (gpt2-small: 163M elements); a non-finite element
    # already fails the comparisons above.
    past = sum(int((np.abs(cand[name] - ref[name]) > envelope.limit(np.abs(ref[name]))).sum()) for name in ref)
    n = sum(v.size for k, v in ref.items() if not noise_only(k))
    return WeightCheck(step, tensors, envelope, past, int(outlier_fraction * n), bounds.weights)


def run_training_parity(
    cfg: GPTConfig,
    *,
    model: str = ModelKind.GPT,
    batch: int = 2,
    seq: int = 16,
    steps: int = 10,
    seed: int = 0,
    lr: float = 4e-4,
    weight_decay: float = 0.1,
    outlier_fraction: float | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
    progress: Progress = silent,
    dtype: str = "float32",
    plant: Callable[[dict[str, Any]], AbstractContextManager] | None = None,
    reuse: Mapping[str, TrainedSide] | None = None,
) -> TrainingReport:
    """Loss and every gradient on one batch, then `steps` AdamW steps on fresh batches in both twins.

    Both twins train in train() mode at drop_rate 0 from the torch twin's init (or `weights`),
    in `dtype` ("bfloat16": both cast, parameters, gradients and AdamW moments in bfloat16), held
    to that tier's bounds (TRAINING_BOUNDS). Inputs and next-token targets are windows of random
    ids, as the book's data loader makes them. `plant(twins)` is entered with both twins built (a
    zoo mutant in one, as forward.run_parity takes it); `outlier_fraction` overrides the tier's.
    `reuse`: a twin's side from an earlier report (its `sides`) of the same run, taken instead of
    training that twin again (diagnose's trials change only the other).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_dtype(dtype, tuple(TRAINING_BOUNDS))  # float16 has a forward tier, not a training one
    bounds = TRAINING_BOUNDS[dtype]
    cfg = cfg.replace(drop_rate=0.0)
    prog = progress(2 + steps)
    rng = np.random.default_rng(seed)

    def next_batch():
        data = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int64)
        return data[:, :-1], data[:, 1:]

    with float32_matmuls() as precision, contextlib.ExitStack() as stack:
        with prog.step("building both twins"):
            tm, fm = build_pair(model, cfg, source="torch", seed=seed, mode="train")
            if weights is not None:
                gpt_torch.load_state_dict(tm, weights)
                gpt_flax.load_state_dict(fm, weights)
            gpt_torch.cast(tm, dtype)  # both round the same weights: the same values
            gpt_flax.cast(fm, dtype)
            if plant is not None:
                stack.enter_context(plant({"torch": tm, "flax": fm}))
        reuse = reuse or {}
        t, f = reuse.get("torch"), reuse.get("flax")
        sides = {"torch": t or TrainedSide(), "flax": f or TrainedSide()}
        with prog.step("loss and gradients"):
            x, y = next_batch()
            if t is None:
                loss_grads = gpt_torch.loss_and_grads(tm, torch.from_numpy(x), torch.from_numpy(y))
                sides["torch"].loss, sides["torch"].grads = loss_grads
            if f is None:
                sides["flax"].loss, sides["flax"].grads = gpt_flax.loss_and_grads(fm, x, y)
        t_loss, t_grads, f_loss, f_grads = (
            sides["torch"].loss,
            sides["torch"].grads,
            sides["flax"].loss,
            sides["flax"].grads,
        )
        loss = compare("loss", np.float64(t_loss), np.float64(f_loss), bounds.loss)
        grads = [compare(f"grad {name}", t_grads[name], f_grads[name], bounds.grads) for name in t_grads]
        t_opt = gpt_torch.adamw(tm, lr=lr, weight_decay=weight_decay) if t is None else None
        f_opt = gpt_flax.adamw(fm, lr=lr, weight_decay=weight_decay) if f is None else None
        weight_checks: list[WeightCheck] = []
        for step in range(1, steps + 1):
            with prog.step(f"AdamW step {step}", phase=f"{steps} AdamW steps"):
                x, y = next_batch()
                if t_opt is not None:
                    sides["torch"].losses.append(
                        gpt_torch.train_step(tm, t_opt, torch.from_numpy(x), torch.from_numpy(y))
                    )
                if f_opt is not None:
                    sides["flax"].losses.append(gpt_flax.train_step(fm, f_opt, x, y))
            if step in (1, steps):  # copies: a twin's state dict may view weights the next steps update
                if t is None:
                    sides["torch"].states[step] = {k: np.array(v) for k, v in gpt_torch.state_dict(tm).items()}
                if f is None:
                    sides["flax"].states[step] = {k: np.array(v) for k, v in gpt_flax.state_dict(fm).items()}
                weight_checks.append(
                    weights_check(
                        step, sides["torch"].states[step], sides["flax"].states[step], lr, outlier_fraction, dtype=dtype
                    )
                )
        step_losses = list(zip(sides["torch"].losses, sides["flax"].losses, strict=True))
    return TrainingReport(
        cfg, model, batch, seq, lr, weight_decay, precision, dtype, loss, grads, step_losses, weight_checks, sides
    )
