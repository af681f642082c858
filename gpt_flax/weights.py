"""Canonical state dict <-> NNX state. Every rename and transpose between the twins is here, in
`_LEAVES` and `canonical_name`; sharding names parameters through it too."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_spec import GPTConfig, StateDict, load_checkpoint, save_checkpoint
from gpt_spec.checks import check_dtype, check_state_dict
from gpt_spec.formats.canonical import check_save
from gpt_spec.formats.torch_save import read_torch_file
from gpt_spec.layout import in_model_order
from gpt_spec.skeleton import canonical_state_dict
from gpt_spec.tensors import check_cast_range

from .model import _GPT

_M = TypeVar("_M", bound=nnx.Module)

__all__ = ["canonical_name", "cast", "load", "load_state_dict", "read_torch_file", "save", "state_dict"]

# NNX parameter name -> (canonical name, transposed?). nnx.Linear keeps its kernel (in, out)
# where nn.Linear keeps its weight (out, in); nnx.Embed's table is nn.Embedding's weight as is.
_LEAVES = {
    "embedding": ("weight", False),
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "scale": ("scale", False),
    "shift": ("shift", False),
}
# FeedForward's `layers` is an nnx.Sequential, which keeps its children in a list of its own, also
# `layers`: its path `ff/layers/layers/0/kernel` is nn.Sequential's `ff.layers.0.weight`. (An
# nnx.List, as trf_blocks, adds nothing to a path: `trf_blocks/0/...` is `trf_blocks.0...`.)
_SEQUENTIAL = ("layers", "layers")


def canonical_name(path: tuple) -> tuple[str, bool]:
    """An NNX parameter's path (as nnx.to_flat_state gives it) -> (its canonical name, whether the
    canonical layout is its own transposed)."""
    *modules, leaf = path
    if leaf not in _LEAVES:
        raise ValueError(f"no canonical name for parameter {'/'.join(map(str, path))}")
    name, transposed = _LEAVES[leaf]
    parts = [str(p) for i, p in enumerate(modules) if i == 0 or (modules[i - 1], p) != _SEQUENTIAL]
    return ".".join([*parts, name]), transposed


def _params(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
    """Canonical name -> (the live parameter, transposed?), in the model order of the torch twin's
    state_dict() (NNX's flat state is sorted by path), so both twins check a state dict in the
    same order and name the same culprit first."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = canonical_name(path)
        out[name] = (var, transposed)
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, GPTConfig):
        return out
    return {name: out[name] for name in in_model_order(out, cfg)}


def to_canonical(params: nnx.State) -> StateDict:
    """An NNX state of parameters (or of their gradients) as a canonical `{name: numpy array}`,
    in float32 (every bfloat16 value widens exactly)."""
    out = {}
    for path, var in nnx.to_flat_state(params):
        name, transposed = canonical_name(path)
        value = np.asarray((var[...] if isinstance(var, nnx.Variable) else var).astype(jnp.float32))
        # A copy, never a view: the JAX buffer may be donated to (and overwritten by) a train step.
        out[name] = np.array(value.T if transposed else value, order="C", copy=True)
    return out


def state_dict(model: nnx.Module) -> StateDict:
    """The model's parameters as the canonical `{name: numpy array}` (torch names and layouts)."""
    return to_canonical(nnx.state(model, nnx.Param))


def load_state_dict(model: nnx.Module, sd: Mapping[str, object]) -> None:
    """Copy a canonical state dict into `model`, all or nothing.

    Every key, shape and dtype is checked, and every value converted, before any parameter
    changes; a bad dict raises ValueError and leaves the model untouched. Values (float16,
    bfloat16, float32 or float64) are cast to each parameter's dtype. The book's own
    `state_dict()`, with its `att.mask` buffers, loads as it is: a buffer that is not the causal
    mask is refused. The other seed's skeleton's state dict (gpt_spec.skeleton) loads
    into DummyGPTModel(final_norm="layernorm").
    """
    params = _params(model)
    expected = _expected(params)
    sd = canonical_state_dict(expected, sd, type(model).__name__)
    arrays = check_state_dict(expected, sd, type(model).__name__)
    # Convert everything before assigning anything: nnx.state hands out the live Variables.
    updates = [(var, _value(arrays[name], var, transposed)) for name, (var, transposed) in params.items()]
    for var, value in updates:
        var[...] = value


