"""State dicts as the twins exchange them, in memory or read lazily from a file, and their checks.

A state dict is a flat `{name: array}` in the PyTorch twin's names and layouts. Both twins'
`load_state_dict` call `check_state_dict` before touching a parameter, so a dict with a missing
or extra key, a wrong shape or a dtype the twins cannot hold exactly is refused whole, with the
same message. A `LazyStateDict` knows every shape and dtype from a file's header and reads a
tensor only when asked for it, so a checkpoint is checked before anything is read or built, and
a model is filled one tensor at a time (the resident memory of a load is the model's plus one
tensor's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

StateDict = dict[str, np.ndarray]
# The floating dtypes a checkpoint may hold: float16 and bfloat16 widen to float32 exactly, and
# float64 narrows by rounding only (a value beyond float32's range is refused, never made inf).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MASK = re.compile(r"trf_blocks\.(\d+)\.att\.mask")


class LazyStateDict(Mapping[str, np.ndarray]):
    """`{name: array}` whose arrays are read on access (a fresh array each time, nothing cached);
    shapes and dtypes are known without reading."""

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], str, Callable[[], np.ndarray]]]):
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._entries[key][2]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        shape, dtype, _ = self._entries[key]
        return shape, dtype

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors)"


def dtype_name(value: Any) -> str:
    """'float32', 'bfloat16', ... for a numpy, JAX or torch array."""
    return str(value.dtype).removeprefix("torch.")


def as_numpy(value: Any) -> np.ndarray:
    """A numpy view or copy of a numpy, JAX or torch array (torch's bfloat16 as ml_dtypes'); a torch
    tensor no numpy array can hold (float8, quantized, sparse, meta) is a ValueError."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        try:
            tensor = value.detach().cpu()
            if dtype_name(tensor) == "bfloat16":
                import ml_dtypes
                import torch

                return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return tensor.numpy()
        # float8 and quantized dtypes, sparse layouts, meta tensors: torch raises each of these
        except (TypeError, RuntimeError, NotImplementedError) as e:
            raise ValueError(f"a torch tensor of dtype {dtype_name(value)} has no numpy equivalent: {e}") from e
    return np.asarray(value)


