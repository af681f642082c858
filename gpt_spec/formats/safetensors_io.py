"""safetensors files as the twins read and write them: one file, or an HF snapshot's shards with
their index; every shape and dtype known from the headers alone, each tensor read only when asked
for (in blocks of rows when large); a written file read back and compared bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import read_json
from ..files import check_input_file
from ..tensors import LazyStateDict, as_numpy, check_bfloat16_range, checked_array

# The index of a sharded HF snapshot, read where a folder has no model.safetensors.
HF_INDEX = "model.safetensors.index.json"
# The dtypes a file this project writes may hold.
SAVE_DTYPES = ("float32", "bfloat16")


def _safetensors_error(path: Path, e: Exception) -> ValueError:
    if isinstance(e, FileNotFoundError):
        return ValueError(f"checkpoint {str(path)!r} does not exist")
    if isinstance(e, IsADirectoryError):
        return ValueError(f"checkpoint {str(path)!r} is a directory without {HF_INDEX} or model.safetensors")
    if isinstance(e, PermissionError):
        return ValueError(f"cannot read checkpoint {str(path)!r}: {e.strerror}")
    return ValueError(f"{str(path)!r} is not a readable safetensors file: {e}")


def _dtype(raw: str) -> str:
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}.get(raw, raw.lower())


# A tensor larger than this is read in blocks of rows, each through its own mapping of the file.
READ_BLOCK_BYTES = 64 << 20


def read_tensor(path: Path, key: str) -> np.ndarray:
    from safetensors import safe_open

    # The file is mapped for each read and unmapped after it, and a large tensor is read in
    # blocks of rows: the file's pages never sit resident beside the model being filled, and a
    # load's peak is the model plus about one tensor (docs/checkpoints.md: gpt-parity load-memory).
    try:
        with safe_open(str(path), framework="numpy") as f:
            shape = tuple(f.get_slice(key).get_shape())
            if len(shape) < 2 or np.prod(shape) * 4 <= READ_BLOCK_BYTES:
                return f.get_tensor(key)
        rows = max(1, READ_BLOCK_BYTES // (4 * int(np.prod(shape[1:]))))
        out = None
        for start in range(0, shape[0], rows):
            stop = min(start + rows, shape[0])  # safetensors' slices do not clamp
            with safe_open(str(path), framework="numpy") as f:
                block = f.get_slice(key)[start:stop]
                if out is None:
                    out = np.empty(shape, block.dtype)
                out[start:stop] = block
            del f, block
        assert out is not None  # shape[0] > 0: an empty tensor was returned whole above
        return out
    except Exception as e:
        raise ValueError(f"{str(path)!r}: cannot read tensor {key!r}: {e}") from e


def open_safetensors(
    path: Path, what: str = "checkpoint"
) -> tuple[dict[str, tuple[tuple[int, ...], str, Callable]], dict[str, str]]:
    """`{key: (shape, dtype, read)}` and the metadata of one file, from its header alone."""
    from safetensors import safe_open

    check_input_file(path, what)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            entries = {}
            for key in f.keys():
                s = f.get_slice(key)
                entries[key] = (
                    tuple(int(n) for n in s.get_shape()),
                    _dtype(s.get_dtype()),
                    lambda key=key: read_tensor(path, key),
                )
    except Exception as e:
        raise _safetensors_error(path, e) from e
    return entries, metadata


def open_sharded(index: Path) -> tuple[LazyStateDict, tuple[str, ...]]:
    """A sharded HF snapshot (`model.safetensors.index.json` + shards) as one lazy state dict."""
    check_input_file(index, "shard index")
    data = read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"shard index {str(index)!r} has no weight_map")
    for shard in weight_map.values():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ValueError(f"shard index {str(index)!r} names {shard!r}, not a file beside it")
    entries: dict[str, tuple] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        found, _ = open_safetensors(index.parent / shard, "shard")
        for key, entry in found.items():
            if key in entries:
                raise ValueError(f"{str(index.parent)!r}: tensor {key!r} is in more than one shard")
            if weight_map.get(key) != shard:
                raise ValueError(
                    f"{str(index.parent / shard)!r} holds {key!r}, which the index places in {weight_map.get(key)!r}"
                )
            entries[key] = entry
    missing = set(weight_map) - set(entries)
    if missing:
        raise ValueError(f"shard index {str(index)!r} lists tensor(s) no shard holds: {', '.join(sorted(missing)[:5])}")
    return LazyStateDict(entries), tuple(str(index.parent / s) for s in shards)


def as_dtype(name: str, value: Any, dtype: str) -> np.ndarray:
    """`value` as a contiguous array of `dtype` (one of SAVE_DTYPES), refusing values it would make inf."""
    import ml_dtypes

    array = np.asarray(as_numpy(value))
    target = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    if array.dtype == np.float64:
        array = checked_array(name, array)
    if dtype == "bfloat16" and array.dtype != target and array.size:
        finite = np.abs(array[np.isfinite(array)])
        check_bfloat16_range(f"state dict key {name!r}", float(finite.max()) if finite.size else 0.0)
    return np.ascontiguousarray(array.astype(target, copy=False))


def write_verified(tmp: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> None:
    """safetensors' save, then every tensor read back and compared bit for bit."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    entries, _ = open_safetensors(tmp)
    for key, value in tensors.items():
        back = entries[key][2]()
        if back.shape != value.shape or back.dtype != value.dtype or back.tobytes() != value.tobytes():
            raise ValueError(f"tensor {key!r} read back differs from what was written")


def check_save_dtype(dtype: str) -> str:
    """Refuse a dtype a saved file may not hold (see SAVE_DTYPES); return it."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    return dtype


__all__ = [
    "HF_INDEX",
    "READ_BLOCK_BYTES",
    "SAVE_DTYPES",
    "as_dtype",
    "check_save_dtype",
    "open_safetensors",
    "open_sharded",
    "read_tensor",
    "write_verified",
]
