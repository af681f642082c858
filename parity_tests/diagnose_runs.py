"""diagnose beyond one forward: the bugs only training steps or decoding show.

An optimizer or loss mutant leaves the forward as the book's; `check --train-steps` sees it in
the loss, the gradients or the weights after some AdamW step (training.py). It is diagnosed as
the forward is (diagnose.py): the training check run with nothing more, then with each suspect
optimizer or loss mutant planted in each reference twin, ranked by how far it brings the findings
back under their bounds.

A KV-cache or sampling mutant shows only in the generation check (decoding.py), which holds each
twin to its own uncached forward and float64 sampling as well as to the other twin. Planting the
candidate's bug in the reference cannot bring the reference back to its own forward; it makes the
two twins alike: at each place each twin departs from its reference, or neither does, and the
twins' logits, tokens and draws agree. A refusal ends its part's comparison (the twin's state
after it is not the other's) and counts as alike where the other twin has departed by then: the
same bug crashes torch's slicing where JAX's clamped update goes on.

`diagnose_all` runs the forward, training and generation checks in turn and diagnoses the first
that fails.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gpt_spec import GPTConfig
from gpt_spec.stages import stage_names

from . import TWINS, decoding, zoo_decoding, zoo_training
from .diagnose import FORWARD, MARGIN_CAP, Diagnosis, Kind, Plant, _both, _other, _ranked, diagnose
from .forward import ParityOptions
from .progress import Progress, silent
from .training import TrainedSide, TrainingReport, run_training_parity
from .zoo_catalog import (
    BF16_TRAINING,
    DECODING_MUTANTS,
    FORWARD_MUTANTS,
    GENERATION,
    OPTIMIZER_MUTANTS,
    TRAINING_MUTANTS,
    Mutant,
)
from .zoo_plant import planted

EVIDENCE = ("forward", "training", "bfloat16-training", "generation")  # the order diagnose_all runs them in
MUTANTS_OF = {
    "forward": FORWARD_MUTANTS,
    "training": OPTIMIZER_MUTANTS,
    "bfloat16-training": TRAINING_MUTANTS,
    "generation": DECODING_MUTANTS,
}
SHOWS_IN = ("forward", zoo_training.TRAINING, BF16_TRAINING, GENERATION)  # what diagnose can name: Mutant.shows_in


@dataclasses.dataclass(frozen=True)
class _Judged:
    """A finding as diagnose reads it, made from the check's own: the weights after one training
    step (named by its first tensor to fail), or one place of the generation check in both twins."""

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


def _training_located(where: str, first: str) -> bool:
    """A bfloat16 training mutant first fails at a gradient; the others, zoo_training.located."""
    return first.startswith("grad ") if where == "gradients" else zoo_training.located(where, first)


TRAINING = Kind(zoo_training.TRAINING, _training_findings, _training_first, _training_located)
BF16_TRAINING_KIND = dataclasses.replace(TRAINING, name=BF16_TRAINING)


def diagnose_training(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    plant: Plant | None = None,
    mutants: Sequence[Mutant] | None = None,
    twins: Sequence[str] = TWINS,
    progress: Progress = silent,
    dtype: str = "float32",
) -> Diagnosis:
    """`check --train-steps` as the zoo runs it (batch opts.batch x at most 32 tokens; float32 and
    zoo_training.STEPS AdamW steps, or bfloat16 and one step), diagnosed with the zoo's mutants that
    show in it (`mutants` None): the optimizer and loss mutants, or the bfloat16 training one."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"diagnose trains in float32 or bfloat16, got {dtype!r}")
    kind, evidence = (TRAINING, "training") if dtype == "float32" else (BF16_TRAINING_KIND, "bfloat16-training")
    seq = min(opts.seq or cfg.context_length, 32)
    first: dict[str, TrainedSide] = {}  # the first run's sides: a trial trains only the twin it plants in

    def run(p: Plant | None, twin: str | None) -> TrainingReport:
        reuse = None if twin is None else {_other(twin): first[_other(twin)]}
        report = run_training_parity(
            cfg,
            batch=opts.batch,
            seq=seq,
            steps=zoo_training.STEPS if dtype == "float32" else 1,
            seed=opts.seed,
            weights=weights,
            plant=p,
            reuse=reuse,
            dtype=dtype,
        )
        if twin is None:
            first.update(report.sides)
        return report

    suspects = MUTANTS_OF[evidence] if mutants is None else mutants
    return _ranked(cfg, run, None, plant, suspects, twins, "", progress, kind)


