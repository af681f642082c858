"""Forward parity, stage by stage: both twins on the same ids, every recorded stage compared.

Each direction builds its source twin, copies the source's weights into the other with the
production converters, and compares every stage of the forward (embeddings; in each block
norm1, att, residual, norm2, ff and the block's output; final norm; logits) on every backend
of the target framework, against the source twin on CPU. Stages are always matched and
reported by name, in the model's order (`stage_key`), never by position.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import jax
import numpy as np

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, ModelKind
from gpt_spec.checks import check_dtype
from gpt_spec.stages import stage_key, stage_of

from .compare import Comparison, compare
from .distribution import Distribution, DistributionCheck, distribution
from .environment import versions
from .layers import Finding, Probe, build_probes, reference_outputs, run_probes
from .progress import Progress, silent
from .tolerances import (
    BF16_FORWARD,
    BF16_KL_MAX,
    BF16_KL_MEAN,
    FP16_FORWARD,
    FP16_KL_MAX,
    FP16_KL_MEAN,
    FP32_FORWARD,
    Bound,
)
from .twins import (
    MODELS,
    MODES,
    Backend,
    build_flax,
    build_torch,
    call_module,
    discover_backends,
    matmuls,
    run_backend,
    set_mode,
    submodule,
    token_batch,
)

DIRECTIONS = ("torch->flax", "flax->torch")
DTYPE_BOUNDS = {"float32": FP32_FORWARD, "bfloat16": BF16_FORWARD, "float16": FP16_FORWARD}  # each tier's bound
KL_BOUNDS = {"bfloat16": (BF16_KL_MEAN, BF16_KL_MAX), "float16": (FP16_KL_MEAN, FP16_KL_MAX)}  # (mean, max)


@dataclasses.dataclass(frozen=True)
class Carried:
    """A stage's own bound plus the difference its inputs carried in (measured, see `carried`)."""

    bound: Bound
    extra: np.ndarray

    def limit(self, reference_abs: np.ndarray) -> np.ndarray:
        return self.bound.limit(reference_abs) + self.extra

    def describe(self) -> str:
        return f"{self.bound.describe()} + what its inputs' difference carried in"


def _inputs(name: str, stages: set[str]) -> tuple[str, list[str]]:
    """(the module that made a stage, or "" for a sum; the stages it read)."""
    if name == "final_norm":
        blocks = sorted((s for s in stages if s.count(".") == 1), key=stage_key)
        return "final_norm", [blocks[-1] if blocks else "drop_emb"]
    if name == "out_head":
        return "out_head", ["final_norm"]
    parts = name.split(".")
    i = int(parts[1])
    before = f"trf_blocks.{i - 1}" if i else "drop_emb"
    sub = parts[2] if len(parts) > 2 else None
    p = f"trf_blocks.{i}"
    return {
        "norm1": (f"{p}.norm1", [before]),
        "att": (f"{p}.att", [f"{p}.norm1"]),
        "residual": ("", [f"{p}.att", before]),
        "norm2": (f"{p}.norm2", [f"{p}.residual"]),
        "ff": (f"{p}.ff", [f"{p}.norm2"]),
        None: ("", [f"{p}.ff", f"{p}.residual"]) if f"{p}.ff" in stages else ("", [before]),
    }[sub]


