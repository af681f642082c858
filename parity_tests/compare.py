"""The comparator: walks nested outputs, checks shapes before values, names what failed and by how much.

Two kinds of evidence come out of it: `compare` holds each element to a bound (a `Bound`, or
limits derived element by element, see envelopes.py), and `bias_check` looks for systematic error:
a mean signed difference far beyond its standard error, which a biased op leaves even where
every element is within its bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast, overload

import numpy as np

from .tolerances import BIAS_FLOOR_ULPS, BIAS_MIN_ROWS, BIAS_Z, Bound

EPS32 = float(np.finfo(np.float32).eps)  # one ulp at 1.0


class Named(Protocol):
    """What a comparison was held to, as its report names it: a `Tolerance`, or what an envelope
    passed as `limit=` was derived from (layers.Envelope)."""

    def describe(self) -> str: ...


class Tolerance(Named, Protocol):
    """A named limit per element from the reference's magnitudes: a `Bound`, or forward.Carried."""

    def limit(self, reference_abs: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One tensor compared: the worst absolute and relative difference and the verdict."""

    name: str
    shape: tuple[int, ...]
    max_abs: float  # max |candidate - reference|
    max_rel: float  # max |candidate - reference| / max |reference|
    worst_index: tuple[int, ...] | None  # the element furthest past (or closest to) its bound
    bound: Named
    passed: bool
    problem: str = ""  # why it failed before values could be compared, or what was non-finite
    n_beyond: int = 0  # elements past the bound
    size: int = 0
    ref_max: float = float("nan")  # max |reference|
    margin: float = float("nan")  # max |Δ| / allowed over the elements: > 1 fails
    largest_allowed: float = float("nan")  # what the bound allows at the reference's largest element
    evidence: str = "bound"  # "bound" (a named Bound) or "envelope" (derived element by element)
    same_non_finite: int = 0  # non-finite elements both sides share, value for value (still a failure)

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        if self.problem:
            return f"{self.name}: {verdict}: {self.problem}"
        at = f" at {self.worst_index}" if self.worst_index is not None else ""
        allowed = self.bound.describe() if self.evidence == "envelope" else f"the bound {self.bound.describe()}"
        return (
            f"{self.name}: {verdict}: max |Δ| {self.max_abs:.3g}{at}, max rel |Δ| {self.max_rel:.3g}; "
            f"{self.margin:.3g}x what {allowed} allows at its worst element "
            f"({self.n_beyond} of {self.size} elements past it)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "worst_index": list(self.worst_index) if self.worst_index is not None else None,
            "evidence": self.evidence,
            "bound": self.bound.describe(),
            **{k: getattr(self.bound, k) for k in ("atol", "rtol", "stol") if hasattr(self.bound, k)},
            "margin": self.margin,
            "largest_allowed": self.largest_allowed,
            "n_beyond": self.n_beyond,
            "ref_max": self.ref_max,
            "size": self.size,
            "same_non_finite": self.same_non_finite,
            "passed": self.passed,
            "problem": self.problem,
        }


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu()
        if x.dtype.is_floating_point:
            x = x.float()
    return np.asarray(x)


@overload
def compare(
    name: str, reference: Any, candidate: Any, bound: Tolerance, *, limit: np.ndarray | None = None
) -> Comparison: ...
@overload
def compare(name: str, reference: Any, candidate: Any, bound: Named, *, limit: np.ndarray) -> Comparison: ...
def compare(name: str, reference: Any, candidate: Any, bound: Named, *, limit: np.ndarray | None = None) -> Comparison:
    """Compare one tensor against its reference under `bound`; NaN or inf on either side fails.

    With `limit` (an array of the reference's shape: what each element may differ by, derived
    for this very input) the elements are held to it, and `bound` only names it.
    """
    evidence = "bound" if limit is None else "envelope"
    ref, cand = _as_numpy(reference), _as_numpy(candidate)
    # float32 pairs stay float32: the difference of two nearby float32 numbers is exact in
    # float32 (Sterbenz), and 163M-element tensors are not copied to float64.
    work = np.float32 if ref.dtype == cand.dtype == np.float32 else np.float64
    ref, cand = ref.astype(work, copy=False), cand.astype(work, copy=False)
    nan = float("nan")
    if ref.shape != cand.shape:
        return Comparison(
            name,
            tuple(ref.shape),
            nan,
            nan,
            None,
            bound,
            False,
            f"shape {tuple(cand.shape)} differs from reference shape {tuple(ref.shape)}",
            margin=float("inf"),
            evidence=evidence,
        )
    shape = tuple(ref.shape)
    bad_ref, bad_cand = ~np.isfinite(ref), ~np.isfinite(cand)
    if bad_ref.any() and np.array_equal(bad_ref, bad_cand) and _same_values(ref[bad_ref], cand[bad_cand]):
        return _shared_non_finite(name, ref, cand, bound, limit, bad_ref)
    for side, arr in (("reference", ref), ("candidate", cand)):
        if not np.isfinite(arr).all():
            bad = ~np.isfinite(arr)
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            return Comparison(
                name,
                shape,
                nan,
                nan,
                where,
                bound,
                False,
                f"{side} has {int(bad.sum())} non-finite value(s), first at {where}",
                margin=float("inf"),
                evidence=evidence,
            )
    if ref.size == 0:
        return Comparison(name, shape, 0.0, 0.0, None, bound, True, margin=0.0, evidence=evidence)
    diff = np.abs(cand - ref)
    ref_abs = np.abs(ref)
    if limit is None:
        limit = cast(Tolerance, bound).limit(ref_abs)  # the overloads ask a Tolerance when no limit is given
    limit = np.broadcast_to(np.asarray(limit, dtype=np.float64), shape)
    if np.isnan(limit).any():  # a limit that could not be derived judges nothing: fail, say why
        where = tuple(int(i) for i in np.argwhere(np.isnan(limit))[0])
        return Comparison(
            name,
            shape,
            nan,
            nan,
            where,
            bound,
            False,
            f"the limit is NaN at {where}: nothing to hold the difference to",
            margin=float("inf"),
            evidence=evidence,
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / limit)  # x/0 = inf: any difference where none is allowed
    worst = np.unravel_index(int(np.argmax(ratio)), shape)
    max_abs = float(diff.max())
    scale = float(ref_abs.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    n_beyond = int((diff > limit).sum())
    return Comparison(
        name,
        shape,
        max_abs,
        max_rel,
        tuple(int(i) for i in worst),
        bound,
        n_beyond == 0,
        n_beyond=n_beyond,
        size=int(ref.size),
        ref_max=scale,
        margin=float(ratio[worst]),
        largest_allowed=float(limit[np.unravel_index(int(np.argmax(ref_abs)), shape)]),
        evidence=evidence,
    )


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def _shared_non_finite(name: str, ref, cand, bound: Named, limit, bad: np.ndarray) -> Comparison:
    """Both sides non-finite at the same elements with the same values (NaN for NaN, inf of one
    sign): still a failure, but the finite elements are compared, so a diagnosis (diagnose.py) can
    tell two models that break alike from two that break differently."""
    if limit is None:  # the bound's limit over the whole tensor (a carried one is element by element)
        limit = cast(Tolerance, bound).limit(np.abs(np.where(bad, 0, ref)))
    limit = np.broadcast_to(np.asarray(limit, dtype=np.float64), ref.shape)[~bad]
    finite = compare(name, ref[~bad], cand[~bad], bound, limit=limit)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    problem = f"both sides have {int(bad.sum())} non-finite value(s), the same ones, first at {where}"
    if finite.problem:
        problem += f"; the finite elements: {finite.problem}"
    return dataclasses.replace(
        finite, shape=tuple(ref.shape), worst_index=where, passed=False, problem=problem, same_non_finite=int(bad.sum())
    )


def compare_tree(reference: Any, candidate: Any, bound: Tolerance, name: str = "output") -> list[Comparison]:
    """Compare nested dicts/lists/tuples of tensors leaf by leaf, names joined with '.'."""
    if isinstance(reference, Mapping):
        if not isinstance(candidate, Mapping) or set(reference) != set(candidate):
            got = sorted(candidate) if isinstance(candidate, Mapping) else type(candidate).__name__
            return [_structure_mismatch(name, f"keys {got} differ from reference keys {sorted(reference)}", bound)]
        return [c for k in reference for c in compare_tree(reference[k], candidate[k], bound, f"{name}.{k}")]
    if isinstance(reference, Sequence) and not isinstance(reference, str):
        if not isinstance(candidate, Sequence) or len(candidate) != len(reference):
            entries = len(candidate) if isinstance(candidate, Sequence) else type(candidate).__name__
            return [_structure_mismatch(name, f"{entries} entries differ from reference's {len(reference)}", bound)]
        return [
            c
            for i, (r, c_) in enumerate(zip(reference, candidate, strict=True))
            for c in compare_tree(r, c_, bound, f"{name}.{i}")
        ]
    return [compare(name, reference, candidate, bound)]


def _structure_mismatch(name: str, problem: str, bound: Named) -> Comparison:
    nan = float("nan")
    return Comparison(name, (), nan, nan, None, bound, False, problem, margin=float("inf"))


def assert_close(reference: Any, candidate: Any, bound: Bound, name: str = "output") -> list[Comparison]:
    """compare_tree, raising AssertionError that lists every failing tensor; returns all comparisons."""
    results = compare_tree(reference, candidate, bound, name)
    failed = [c for c in results if not c.passed]
    if failed:
        raise AssertionError("\n".join(c.describe() for c in failed))
    return results


@dataclasses.dataclass(frozen=True)
class BiasCheck:
    """Systematic error of a candidate against its reference.

    Two ratio estimates over all elements: the scale bias sum(Δ*ref)/sum(ref^2) (a candidate that
    multiplies by 1 + δ gives δ) and the offset bias sum(Δ)/sum|ref| (one that adds b gives
    b/mean|ref|), each with its standard error computed over rows (the last axis): rows, not
    elements, are the independent units, since one row shares its mean, its variance, its
    softmax; repeated rows count once, and with fewer than BIAS_MIN_ROWS distinct rows there is
    no test. It fails where an estimate is both BIAS_Z standard errors from zero and more than
    BIAS_FLOOR_ULPS ulps (of 1.0, relative): correctly rounded ops may be biased by a fraction of
    an ulp (XLA multiplies by a rounded 1/K where torch divides by K), so a tiny bias measured
    very precisely is no failure.
    """

    name: str
    rows: int
    scale_ulps: float  # mean scale bias, in float32 ulps (relative)
    scale_z: float
    offset_ulps: float  # mean offset bias / mean|ref|, in ulps
    offset_z: float
    evidence: str = "bias"

    @property
    def margin(self) -> float:
        """min(|z| / BIAS_Z, |mean| / floor) of the worse statistic: > 1 fails."""
        return max(
            min(abs(z) / BIAS_Z, abs(m) / BIAS_FLOOR_ULPS)
            for m, z in ((self.scale_ulps, self.scale_z), (self.offset_ulps, self.offset_z))
        )

    @property
    def passed(self) -> bool:
        return not self.margin > 1.0

    @property
    def tested(self) -> bool:
        return self.rows >= BIAS_MIN_ROWS

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        if not self.tested:
            return (
                f"{self.name}: not tested for systematic error: {self.rows} distinct rows, fewer than {BIAS_MIN_ROWS}"
            )
        return (
            f"{self.name}: {verdict}: systematic error over {self.rows} distinct rows: scale "
            f"{self.scale_ulps:+.3g} ulps ({self.scale_z:+.3g} standard errors), offset "
            f"{self.offset_ulps:+.3g} ulps ({self.offset_z:+.3g} s.e.); fails past {BIAS_Z:g} "
            f"s.e. and {BIAS_FLOOR_ULPS:g} ulps together"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "evidence": self.evidence,
            "rows": self.rows,
            "scale_ulps": self.scale_ulps,
            "scale_z": self.scale_z,
            "offset_ulps": self.offset_ulps,
            "offset_z": self.offset_z,
            "z_limit": BIAS_Z,
            "floor_ulps": BIAS_FLOOR_ULPS,
            "min_rows": BIAS_MIN_ROWS,
            "tested": self.tested,
            "margin": self.margin,
            "passed": self.passed,
        }


def _ratio_and_z(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """sum(num)/sum(den) over rows, and that ratio over its cluster-robust standard error."""
    total = float(den.sum())
    if num.size < 2 or total == 0.0:
        return 0.0, 0.0
    ratio = float(num.sum()) / total
    resid = num - ratio * den
    se = np.sqrt(float((resid**2).sum()) * num.size / (num.size - 1)) / total
    if se == 0.0:
        return ratio, (0.0 if ratio == 0.0 else float("inf") * np.sign(ratio))
    return ratio, ratio / se


def bias_check(name: str, reference: Any, candidate: Any, *, row: int | None = None) -> BiasCheck:
    """Test `candidate - reference` for systematic error, rows along the last axis (or, with
    `row`, the flattened values cut into rows of that length)."""
    ref = _as_numpy(reference).astype(np.float64)
    cand = _as_numpy(candidate).astype(np.float64)
    if row is not None:
        n = ref.size // row * row
        ref, cand = ref.reshape(-1)[:n].reshape(-1, row), cand.reshape(-1)[:n].reshape(-1, row)
    ref, cand = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
    # Rows are the independent units: a repeated row repeats the same roundings, not new evidence.
    _, first = np.unique(ref, axis=0, return_index=True)
    ref, cand = ref[np.sort(first)], cand[np.sort(first)]
    if ref.shape[0] < BIAS_MIN_ROWS:  # a few rows' roundings can all lean one way by chance
        return BiasCheck(name, int(ref.shape[0]), 0.0, 0.0, 0.0, 0.0)
    diff = cand - ref
    scale, scale_z = _ratio_and_z((diff * ref).sum(axis=-1), (ref * ref).sum(axis=-1))
    offset, offset_z = _ratio_and_z(diff.sum(axis=-1), np.abs(ref).sum(axis=-1))
    return BiasCheck(name, int(ref.shape[0]), scale / EPS32, scale_z, offset / EPS32, offset_z)
