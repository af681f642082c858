"""The Flax twin on a device mesh: named axes `data` and `model`, Megatron-style partition rules.

Attention heads and the MLP's hidden dimension are split over `model` (query/key/value and the
first MLP layer column-wise, the output projections row-wise, so each block needs one all-reduce
per half); embeddings and the vocabulary head are split along the embedding dimension (GPT-2's
vocabulary, 50257 = 29 x 1733, divides by no usual mesh size); the batch is split over `data`.
A dimension an axis does not divide evenly is replicated instead, and the plan says so. Nothing
else changes: `jax.jit` propagates the shardings through the same model code (GSPMD).

With `fsdp`, every parameter is also split over `data` (ZeRO-3/FSDP style) along a dimension the
rules leave whole, so each data-parallel device keeps a slice of it and of its Adam moments; GSPMD
gathers a parameter where the model uses it and reduce-scatters its gradient.

The same code runs on GPUs and on a multi-host TPU slice: call `jax.distributed.initialize()` first
on every host, then `make_mesh` sees every device of the job and, through `jax.make_mesh`, lays the
mesh out on the devices' physical topology (a job of several slices would need
`mesh_utils.create_hybrid_device_mesh` instead, which jax.make_mesh refuses to stand in for).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .model import put
from .weights import canonical_name

AXES = ("data", "model")
FSDP_AXIS = "data"  # the axis shard_model(fsdp=True) also splits every parameter over

# Canonical name (the torch twin's state_dict key) -> PartitionSpec over the canonical layout
# (Linear weights (out, in)); a Flax kernel, (in, out), gets it transposed, as weights.py says.
# First full match wins; parameters no rule names are replicated.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"(tok_emb|pos_emb)\.weight", P(None, "model")),  # (rows, emb): split emb
    (r"trf_blocks\.\d+\.att\.W_(query|key|value)\.weight", P("model", None)),  # column-parallel: split heads
    (r"trf_blocks\.\d+\.att\.W_(query|key|value)\.bias", P("model")),
    (r"trf_blocks\.\d+\.att\.out_proj\.weight", P(None, "model")),  # row-parallel: emb out, heads in
    (r"trf_blocks\.\d+\.ff\.layers\.0\.weight", P("model", None)),  # column-parallel: split 4*emb hidden
    (r"trf_blocks\.\d+\.ff\.layers\.0\.bias", P("model")),
    (r"trf_blocks\.\d+\.ff\.layers\.2\.weight", P(None, "model")),  # row-parallel
    (r"out_head\.weight", P(None, "model")),  # (vocab, emb): split emb, logits all-reduced
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
        hint = (
            " (on a CPU, simulate more: gpt-parity --cpu-devices N, or before JAX starts "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N or jax.config.update('jax_num_cpu_devices', N))"
            if devices and devices[0].platform == "cpu"
            else ""
        )
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, this job has {len(devices)}{hint}")
    # Auto axes: jit propagates the parameters' shardings through the unchanged model code.
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[int]]:
    """`spec` with every axis that does not divide its dimension dropped; and those dimensions."""
    fitted: list[str | tuple[str, ...] | None] = []
    dropped: list[int] = []
    for dim, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is not None and shape[dim] % mesh.shape[axis]:
            fitted.append(None)
            dropped.append(dim)
        else:
            fitted.append(axis)
    return P(*fitted), dropped


def fsdp_spec(spec: P, shape: tuple[int, ...], mesh: Mesh | AbstractMesh) -> tuple[P, int | None]:
    """`spec` with FSDP_AXIS added on the first dimension it leaves whole (split by no axis larger
    than 1) that FSDP_AXIS divides, and that dimension; `spec` as it is and None where none does."""
    axes = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    size = mesh.shape[FSDP_AXIS]
    for dim, axis in enumerate(axes):
        held = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        if FSDP_AXIS in held or any(mesh.shape[a] > 1 for a in held) or shape[dim] % size:
            continue
        axes[dim] = (*held, FSDP_AXIS) if held else FSDP_AXIS
        return P(*axes), dim
    return spec, None


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[int]]:
    """The spec of the parameter of canonical `name` and (canonical) `shape`, and the dimensions
    its rule wanted split that the mesh does not divide."""
    for pattern, spec in PARTITION_RULES:
        if re.fullmatch(pattern, name):
            return _fit(spec, shape, mesh)
    return P(), []


@dataclasses.dataclass
class ShardingPlan:
    """Which spec each parameter got, and which wanted splits did not divide evenly: by canonical
    name, over the canonical layout (a Flax kernel holds its spec transposed)."""

    mesh: Mesh
    specs: dict[str, P]
    replicated_dims: dict[str, list[int]]  # name -> dims a rule wanted split but could not
    fsdp_dims: dict[str, int | None] = dataclasses.field(default_factory=dict)  # fsdp: name -> dim over data

    def describe(self) -> list[str]:
        lines = [
            f"{name}: dim(s) {dims} not divisible by the mesh, replicated"
            for name, dims in self.replicated_dims.items()
            if dims
        ]
        return lines + [
            f"{name}: no dimension divisible by {FSDP_AXIS} {self.mesh.shape[FSDP_AXIS]}, not split over it (fsdp)"
            for name, dim in self.fsdp_dims.items()
            if dim is None
        ]


def shard_model(model: nnx.Module, mesh: Mesh, *, fsdp: bool = False) -> ShardingPlan:
    """Place the model's parameters on the mesh by PARTITION_RULES (everything else replicated),
    with `fsdp` each also split over FSDP_AXIS where a dimension allows (fsdp_spec), and
    record each one's spec as NNX sharding metadata (`out_sharding`, with the mesh), so that an
    optimizer made afterwards (gpt_flax.adamw) places Adam's moments as their parameters: NNX
    copies a parameter's metadata to its optimizer state. Make the optimizer after this call: one
    made before holds its moments on one device until its first step's jit places them."""
    specs: dict[str, P] = {}
    dropped: dict[str, list[int]] = {}
    fsdp_dims: dict[str, int | None] = {}
    for keys, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = canonical_name(keys)
        shape = tuple(var.shape)
        canonical = shape[::-1] if transposed else shape
        spec, bad = spec_for(name, canonical, mesh)
        if fsdp:
            spec, fsdp_dims[name] = fsdp_spec(spec, canonical, mesh)
        specs[name], dropped[name] = spec, bad
        # One entry per dimension: NNX's eager sharding places a (None, ...) spec on the mesh,
        # replicated, but leaves a variable with an empty one where it was.
        axes = tuple(spec) + (None,) * (len(shape) - len(spec))
        var.set_metadata(out_sharding=axes[::-1] if transposed else axes, mesh=mesh)
    state = nnx.state(model)
    nnx.update(model, put(state, nnx.get_named_sharding(state, mesh)))
    return ShardingPlan(mesh, specs, dropped, fsdp_dims)


def shard_batch(ids: Any, mesh: Mesh) -> jax.Array:
    """Token ids split over `data` along the batch (replicated if the batch does not divide)."""
    ids = np.asarray(ids)
    spec, _ = _fit(P("data", None), ids.shape, mesh)
    return put(ids, NamedSharding(mesh, spec))


def param_bytes_per_device(model: nnx.Module) -> dict[jax.Device, int]:
    """Bytes of parameters each device holds (a replicated parameter counts on every device)."""
    out: dict[jax.Device, int] = {}
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        for shard in var[...].addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
