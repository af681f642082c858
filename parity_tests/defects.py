"""A one-step defect: the zoo's learning-rate mutant switched on for one step and one tensor, as a
bug that strikes once in a long run would (a schedule off by one step, a shard updated twice).

Planted, it wraps the twin's train_step: at the step whose optimizer count is `step` (the run's
0-based global step), that step's change of one tensor (`param`'s update, or one of its AdamW
moments) is scaled by `factor`; every other step, and every other tensor, is the twin's own. `gpt-parity train --plant-defect` trains with it and records it in
train.json; `gpt-parity diverge` replays that run with it planted again (it stands for the code
under test) and has to find the step and the tensor from the evidence alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpt_spec import GPTConfig
from gpt_spec.layout import gpt_shapes

from . import twins

SPEC = "TWIN:STEP:PARAM:FACTOR[:PART]"  # how --plant-defect is written
PARTS = {"update": "weights", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}  # PART: the TrainState field


@dataclasses.dataclass(frozen=True)
class OneStepDefect:
    twin: str  # "torch" or "flax"
    step: int  # the 0-based global step it strikes at
    param: str  # a canonical parameter name
    factor: float  # that step's change of the tensor times this
    part: str = "update"  # which tensor of `param`'s changes: its update or a moment (PARTS)

    @classmethod
    def parse(cls, spec: str) -> OneStepDefect:
        """From TWIN:STEP:PARAM:FACTOR[:PART], e.g. flax:30:trf_blocks.1.att.W_value.weight:8."""
        parts = spec.split(":")
        if len(parts) not in (4, 5):
            raise ValueError(f"a one-step defect is written {SPEC}, got {spec!r}")
        twin, step, param, factor, *part = parts
        try:
            defect = cls(twin, int(step), param, float(factor), *part)
        except ValueError:
            raise ValueError(f"a one-step defect's STEP is an integer and FACTOR a number, got {spec!r}") from None
        defect.check()
        return defect

    def check(self, cfg: GPTConfig | None = None) -> None:
        if self.twin not in ("torch", "flax"):
            raise ValueError(f"a one-step defect's twin is torch or flax, got {self.twin!r}")
        if self.step < 0:
            raise ValueError(f"a one-step defect's step is >= 0, got {self.step}")
        if self.part not in PARTS:
            raise ValueError(f"a one-step defect's part is one of {', '.join(PARTS)}, got {self.part!r}")
        if not math.isfinite(self.factor) or self.factor == 1.0:
            raise ValueError(f"a one-step defect's factor is a finite number other than 1, got {self.factor}")
        if cfg is not None and self.param not in gpt_shapes(cfg):
            raise ValueError(f"a one-step defect's parameter {self.param!r} is not one of the model's")

    def describe(self) -> str:
        what = "update" if self.part == "update" else f"change of {self.part}"
        return f"the {self.twin} twin's {what} of {self.param} x{self.factor:g} at step {self.step}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def steps_taken(twin: str, optimizer: Any) -> int:
    """The optimizer's count of steps taken (torch's per-parameter `step`, optax's count)."""
    if twin == "flax":
        return int(np.asarray(optimizer.step[...]))
    states = [s for s in optimizer.state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


@contextlib.contextmanager
def planted(defect: OneStepDefect | None) -> Iterator[None]:
    """The twin's train_step with `defect` in it, until the context ends (nothing where None)."""
    if defect is None:
        yield
        return
    package = twins.package(defect.twin)
    clean = package.train_step

    def train_step(model: Any, optimizer: Any, input_batch: Any, target_batch: Any) -> float:
        if steps_taken(defect.twin, optimizer) != defect.step:
            return clean(model, optimizer, input_batch, target_batch)
        field = PARTS[defect.part]
        before = getattr(package.train_state(model, optimizer), field)[defect.param]
        loss = clean(model, optimizer, input_batch, target_batch)
        after = package.train_state(model, optimizer)
        tensors = getattr(after, field)
        tensors[defect.param] = before + np.float32(defect.factor) * (tensors[defect.param] - before)
        package.load_train_state(model, optimizer, after)
        return loss

    package.train_step = train_step
    try:
        yield
    finally:
        package.train_step = clean


__all__ = ["PARTS", "SPEC", "OneStepDefect", "planted", "steps_taken"]
