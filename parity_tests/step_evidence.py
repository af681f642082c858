"""One training step computed by both twins from given training states, compared tensor by tensor
in the order the step makes them: the forward stage by stage, the loss, each gradient, both AdamW
moments and the update, each against its one-step bound (what `gpt-parity diverge` judges a step by).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

import gpt_flax
import gpt_torch
from gpt_spec.formats.train_state import TrainState

from . import twins
from .chapter5 import TWINS
from .compare import Comparison, compare
from .forward import carried, compare_stages
from .resume import restore
from .tolerances import FP32_FORWARD, GRADS, LOSS, MOMENT_ROUNDING
from .training import WeightCheck, weights_check
from .twins import Backend, run_backend

EVIDENCE_KINDS = ("stages", "loss", "grads", "moments", "weights")  # in the order a step makes them


@dataclasses.dataclass(frozen=True)
class Described:
    """What a comparison was held to, by name only: what a report keeps of a bound."""

    text: str

    def describe(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class MomentEnvelope:
    """What a moment may differ by from the same state (tolerances.MOMENT_ROUNDING has the rule and
    the figures): the gradients' bound carried through Adam's running averages, plus roundings."""

    which: str  # "exp_avg" or "exp_avg_sq"

    def describe(self) -> str:
        carried_as = "(1-b1)" if self.which == "exp_avg" else "(1-b2)|2g|"
        return f"{carried_as} x the gradient bound + 2^-22|ref|"


def moment_limits(state: TrainState, grad: np.ndarray, new: np.ndarray, which: str) -> np.ndarray:
    """What each element of moment `which` (its new value `new`) may differ by from the same state,
    where the reference's gradient is `grad`."""
    b1, b2 = state.adamw.betas
    g = np.abs(grad)
    dg = GRADS.limit(g)
    carried_in = (1 - b1) * dg if which == "exp_avg" else (1 - b2) * (2 * g + dg) * dg
    return carried_in + MOMENT_ROUNDING * np.abs(new)


@dataclasses.dataclass
class Evidence:
    """One step computed by both twins from given states on one batch, compared in the order the
    step makes its tensors: the forward's stages, the loss, each gradient, the moments, the update."""

    inputs: str  # "same state" or "own states"
    losses: dict[str, float]  # each twin's training loss at the step (before its update)
    differed: dict[str, float]  # max |Δ| of the states going in: weights, exp_avg, exp_avg_sq
    stages: list[Comparison]
    loss: Comparison
    grads: list[Comparison]
    moments: list[Comparison]
    weights: WeightCheck

    def first_failure(self) -> tuple[str, str] | None:
        """(what, its description) of the first tensor past its bound, in the step's order."""
        for kind, found in (("stage", self.stages), ("", [self.loss]), ("gradient of", self.grads)):
            for c in found:
                if not c.passed:
                    return f"{kind} {c.name}".strip(), c.describe()
        for c in self.moments:
            if not c.passed:
                return c.name, c.describe()
        update = self.weights.first_tensor()
        if update is not None:
            return f"update of {update.name}", f"{update.describe()}; {self.weights.verdict()}"
        return None

    def worst(self) -> tuple[str, float]:
        """The comparison closest to its bound, and its margin (|Δ| / allowed at the worst element)."""
        found = [*self.stages, self.loss, *self.grads, *self.moments, *self.weights.tensors]
        c = max(found, key=lambda c: c.margin if math.isfinite(c.margin) else math.inf)
        return c.name, c.margin

    def to_json(self, tensors: bool = True) -> dict[str, Any]:
        """Every comparison, or (`tensors` False) per kind only the closest to its bound and how
        many failed: gpt2-small's whole evidence is about 0.5 MB a step."""
        failure = self.first_failure()
        name, margin = self.worst()
        kinds = {
            "stages": self.stages,
            "loss": [self.loss],
            "grads": self.grads,
            "moments": self.moments,
            "weights": self.weights.tensors,
        }
        if tensors:
            shown: dict[str, Any] = {kind: [c.to_json() for c in found] for kind, found in kinds.items()}
            shown["loss"], shown["weights"] = self.loss.to_json(), self.weights.to_json()
        else:
            shown = {kind: _brief(found) for kind, found in kinds.items()}
            shown["weights"]["verdict"] = self.weights.verdict()
        return {
            "inputs": self.inputs,
            "losses": self.losses,
            "inputs_max_abs_diff": self.differed,
            "first_failure": None if failure is None else {"what": failure[0], "describe": failure[1]},
            "worst": {"name": name, "margin": margin},
            **shown,
        }


