"""The canonical checkpoint file: the canonical state dict in safetensors (float32 or bfloat16) with
the config, the model and its options in the file's metadata, so a file describes itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import GPTConfig, parse_json
from ..layout import check_options, model_shapes
from ..models import ModelClass
from ..tensors import check_state_dict
from . import safetensors_io
from .atomic import atomic_write, check_destination

# The metadata's "format": what tells a canonical file from any other safetensors file.
FORMAT = "gpt-twins/canonical-v1"
SAVE_SUFFIX = ".safetensors"


def is_canonical(metadata: Mapping[str, str]) -> bool:
    """Whether a safetensors file's metadata marks it as a canonical checkpoint."""
    return metadata.get("format") == FORMAT


def read_metadata(
    metadata: Mapping[str, str], config: GPTConfig | None, source: str
) -> tuple[GPTConfig, ModelClass, dict[str, Any]]:
    """The config (`config` where given), model and options a canonical file's metadata records,
    each checked; a damaged field is refused naming the file."""
    if "config" not in metadata:
        raise ValueError(f"{source}: its metadata is damaged: it has no 'config'")
    if config is None:
        data = parse_json(metadata["config"], f"{source}: its metadata field 'config'")
        try:
            cfg = GPTConfig.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{source}: its metadata holds a bad config: {e}") from e
    else:
        cfg = config
    model = metadata.get("model", ModelClass.GPT_MODEL)
    options = parse_json(metadata.get("options", "{}"), f"{source}: its metadata field 'options'")
    options = check_options(model, options, source)
    return cfg, ModelClass(model), options


def check_save(path: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Refuse a checkpoint `save_checkpoint` could not write, or one `load_checkpoint` would not
    read back: the destination (see `check_destination`), a name not ending in .safetensors, a
    dtype other than float32 or bfloat16. Both twins' `save` call this before any work."""
    target = check_destination(path, "checkpoint")
    if not os.fspath(path).endswith(SAVE_SUFFIX):  # load would read a .pth or .pt as torch.save
        raise ValueError(
            f"cannot write checkpoint {os.fspath(path)!r}: a checkpoint is written as safetensors, "
            f"so its name must end in {SAVE_SUFFIX}"
        )
    safetensors_io.check_save_dtype(dtype)
    return target


def save_checkpoint(
    path: str | os.PathLike[str],
    sd: Mapping[str, Any],
    cfg: GPTConfig,
    *,
    model: str = ModelClass.GPT_MODEL,
    options: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> None:
    """Write a canonical state dict as safetensors (float32 or bfloat16), with its config in the
    metadata, to a path ending in .safetensors. The dict is checked against the model first; the
    file is written beside the destination, read back and compared, and only then renamed over it
    (see `atomic_write`)."""
    check_save(path, dtype)  # before any tensor is read or converted
    options = check_options(model, options or {})
    sd = check_state_dict(model_shapes(model, cfg, options), sd, model)
    try:
        tensors = {k: safetensors_io.as_dtype(k, sd[k], dtype) for k in sd}
    except ValueError as e:
        raise ValueError(f"cannot write checkpoint {os.fspath(path)!r}: {e}") from None
    metadata = {
        "format": FORMAT,
        "config": json.dumps(cfg.to_dict()),
        "model": str(model),
        "options": json.dumps(options),
    }
    atomic_write(path, lambda tmp: safetensors_io.write_verified(tmp, tensors, metadata))


__all__ = ["FORMAT", "SAVE_SUFFIX", "check_save", "is_canonical", "read_metadata", "save_checkpoint"]
