"""Canonical state dict <-> the PyTorch twin: the canonical names are this twin's own, so no renames."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from gpt_spec import GPTConfig, StateDict, check_dtype, check_state_dict
from gpt_spec.checkpoint import Checkpoint, infer_config, load_checkpoint, save_checkpoint


def state_dict(model: torch.nn.Module) -> StateDict:
    """The model's parameters as the canonical `{name: numpy array}` (float32 copies, on the host)."""
    # bfloat16 has no numpy dtype: parameters leave as float32, which holds every bfloat16 exactly.
    return {k: v.detach().cpu().float().numpy().copy() for k, v in model.state_dict().items()}


def load_state_dict(model: torch.nn.Module, sd: Mapping[str, object]) -> None:
    """Copy a canonical state dict into `model`, all or nothing.

    Unlike `nn.Module.load_state_dict`, which copies the tensors that fit before it reports a
    size mismatch, every key, shape and dtype is checked first; a bad dict raises ValueError
    and leaves the model untouched. Values are cast to each parameter's dtype and device.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arrays = check_state_dict(expected, sd, type(model).__name__)
    # np.require copies read-only views (e.g. of JAX arrays), which torch.from_numpy warns about.
    tensors = {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in arrays.items()}
    model.load_state_dict(tensors, strict=True)


def read_torch_file(path: str | os.PathLike[str]) -> StateDict:
    """A state dict saved with `torch.save` (the book's `model.pth`, or its chapter-5 dict with a
    `model_state_dict` entry) as a canonical numpy dict, loaded with `weights_only=True`, so no
    pickled code runs. The book's persistent `att.mask` buffers are checked and dropped."""
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not exist") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"{os.fspath(path)!r} holds more than tensors; refusing to unpickle it: {e}") from e
    except Exception as e:  # a truncated zip, or not a torch file at all
        raise ValueError(f"{os.fspath(path)!r} is not a readable torch.save file: {e}") from e
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict of tensors")
    out: StateDict = {}
    for name, tensor in obj.items():
        if name.endswith(".att.mask"):
            n = tensor.shape[-1]
            if tensor.shape != (n, n) or not torch.equal(tensor, torch.triu(torch.ones(n, n), diagonal=1)):
                raise ValueError(f"{os.fspath(path)!r}: buffer {name!r} is not a causal mask")
            continue
        out[name] = tensor.detach().cpu().numpy()
    return out


def save(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's canonical state dict and config to a safetensors file."""
    save_checkpoint(path, state_dict(model), model.cfg, model=type(model).__name__,
                    options=getattr(model, "options", {}))


def load(path: str | os.PathLike[str], *, config: GPTConfig | None = None) -> torch.nn.Module:
    """Build the model a checkpoint describes and load its weights (eval mode off, as constructed).

    Reads canonical or HF GPT-2 safetensors files (see gpt_spec.load_checkpoint) and `torch.save`
    files (`.pth`, `.pt`; their config is inferred, or given with `config`).
    """
    from . import model as models

    if Path(path).suffix in (".pth", ".pt"):
        sd = read_torch_file(path)
        ckpt = Checkpoint(sd, config or infer_config(sd, source=f"checkpoint {os.fspath(path)!r}"))
    else:
        ckpt = load_checkpoint(path, config=config)
    model = getattr(models, ckpt.model)(ckpt.config, **ckpt.options)
    load_state_dict(model, ckpt.state_dict)
    return model


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cast(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Parameters (and so the compute) in `dtype`, "float32" or "bfloat16"; LayerNorm statistics,
    softmax and logits stay float32. In place; returns the model."""
    return model.to(_TORCH_DTYPES[check_dtype(dtype)])
