"""The zoo in reverse: from "the check fails" to "this is the bug".

A candidate fails `check` against its reference. Each forward mutant of the zoo that could have
made that first failure (its `where` holds the failing stage, and it needs nothing the config
lacks) is planted in turn in one twin, and the same check runs again. A mutant that is the
candidate's bug makes the two twins compute alike again, so every finding (each stage of the
forward, each layer on its own inputs and traps) comes back under its bound; a mutant that is not
leaves findings past theirs. The trials are ranked by that: first whether everything passes,
then the summed log2 of the margins still past their bounds, then the largest margin left.

Where a trial planted in torch brings the twins together, the bug is in flax, and the other way
round: the verdict names the twin that carries it. Two models that both turn to NaN at the same
elements agree there (compare.py's `same_non_finite`), so a bug that breaks the forward (a mask
that hides every key of the first token) is matched by the same bug and by no other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from gpt_spec import GPTConfig
from gpt_spec.stages import in_stage, stage_key, stage_of

from . import TWINS, hf_candidate
from .forward import ParityOptions, ParityReport, run_parity
from .layers import Finding
from .progress import Progress, silent
from .tolerances import OWN_ROUNDING_SLACK
from .twins import build_flax, build_torch
from .zoo_catalog import FORWARD_MUTANTS, Mutant
from .zoo_plant import planted

Plant = Callable[[dict[str, Any]], AbstractContextManager]
MARGIN_CAP = 2.0**64  # an infinite or undefined margin (a shape, a NaN) counts as this far past


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of check as diagnose reads it: its findings (each with a name, passed, margin and
    describe()) in the order they are told, where it first fails, and whether a mutant planted at
    `where` could have failed first there."""

    name: str  # "forward", "float32 training"
    findings: Callable[[Any], list[Any]]
    first: Callable[[Any], str | None]  # None: the check passes
    suspect: Callable[[str, str], bool]  # (mutant's where, first failure)
    plant: Callable[..., AbstractContextManager] = planted  # (mutant, twin, models): the zoo's planting for it
    settled: str = "under their bounds"  # how the verdict says a trial settled the findings


def _forward_findings(report: ParityReport) -> list[Finding]:
    return sorted((f for r in report.rows for f in r.findings), key=lambda f: (stage_key(f.name), -f.margin))


def _forward_first(report: ParityReport) -> str | None:
    first = report.first_failure
    return None if first is None else stage_of(first[1].name)


FORWARD = Kind("forward", _forward_findings, _forward_first, lambda where, first: in_stage(first, where))


def _other(twin: str) -> str:
    return "flax" if twin == "torch" else "torch"


def _matches(f: Finding) -> bool:
    """Within its bound, or both sides broken alike with the finite elements within it."""
    if f.passed:
        return True
    return bool(getattr(f, "same_non_finite", 0)) and f.margin <= 1.0


def _log_margin(f: Finding) -> float:
    m = f.margin
    return math.log2(MARGIN_CAP) if not np.isfinite(m) else math.log2(min(max(m, 1.0), MARGIN_CAP))


def _own_rounding(left: list[Finding], own: Any, kind: Kind) -> list[Finding]:
    """Of the findings a trial leaves past their bounds, those not within OWN_ROUNDING_SLACK times
    what the mutant leaves between two twins that both carry it (`own`, its kind's report), finding
    by finding."""
    noise = {f.name: f.margin for f in kind.findings(own) if not _matches(f)}
    return [f for f in left if not (f.name in noise and f.margin <= OWN_ROUNDING_SLACK * noise[f.name])]


@dataclasses.dataclass(frozen=True)
class Trial:
    """The check run again with `mutant` planted in `planted_in` ("" and "-": nothing planted)."""

    mutant: str
    planted_in: str
    findings: int
    unexplained: list[str]  # the findings still past their bounds, in the model's order
    excess: float  # sum of log2(margin) over them
    worst: float  # the largest margin of any finding (<= 1 when every finding matches)
    first: str  # the first of them, described; "" when none is left
    own_rounding: int = 0  # findings past their bounds, but within the mutant's own rounding
    candidate: str = ""  # the candidate when it is not a twin (hf_candidate.NAME): the bug is in it

    @property
    def explains(self) -> bool:
        return not self.unexplained

    @property
    def exactly(self) -> bool:
        """Every finding under its bound, not only within the mutant's own rounding."""
        return self.explains and not self.own_rounding

    @property
    def carrier(self) -> str:
        """The twin the bug is in: the one the mutant was not planted in."""
        if not self.mutant:
            return "-"
        return self.candidate or _other(self.planted_in)

    def key(self) -> tuple:
        return (not self.explains, not self.exactly, round(self.excess, 6), self.worst)

    def to_json(self) -> dict[str, Any]:
        return {
            "mutant": self.mutant or None,
            "planted_in": self.planted_in if self.mutant else None,
            "bug_in": self.carrier if self.mutant else None,
            "explains": self.explains,
            "findings": self.findings,
            "unexplained": len(self.unexplained),
            "excess_log2": self.excess,
            "worst_margin": self.worst,
            "first_unexplained": self.first or None,
            "within_own_rounding": self.own_rounding,
        }


