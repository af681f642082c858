"""Canonical state dict <-> the PyTorch twin: the canonical names are this twin's own, so no renames.

`read_torch_file` (the book's `.pth` files) is gpt_spec's, exported here as in the Flax twin."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch

from gpt_spec import GPTConfig, StateDict, load_checkpoint, save_checkpoint
from gpt_spec.checks import check_dtype, check_state_dict
from gpt_spec.formats.canonical import check_save
from gpt_spec.formats.torch_save import read_torch_file
from gpt_spec.skeleton import canonical_state_dict
from gpt_spec.tensors import check_cast_range

from .model import _GPT

_M = TypeVar("_M", bound=torch.nn.Module)

__all__ = ["cast", "load", "load_state_dict", "read_torch_file", "save", "state_dict"]


def state_dict(model: torch.nn.Module) -> StateDict:
    """The model's parameters as the canonical `{name: numpy array}` (float32 copies, on the host)."""
    # bfloat16 has no numpy dtype: parameters leave as float32, which holds every bfloat16 exactly.
    return {k: v.detach().cpu().float().numpy().copy() for k, v in model.state_dict().items()}


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A numpy array (bfloat16 as ml_dtypes') as a torch tensor of `dtype`."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16).to(dtype)
    # np.require copies read-only views (e.g. of JAX arrays), which torch.from_numpy warns about.
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(dtype)


def load_state_dict(model: torch.nn.Module, sd: Mapping[str, object]) -> None:
    """Copy a canonical state dict into `model`, all or nothing.

    Unlike `nn.Module.load_state_dict`, which copies the tensors that fit before it reports a
    size mismatch, every key, shape and dtype is checked first, and every value converted; a bad
    dict raises ValueError and leaves the model untouched. Values (float16, bfloat16, float32 or
    float64) are cast to each parameter's dtype. The book's own `state_dict()`, with its
    `att.mask` buffers, loads as it is: a buffer that is not the causal mask is refused. The other
    seed's skeleton's state dict (gpt_spec.skeleton) loads into DummyGPTModel(final_norm="layernorm").
    """
    targets = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in targets.items()}
    sd = canonical_state_dict(expected, sd, type(model).__name__)
    arrays = check_state_dict(expected, sd, type(model).__name__)
    tensors = {k: _tensor(arrays[k], targets[k].dtype) for k in targets}
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])


def dtype_name(model: torch.nn.Module) -> str:
    """The dtype of the model's parameters, by name ("float32", "bfloat16")."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def save(model: _GPT, path: str | os.PathLike[str], *, dtype: str | None = None) -> None:
    """Write the model's canonical state dict and config to a safetensors file, in `dtype`
    ("float32" or "bfloat16"; default the model's own). The path must end in .safetensors."""
    dtype = dtype or dtype_name(model)
    check_save(path, dtype)  # a refusal before the parameters are copied out
    save_checkpoint(
        path,
        state_dict(model),
        model.cfg,
        model=type(model).__name__,
        options=getattr(model, "options", {}),
        dtype=dtype,
    )


def load(
    path: str | os.PathLike[str],
    *,
    config: GPTConfig | None = None,
    n_heads: int | None = None,
    dtype: str | None = None,
) -> _GPT:
    """Build the model a checkpoint describes and load its weights (train mode, as constructed).

    Reads canonical or HF GPT-2 safetensors (a file, or a snapshot folder with its config.json,
    sharded or not) and `torch.save` files (see gpt_spec.load_checkpoint). Everything is checked
    against the file's headers before the model is built; tensors are then read one at a time.
    `dtype` ("float32" or "bfloat16") is what the model holds; default bfloat16 for a bfloat16
    file, else float32.
    """
    from . import model as models

    ckpt = load_checkpoint(path, config=config, n_heads=n_heads)
    target = _TORCH_DTYPES[check_dtype(dtype or ckpt.compute_dtype)]
    # Built on the meta device, no memory and no random init; the file's tensors become the
    # parameters themselves (assign), so the weights are in memory once.
    with torch.device("meta"):
        model = getattr(models, ckpt.model)(ckpt.config, **ckpt.options)
    names = list(model.state_dict())
    model.load_state_dict({name: _tensor(ckpt.state_dict[name], target) for name in names}, assign=True)
    for module in model.modules():
        if isinstance(module, models.MultiHeadAttention):
            module.mask = models.causal_mask(module.mask.shape[0])
    return model


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cast(model: _M, dtype: str) -> _M:
    """Parameters (and so the compute) in `dtype`, "float32", "bfloat16" or "float16"; LayerNorm statistics,
    softmax and logits stay float32. A KV cache is cast too (its keys and values rounded), as
    module.to() casts buffers: cached calls go on. In place; returns the model."""
    target = _TORCH_DTYPES[check_dtype(dtype)]
    if target != torch.float32:  # checked before any parameter changes
        for name, p in model.named_parameters():
            if p.dtype != target and p.numel():
                finite = p.detach().abs()[torch.isfinite(p.detach())]
                check_cast_range(f"parameter {name!r}", float(finite.max()) if finite.numel() else 0.0, dtype)
    return model.to(target)
