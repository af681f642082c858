"""One rank of the torch twin's distributed parity run: `python -m parity_tests.parallel_torch SPEC
FOLDER`, started by `gpt-parity parallel` or by torchrun (it reads torchrun's RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT). Rank 0 trains the one-device run first, then every rank
trains each strategy of the spec from the same initial weights (gpt_torch.distributed applies
the strategy from outside the book's model) and rank 0 writes each run's Result.

A distributed mutant (parallel_spec.DIST_MUTANTS) is written here as a torch user would get it
wrong: a DDP comm hook that sums, an FSDP2 divide factor of 1, a rank-local mean, a row-parallel
output left partial or reduced again, masks without the rank's offset, a parameter DDP or FSDP2
is told to ignore.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

import gpt_torch
from gpt_torch import distributed as tdist

from .parallel_spec import (
    DIST_BY_NAME,
    FINISHED,
    INIT_FILE,
    SINGLE,
    UNSYNCED_PARAM,
    ParallelSpec,
    Result,
    fault_step,
    global_batch,
    rank_rows,
    strike,
)


def _progress(text: str) -> None:
    print(f"PROGRESS {text}", flush=True)


def _device() -> torch.device:
    """A GPU of its own per rank where this host has one for each of its ranks (NCCL refuses two
    ranks on one GPU), else the CPU (gloo)."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and torch.cuda.device_count() >= ranks_here:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _model(spec: ParallelSpec, folder: Path, device: torch.device) -> gpt_torch.GPTModel:
    model = gpt_torch.GPTModel(spec.cfg)
    with np.load(folder / INIT_FILE) as z:
        gpt_torch.load_state_dict(model, {k: z[k] for k in z.files})
    if spec.dropout == "parity":
        gpt_torch.use_parity_dropout(model, seed=spec.seed)
    return model.to(device).train()


def _whole(t: torch.Tensor) -> np.ndarray:
    return tdist.full(t).detach().cpu().float().numpy().copy()


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters and AdamW moments this rank holds."""
    held = sum(_local_bytes(p) for p in model.parameters())
    for state in opt.state.values():
        held += sum(_local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return held


# The mutants' torch forms.


def _summing_hook(state, bucket):  # unannotated: DDP checks a hook's annotations as objects, not strings
    """A DDP comm hook that all-reduces each bucket and forgets to divide by the world size."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


class _UnreducedRowwise(RowwiseParallel):
    """Row-parallel whose partial sums are handed on as if they were the whole output."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        return outputs.to_local()


class _TwiceReducedRowwise(RowwiseParallel):
    """Row-parallel whose reduced output is taken for partial sums again and reduced a second time."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        once = outputs.redistribute(placements=[Replicate()]).to_local()
        again = DTensor.from_local(once, device_mesh, [Partial()], run_check=False)
        return again.redistribute(placements=[Replicate()]).to_local()


def _parallelize(model: gpt_torch.GPTModel, strategy: str, mesh: DeviceMesh, plant: str | None) -> nn.Module:
    """gpt_torch.distributed.parallelize, or the planted mutant's version of it."""
    if plant is None:
        return tdist.parallelize(model, strategy, mesh)
    if plant.startswith("row-parallel"):
        style = _UnreducedRowwise if plant == "row-parallel-unreduced" else _TwiceReducedRowwise
        plan = {
            k: style() if isinstance(v, RowwiseParallel) else v for k, v in tdist.tensor_parallel_plan(model).items()
        }
        parallelize_module(model, mesh, plan)
        tdist.split_heads(model, mesh)
        return model
    if plant == "unsynced-param":
        param = dict(model.named_parameters())[UNSYNCED_PARAM]
        if strategy == "ddp":
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [UNSYNCED_PARAM])
            return tdist.parallelize(model, strategy, mesh)
        tdist.shard_dropouts(model, ((0, mesh.get_local_rank(), mesh.size()),))
        for block in model.trf_blocks:
            fully_shard(block, mesh=mesh, ignored_params={param})
        fully_shard(model, mesh=mesh, ignored_params={param})
        return model
    call = tdist.parallelize(model, strategy, mesh)
    if plant == "same-dropout-mask":
        tdist.shard_dropouts(model, ())
    elif plant == "grads-summed":
        if isinstance(call, DistributedDataParallel):
            call.register_comm_hook(None, _summing_hook)
        else:
            for m in model.modules():
                if isinstance(m, FSDPModule):  # gloo has no pre-multiplied sum: ask for plain sums
                    m.set_force_sum_reduction_for_comms(True)
                    m.set_gradient_divide_factor(1.0)
    return call