def _brief(found: list[Comparison]) -> dict[str, Any]:
    worst = max(found, key=lambda c: c.margin if math.isfinite(c.margin) else math.inf)
    return {
        "n": len(found),
        "n_failed": sum(not c.passed for c in found),
        "closest": worst.name,
        "margin": worst.margin,
    }


class Probe:
    """A model and optimizer per twin, into which `evidence` loads the states it compares. After
    the evidence from the twins' own states, they hold the runs' states after that step."""

    def __init__(self, resumed: dict[str, Any], text: str):
        self.trainers = {twin: restore(resumed[twin], twin, text)[0] for twin in TWINS}

    def states(self) -> dict[str, TrainState]:
        return {twin: trainer.state() for twin, trainer in self.trainers.items()}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {twin: trainer.step(x, y) for twin, trainer in self.trainers.items()}

    def load(self, states: dict[str, TrainState]) -> None:
        for twin, trainer in self.trainers.items():
            package = twins.package(twin)
            package.load_train_state(trainer.model, trainer.optimizer, states[twin])

    def evidence(self, states: dict[str, TrainState], x: torch.Tensor, y: torch.Tensor, inputs: str) -> Evidence:
        """The step from `states` (per twin) on batch (x, y), both twins against the torch twin."""
        tt, ft = self.trainers["torch"], self.trainers["flax"]
        ref, cand = states["torch"], states["flax"]
        differed = {
            part: _max_abs(getattr(ref, part), getattr(cand, part)) for part in ("weights", "exp_avg", "exp_avg_sq")
        }
        ids = x.numpy()
        self.load(states)
        for trainer in (tt, ft):
            trainer.model.eval()  # the forward's stages without dropout: parity masks are drawn below
        cpu = Backend("torch", "cpu")
        out_t, out_f = run_backend(cpu, tt.model, ids), run_backend(Backend("flax", None), ft.model, ids)
        stages = [
            dataclasses.replace(c, bound=Described(c.bound.describe()))  # not Carried's arrays: 0.4 GB a step (124M)
            for c in compare_stages(out_t, out_f, FP32_FORWARD, carried(cpu, tt.model, out_t, out_f))
        ]
        del out_t, out_f  # 124M: the logits alone are 100 MB a twin
        for trainer in (tt, ft):
            trainer.model.train()
        loss_t, grads_t = gpt_torch.loss_and_grads(tt.model, x, y)
        loss_f, grads_f = gpt_flax.loss_and_grads(ft.model, ids, y.numpy())
        loss = compare("loss", np.float64(loss_t), np.float64(loss_f), LOSS)
        grads = [compare(name, grads_t[name], grads_f[name], GRADS) for name in grads_t]
        del grads_f
        self.load(states)  # the step draws the masks the gradients drew
        losses = self.step(x, y)
        after_t, after_f = tt.state(), ft.state()
        moments = [
            compare(
                f"{which} {name}",
                getattr(after_t, which)[name],
                getattr(after_f, which)[name],
                MomentEnvelope(which),
                limit=moment_limits(ref, grads_t[name], getattr(after_t, which)[name], which),
            )
            for name in ref.weights
            for which in ("exp_avg", "exp_avg_sq")
        ]
        return Evidence(
            inputs,
            losses,
            differed,
            stages,
            loss,
            grads,
            moments,
            weights_check(1, after_t.weights, after_f.weights, ref.adamw.lr),
        )


def _max_abs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


__all__ = ["EVIDENCE_KINDS", "Evidence", "MomentEnvelope", "Probe", "moment_limits"]