def info(sd: Mapping[str, Any], key: str) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of `sd[key]`, without reading a lazy one."""
    if isinstance(sd, LazyStateDict):
        return sd.info(key)
    value = sd[key]
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except Exception as e:  # e.g. a ragged list
            raise ValueError(f"state dict key {key!r} is not an array: {e}") from e
    return tuple(int(n) for n in value.shape), dtype_name(value)


def layer_count(keys, pattern: str, what: str) -> int:
    """How many blocks `pattern` (one group: the index) numbers among `keys`, refusing gaps."""
    found = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if found != list(range(len(found))):
        raise ValueError(f"{what}: transformer layers {found} are not numbered 0..n-1")
    return len(found)


def _names(keys) -> str:
    return ", ".join(repr(k) for k in sorted(keys))


def checked_array(name: str, value: Any, source: str | None = None) -> np.ndarray:
    """`value` as a numpy array, refusing float64 values float32 cannot hold (they would be inf);
    `source` (the file) starts the refusal when given."""
    array = as_numpy(value)
    if array.dtype == np.float64 and array.size:
        finite = np.isfinite(array)
        # Only what rounds past float32's largest is refused: a value a little beyond it rounds to it.
        with np.errstate(over="ignore"):
            overflows = finite & np.isinf(array.astype(np.float32))
        if overflows.any():
            where = f"{source}: " if source else ""
            raise ValueError(
                f"{where}state dict key {name!r} holds float64 value(s) up to {np.abs(array[finite]).max():.9g} "
                f"in magnitude, beyond float32's range (largest {_FLOAT32_MAX:.9g})"
            )
    return array


# Past halfway from bfloat16's largest (3.38953139e38) to 2**128, float32 rounds to inf in bfloat16.
BFLOAT16_OVERFLOW = float((2 - 2.0**-8) * 2.0**127)
_BFLOAT16_MAX = float((2 - 2.0**-7) * 2.0**127)


FLOAT16_OVERFLOW = 65520.0  # the midpoint past float16's largest, 65504: rounds to inf


def check_cast_range(what: str, max_abs: float, dtype: str) -> None:
    """Refuse values of `what` that a cast to `dtype` would make inf (bfloat16, float16)."""
    if dtype == "bfloat16":
        check_bfloat16_range(what, max_abs)
    elif dtype == "float16" and max_abs >= FLOAT16_OVERFLOW:
        raise ValueError(
            f"{what} holds value(s) up to {max_abs:.9g} in magnitude, which round to inf in float16 (largest 65504)"
        )


def check_bfloat16_range(what: str, max_abs: float) -> None:
    """Refuse values of `what` (the largest finite magnitude `max_abs`) that bfloat16 would make inf:
    a cast or a bfloat16 save must not turn a finite weight into an infinity silently."""
    if max_abs >= BFLOAT16_OVERFLOW:
        raise ValueError(
            f"{what} holds value(s) up to {max_abs:.9g} in magnitude, which round to inf in bfloat16 "
            f"(largest {_BFLOAT16_MAX:.9g})"
        )


def _check_mask(name: str, sd: Mapping[str, Any], context_length: int) -> None:
    """The book's persistent causal-mask buffer: exactly triu(ones(n, n), 1) for this context."""
    shape, _ = info(sd, name)
    if shape != (context_length, context_length):
        raise ValueError(
            f"state dict key {name!r} has shape {shape}, expected the causal mask {(context_length, context_length)}"
        )
    value = as_numpy(sd[name]).astype(np.float64)
    if not np.array_equal(value, np.triu(np.ones((context_length, context_length)), k=1)):
        raise ValueError(f"state dict key {name!r} is not the causal mask triu(ones, 1)")


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    given: Mapping[str, Any],
    model_name: str,
    *,
    what: str = "state dict",
    context_length: int | None = None,
) -> None:
    """Every key of `given` expected and there, with its shape and a float dtype; else ValueError
    (`what` names the dict in it). A causal-mask buffer is checked against `context_length`,
    default that of the expected `pos_emb.weight`."""
    if not isinstance(given, Mapping):
        raise ValueError(f"state dict must be a mapping of name -> array, got {type(given).__name__}")
    masks = {
        k
        for k in given
        if isinstance(k, str)
        and (m := _MASK.fullmatch(k))
        and f"trf_blocks.{m.group(1)}.att.out_proj.weight" in expected
    }
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected) - masks
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_names(map(str, unexpected))}")
        raise ValueError(f"{what} does not match {model_name}: {'; '.join(parts)}")
    for name in sorted(masks):
        _check_mask(name, given, expected["pos_emb.weight"][0] if context_length is None else context_length)
    for name, shape in expected.items():
        got, dtype = info(given, name)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"state dict key {name!r} has dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
        if got != tuple(shape):
            raise ValueError(f"state dict key {name!r} has shape {got}, expected {tuple(shape)}")


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, Any], model_name: str, source: str | None = None
) -> Mapping[str, np.ndarray]:
    """Validate `given` against the model's `{name: shape}`; return its arrays as numpy (lazily for
    a `LazyStateDict`), without the causal-mask buffers the book's model carries.

    Raises ValueError naming every missing and unexpected key, or the first key whose shape or
    dtype is wrong. A `trf_blocks.N.att.mask` of a block the model has is accepted (and dropped)
    only if it is the causal mask of the model's context length. Nothing is converted in place.
    `source` (the file `given` was read from) starts every refusal, a lazy read's too.
    """
    try:
        check_keys(expected, given, model_name)
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f"{source}: {e}") from None
    if isinstance(given, LazyStateDict):

        def reader(name: str) -> Callable[[], np.ndarray]:
            return lambda: checked_array(name, given[name], source)

        return LazyStateDict({name: (*given.info(name), reader(name)) for name in expected})
    return {name: checked_array(name, given[name], source) for name in expected}