def _train(spec: ParallelSpec, folder: Path, strategy: str, mesh: DeviceMesh | None, device: torch.device) -> Result:
    rank, world = (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
    mutant = DIST_BY_NAME.get(spec.plant or "")
    plant = mutant.name if mutant is not None and strategy in mutant.strategies else None
    model = _model(spec, folder, device)
    call: nn.Module = model if mesh is None else _parallelize(model, strategy, mesh, plant)
    opt = gpt_torch.adamw(model, lr=spec.lr, weight_decay=spec.weight_decay)
    data_parallel = strategy in ("ddp", "fsdp")
    dies_at = fault_step(spec, rank) if strategy == spec.strategies[0] else None
    losses: list[float] = []
    grads: dict[str, np.ndarray] = {}
    for step in range(1, spec.steps + 1):
        _progress(f"torch {strategy}: step {step} of {spec.steps}")
        if step == dies_at:
            strike(spec)
        x, y, mask = (torch.from_numpy(a).to(device) for a in global_batch(spec, step))
        if data_parallel:
            rows = rank_rows(spec, rank)
            x, y, mask = x[rows], y[rows], mask[rows]
        opt.zero_grad()
        token_loss = F.cross_entropy(call(x).flatten(0, 1), y.flatten(), reduction="none") * mask.flatten()
        if data_parallel:
            if plant == "per-rank-mean":
                loss = token_loss.sum() / mask.sum()
            else:  # each rank's share of the global mean; DDP and FSDP2 average the gradients
                counted = mask.sum()
                dist.all_reduce(counted)
                loss = token_loss.sum() * world / counted
        else:
            loss = token_loss.sum() / mask.sum()
        loss.backward()
        reported = loss.detach().clone()
        if data_parallel:
            dist.all_reduce(reported)
            reported /= world
        losses.append(float(reported))
        if step == 1:
            grads = {n: _whole(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    weights = {n: _whole(p) for n, p in model.named_parameters()}
    held = torch.tensor(_state_bytes(model, opt), dtype=torch.int64)
    if mesh is not None:
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
    notes = [f"{mutant.name} planted"] if plant is not None and mutant is not None else []
    return Result("torch", strategy, losses, grads, weights, int(held), notes)


@contextlib.contextmanager
def _process_group(spec: ParallelSpec, device: torch.device) -> Iterator[DeviceMesh]:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=spec.timeout_s))
    try:
        yield init_device_mesh(device.type, (dist.get_world_size(),))
    finally:
        dist.destroy_process_group()


def run(spec: ParallelSpec, folder: Path) -> None:
    device = _device()
    torch.set_num_threads(1) if device.type == "cpu" else None
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls, as the parity suite holds them
    torch.backends.cudnn.allow_tf32 = False
    with _process_group(spec, device) as mesh:
        if dist.get_world_size() != spec.world:
            raise ValueError(f"the spec is for world size {spec.world}, the process group has {dist.get_world_size()}")
        rank = dist.get_rank()
        if rank == 0:
            _progress("torch single: one device")
            _train(spec, folder, SINGLE, None, device).save(folder)
        for strategy in spec.strategies:
            result = _train(spec, folder, strategy, mesh, device)
            if rank == 0:
                result.save(folder)
        dist.barrier()
        _progress(FINISHED)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec, folder = ParallelSpec.load(Path(args[0])), Path(args[1])
    try:
        run(spec, folder)
    except Exception as e:
        if os.environ.get("PARITY_DEBUG"):
            raise
        print(f"torch rank {os.environ.get('RANK', '?')}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
