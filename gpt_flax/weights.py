"""Canonical state dict <-> NNX state. Every rename and transpose between the twins is in `_LEAVES`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_spec import GPTConfig, StateDict, check_dtype, check_state_dict
from gpt_spec.checkpoint import load_checkpoint, save_checkpoint

# NNX parameter name -> (canonical name, transposed?). nnx.Linear keeps its kernel (in, out)
# where nn.Linear keeps its weight (out, in); nnx.Embed's table is nn.Embedding's weight as is.
_LEAVES = {
    "embedding": ("weight", False),
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "scale": ("scale", False),
    "shift": ("shift", False),
}
# nnx.Sequential holds its children in a list `.layers`, so its paths read `trf_blocks/layers/0/...`
# where nn.Sequential's read `trf_blocks.0...`. FeedForward's own attribute `layers` stays.
_SEQUENTIAL_LIST = "layers"


def _canonical(path: tuple) -> tuple[str, bool]:
    *modules, leaf = path
    if leaf not in _LEAVES:
        raise ValueError(f"no canonical name for parameter {'/'.join(map(str, path))}")
    name, transposed = _LEAVES[leaf]
    parts = [
        str(p) for p, nxt in zip(modules, [*modules[1:], leaf])
        if not (p == _SEQUENTIAL_LIST and isinstance(nxt, int))
    ]
    return ".".join([*parts, name]), transposed


def _params(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
    """Canonical name -> (the live parameter, transposed?)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _canonical(path)
        out[name] = (var, transposed)
    return out


def to_canonical(params: nnx.State) -> StateDict:
    """An NNX state of parameters (or of their gradients) as a canonical `{name: numpy array}`,
    in float32 (every bfloat16 value widens exactly)."""
    out = {}
    for path, var in nnx.to_flat_state(params):
        name, transposed = _canonical(path)
        value = np.asarray((var[...] if isinstance(var, nnx.Variable) else var).astype(jnp.float32))
        # A copy, never a view: the JAX buffer may be donated to (and overwritten by) a train step.
        out[name] = np.array(value.T if transposed else value, order="C", copy=True)
    return out


def state_dict(model: nnx.Module) -> StateDict:
    """The model's parameters as the canonical `{name: numpy array}` (torch names and layouts)."""
    return to_canonical(nnx.state(model, nnx.Param))


def load_state_dict(model: nnx.Module, sd: Mapping[str, object]) -> None:
    """Copy a canonical state dict into `model`, all or nothing.

    Every key, shape and dtype is checked before any parameter changes; a bad dict raises
    ValueError and leaves the model untouched. Values are cast to each parameter's dtype.
    """
    params = _params(model)
    expected = {
        name: var.shape[::-1] if transposed else var.shape
        for name, (var, transposed) in params.items()
    }
    arrays = check_state_dict(expected, sd, type(model).__name__)
    # Convert everything before assigning anything: nnx.state hands out the live Variables.
    updates = [
        (var, jnp.asarray(arrays[name].T if transposed else arrays[name], dtype=var.dtype))
        for name, (var, transposed) in params.items()
    ]
    for var, value in updates:
        var[...] = value


def save(model: nnx.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's canonical state dict and config to a safetensors file."""
    save_checkpoint(path, state_dict(model), model.cfg, model=type(model).__name__,
                    options=getattr(model, "options", {}))


def load(path: str | os.PathLike[str], *, config: GPTConfig | None = None,
         rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Build the model a checkpoint describes and load its weights (canonical or HF GPT-2
    safetensors, see gpt_spec.load_checkpoint). A torch.save file goes through the torch twin:
    `gpt_flax.load_state_dict(model, gpt_torch.read_torch_file(path))`, or `gpt-parity convert`."""
    from . import model as models

    if Path(path).suffix in (".pth", ".pt"):
        raise ValueError(
            f"{os.fspath(path)!r} is a torch.save file, which only torch can read; convert it with "
            "`gpt-parity convert SRC DST.safetensors` or read it with gpt_torch.read_torch_file"
        )
    ckpt = load_checkpoint(path, config=config)
    model = getattr(models, ckpt.model)(ckpt.config, **ckpt.options, rngs=rngs or nnx.Rngs(0))
    load_state_dict(model, ckpt.state_dict)
    return model


_JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast(model: nnx.Module, dtype: str) -> nnx.Module:
    """Parameters (and so the compute) in `dtype`, "float32" or "bfloat16"; LayerNorm statistics,
    softmax and logits stay float32. In place; returns the model."""
    target = _JAX_DTYPES[check_dtype(dtype)]
    for var, _ in _params(model).values():
        var.set_value(var[...].astype(target))  # `var[...] =` would keep the old dtype
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Embed):
            # nnx.Embed fixes its compute dtype at construction (the float32 of its table then);
            # nnx.Linear computes in the dtype of its inputs and kernel, so follows the cast.
            module.dtype = module.param_dtype = target
    return model