def _expected(params: Mapping[str, tuple[nnx.Variable, bool]]) -> dict[str, tuple[int, ...]]:
    return {name: var.shape[::-1] if transposed else var.shape for name, (var, transposed) in params.items()}


def _value(array: np.ndarray, var: nnx.Variable, transposed: bool) -> jax.Array:
    return jnp.asarray(array.T if transposed else array, dtype=var.dtype)


def _unfilled(cls: Callable[..., _M], cfg: GPTConfig, options: Mapping[str, object], rngs: nnx.Rngs) -> _M:
    """`cls(cfg, **options, rngs=rngs)` with abstract parameters: the random init is never computed.

    The state that is not a parameter (dropout's RNG keys and counts, the KV cache's counters) is
    computed for real by one jitted construction whose parameter outputs XLA drops as dead code,
    so it is exactly what a plain construction gives, and `rngs` advances as it would. A load
    then holds the model once (a plain build first holds its random init, in flight 1.3x).
    """
    rng_graph, rng_state = nnx.split(rngs)

    def rest(rng_state):
        own = nnx.merge(rng_graph, rng_state)
        model = cls(cfg, **options, rngs=own)
        return nnx.state(model, nnx.Not(nnx.Param)), nnx.state(own)

    rest_state, rng_after = jax.jit(rest)(rng_state)
    nnx.update(rngs, rng_after)
    graphdef, *states = nnx.split(nnx.eval_shape(lambda: cls(cfg, **options, rngs=nnx.Rngs(0))), nnx.Param, ...)
    params, _ = states
    return nnx.merge(graphdef, params, rest_state)


def _fill(model: nnx.Module, sd: Mapping[str, np.ndarray], dtype) -> None:
    """Set every parameter of a model just built from a checked (possibly lazy) state dict, one
    tensor at a time."""
    for name, (var, transposed) in _params(model).items():
        array = sd[name]
        var.set_value(jnp.asarray(array.T if transposed else array, dtype=dtype))


def dtype_name(model: nnx.Module) -> str:
    """The dtype of the model's parameters, by name ("float32", "bfloat16")."""
    return jnp.dtype(next(iter(nnx.to_flat_state(nnx.state(model, nnx.Param))))[1].dtype).name


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
    rngs: nnx.Rngs | None = None,
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
    target = check_dtype(dtype or ckpt.compute_dtype)
    model = _unfilled(getattr(models, ckpt.model), ckpt.config, ckpt.options, rngs or nnx.Rngs(0))
    _fill(model, ckpt.state_dict, _JAX_DTYPES[target])
    return cast(model, target)  # sets nnx.Embed's compute dtype; the parameters are in it already


_JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def cast(model: _M, dtype: str) -> _M:
    """Parameters (and so the compute) in `dtype`, "float32", "bfloat16" or "float16"; LayerNorm statistics,
    softmax and logits stay float32. A KV cache is cast too (its keys and values rounded), as
    torch's twin casts its buffers: cached calls go on. In place; returns the model."""
    target = _JAX_DTYPES[check_dtype(dtype)]
    if target != jnp.float32:  # checked before any parameter changes
        for name, (var, _) in _params(model).items():
            if var.dtype != target and var.size:
                value = jnp.abs(var[...])
                largest = float(jnp.max(jnp.where(jnp.isfinite(value), value, 0)))
                check_cast_range(f"parameter {name!r}", largest, dtype)
    for var, _ in _params(model).values():
        if var.dtype != target:
            var.set_value(var[...].astype(target))  # `var[...] =` would keep the old dtype
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Cache)):
        if jnp.issubdtype(var.dtype, jnp.floating) and var.dtype != target:
            var.set_value(var[...].astype(target))  # the KV cache, as torch's module.to() casts its buffers
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Embed):
            # nnx.Embed fixes its compute dtype at construction (the float32 of its table then);
            # nnx.Linear computes in the dtype of its inputs and kernel, so follows the cast.
            module.dtype = module.param_dtype = target
    return model
