"""Where two chapter-5 runs part, and why: rounding carried in, or a defect at one step.

A `gpt-parity train` run saved with --snapshot-every K holds both twins' training states every K
steps. `diverge` finds the run's first evidence past its bound (a step's training loss, or an
evaluation), reloads both twins from the last snapshot before it and replays the steps up to it one
at a time, exactly as the run took them (the same batches, dropout masks and evaluations, so the
replay reproduces the recorded losses bit for bit). At each step it computes the step twice:

- **from the same state**: the torch twin's state (weights, AdamW moments and step, dropout
  counter) loaded into both twins. Nothing differs going in, so whatever comes out past the
  one-step bounds (the forward stage by stage, the loss, each gradient, the moments, the update) is
  this step's own: a defect, named at its first tensor.
- **from each twin's own state**: what the runs did. Its first tensor past the one-step bounds
  shows where the difference the runs carry appears, and the states' difference going in says it
  was carried in.

The first step whose same-state evidence fails is the defect's. Where every replayed step passes
from the same state, the twins compute each step alike and the runs' difference is rounding carried
in and amplified, with the growth step by step to show it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .chapter5 import TWINS, Chapter5Report, TwinRun
from .defects import OneStepDefect, planted
from .progress import Progress, silent
from .resume import SNAPSHOTS, STATE_FILES, Feed, Trainer, advance, read_state, restore_feed, snapshot_path
from .step_evidence import Evidence, Probe
from .tolerances import LOSS, train_loss_bound
from .twins import float32_matmuls

RUN_FILE = "train.json"  # the run's record, as `gpt-parity train` writes it
_STEP_FOLDER = re.compile(r"step-(\d+)")


@dataclasses.dataclass
class Replayed:
    """One replayed step: the runs' losses at it, their weights' difference after it, and the
    step computed from the same state and from each twin's own."""

    step: int
    recorded: dict[str, float]  # the run's losses at the step
    same: Evidence
    own: Evidence

    @property
    def losses(self) -> dict[str, float]:
        return self.own.losses

    @property
    def weights_after(self) -> float:
        return self.own.weights.max_abs

    def to_json(self, tensors: bool = True) -> dict[str, Any]:
        return {
            "step": self.step,
            "losses": self.losses,
            "recorded_losses": self.recorded,
            "loss_abs_diff": abs(self.losses["torch"] - self.losses["flax"]),
            "bound": train_loss_bound(self.step),
            "weights_max_abs_diff_before": self.own.differed["weights"],
            "weights_max_abs_diff_after": self.weights_after,
            "same_state": self.same.to_json(tensors),
            "own_states": self.own.to_json(tensors),
        }