def _trial(
    mutant: str,
    twin: str,
    report: Any,
    own: Any = None,
    candidate: str = "",
    kind: Kind = FORWARD,
) -> Trial:
    findings = kind.findings(report)
    past = [f for f in findings if not _matches(f)]
    left = past if own is None else _own_rounding(past, own, kind)
    worst = max((f.margin if np.isfinite(f.margin) else MARGIN_CAP for f in findings), default=0.0)
    return Trial(
        mutant,
        twin,
        len(findings),
        [f.name for f in left],
        sum(_log_margin(f) for f in past),
        float(worst),
        left[0].describe() if left else "",
        len(past) - len(left),
        candidate,
    )


@dataclasses.dataclass
class Diagnosis:
    config: GPTConfig
    baseline: Any  # the check's report: a ParityReport for the forward (its kind's otherwise)
    stage: str  # where the check first failed ("" when it passed)
    trials: list[Trial]  # ranked, best explanation first; the baseline (nothing planted) is not among them
    untried: list[tuple[str, str]]  # (mutant, why it was not tried)
    kind: Kind = FORWARD
    passed: tuple[str, ...] = ()  # the kinds of check run before this one, which passed

    @property
    def none(self) -> Trial:
        return _trial("", "-", self.baseline, kind=self.kind)

    @property
    def explained(self) -> list[Trial]:
        """Every trial that brings all findings back under their bounds, best first."""
        return [t for t in self.trials if t.explains]

    @property
    def best(self) -> Trial | None:
        return self.trials[0] if self.trials else None

    @property
    def verdict(self) -> str:
        if self.baseline.passed:
            if not self.passed:
                return "nothing to diagnose: the check passes"
            names = (*self.passed, self.kind.name)
            return f"nothing to diagnose: the {', '.join(names[:-1])} and {names[-1]} checks pass"
        if not self.explained:
            closest = self.best
            tail = (
                f"; closest: {closest.mutant} in {closest.carrier}, which leaves {len(closest.unexplained)} "
                f"of {closest.findings} findings past their bounds (baseline {len(self.none.unexplained)})"
                if closest
                else ""
            )
            return f"no known bug explains it (first failure at {self.stage}){tail}"
        best = self.explained[0]
        if any(t.mutant == best.mutant and t.carrier != best.carrier for t in self.explained):
            # A bug that is its own inverse (a transpose): planted in the twin that has it, it undoes it.
            return (
                f"consistent with {best.mutant} at {self.stage}, in torch or in flax: planted in either twin "
                "it makes them agree, so only a third reference (the checkpoint file, transformers) tells which"
            )
        alike = [f"{t.mutant} in {t.carrier}" for t in self.explained[1:]]
        also = f"; equally consistent: {', '.join(alike)}" if alike else ""
        settled = self.kind.settled
        how = (
            f"it brings all {best.findings} findings {settled} (worst {best.worst:.3g} of what it allows)"
            if best.exactly
            else f"it brings {best.findings - best.own_rounding} of {best.findings} findings {settled} and "
            f"the other {best.own_rounding} within what {best.mutant} leaves between two twins that both carry it"
        )
        return (
            f"consistent with {best.mutant} in {best.carrier} at {self.stage}: planted in {best.planted_in}, "
            f"{how}; {len(self.none.unexplained)} {'was' if len(self.none.unexplained) == 1 else 'were'} "
            f"past before{also}"
        )

    def to_json(self) -> dict[str, Any]:
        best = self.explained[0] if self.explained else None
        return {
            "config": self.config.to_dict(),
            "check_passed": self.baseline.passed,
            "evidence": self.kind.name,
            "passed_before": list(self.passed),
            "first_failure_stage": self.stage or None,
            "verdict": self.verdict,
            "diagnosis": None if best is None else {"mutant": best.mutant, "bug_in": best.carrier},
            "nothing_planted": self.none.to_json(),
            "trials": [t.to_json() for t in self.trials],
            "untried": [{"mutant": m, "why": why} for m, why in self.untried],
            "check": self.baseline.to_json(),
        }


def suspects(
    cfg: GPTConfig, stage: str, mutants: Sequence[Mutant], kind: Kind = FORWARD
) -> tuple[list[Mutant], list[tuple[str, str]]]:
    """The mutants that could have made a first failure at `stage`, and why each other is left out."""
    tried, untried = [], []
    for m in mutants:
        if m.adapt(cfg) != cfg:
            untried.append((m.name, f"needs {dict(m.needs)}, which the config lacks"))
        elif not kind.suspect(m.where, stage):
            untried.append((m.name, f"first fails at {m.where}, not {stage}"))
        else:
            tried.append(m)
    return tried, untried


def _both(first: Plant | None, second: Plant) -> Plant:
    @contextlib.contextmanager
    def plant(models: dict[str, Any]):
        with first(models) if first is not None else contextlib.nullcontext(), second(models):
            yield

    return plant


_OWN: dict[tuple, ParityReport] = {}  # _in_both's reports on an init's weights: the same for every candidate


