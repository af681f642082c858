"""The Flax twin on a device mesh: named axes `data` and `model`, Megatron-style partition rules.

Attention heads and the MLP's hidden dimension are split over `model` (query/key/value and the
first MLP layer column-wise, the output projections row-wise, so each block needs one all-reduce
per half); embeddings and the vocabulary head are split along the embedding dimension (GPT-2's
vocabulary, 50257 = 29 x 1733, divides by no usual mesh size); the batch is split over `data`.
A dimension an axis does not divide evenly is replicated instead, and the plan says so. Nothing
else changes: `jax.jit` propagates the shardings through the same model code (GSPMD).

The same code runs on GPUs and on multi-host TPU slices: call `jax.distributed.initialize()` first
on every host, then `make_mesh` sees every device of the job.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")

# NNX parameter path (joined with '/') -> PartitionSpec over the parameter's own layout
# (kernels are (in, out)). First match wins; parameters no rule names are replicated.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"(tok_emb|pos_emb)/embedding$", P(None, "model")),  # (rows, emb): split emb
    (r"att/W_(query|key|value)/kernel$", P(None, "model")),  # column-parallel: split heads
    (r"att/W_(query|key|value)/bias$", P("model")),
    (r"att/out_proj/kernel$", P("model", None)),  # row-parallel: heads in, emb out
    (r"ff/layers/layers/0/kernel$", P(None, "model")),  # column-parallel: split 4*emb hidden
    (r"ff/layers/layers/0/bias$", P("model")),
    (r"ff/layers/layers/2/kernel$", P("model", None)),  # row-parallel
    (r"out_head/kernel$", P("model", None)),  # (emb, vocab): split emb, logits all-reduced
)


def parse_mesh(text: str) -> tuple[int, int]:
    """'2x4' -> (2, 4): data x model."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"mesh must look like DATAxMODEL with positive sizes, e.g. 2x4; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def make_mesh(shape: tuple[int, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all of this job's devices)."""
    data, model = parse_mesh(shape) if isinstance(shape, str) else shape
    devices = list(jax.devices() if devices is None else devices)
    if data * model != len(devices):
        hint = (" (on a CPU, simulate more: gpt-parity --cpu-devices N, or before JAX starts "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N or jax.config.update('jax_num_cpu_devices', N))"
                if devices and devices[0].platform == "cpu" else "")
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, this job has {len(devices)}{hint}")
    grid = np.array(devices).reshape(data, model)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[int]]:
    """`spec` with every axis that does not divide its dimension dropped; and those dimensions."""
    fitted, dropped = [], []
    for dim, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is not None and shape[dim] % mesh.shape[axis]:
            fitted.append(None)
            dropped.append(dim)
        else:
            fitted.append(axis)
    return P(*fitted), dropped


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[int]]:
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            return _fit(spec, shape, mesh)
    return P(), []


@dataclasses.dataclass
class ShardingPlan:
    """Which spec each parameter got, and which wanted splits did not divide evenly."""

    mesh: Mesh
    specs: dict[str, P]
    replicated_dims: dict[str, list[int]]  # path -> dims a rule wanted split but could not

    def describe(self) -> list[str]:
        return [f"{path}: dim(s) {dims} not divisible by the mesh, replicated"
                for path, dims in self.replicated_dims.items() if dims]


def _path(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def shard_model(model: nnx.Module, mesh: Mesh, *extra: nnx.Module) -> ShardingPlan:
    """Place the model's parameters (and the same-shaped state of `extra` objects such as its
    nnx.Optimizer: Adam's moments) on the mesh by PARTITION_RULES; everything else replicated."""
    specs: dict[str, P] = {}
    dropped: dict[str, list[int]] = {}

    def place(obj: Any) -> None:
        state = nnx.state(obj)
        flat = []
        for keys, var in nnx.to_flat_state(state):
            value = var[...] if isinstance(var, nnx.Variable) else var
            path = _path(keys)
            spec, bad = spec_for(path, tuple(np.shape(value)), mesh) if np.ndim(value) else (P(), [])
            if obj is model and isinstance(var, nnx.Param):
                specs[path], dropped[path] = spec, bad
            flat.append((keys, var.replace(jax.device_put(value, NamedSharding(mesh, spec)))))
        nnx.update(obj, nnx.from_flat_state(flat))

    for obj in (model, *extra):
        place(obj)
    return ShardingPlan(mesh, specs, dropped)


def shard_batch(ids: Any, mesh: Mesh) -> jax.Array:
    """Token ids split over `data` along the batch (replicated if the batch does not divide)."""
    ids = np.asarray(ids)
    spec, _ = _fit(P("data", None), ids.shape, mesh)
    return jax.device_put(ids, NamedSharding(mesh, spec))


def param_bytes_per_device(model: nnx.Module) -> dict[jax.Device, int]:
    """Bytes of parameters each device holds (a replicated parameter counts on every device)."""
    out: dict[jax.Device, int] = {}
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        for shard in var[...].addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
