"""diagnose beyond one forward: the bugs only training steps show.

An optimizer or loss mutant leaves the forward as the book's; `check --train-steps` sees it in
the loss, the gradients or the weights after some AdamW step (training.py). It is diagnosed as
the forward is (diagnose.py): the training check run with nothing more, then with each suspect
optimizer or loss mutant planted in each reference twin, ranked by how far it brings the findings
back under their bounds. `diagnose_all` runs the forward check, then the training check, and
diagnoses the first that fails.

The generation check's KV-cache and sampling mutants are not diagnosed: it holds each twin to its
own uncached forward, so a bug in one twin cannot be undone by planting it in the other, and the
same mutant breaks each framework's decoding its own way (docs/diagnosis.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gpt_spec import GPTConfig

from . import TWINS, zoo_training
from .diagnose import FORWARD, Diagnosis, Kind, Plant, _other, _ranked, diagnose
from .forward import ParityOptions
from .progress import Progress, silent
from .training import TrainedSide, TrainingReport, run_training_parity
from .zoo_catalog import FORWARD_MUTANTS, OPTIMIZER_MUTANTS, Mutant
from .zoo_plant import planted

EVIDENCE = ("forward", "training")  # the order diagnose_all runs them in
MUTANTS_OF = {"forward": FORWARD_MUTANTS, "training": OPTIMIZER_MUTANTS}
SHOWS_IN = ("forward", zoo_training.TRAINING)  # the mutants diagnose can name: Mutant.shows_in


@dataclasses.dataclass(frozen=True)
class _Judged:
    """The weights after one step, judged as the training check judges them (a count of elements
    past the bound, none past the envelope), under the name of its first tensor to fail."""

    name: str
    passed: bool
    margin: float
    text: str

    def describe(self) -> str:
        return self.text


def _training_findings(report: TrainingReport) -> list[Any]:
    weights = []
    for w in report.weights:
        worst = w.first_tensor() or max(w.tensors, key=lambda c: c.margin)
        text = f"{worst.describe()}; step {w.step}: {w.verdict()}"
        margin = worst.margin if not w.passed else min(worst.margin, 1.0)
        weights.append(_Judged(f"weights {worst.name} after step {w.step}", w.passed, margin, text))
    return [report.loss, *report.grads, *weights]


def _training_first(report: TrainingReport) -> str | None:
    found = report.first_failure()
    return None if found is None else found[0]


TRAINING = Kind(zoo_training.TRAINING, _training_findings, _training_first, zoo_training.located)


def diagnose_training(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    plant: Plant | None = None,
    mutants: Sequence[Mutant] = OPTIMIZER_MUTANTS,
    twins: Sequence[str] = TWINS,
    progress: Progress = silent,
) -> Diagnosis:
    """`check --train-steps` as the zoo runs it (float32, zoo_training.STEPS AdamW steps, batch
    opts.batch x at most 32 tokens), diagnosed with the zoo's optimizer and loss mutants."""
    seq = min(opts.seq or cfg.context_length, 32)
    first: dict[str, TrainedSide] = {}  # the first run's sides: a trial trains only the twin it plants in

    def run(p: Plant | None, twin: str | None) -> TrainingReport:
        reuse = None if twin is None else {_other(twin): first[_other(twin)]}
        report = run_training_parity(
            cfg,
            batch=opts.batch,
            seq=seq,
            steps=zoo_training.STEPS,
            seed=opts.seed,
            weights=weights,
            plant=p,
            reuse=reuse,
        )
        if twin is None:
            first.update(report.sides)
        return report

    return _ranked(cfg, run, None, plant, mutants, twins, "", progress, TRAINING)


_DIAGNOSE = {"forward": diagnose, "training": diagnose_training}


def plant_of(mutant: Mutant, twin: str) -> Plant:
    """A forward, optimizer or loss mutant planted in one twin, as run_parity and
    run_training_parity take it."""
    if mutant.shows_in not in SHOWS_IN:
        raise ValueError(
            f"mutant {mutant.name} shows only in {mutant.shows_in} ({mutant.where}), which diagnose does not read"
        )
    return functools.partial(planted, mutant, twin)


def diagnose_all(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    plant: Plant | None = None,
    evidence: Sequence[str] = EVIDENCE,
    twins: Sequence[str] = TWINS,
    progress: Progress = silent,
) -> Diagnosis:
    """Each kind of check in `evidence`, in EVIDENCE's order, until one fails: that one diagnosed."""
    unknown = [e for e in evidence if e not in EVIDENCE]
    if unknown or not evidence:
        raise ValueError(f"evidence is one or more of {', '.join(EVIDENCE)}, got {', '.join(unknown) or 'none'}")
    ran: list[Diagnosis] = []  # every kind before the last passed: the loop stops at a failure
    for kind in (e for e in EVIDENCE if e in evidence):
        ran.append(_DIAGNOSE[kind](cfg, opts, weights=weights, plant=plant, twins=twins, progress=progress))
        if not ran[-1].baseline.passed:
            break
    return dataclasses.replace(ran[-1], passed=tuple(d.kind.name for d in ran[:-1]))


@dataclasses.dataclass(frozen=True)
class ZooDiagnosis:
    """One mutant of the zoo planted in the candidate twin, and what diagnose made of it."""

    mutant: str
    candidate: str
    verdict: str
    explained: list[tuple[str, str]]  # (mutant, twin it is in) of every trial that explains it, best first
    trials: int

    @property
    def top1(self) -> bool:
        return bool(self.explained) and self.explained[0] == (self.mutant, self.candidate)

    @property
    def alone(self) -> bool:
        """Named top-1 and by no other mutant."""
        return self.top1 and {m for m, _ in self.explained} == {self.mutant}

    def to_json(self) -> dict[str, Any]:
        return {
            "mutant": self.mutant,
            "planted_in": self.candidate,
            "top1": self.top1,
            "alone": self.alone,
            "explained_by": [{"mutant": m, "bug_in": t} for m, t in self.explained],
            "trials": self.trials,
            "verdict": self.verdict,
        }


def diagnose_zoo(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    candidate: str = "flax",
    evidence: Sequence[str] = ("forward",),
    twins: Sequence[str] = TWINS,
    progress: Progress = silent,
) -> list[ZooDiagnosis]:
    """The zoo in reverse: each mutant of the kinds in `evidence` planted in `candidate` (in the
    config it needs), then diagnosed by its kind's check with the zoo's mutants planted in `twins`."""
    mutants = [(kind, m) for kind in EVIDENCE if kind in evidence for m in MUTANTS_OF[kind]]
    prog = progress(len(mutants))
    out = []
    for kind, mutant in mutants:
        with prog.step(f"{mutant.name} planted in {candidate}", phase=f"{len(mutants)} mutants"):
            d = _DIAGNOSE[kind](mutant.adapt(cfg), opts, plant=plant_of(mutant, candidate), twins=twins)
        out.append(
            ZooDiagnosis(mutant.name, candidate, d.verdict, [(t.mutant, t.carrier) for t in d.explained], len(d.trials))
        )
    return out


__all__ = [
    "EVIDENCE",
    "MUTANTS_OF",
    "SHOWS_IN",
    "ZooDiagnosis",
    "FORWARD",
    "TRAINING",
    "diagnose_all",
    "diagnose_training",
    "diagnose_zoo",
    "plant_of",
]
