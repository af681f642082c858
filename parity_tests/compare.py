"""The comparator: walks nested outputs, checks shapes before values, names what failed and by how much."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .tolerances import Bound


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One tensor compared: the worst absolute and relative difference and the verdict."""

    name: str
    shape: tuple[int, ...]
    max_abs: float  # max |candidate - reference|
    max_rel: float  # max |candidate - reference| / max |reference|
    worst_index: tuple[int, ...] | None  # the element furthest past (or closest to) its bound
    bound: Bound
    passed: bool
    problem: str = ""  # why it failed before values could be compared, or what was non-finite
    n_beyond: int = 0  # elements past the bound
    size: int = 0
    ref_max: float = float("nan")  # max |reference|

    @property
    def largest_allowed(self) -> float:
        """The bound at the reference's largest element: atol + (rtol + stol) * max|ref|."""
        return self.bound.atol + (self.bound.rtol + self.bound.stol) * self.ref_max

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        if self.problem:
            return f"{self.name}: {verdict}: {self.problem}"
        at = f" at {self.worst_index}" if self.worst_index is not None else ""
        return (
            f"{self.name}: {verdict}: max |Δ| {self.max_abs:.3g}{at}, max rel |Δ| {self.max_rel:.3g} "
            f"(bound {self.bound.describe()}; {self.n_beyond} of {self.size} elements past it)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "worst_index": list(self.worst_index) if self.worst_index is not None else None,
            "atol": self.bound.atol,
            "rtol": self.bound.rtol,
            "stol": self.bound.stol,
            "n_beyond": self.n_beyond,
            "ref_max": self.ref_max,
            "size": self.size,
            "passed": self.passed,
            "problem": self.problem,
        }


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu()
        if x.dtype.is_floating_point:
            x = x.float()
    return np.asarray(x)


def compare(name: str, reference: Any, candidate: Any, bound: Bound) -> Comparison:
    """Compare one tensor against its reference under `bound`; NaN or inf on either side fails."""
    ref, cand = _as_numpy(reference), _as_numpy(candidate)
    # float32 pairs stay float32: the difference of two nearby float32 numbers is exact in
    # float32 (Sterbenz), and 163M-element tensors are not copied to float64.
    work = np.float32 if ref.dtype == cand.dtype == np.float32 else np.float64
    ref, cand = ref.astype(work, copy=False), cand.astype(work, copy=False)
    nan = float("nan")
    if ref.shape != cand.shape:
        return Comparison(
            name, tuple(ref.shape), nan, nan, None, bound, False,
            f"shape {tuple(cand.shape)} differs from reference shape {tuple(ref.shape)}",
        )
    shape = tuple(ref.shape)
    for side, arr in (("reference", ref), ("candidate", cand)):
        if not np.isfinite(arr).all():
            bad = ~np.isfinite(arr)
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            return Comparison(
                name, shape, nan, nan, where, bound, False,
                f"{side} has {int(bad.sum())} non-finite value(s), first at {where}",
            )
    if ref.size == 0:
        return Comparison(name, shape, 0.0, 0.0, None, bound, True)
    diff = np.abs(cand - ref)
    ref_abs = np.abs(ref)
    limit = bound.limit(ref_abs).astype(work, copy=False)
    worst = np.unravel_index(int(np.argmax(diff / np.maximum(limit, np.finfo(work).tiny))), shape)
    max_abs = float(diff.max())
    scale = float(ref_abs.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    n_beyond = int((diff > limit).sum())
    return Comparison(name, shape, max_abs, max_rel, tuple(int(i) for i in worst), bound,
                      n_beyond == 0, n_beyond=n_beyond, size=int(ref.size), ref_max=scale)


def compare_tree(reference: Any, candidate: Any, bound: Bound, name: str = "output") -> list[Comparison]:
    """Compare nested dicts/lists/tuples of tensors leaf by leaf, names joined with '.'."""
    if isinstance(reference, Mapping):
        if not isinstance(candidate, Mapping) or set(reference) != set(candidate):
            got = sorted(candidate) if isinstance(candidate, Mapping) else type(candidate).__name__
            return [_structure_mismatch(name, f"keys {got} differ from reference keys {sorted(reference)}", bound)]
        return [c for k in reference for c in compare_tree(reference[k], candidate[k], bound, f"{name}.{k}")]
    if isinstance(reference, Sequence) and not isinstance(reference, str):
        if not isinstance(candidate, Sequence) or len(candidate) != len(reference):
            got = len(candidate) if isinstance(candidate, Sequence) else type(candidate).__name__
            return [_structure_mismatch(name, f"{got} entries differ from reference's {len(reference)}", bound)]
        return [c for i, (r, c_) in enumerate(zip(reference, candidate)) for c in compare_tree(r, c_, bound, f"{name}.{i}")]
    return [compare(name, reference, candidate, bound)]


def _structure_mismatch(name: str, problem: str, bound: Bound) -> Comparison:
    nan = float("nan")
    return Comparison(name, (), nan, nan, None, bound, False, problem)


def assert_close(reference: Any, candidate: Any, bound: Bound, name: str = "output") -> list[Comparison]:
    """compare_tree, raising AssertionError that lists every failing tensor; returns all comparisons."""
    results = compare_tree(reference, candidate, bound, name)
    failed = [c for c in results if not c.passed]
    if failed:
        raise AssertionError("\n".join(c.describe() for c in failed))
    return results