def _pair(sides: dict[str, decoding.Finding]) -> _Judged:
    """One place of the generation check in both twins, each against its own reference: alike when
    both pass or both fail."""
    t, f = sides["torch"], sides["flax"]
    alike = t.passed == f.passed
    margin = 0.0 if alike and not t.passed else max(t.margin, f.margin)  # alike: no margin is left to judge
    text = f"{t.name} in each twin: torch {t.describe()}; flax {f.describe()}"
    return _Judged(f"{t.name} in each twin", alike, margin, text)


def _generation_findings(report: decoding.DecodingReport) -> list[Any]:
    """Part by part, up to the first refusal: each place in both twins (_pair), the twins against
    each other as the check judges them, and the refusal, alike where the other twin has departed
    from its reference by then."""
    stages = stage_names(report.config.n_layers)
    placed: list[tuple[tuple, Any]] = []
    for part in decoding.PARTS:
        found = [f for f in report.findings if f.part == part]
        cut = min((decoding.history(f) for f in found if f.refused), default=None)
        sides: dict[tuple, dict[str, decoding.Finding]] = {}
        for f in found:
            at = decoding.history(f)
            if cut is not None and at >= cut:
                if at == cut and f.refused:
                    other = [g for g in found if g.twin == _other(f.twin) and decoding.history(g) <= cut]
                    alike = f.twin in TWINS and any(not g.passed for g in other)
                    text = f"{f.describe()}; the other twin {'had departed' if alike else 'had not departed'} by then"
                    placed.append(
                        (decoding.order(f, stages), _Judged(f.name, alike, 0.0 if alike else MARGIN_CAP, text))
                    )
            elif f.twin in TWINS:
                sides.setdefault((f.rows, f.position, f.what), {})[f.twin] = f
            else:
                placed.append(
                    (decoding.order(f, stages), _Judged(f"{f.name} torch vs flax", f.passed, f.margin, f.describe()))
                )
        for pair in sides.values():
            one = next(iter(pair.values()))
            judged = _pair(pair) if len(pair) == 2 else _Judged(one.name, one.passed, one.margin, one.describe())
            placed.append((decoding.order(one, stages), judged))
    return [j for _, j in sorted(placed, key=lambda p: p[0])]


def _generation_first(report: decoding.DecodingReport) -> str | None:
    found = report.first_failure
    return None if found is None else found.name


GENERATION_KIND = Kind(
    GENERATION,
    _generation_findings,
    _generation_first,
    lambda where, first: where.split()[0] == first.split()[0],  # the part: cached, sliding or sampling
    zoo_decoding.planted,
    "alike in both twins or under their bounds",
)


def diagnose_generation(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    plant: Plant | None = None,
    mutants: Sequence[Mutant] = DECODING_MUTANTS,
    twins: Sequence[str] = TWINS,
    progress: Progress = silent,
) -> Diagnosis:
    """The generation check as the zoo runs it (decoding.py's prompts, cache, window and sampling,
    float32, both twins from opts.seed's init or `weights`), diagnosed with the zoo's KV-cache and
    sampling mutants; what a mutant leaves between two twins that both carry it (torch.topk and
    lax.top_k keep different ones of tied logits) is its own rounding."""
    models = decoding.build_models(cfg, opts.seed, weights)

    def run(p: Plant | None, twin: str | None) -> decoding.DecodingReport:
        return decoding.run_generation_check(cfg, seed=opts.seed, models=models, plant=p)

    def own(mutant: Mutant) -> decoding.DecodingReport:
        in_torch, in_flax = (functools.partial(zoo_decoding.planted, mutant, t) for t in TWINS)
        return run(_both(in_torch, in_flax), None)

    return _ranked(cfg, run, own, plant, mutants, twins, "", progress, GENERATION_KIND)


_DIAGNOSE: dict[str, Callable[..., Diagnosis]] = {
    "forward": diagnose,
    "training": diagnose_training,
    "bfloat16-training": functools.partial(diagnose_training, dtype="bfloat16"),
    "generation": diagnose_generation,
}


def plant_of(mutant: Mutant, twin: str) -> Plant:
    """A forward, optimizer, loss, KV-cache or sampling mutant planted in one twin, as its check
    takes it."""
    if mutant.shows_in not in SHOWS_IN:
        raise ValueError(
            f"mutant {mutant.name} shows only in {mutant.shows_in} ({mutant.where}), which diagnose does not read"
        )
    return functools.partial(zoo_decoding.planted if mutant.shows_in == GENERATION else planted, mutant, twin)


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
    if "generation" in evidence:  # refused before any check runs, not after the first two
        try:
            decoding.check_fits(cfg)
        except ValueError as e:
            raise ValueError(f"{e}: leave generation out of the evidence") from None
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
    "BF16_TRAINING_KIND",
    "GENERATION_KIND",
    "diagnose_all",
    "diagnose_generation",
    "diagnose_training",
    "diagnose_zoo",
    "plant_of",
]
