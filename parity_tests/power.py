"""Stated detection power: how small a bug `check` catches, per kind of evidence.

Each bug of the zoo with a natural size gets a continuous knob: LayerNorm's eps and GELU's cubic
constant off by a relative δ, the attention scores divided by head_dim ** (0.5 + δ), every
matmul's operands rounded to n mantissa bits (23 is float32's: nothing lost), one weight tensor
multiplied by 1 ± ε element by element, the learning rate times 1 + δ. The knob is planted in the
candidate twin (flax by default, compared against torch) and bisected, in log2 of δ (in n for the bits), to
the smallest setting each kind of evidence catches: the whole forward against its bound
("bound"), each layer against its rounding envelope ("envelope"), the test for systematic error
("bias"), ten AdamW steps ("training"). Each kind is assumed monotone in its knob (a larger bug
fails whatever a smaller one fails); the report keeps every point it ran, so that can be read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from gpt_spec import GPTConfig, ModelKind

from . import TWINS, zoo_training
from .forward import ParityOptions, run_parity
from .progress import Progress, silent
from .training import run_training_parity
from .twins import build_flax, build_torch
from .zoo_catalog import Mutant, Swap
from .zoo_plant import perturb, planted

FORWARD_KINDS = ("bound", "envelope", "bias")
TRAINING_STEPS = zoo_training.STEPS  # as `mutants` runs a training mutant: `check --train-steps 10`
RESOLUTION = 2.0**0.5  # bisect until the caught and the passing settings are this close (a ratio)
WEIGHT = "trf_blocks.0.att.W_value.weight"  # the tensor the weight knob perturbs


@dataclasses.dataclass(frozen=True)
class Knob:
    name: str
    what: str  # what the setting x means
    lo: float  # the range bisected (x; for `bits`, the fewest and the most mantissa bits)
    hi: float
    mutant: Callable[[float], Mutant] | None = None  # the zoo's bug at setting x
    weight: str | None = None  # or: this tensor perturbed by a relative x
    evidence: str = "forward"  # or "training"
    bits: bool = False  # an integer knob where fewer is the larger bug

    def caught_at_most(self) -> str:
        return "at most" if self.bits else "at least"


def _mutant(name: str, layer: str, knob: str, value: Callable[[float], Any], **extra: Any) -> Callable[[float], Mutant]:
    def make(x: float) -> Mutant:
        knobs = tuple(sorted({knob: value(x), **extra}.items()))
        return Mutant(f"{name}={x:g}", "", "", (Swap(layer, knobs),))

    return make


def _bits(x: float) -> Mutant:
    n = round(x)
    swap = (("bug_operand_bits", n),)
    return Mutant(f"operand-bits={n}", "", "", (Swap("Linear", swap), Swap("MultiHeadAttention", swap)))


KNOBS: tuple[Knob, ...] = (
    Knob(
        "layernorm-eps",
        "LayerNorm eps 1e-5 x (1 + x)",
        1e-6,
        10.0,
        _mutant("layernorm-eps", "LayerNorm", "bug_eps", lambda x: 1e-5 * (1 + x)),
    ),
    Knob(
        "gelu-constant",
        "GELU's cubic constant 0.044715 x (1 + x)",
        1e-7,
        1.0,
        _mutant("gelu-constant", "GELU", "bug_constant", lambda x: 0.044715 * (1 + x)),
    ),
    Knob(
        "attention-scale",
        "attention scores / head_dim ** (0.5 + x)",
        1e-8,
        0.5,
        _mutant("attention-scale", "MultiHeadAttention", "bug_scale_power", lambda x: 0.5 + x),
    ),
    Knob("operand-bits", "every matmul's operands rounded to x mantissa bits", 7, 22, _bits, bits=True),
    Knob("weight", f"{WEIGHT} x (1 ± x), element by element", 1e-8, 1.0, weight=WEIGHT),
    Knob(
        "learning-rate",
        f"AdamW's learning rate x (1 + x), {TRAINING_STEPS} steps",
        1e-5,
        1.0,
        lambda x: Mutant(f"lr={x:g}", "", "", shows_in=zoo_training.TRAINING, training=(("lr_factor", 1 + x),)),
        evidence="training",
    ),
)
BY_NAME = {k.name: k for k in KNOBS}


@dataclasses.dataclass(frozen=True)
class Point:
    x: float
    failing: frozenset[str]  # the kinds of evidence past their bounds at x


@dataclasses.dataclass
class Threshold:
    kind: str
    caught: float | None  # the smallest setting seen caught (bits: the most bits caught)
    passes: float | None  # the largest seen passing next to it (bits: the fewest bits passing)
    # Both None: not run (the bias test runs only where the envelope passes)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "caught_at": self.caught, "passes_at": self.passes}


@dataclasses.dataclass
class KnobPower:
    knob: Knob
    thresholds: list[Threshold]  # per kind of evidence, then "check" (any of them)
    points: list[Point]

    @property
    def check(self) -> Threshold:
        return self.thresholds[-1]

    def describe(self) -> str:
        t, k = self.check, self.knob
        if t.caught is None:
            return f"{k.name}: not caught anywhere in [{k.lo:g}, {k.hi:g}]"
        if k.bits:
            return f"{k.name}: catches operands of {t.caught:g} mantissa bits or fewer"
        return f"{k.name}: catches x >= {t.caught:.3g} ({k.what}); passes {t.passes:.3g}"

    def to_json(self) -> dict[str, Any]:
        k = self.knob
        return {
            "knob": k.name,
            "what": k.what,
            "range": [k.lo, k.hi],
            "evidence": k.evidence,
            "thresholds": [t.to_json() for t in self.thresholds],
            "points": [{"x": p.x, "failing": sorted(p.failing)} for p in sorted(self.points, key=lambda p: p.x)],
        }


@dataclasses.dataclass
class PowerReport:
    config: GPTConfig
    opts: ParityOptions
    knobs: list[KnobPower]
    candidate: str = "flax"  # the twin each knob is planted in

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "batch": self.opts.batch,
            "seq": self.opts.seq,
            "candidate": self.candidate,
            "directions": list(self.opts.directions),
            "knobs": [k.to_json() for k in self.knobs],
        }


class _Evaluator:
    """Runs the check at setting x of one knob, once per x."""

    def __init__(self, cfg: GPTConfig, opts: ParityOptions, knob: Knob, models: dict[str, Any], candidate: str):
        self.cfg, self.opts, self.knob, self.models, self.candidate = cfg, opts, knob, models, candidate
        self.seen: dict[float, Point] = {}

    def __call__(self, x: float) -> frozenset[str]:
        if x not in self.seen:
            self.seen[x] = Point(x, self._run(x))
        return self.seen[x].failing

    def _run(self, x: float) -> frozenset[str]:
        k = self.knob
        plant = (
            perturb(k.weight, x, self.candidate, seed=self.opts.seed)
            if k.weight is not None
            else functools.partial(planted, k.mutant(x), self.candidate)  # type: ignore[misc]
        )
        if k.evidence == "training":
            report = run_training_parity(
                self.cfg,
                batch=self.opts.batch,
                seq=min(self.opts.seq or 32, 32),
                steps=TRAINING_STEPS,
                seed=self.opts.seed,
                plant=plant,
            )
            return frozenset() if report.passed else frozenset({"training"})
        check = run_parity(self.cfg, self.opts, plant=plant, models=self.models)
        return frozenset(f.evidence for r in check.rows for f in r.findings if not f.passed)


def _bisect(caught: Callable[[float], bool], knob: Knob) -> Threshold:
    """The boundary between passing and caught settings, to RESOLUTION (to 1 for bits)."""
    lo, hi = (knob.hi, knob.lo) if knob.bits else (knob.lo, knob.hi)  # `hi`: the larger bug
    if not caught(hi):
        return Threshold("", None, hi)
    if caught(lo):
        return Threshold("", lo, None)
    while (abs(hi - lo) > 1) if knob.bits else (hi / lo > RESOLUTION):
        mid = round((lo + hi) / 2) if knob.bits else math.sqrt(lo * hi)
        if caught(mid):
            hi = mid
        else:
            lo = mid
    return Threshold("", hi, lo)


def _thresholds(knob: Knob, run: _Evaluator) -> list[Threshold]:
    """Each kind of evidence's threshold, then the check's (any kind)."""
    if knob.evidence == "training":
        return [dataclasses.replace(_bisect(lambda x: "training" in run(x), knob), kind="training")]
    out: list[Threshold] = []
    for kind in FORWARD_KINDS:
        span = knob
        if kind == "bias":  # the bias test runs only where the envelope passes: search there
            edge = out[-1].passes
            if edge is None:
                out.append(Threshold(kind, None, None))
                continue
            span = dataclasses.replace(knob, lo=edge) if knob.bits else dataclasses.replace(knob, hi=edge)

        def caught(x: float, kind: str = kind) -> bool:
            return kind in run(x)

        out.append(dataclasses.replace(_bisect(caught, span), kind=kind))
    out.append(dataclasses.replace(_bisect(lambda x: bool(run(x)), knob), kind="check"))
    return out


def measure(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(directions=("torch->flax",)),  # noqa: B008 - frozen
    *,
    knobs: Sequence[Knob] = KNOBS,
    candidate: str = "flax",
    progress: Progress = silent,
) -> PowerReport:
    """Bisect each knob, planted in `candidate`, to the smallest setting each kind of evidence catches.
    Planted in torch, no setting recompiles the Flax twin (each new knob class does, planted there)."""
    if candidate not in TWINS:
        raise ValueError(f"candidate must be one of {', '.join(TWINS)}, got {candidate!r}")
    models = {
        "torch": build_torch(ModelKind.GPT, cfg, seed=opts.seed),
        "flax": build_flax(ModelKind.GPT, cfg, seed=opts.seed),
    }
    prog = progress(len(knobs))
    out = []
    for knob in knobs:
        with prog.step(f"{knob.name}: {knob.what}", phase=f"{len(knobs)} knobs"):
            run = _Evaluator(cfg, opts, knob, models, candidate)
            thresholds = _thresholds(knob, run)
            out.append(KnobPower(knob, thresholds, list(run.seen.values())))
    return PowerReport(cfg, opts, out, candidate)
