"""The torch twin on torch.distributed, applied from outside the book's model: DDP, FSDP2
(`fully_shard`) and tensor parallelism on DTensor (`parallelize_module`) with the Megatron plan the
Flax twin's partition rules express (gpt_flax.sharding.PARTITION_RULES): query/key/value and the
first MLP layer column-parallel, the two output projections row-parallel. Embeddings, LayerNorms and
the head stay replicated under tensor parallelism.

Call inside an initialised process group (gloo on CPU, NCCL on CUDA; `torchrun` sets one up).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from .dropout import ParityDropout
from .model import GPTModel, MultiHeadAttention

STRATEGIES = ("ddp", "fsdp", "tp")


def check_tensor_parallel(n_heads: int, emb_dim: int, world_size: int) -> None:
    """Refuse a tensor-parallel split the heads (or the MLP's hidden width) do not divide."""
    if n_heads % world_size:
        raise ValueError(f"tensor parallelism over {world_size} ranks needs heads divisible by it, got {n_heads} heads")
    if (4 * emb_dim) % world_size:
        raise ValueError(
            f"tensor parallelism over {world_size} ranks needs 4*emb_dim divisible by it, got {4 * emb_dim}"
        )


def tensor_parallel_plan(model: GPTModel) -> dict[str, ParallelStyle]:
    """Module path -> ParallelStyle for every block: the Megatron split of attention and MLP."""
    plan: dict[str, ParallelStyle] = {}
    for i in range(len(model.trf_blocks)):
        for name in ("W_query", "W_key", "W_value"):
            plan[f"trf_blocks.{i}.att.{name}"] = ColwiseParallel()
        plan[f"trf_blocks.{i}.att.out_proj"] = RowwiseParallel()
        plan[f"trf_blocks.{i}.ff.layers.0"] = ColwiseParallel()
        plan[f"trf_blocks.{i}.ff.layers.2"] = RowwiseParallel()
    return plan


def parallelize(model: GPTModel, strategy: str, mesh: DeviceMesh) -> nn.Module:
    """`model` distributed by `strategy` over the 1-D `mesh`; returns the module to call (DDP
    wraps; FSDP2 and tensor parallelism change `model` in place and return it). Make the optimizer
    afterwards: FSDP2 and tensor parallelism replace the parameters with DTensors.

    Under a data-parallel strategy each rank feeds its own rows of the global batch; under tensor
    parallelism every rank feeds the whole batch."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    rank, world = mesh.get_local_rank(), mesh.size()
    if strategy == "tp":
        check_tensor_parallel(model.cfg.n_heads, model.cfg.emb_dim, world)
        parallelize_module(model, mesh, tensor_parallel_plan(model))
        split_heads(model, mesh)
        return model
    shard_dropouts(model, ((0, rank, world),))  # every dropout's input leads with the batch
    if strategy == "ddp":
        return DistributedDataParallel(model)
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def split_heads(model: GPTModel, mesh: DeviceMesh) -> None:
    """After the tensor-parallel plan: each rank computes its own heads, so the book's views and
    its attention dropout see those (a part of the heads dimension)."""
    rank, world = mesh.get_local_rank(), mesh.size()
    for att in (block.att for block in model.trf_blocks):
        assert isinstance(att, MultiHeadAttention)
        att.num_heads //= world
        att.d_out //= world
        shard_dropouts(att, ((1, rank, world),))  # (batch, heads, queries, keys)


def shard_dropouts(module: nn.Module, shards: tuple[tuple[int, int, int], ...]) -> None:
    """Tell every parity dropout under `module` which part of the whole its input is, so that its
    masks are the one-device run's (torch's own nn.Dropout draws per rank and needs nothing)."""
    for m in module.modules():
        if isinstance(m, ParityDropout):
            m.shards = shards


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient whole, on every rank (a DTensor gathered; a plain tensor as it is)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