@dataclasses.dataclass
class DivergeReport:
    run: str
    reason: str | None  # why these steps: the run's first evidence past its bound, or its largest jump
    snapshot: int  # the step of the snapshot the replay started from
    window: tuple[int, int]  # the steps examined, first and last
    steps: list[Replayed]
    defect: OneStepDefect | None  # planted in the run (and so in the replay)

    @property
    def reproduced(self) -> bool:
        """The replay took the recorded steps: its losses are the run's, bit for bit."""
        return all(r.losses == r.recorded for r in self.steps)

    @property
    def defect_step(self) -> Replayed | None:
        return next((r for r in self.steps if r.same.first_failure() is not None), None)

    @property
    def kind(self) -> str:
        if not self.steps:
            return "nothing to replay"
        if self.defect_step is not None:
            return "defect"
        if any(r.own.first_failure() is not None for r in self.steps):
            return "rounding carried in"
        return "agree"

    def verdict(self) -> str:
        if not self.steps:
            return f"{self.run}: every step and evaluation is within its bound: nothing to replay (name --steps A-B)"
        found = self.defect_step
        a, b = self.window
        if found is not None:
            what, describe = found.same.first_failure() or ("", "")
            return (
                f"defect at step {found.step}: from the same state (nothing differed going in), the first "
                f"tensor past its bound is the {what}: {describe}"
            )
        name, margin = max((r.same.worst() for r in self.steps), key=lambda w: w[1])
        first = self.steps[0]
        before, after = first.own.differed["weights"], self.steps[-1].weights_after
        growth = f"x{after / before:.3g}" if before else "from 0"
        shown = next(((r.step, r.own.first_failure()) for r in self.steps if r.own.first_failure()), None)
        where = f"; the runs' own states first show it at step {shown[0]}: {shown[1][0]}" if shown and shown[1] else ""
        kind = "rounding carried in" if self.kind == "rounding carried in" else "the twins agree"
        return (
            f"{kind}: from the same state every step {a}-{b} agrees within the one-step bounds "
            f"(closest: {name} at {margin:.3g} of its bound); the runs' weights differed by {before:.3g} "
            f"before step {a} and {after:.3g} after step {b} ({growth}){where}"
        )

    def to_json(self, tensors: bool = True) -> dict[str, Any]:
        return {
            "run": self.run,
            "verdict": self.verdict(),
            "kind": self.kind,
            "reason": self.reason,
            "snapshot": self.snapshot,
            "window": list(self.window),
            "reproduces_the_recorded_losses": self.reproduced,
            "defect_step": None if self.defect_step is None else self.defect_step.step,
            "planted": None if self.defect is None else self.defect.to_json(),
            "steps": [r.to_json(tensors) for r in self.steps],
        }


def first_failure(report: Chapter5Report) -> tuple[str, int] | None:
    """The run's first evidence past its bound, and the number of updates behind it."""
    found = report.parted()
    if not found:
        return None
    updates, line = min(found)
    return line, updates


def largest_jump(report: Chapter5Report) -> tuple[str, int] | None:
    """Where a run within its bound parts the most: the step whose |Δ training loss| grew most over
    the step before's (or over LOSS's floor, where that was smaller), and the updates behind it."""
    deltas = report.step_deltas()
    if len(deltas) < 2:
        return None
    ratios = deltas[1:] / np.maximum(deltas[:-1], LOSS.atol)
    step = int(np.argmax(ratios)) + 1
    line = (
        f"within its bound; its largest jump in |Δ training loss| is at step {step}: "
        f"{deltas[step - 1]:.3g} -> {deltas[step]:.3g} (x{ratios[step - 1]:.3g})"
    )
    return line, step


def snapshots(run_dir: str | os.PathLike[str]) -> list[int]:
    """The steps at which both twins' states were saved."""
    folder = Path(run_dir) / SNAPSHOTS
    steps = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _STEP_FOLDER.fullmatch(entry.name)
        if match and all((entry / name).is_file() for name in STATE_FILES.values()):
            steps.append(int(match.group(1)))
    return steps


