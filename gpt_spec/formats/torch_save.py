"""The book's `torch.save` files (`model.pth`, or chapter 5's dict with a `model_state_dict`), read
with `weights_only=True` so no pickled code runs, every tensor as numpy; what no state dict holds
(code in the pickle, a TorchScript archive, safetensors under a .pth name) is refused, naming it.
torch is imported only when such a file is read: gpt_spec needs no framework otherwise.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..files import check_input_file
from ..tensors import FLOAT_DTYPES, as_numpy, dtype_name


def read_torch_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A state dict saved with `torch.save` (the book's `model.pth`, or its chapter-5 dict with a
    `model_state_dict` entry) as numpy arrays, loaded with `weights_only=True`, so no pickled code
    runs. The book's `att.mask` buffers stay in: `check_state_dict` checks and drops them."""
    return read_torch_objects(path)[0]


def read_torch_objects(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """`read_torch_file`'s state dict, and the chapter-5 dict's `optimizer_state_dict` (its tensors
    as numpy arrays) where the file holds one, else None."""
    import torch

    check_input_file(path, "checkpoint")
    what = f"checkpoint {os.fspath(path)!r}"
    try:
        with warnings.catch_warnings():
            # torch warns before it refuses a TorchScript archive; the refusal below says it all
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{what} does not exist") from None
    except pickle.UnpicklingError as e:
        raise ValueError(_unpickling_refusal(path, e)) from e
    except Exception as e:  # a truncated zip, or not a torch file at all; an empty one is a bare EOFError
        if "TorchScript" in str(e):
            raise ValueError(
                f"{what} is a TorchScript archive (a program, not a state dict); refused, nothing was run"
            ) from e
        reason = _torch_reason(e) or (
            "it ends before its first record (empty or cut short)" if isinstance(e, EOFError) else type(e).__name__
        )
        raise ValueError(f"{os.fspath(path)!r} is not a readable torch.save file: {reason}") from e
    optimizer = None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        optimizer = obj.get("optimizer_state_dict")
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict of tensors")
    weights = {str(name): _torch_array(path, str(name), tensor) for name, tensor in obj.items()}
    if optimizer is not None and not isinstance(optimizer, Mapping):
        raise ValueError(f"checkpoint {os.fspath(path)!r}: its optimizer_state_dict is not a dict")
    return weights, None if optimizer is None else _as_numpy_tree(path, "optimizer_state_dict", optimizer)


def _as_numpy_tree(path: str | os.PathLike[str], where: str, obj: Any) -> Any:
    """`obj` (dicts, lists, numbers, tensors) with every tensor as a numpy array."""
    import torch

    if isinstance(obj, torch.Tensor):
        return _torch_array(path, where, obj)
    if isinstance(obj, Mapping):
        return {k: _as_numpy_tree(path, f"{where}.{k}", v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_as_numpy_tree(path, f"{where}.{i}", v) for i, v in enumerate(obj))
    return obj


def _torch_reason(e: BaseException) -> str:
    """torch's reason in one line, without its advice to load with weights_only=False (which would
    run whatever code the pickle holds)."""
    import torch.serialization

    text = str(e).replace(getattr(torch.serialization, "UNSAFE_MESSAGE", "\0"), "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """An 8-byte little-endian header length within the file, then the header's JSON object."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(9)
        return (
            len(head) == 9
            and head[8:] == b"{"
            and int.from_bytes(head[:8], "little") <= os.fstat(f.fileno()).st_size - 8
        )
    return False


def _unpickling_refusal(path: str | os.PathLike[str], e: pickle.UnpicklingError) -> str:
    """Why torch's weights-only unpickler stopped, in one line. torch raises its advice `from None`:
    the unpickler's own reason is the exception's context."""
    name = f"checkpoint {os.fspath(path)!r}"
    reason = str(e.__context__ or e)
    found = re.search(r"GLOBAL (\S+)", reason)
    if found:
        return (
            f"{name}: its pickle would run code (a global {found.group(1)!r} outside the tensors and containers a "
            "state dict holds); refused, nothing was run"
        )
    if _looks_like_safetensors(path):
        return (
            f"{name} holds safetensors, but a name ending in .pth or .pt is read as a torch.save file; "
            "rename it to end in .safetensors"
        )
    return (
        f"{name}: its pickle holds more than the tensors and containers a state dict holds "
        f"({_torch_reason(e.__context__ or e)}); refused, nothing was run"
    )


def _torch_array(path: str | os.PathLike[str], name: str, tensor: Any) -> np.ndarray:
    """One tensor of a torch.save file as numpy (bfloat16 as ml_dtypes', exactly); a tensor no numpy
    array holds (float8, quantized, sparse, on the meta device) is refused naming it."""
    import torch

    source = f"checkpoint {os.fspath(path)!r}: state dict key {name!r}"
    if tensor.layout != torch.strided:
        raise ValueError(f"{source} is a {str(tensor.layout).removeprefix('torch.')} tensor; expected a dense one")
    if tensor.is_meta:
        raise ValueError(f"{source} is a meta tensor (a shape without values)")
    try:
        return as_numpy(tensor)
    except ValueError as e:
        raise ValueError(
            f"{source} has dtype {dtype_name(tensor)}, which numpy cannot hold; expected one of "
            f"{', '.join(FLOAT_DTYPES)}"
        ) from e


__all__ = ["read_torch_file", "read_torch_objects"]