def _in_both(
    cfg: GPTConfig, opts: ParityOptions, mutant: Mutant, weights: Any, models: dict[str, Any], *, cache: bool
) -> ParityReport:
    """The check with `mutant` in both twins and nothing else: what the bug leaves between two ports
    that both carry it."""
    key = (cfg, repr(opts), mutant.name)
    if cache and key in _OWN:
        return _OWN[key]
    in_both = _both(functools.partial(planted, mutant, "torch"), functools.partial(planted, mutant, "flax"))
    report = run_parity(cfg, opts, weights=weights, plant=in_both, models=models)
    if cache:
        _OWN[key] = report
    return report


def diagnose(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    plant: Plant | None = None,
    mutants: Sequence[Mutant] = FORWARD_MUTANTS,
    twins: Sequence[str] = TWINS,
    models: dict[str, Any] | None = None,
    progress: Progress = silent,
) -> Diagnosis:
    """Check the two twins against each other (`plant`: a bug to put in one first, as `check
    --plant` does; `weights`: a checkpoint's), and if the check fails, rank each suspect mutant
    planted in each of `twins` by how well it explains the failure. `twins` ("torch",) takes flax
    for the candidate: only torch, the reference, gets mutants planted."""
    for twin in twins:
        if twin not in TWINS:
            raise ValueError(f"twin must be one of {', '.join(TWINS)}, got {twin!r}")
    cache = weights is None and models is None  # twins of opts.seed's init: what _OWN holds
    if models is None:  # built once, reused by every trial
        options = dict(opts.model_options)
        models = {
            "torch": build_torch(opts.model, cfg, seed=opts.seed, **options),
            "flax": build_flax(opts.model, cfg, seed=opts.seed, **options),
        }
    built = models

    def run(trial: Plant | None, twin: str | None) -> ParityReport:
        return run_parity(cfg, opts, weights=weights, plant=trial, models=built)

    def own(mutant: Mutant) -> ParityReport:
        return _in_both(cfg, opts, mutant, weights, built, cache=cache)

    return _ranked(cfg, run, own, plant, mutants, twins, "", progress)


def diagnose_hf(
    candidate: hf_candidate.HFCandidate,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    mutants: Sequence[Mutant] = FORWARD_MUTANTS,
    progress: Progress = silent,
) -> Diagnosis:
    """Check an HF transformers model against the torch twin holding its weights and, if the check
    fails, rank each suspect mutant planted in the twin by how well it explains the failure: the
    bug it names is in the HF model (or in what its config.json asks of it)."""
    cfg = candidate.config
    reference = build_torch(opts.model, cfg, seed=opts.seed)
    twins: dict[str, Any] = {}  # built the first time a mutant's own rounding is asked for

    def run(trial: Plant | None, twin: str | None) -> ParityReport:
        return hf_candidate.check(candidate, opts, plant=trial, reference=reference)

    def own(mutant: Mutant) -> ParityReport:
        """transformers cannot carry a mutant: what it leaves between two twins that both carry it stands in."""
        if not twins:
            twins.update(torch=reference, flax=build_flax(opts.model, cfg, seed=opts.seed))
        one_way = dataclasses.replace(opts, directions=("torch->flax",))
        return _in_both(cfg, one_way, mutant, candidate.weights, twins, cache=False)

    return _ranked(cfg, run, own, None, mutants, ("torch",), hf_candidate.NAME, progress)


def _ranked(
    cfg: GPTConfig,
    run: Callable[[Plant | None, str | None], Any],
    own_rounding: Callable[[Mutant], Any] | None,
    plant: Plant | None,
    mutants: Sequence[Mutant],
    twins: Sequence[str],
    candidate: str,
    progress: Progress,
    kind: Kind = FORWARD,
) -> Diagnosis:
    """The check (`run(plant, None)`), and where it fails each suspect planted in each of `twins` on
    top (`run(plant and the suspect, twin)`: only `twin` differs from the first run);
    `own_rounding(mutant)`: the check with it in both sides, where both can carry it."""
    baseline = run(plant, None)
    stage = kind.first(baseline)
    if stage is None:
        return Diagnosis(cfg, baseline, "", [], [], kind)
    tried, untried = suspects(cfg, stage, mutants, kind)
    prog = progress(len(tried) * len(twins))
    trials = []
    own: dict[str, Any] = {}  # per mutant: the check with it in both twins, nothing else
    for mutant in tried:
        for twin in twins:
            with prog.step(f"{mutant.name} in {twin}", phase=f"{len(tried)} suspects at {stage}"):
                report = run(_both(plant, functools.partial(kind.plant, mutant, twin)), twin)
                trial = _trial(mutant.name, twin, report, None, candidate, kind)
                if not trial.explains and own_rounding is not None:
                    if mutant.name not in own:
                        own[mutant.name] = own_rounding(mutant)
                    trial = _trial(mutant.name, twin, report, own[mutant.name], candidate, kind)
                trials.append(trial)
    trials.sort(key=Trial.key)
    return Diagnosis(cfg, baseline, stage, trials, untried, kind)