def read_run(run_dir: str | os.PathLike[str]) -> tuple[Chapter5Report, OneStepDefect | None]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"{os.fspath(run_dir)!r} holds no {RUN_FILE}: give the --out folder of a gpt-parity train run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = Chapter5Report.from_json(data)
        defect = None if data.get("planted") is None else OneStepDefect(**data["planted"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not a two-twin train.json: {e}") from None
    if set(report.runs) != set(TWINS):
        raise ValueError(f"{os.fspath(path)!r} records one twin: diverge needs a run of both (--twin both)")
    return report, defect


def examined(report: Chapter5Report, steps: tuple[int, int] | None) -> tuple[str | None, int | None, int]:
    """(the run's first failure, or its largest jump; the first and the last step to judge).
    Without `steps`, the steps up to the first failure or, in a run within its bound, to its largest
    jump (the first None: from the snapshot before it); the last is -1 where there is no step."""
    failing = first_failure(report)
    n = len(report.torch.step_losses)
    if steps is not None:
        a, b = steps
        if not 0 <= a <= b < n:
            raise ValueError(f"--steps {a}-{b}: the run took steps 0-{n - 1}")
        return None if failing is None else failing[0], a, b
    if failing is None:
        failing = largest_jump(report)
    if failing is None:
        return None, None, -1
    line, updates = failing
    return line, None, max(updates - 1, 0)  # a loss at step 0 is before any update: step 0's forward


def diverge(
    run_dir: str | os.PathLike[str],
    text: str,
    *,
    steps: tuple[int, int] | None = None,
    progress: Progress = silent,
) -> DivergeReport:
    """Replay the run saved in `run_dir` (its train.json and snapshots) on `text` from the last
    snapshot before the steps to judge (`steps`, first and last, or those up to the run's first
    evidence past its bound) and judge each step (see the module's docstring)."""
    report, defect = read_run(run_dir)
    taken = snapshots(run_dir)
    if not taken:
        raise ValueError(f"{os.fspath(run_dir)!r} holds no snapshots: train with --snapshot-every K")
    failing, first, last = examined(report, steps)
    if last < 0:
        return DivergeReport(os.fspath(run_dir), None, -1, (-1, -1), [], defect)
    start = max((s for s in taken if s <= (last if first is None else first)), default=None)
    if start is None:
        raise ValueError(f"{os.fspath(run_dir)!r} has no snapshot at or before step {first} (snapshots: {taken})")
    first = start if first is None else first
    replayed: list[Replayed] = []
    bar = progress(last + 1 - start)
    with float32_matmuls(), planted(defect):
        paths = {twin: snapshot_path(run_dir, start, twin) for twin in TWINS}
        resumed = {twin: read_state(path, text) for twin, path in paths.items()}
        for twin, state in resumed.items():
            if state.position.step != start or state.history.step_losses != report.runs[twin].step_losses[:start]:
                raise ValueError(f"{os.fspath(paths[twin])!r} is not of this run: its steps differ from {RUN_FILE}'s")
        probe = Probe(resumed, text)
        batches = Batches(restore_feed(resumed["torch"], text), resumed["torch"])
        del resumed  # 124M: two states of 2 GB each
        for step in range(start, last + 1):
            with bar.step(f"step {step}: both twins, from the same state and from their own"):
                x, y = batches.next()
                if step < first:
                    probe.step(x, y)
                    continue
                before = probe.states()
                same = probe.evidence({"torch": before["torch"], "flax": before["torch"]}, x, y, "same state")
                own = probe.evidence(before, x, y, "own states")  # the runs' step: the probe holds its result
                del before
                recorded = {twin: report.runs[twin].step_losses[step] for twin in TWINS}
                replayed.append(Replayed(step, recorded, same, own))
                if same.first_failure() is not None:
                    break
    end = replayed[-1].step if replayed else last
    return DivergeReport(os.fspath(run_dir), failing, start, (first, end), replayed, defect)


class Batches(Trainer):
    """The run's batches in its order, with no model: the book's loop over the loaders, each
    evaluation drawing from torch's generator as the run's did (neither twin's steps draw from it)."""

    def __init__(self, feed: Feed, resumed: Any):
        super().__init__("torch", torch.nn.Module(), None, resumed.settings, TwinRun())
        self.feed, self.position = feed, resumed.position
        self.taken: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rng = torch.get_rng_state()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        torch.set_rng_state(self.rng)
        self.position = advance(self, self.feed, self.position, self.position.step + 1, tokenizer=None)  # no samples
        self.rng = torch.get_rng_state()
        return self.taken.pop()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.taken.append((x, y))
        return 0.0

    def evaluate(self, feed: Feed) -> tuple[float, float]:
        feed.evaluation(self.settings.eval_iter)
        return math.nan, math.nan

    def sample(self, tokenizer: Any) -> str:
        return ""


__all__ = ["RUN_FILE", "DivergeReport", "Replayed", "diverge", "examined", "first_failure", "snapshots"]