def carried(
    backend: Backend, model: Any, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """For each stage, what the difference already in its inputs becomes through it, measured
    with the reference twin's own layer: |layer(candidate's input) - layer(reference's input)|;
    for a sum (a residual add), the sum of its inputs' differences.

    So each stage is held to the bound for its *own* contribution. A difference passed on from
    upstream is not blamed on the stage that passes it on, which matters where a layer amplifies:
    a LayerNorm divides by its row's sigma, and on a row of near-zero variance turns the
    rounding that reaches it into a large difference (hypothesis found one, 2 wide); the
    logits computed from it then differ as much, through no fault of the head.
    """
    names = set(reference)
    out = {}
    for name in reference:
        if name == "drop_emb":
            continue
        module, sources = _inputs(name, names)
        if not module:
            total = sum(np.asarray(candidate[s], np.float64) - reference[s] for s in sources)
            out[name] = np.abs(total)
            continue
        layer = submodule(model, module)
        x_ref, x_cand = reference[sources[0]], candidate[sources[0]]
        if np.array_equal(x_ref, x_cand):
            continue
        out[name] = np.abs(
            np.asarray(call_module(backend, layer, x_cand), np.float64) - call_module(backend, layer, x_ref)
        )
    return out


def compare_stages(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    bound: Bound,
    carry: dict[str, np.ndarray] | None = None,
) -> list[Comparison]:
    """One comparison per forward stage, matched by name and put in the model's order; with
    `carry` (from `carried`), each stage is allowed what its inputs' difference carried in."""
    if set(reference) != set(candidate):
        raise ValueError(f"stages differ: {sorted(candidate)} vs reference {sorted(reference)}")
    carry = carry or {}
    return [
        compare(name, reference[name], candidate[name], Carried(bound, carry[name]) if name in carry else bound)
        for name in sorted(reference, key=stage_key)
    ]


def _failure_order(f: Finding) -> tuple:
    return stage_key(f.name), -f.margin


def first_failure(findings: Sequence[Finding]) -> Finding | None:
    """The failing finding earliest in the forward; of those at one stage, the one furthest past
    what it allows (the most telling figure, whichever kind of evidence it is)."""
    return min((f for f in findings if not f.passed), key=_failure_order, default=None)


@dataclasses.dataclass
class ParityRow:
    direction: str
    reference: str
    candidate: str
    stages: list[Comparison]  # every recorded stage of the whole forward, in the model's order
    layers: list[Finding] = dataclasses.field(default_factory=list)  # layers.py's evidence
    distribution: Distribution | None = None  # the next-token distributions (distribution.py)
    distribution_check: DistributionCheck | None = None  # held to its tier's KL bounds, where it has them

    def stage(self, name: str) -> Comparison:
        return next(c for c in self.stages if c.name == name)

    @property
    def logits(self) -> Comparison:
        return self.stage("out_head")

    @property
    def findings(self) -> list[Finding]:
        check = [self.distribution_check] if self.distribution_check is not None else []
        return [*self.stages, *self.layers, *check]

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.findings)

    @property
    def first_failure(self) -> Finding | None:
        return first_failure(self.findings)

    def to_json(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "direction": self.direction,
            "reference": self.reference,
            "candidate": self.candidate,
            "passed": self.passed,
            "first_failure": None
            if first is None
            else {
                "name": first.name,
                "stage": stage_of(first.name),
                "evidence": first.evidence,
                "margin": first.margin,
                "describe": first.describe(),
            },
            "logits": self.logits.to_json(),
            "distribution": None
            if self.distribution is None
            else {
                **self.distribution.to_json(),
                "check": None if self.distribution_check is None else self.distribution_check.to_json(),
            },
            "stages": [c.to_json() for c in self.stages],
            "layers": [f.to_json() for f in self.layers],
        }


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
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def first_failure(self) -> tuple[ParityRow, Finding] | None:
        """The earliest failing finding of any row (a row's candidate named with it)."""
        found = [(r, r.first_failure) for r in self.rows if r.first_failure is not None]
        return min(found, key=lambda rf: _failure_order(rf[1]), default=None)

    def failures(self) -> list[str]:
        """Per row that fails: where, which evidence, the figure."""
        out = []
        for r in self.rows:
            first = r.first_failure
            if first is not None:
                out.append(
                    f"{r.direction} {r.candidate}: first failure at {stage_of(first.name)}, "
                    f"{first.evidence} evidence: {first.describe()}"
                )
        return out

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
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
            "skipped": [{"backend": b, "reason": why} for b, why in self.skipped],
            "versions": versions(),
        }


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference's side of a check, computed once: its stages on the ids, and (with layer
    evidence) the probes built from its stream and weights with its own outputs on them."""

    backend: Backend
    model: Any
    stages: dict[str, np.ndarray]
    probes: list[Probe] | None
    outputs: list[np.ndarray] | None

    @classmethod
    def run(cls, cfg: GPTConfig, kind: str, backend: Backend, model: Any, ids: np.ndarray, *, seed: int, layers: bool):
        stages = run_backend(backend, model, ids)
        if not layers:
            return cls(backend, model, stages, None, None)
        probes = build_probes(cfg, kind, stages, _TRUE_STATE_DICT[backend.framework](model), seed=seed)
        return cls(backend, model, stages, probes, reference_outputs(probes, backend, model))

    def against(
        self, direction: str, backend: Backend, candidate: Any, ids: np.ndarray, bound: Bound, dtype: str
    ) -> ParityRow:
        """Every piece of evidence for `candidate` run on `backend` (a torch-like module on a torch one)."""
        out = run_backend(backend, candidate, ids)
        found = (
            []
            if self.probes is None or self.outputs is None
            else run_probes(self.probes, self.outputs, backend, candidate)
        )
        carry = carried(self.backend, self.model, self.stages, out) if dtype == "float32" else None
        dist = distribution(self.stages["out_head"], out["out_head"])
        check = DistributionCheck(dist, *KL_BOUNDS[dtype]) if dtype in KL_BOUNDS else None
        stages = compare_stages(self.stages, out, bound, carry)
        return ParityRow(direction, self.backend.label, backend.label, stages, found, dist, check)


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


# What a twin's own converters say it holds: unaffected by a planted converter bug (zoo.py
# patches the package-level functions, which the checks below call).
_TRUE_STATE_DICT: dict[str, Callable[[Any], dict[str, np.ndarray]]] = {
    "torch": gpt_torch.weights.state_dict,
    "flax": gpt_flax.weights.state_dict,
}


@dataclasses.dataclass(frozen=True)
class ParityOptions:
    """What one parity check compares, and how: the model and its options, the batch of token ids
    (`seq` None: 128 or the context), the directions, the dtype tier and its bound (None: the
    tier's own), whether each layer is checked on its own, and the matmul precision."""

    model: str = ModelKind.GPT
    batch: int = 2
    seq: int | None = None
    seed: int = 0
    mode: str = "eval"
    directions: Sequence[str] = DIRECTIONS
    dtype: str = "float32"
    bound: Bound | None = None
    layer_evidence: bool = True
    matmul_precision: str = "float32"
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def run_parity(
    cfg: GPTConfig,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    weights: Mapping[str, np.ndarray] | None = None,
    plant: Callable[[dict[str, Any]], AbstractContextManager] | None = None,
    models: dict[str, Any] | None = None,
    progress: Progress = silent,
) -> ParityReport:
    """Build each direction's source twin, copy its weights into the other, compare every stage,
    then (float32, `opts.layer_evidence`) every building block on its own (layers.py).

    The reference is the source twin on CPU; the candidates are the target twin on every device
    of its framework. Train mode is compared only at drop_rate 0 (the twins draw dropout masks
    from different generators). With `weights` (a checkpoint's state dict) both twins hold those
    instead of an init. With `opts.dtype` "bfloat16" both twins run cast to bfloat16 (the weights
    rounded identically), the bound defaults to that tier's and the layer evidence (float32
    envelopes) is left out. `opts.matmul_precision` "default" leaves each framework's default (TF32
    on GPUs, bfloat16 passes on TPUs) instead of pinning float32. `plant(twins)` is entered with
    both twins built (a context manager: zoo.py plants a bug in one); `models` passes both
    twins ready built ({"torch": ..., "flax": ...}, of `cfg`), which are left at their own weights.
    """
    model, batch, seed, mode, directions, dtype = (
        opts.model,
        opts.batch,
        opts.seed,
        opts.mode,
        opts.directions,
        opts.dtype,
    )
    options = opts.model_options
    _check_args(model, mode, cfg)
    check_dtype(dtype)
    bound = DTYPE_BOUNDS[dtype] if opts.bound is None else opts.bound
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {d!r}")
    layer_evidence = opts.layer_evidence and dtype == "float32"
    seq = min(cfg.context_length, 128) if opts.seq is None else opts.seq
    ids = token_batch(cfg, batch, seq, seed)
    backends, skipped = discover_backends()
    cpu = {"torch": Backend("torch", "cpu"), "flax": Backend("flax", jax.devices("cpu")[0])}
    per_direction = 1 + sum(b.framework == d.split("->")[1] for b in backends for d in directions[:1])
    prog = progress(1 + len(directions) * per_direction)
    rows: list[ParityRow] = []
    notes = (
        []
        if layer_evidence
        else [
            "layer evidence left out: its envelopes are float32's" if dtype != "float32" else "layer evidence left out"
        ]
    )
    with matmuls(opts.matmul_precision) as precision, contextlib.ExitStack() as stack:
        with prog.step("building both twins, each with its own init"):
            twin: dict[str, Any] = (
                models
                if models is not None
                else {
                    "torch": build_torch(model, cfg, seed=seed, **(options or {})),
                    "flax": build_flax(model, cfg, seed=seed, **(options or {})),
                }
            )
            if plant is not None:
                stack.enter_context(plant(twin))
            own = (
                {"torch": weights, "flax": weights}
                if weights is not None
                else {"torch": gpt_torch.state_dict(twin["torch"]), "flax": gpt_flax.state_dict(twin["flax"])}
            )
            for m in twin.values():
                set_mode(m, mode)
            gpt_torch.cast(twin["torch"], dtype)  # loads below round into this dtype
            gpt_flax.cast(twin["flax"], dtype)
        load: dict[str, Callable[[Any, Mapping[str, object]], None]] = {
            "torch": gpt_torch.load_state_dict,
            "flax": gpt_flax.load_state_dict,
        }
        for direction in directions:
            source, target = direction.split("->")
            with prog.step(
                f"{direction}: copy {source}'s weights into both, {cpu[source].label} reference"
                + (", layer probes" if layer_evidence else "")
            ):
                load[source](twin[source], own[source])  # back to its own weights after an earlier direction
                load[target](twin[target], own[source])
                ref = Reference.run(cfg, model, cpu[source], twin[source], ids, seed=seed, layers=layer_evidence)
            for backend in backends:
                if backend.framework != target:
                    continue
                with prog.step(f"{direction}: {backend.label}"):
                    rows.append(ref.against(direction, backend, twin[target], ids, bound, dtype))
        if models is not None:  # leave them as they came
            for name in twin:
                load[name](twin[name], own[name])
    return ParityReport(cfg, model, mode, batch, seq, seed, precision, rows, skipped, dtype, notes)
