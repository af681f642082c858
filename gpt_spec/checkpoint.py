"""The canonical state dict: flat `{name: numpy array}` in the PyTorch twin's names and layouts.

Both twins' `load_state_dict` call `check_state_dict` before touching a parameter, so a dict with a
missing or extra key, a wrong shape or a non-float tensor is refused whole, with the same message.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

StateDict = dict[str, np.ndarray]


def _names(keys) -> str:
    return ", ".join(repr(k) for k in sorted(keys))


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, object], model_name: str
) -> StateDict:
    """Validate `given` against the model's `{name: shape}`; return it as float numpy arrays.

    Raises ValueError naming every missing and unexpected key, or the first key whose shape or
    dtype is wrong. Nothing is converted in place; the caller assigns only after this returns.
    """
    if not isinstance(given, Mapping):
        raise ValueError(f"state dict must be a mapping of name -> array, got {type(given).__name__}")
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_names(unexpected)}")
        raise ValueError(f"state dict does not match {model_name}: {'; '.join(parts)}")
    arrays: StateDict = {}
    for name, shape in expected.items():
        try:
            value = np.asarray(given[name])
        except Exception as e:  # e.g. a torch tensor that requires grad, or a ragged list
            raise ValueError(f"state dict key {name!r} is not an array: {e}") from e
        if value.dtype.kind != "f":
            raise ValueError(
                f"state dict key {name!r} has dtype {value.dtype}, expected a floating-point array"
            )
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"state dict key {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        arrays[name] = value
    return arrays
