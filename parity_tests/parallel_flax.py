"""The Flax twin's worker of a distributed parity run: one OS process per JAX process.

    python -m parity_tests.parallel_flax SPEC_JSON OUT_DIR

Environment (set by the launcher): PARITY_NUM_PROCESSES (P), PARITY_PROCESS_ID, PARITY_COORDINATOR
("HOST:PORT", used when P > 1) and PARITY_LOCAL_DEVICES (CPU devices per process, spec.world // P);
PARITY_DEBUG set prints a failure's traceback. Every process loads OUT_DIR/init.npz and runs the
one-device reference (on process 0 only), then each strategy on a mesh of every process's devices:
ddp (data x 1, parameters replicated), fsdp (the same mesh, parameters and Adam's moments also
split over `data`) and tp (1 x model, gpt_flax.sharding.PARTITION_RULES); process 0 writes one
parallel_spec.Result per run. Stdout carries `PROGRESS <text>` lines; a failure is one stderr line,
`flax process I: Type: message`, and exit status 1. A process that sees no progress for
spec.timeout_s (a peer died inside a collective) exits the same way.

The clean runs are the unchanged model under jax.jit (GSPMD). A planted distributed mutant
(parallel_spec.DIST_MUTANTS) is written as a JAX user ports the strategy by hand with jax.shard_map,
with one thing wrong: `PORTS` says what.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gpt_flax
from gpt_flax import sharding
from gpt_flax.dropout import KEEP_BITS, ParityDropout, _call_key, _mix, drop_threshold, keep_scale
from gpt_flax.model import commit, dot_general_f32
from gpt_flax.weights import canonical_name, to_canonical

from .parallel_spec import (
    DIST_BY_NAME,
    INIT_FILE,
    SINGLE,
    STRATEGIES,
    UNSYNCED_PARAM,
    ParallelSpec,
    Result,
    check_spec,
    fault_step,
    global_batch,
    strike,
)

TWIN = "flax"
ENV_PROCESSES = "PARITY_NUM_PROCESSES"
ENV_PROCESS_ID = "PARITY_PROCESS_ID"
ENV_COORDINATOR = "PARITY_COORDINATOR"
ENV_LOCAL_DEVICES = "PARITY_LOCAL_DEVICES"
ENV_DEBUG = "PARITY_DEBUG"


@dataclasses.dataclass(frozen=True)
class WorkerEnv:
    processes: int
    process_id: int
    coordinator: str | None
    local_devices: int

    @classmethod
    def from_environ(cls, spec: ParallelSpec) -> WorkerEnv:
        processes = int(os.environ.get(ENV_PROCESSES, "1"))
        process_id = int(os.environ.get(ENV_PROCESS_ID, "0"))
        local = int(os.environ.get(ENV_LOCAL_DEVICES, str(spec.world // max(processes, 1))))
        coordinator = os.environ.get(ENV_COORDINATOR)
        if processes < 1 or not 0 <= process_id < processes:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} is not a process of {ENV_PROCESSES}={processes}")
        if processes * local != spec.world:
            raise ValueError(f"{processes} processes x {local} devices is not the spec's world {spec.world}")
        if processes > 1 and not coordinator:
            raise ValueError(f"{ENV_COORDINATOR} must be set for {processes} processes")
        return cls(processes, process_id, coordinator, local)


def start_jax(env: WorkerEnv, spec: ParallelSpec) -> None:
    """CPU devices and gloo collectives, set before JAX's backend starts; then the job's
    coordinator, with timeouts so that a missing or dead peer ends this process."""
    jax.config.update("jax_num_cpu_devices", env.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.processes > 1:
        jax.distributed.initialize(
            env.coordinator,
            num_processes=env.processes,
            process_id=env.process_id,
            initialization_timeout=max(1, int(spec.timeout_s)),
            heartbeat_timeout_seconds=max(10, int(spec.timeout_s) // 4),
        )


class Watchdog:
    """Ends the process when no progress is reported for `timeout_s`: a collective whose peer died
    may otherwise wait forever."""

    def __init__(self, timeout_s: float, process_id: int):
        self.timeout_s = timeout_s
        self.process_id = process_id
        self.last = time.monotonic()
        self.what = "start"
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self, what: str) -> None:
        self.last, self.what = time.monotonic(), what

    def pause(self, what: str) -> None:
        """No limit until the next beat: waiting on a peer whose own watchdog, and the JAX
        coordinator's heartbeats, end the job if it dies or hangs."""
        self.last, self.what = math.inf, what

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            if time.monotonic() - self.last > self.timeout_s:
                fail(self.process_id, TimeoutError(f"no progress for {self.timeout_s:g} s after {self.what}"))


def fail(process_id: int, error: BaseException) -> None:
    """One line on stderr and exit status 1, without waiting for peers (os._exit skips the
    coordinator's shutdown barrier, which a dead peer would never reach)."""
    message = str(error).strip().splitlines()
    print(f"{TWIN} process {process_id}: {type(error).__name__}: {message[0] if message else ''}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


# The porting bugs, by mutant name: how the hand-written step of that run is wrong.


@dataclasses.dataclass(frozen=True)
class Port:
    """How a run's step is written. Default: the model under jax.jit, GSPMD placing everything.
    `dp_shard_map`: the data-parallel step by hand, jax.shard_map over `data` (each shard's loss
    W * its masked sum / the global count, gradients pmean'ed), unless a knob says otherwise.
    `row_parallel_psums`: the row-parallel projections by hand, jax.shard_map over `model`, their
    partial sums all-reduced this many times (1 is right)."""

    dp_shard_map: bool = False
    local_mean: bool = False  # each shard's loss its own masked mean (per-rank-mean)
    reduce: str = "pmean"  # "psum": gradients summed over shards (grads-summed)
    unsynced: str | None = None  # this parameter's gradient never reduced (unsynced-param)
    local_dropout_index: bool = False  # dropout masks indexed within the shard (same-dropout-mask)
    row_parallel_psums: int | None = None


PORTS: dict[str, Port] = {
    "grads-summed": Port(dp_shard_map=True, reduce="psum"),
    "per-rank-mean": Port(dp_shard_map=True, local_mean=True),
    "row-parallel-unreduced": Port(row_parallel_psums=0),
    "row-parallel-reduced-twice": Port(row_parallel_psums=2),
    "same-dropout-mask": Port(dp_shard_map=True, local_dropout_index=True),
    "unsynced-param": Port(dp_shard_map=True, unsynced=UNSYNCED_PARAM),
}
CLEAN = Port()


def port_for(plant: str | None, strategy: str) -> Port:
    """The step the run of `strategy` uses: the mutant's port where it exists in that strategy."""
    if plant is None or strategy not in DIST_BY_NAME[plant].strategies:
        return CLEAN
    return PORTS[plant]


def masked_loss(model: nnx.Module, x: jax.Array, y: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
    """Cross-entropy summed over the counted tokens, divided by `count`."""
    logits = model(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return (ce * mask).sum() / count


def gspmd_step() -> Callable[..., tuple[jax.Array, nnx.State]]:
    """The clean step: the global masked mean's loss and gradients, then AdamW; GSPMD splits it."""

    @nnx.jit
    def step(model, optimizer, x, y, mask):
        loss, grads = nnx.value_and_grad(masked_loss)(model, x, y, mask, mask.sum())
        optimizer.update(model, grads)
        return loss, grads

    return step


def dp_port_step(port: Port, mesh: Mesh) -> Callable[..., tuple[jax.Array, nnx.State]]:
    """The data-parallel step as written by hand: forward and backward inside jax.shard_map over
    `data` (parameters replicated into it), gradients reduced explicitly, AdamW outside. check_vma
    off: gradients come out per shard (with it on, JAX sums them itself) and reduced as `port` says."""
    shards = mesh.shape["data"]
    reduce = jax.lax.psum if port.reduce == "psum" else jax.lax.pmean

    def local(graphdef, params, rest, x, y, mask):
        model = nnx.merge(graphdef, params, rest)
        count = mask.sum()
        # Right: W x this shard's sum / the global count, whose mean over shards is the global loss.
        scale = count if port.local_mean else jax.lax.psum(count, "data") / shards
        loss, grads = nnx.value_and_grad(masked_loss)(model, x, y, mask, scale)
        flat = [
            (path, g if canonical_name(path)[0] == port.unsynced else reduce(g, "data"))
            for path, g in nnx.to_flat_state(grads)
        ]
        return jax.lax.pmean(loss, "data"), nnx.from_flat_state(flat), nnx.state(model, nnx.Not(nnx.Param))

    @nnx.jit
    def step(model, optimizer, x, y, mask):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss, grads, rest = jax.shard_map(
            lambda *a: local(graphdef, *a),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data"), P("data")),
            out_specs=(P(), P(), P()),
            check_vma=False,
        )(params, rest, x, y, mask)
        nnx.update(model, rest)
        optimizer.update(model, grads)
        return loss, grads

    return step


class ShardParityDropout(ParityDropout):
    """gpt_flax's ParityDropout inside a shard_map over `data` (swapped in as its `__class__`):
    the element's index is its global one, the shard's offset plus its index within the shard;
    `bug_local_index` leaves the offset out, so every shard draws the same mask."""

    bug_local_index = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic:
            return x
        count = self.counter[...]
        self.counter[...] = count + 1
        key = _call_key(self.seed, count)
        h = jax.lax.iota(jnp.uint32, x.size)
        if not self.bug_local_index:  # the batch is the leading axis: shards are contiguous blocks
            h = h + jax.lax.axis_index("data").astype(jnp.uint32) * jnp.uint32(x.size)
        h = _mix(_mix(h ^ key) + key)
        keep = (h >> (32 - KEEP_BITS)) >= jnp.uint32(drop_threshold(self.rate))
        scale = jnp.asarray(keep_scale(self.rate), dtype=x.dtype)
        return jnp.where(keep.reshape(x.shape), x * scale, jnp.zeros((), x.dtype))


class RowParallelLinear(nnx.Linear):
    """A row-parallel projection by hand (swapped in as a Linear's `__class__`): jax.shard_map
    over `model`, each device multiplying its slice of the input features by its rows of the
    kernel, the partial sums all-reduced `bug_psums` times (1 is right), then the bias."""

    bug_psums = 1
    mesh: Mesh

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        def partial(x: jax.Array, kernel: jax.Array) -> jax.Array:
            y = dot_general_f32(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
            for _ in range(self.bug_psums):
                y = jax.lax.psum(y, "model")
            return y

        lead = (None,) * (x.ndim - 1)
        y = jax.shard_map(
            partial,
            mesh=self.mesh,
            in_specs=(P(*lead, "model"), P("model", None)),
            out_specs=P(),
            check_vma=False,  # an unreduced partial sum passes for replicated, as the bug has it
        )(x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...]


def plant(model: nnx.Module, port: Port, mesh: Mesh) -> None:
    """Swap the port's hand-written layers into `model` (their classes are part of its graph
    definition, so the jitted step traces them)."""
    if port.dp_shard_map:
        cls = type("ShardParityDropout", (ShardParityDropout,), {"bug_local_index": port.local_dropout_index})
        for _, module in nnx.iter_modules(model):
            if isinstance(module, ParityDropout):
                module.__class__ = cls
    if port.row_parallel_psums is not None:
        cls = type("RowParallelLinear", (RowParallelLinear,), {"bug_psums": port.row_parallel_psums, "mesh": mesh})
        for block in model.trf_blocks:  # type: ignore[attr-defined]
            block.att.out_proj.__class__ = cls
            block.ff.layers.layers[2].__class__ = cls


# Placement, gathering, bytes.


def whole(tree: Any) -> Any:
    """Every array of `tree` as one numpy array on this process: gathered from every process
    where this one does not hold all of it (a collective: every process calls it alike)."""

    def one(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a global array of `shape` that this process's devices hold under `sharding`."""
    spans = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows = index[0] if index else slice(None)
        spans.add(rows.indices(shape[0])[:2])
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"this process's devices hold rows {sorted(spans)}, not one block")
    return slice(lo, hi)


def place_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array split over `data` from this process's own rows (what a multi-host loader has)."""
    rows = process_rows(sharding, array.shape)
    return jax.make_array_from_process_local_data(sharding, array[rows], array.shape)


def state_bytes(model: nnx.Module, optimizer: nnx.Optimizer, processes: int) -> int:
    """Bytes of parameters and optimizer state on the device that holds the most, over every process."""
    per_device: dict[jax.Device, int] = {}
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param)) + jax.tree.leaves(nnx.state(optimizer))
    for x in leaves:
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    most = max(per_device.values())
    if processes == 1:
        return most
    return int(np.max(multihost_utils.process_allgather(np.int64(most))))


# The runs.


@dataclasses.dataclass
class Worker:
    spec: ParallelSpec
    env: WorkerEnv
    out_dir: Path
    watchdog: Watchdog

    def progress(self, text: str) -> None:
        self.watchdog.beat(text)
        print(f"PROGRESS {TWIN} process {self.env.process_id}/{self.env.processes}: {text}", flush=True)

    def fresh_model(self) -> Any:
        spec = self.spec
        model = gpt_flax.GPTModel(spec.cfg, rngs=nnx.Rngs(spec.seed))
        with np.load(self.out_dir / INIT_FILE) as z:
            gpt_flax.load_state_dict(model, {k: z[k] for k in z.files})
        if spec.dropout == "parity":
            gpt_flax.use_parity_dropout(model, seed=spec.seed)
        model.train()
        return model

    def run_single(self) -> Result:
        """The reference: every step on one device of process 0, no mesh."""
        device = jax.local_devices()[0]
        model = self.fresh_model()
        nnx.update(model, jax.device_put(nnx.state(model), device))
        optimizer = gpt_flax.adamw(model, lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        commit(model, optimizer)
        result = self.train(SINGLE, model, optimizer, gspmd_step(), lambda a: jax.device_put(a, device), None)
        result.state_bytes = state_bytes(model, optimizer, 1)
        result.notes.append(f"one device: {device}")
        return result

    def run_strategy(self, strategy: str, port: Port, fault: int | None) -> Result:
        spec, world = self.spec, self.spec.world
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        shape = (1, world) if strategy == "tp" else (world, 1)
        if spec.batch % shape[0]:
            raise ValueError(f"{strategy}: batch {spec.batch} not divisible by the data axis {shape[0]}")
        mesh = sharding.make_mesh(shape)
        model = self.fresh_model()
        plan = sharding.shard_model(model, mesh, fsdp=strategy == "fsdp")
        plant(model, port, mesh)
        optimizer = gpt_flax.adamw(model, lr=spec.lr, weight_decay=spec.weight_decay)  # after: moments as params
        commit(model, optimizer)  # Adam's count, made on one device: replicated over the mesh
        batch = NamedSharding(mesh, P("data", None))
        step = dp_port_step(port, mesh) if port.dp_shard_map else gspmd_step()
        result = self.train(strategy, model, optimizer, step, lambda a: place_global(a, batch), fault)
        result.state_bytes = state_bytes(model, optimizer, self.env.processes)
        result.notes += [f"mesh {shape[0]}x{shape[1]} (data x model) over {self.env.processes} process(es)"]
        result.notes += plan.describe()
        if spec.plant is not None and port != CLEAN:
            result.notes.append(f"planted {spec.plant}: {DIST_BY_NAME[spec.plant].bug}")
        return result

    def train(
        self,
        run: str,
        model: Any,
        optimizer: nnx.Optimizer,
        step: Callable[..., tuple[jax.Array, nnx.State]],
        place: Callable[[np.ndarray], jax.Array],
        fault: int | None,
    ) -> Result:
        spec = self.spec
        losses: list[float] = []
        grads: dict[str, np.ndarray] = {}
        for k in range(1, spec.steps + 1):
            self.progress(f"{run} step {k}/{spec.steps}")
            if fault == k:
                strike(spec)
            x, y, mask = global_batch(spec, k)
            loss, g = step(model, optimizer, place(x.astype(np.int32)), place(y.astype(np.int32)), place(mask))
            losses.append(float(whole(loss)))
            if k == 1:
                grads = to_canonical(whole(g))
            self.watchdog.beat(f"{run} step {k}/{spec.steps} done")
        weights = to_canonical(whole(nnx.state(model, nnx.Param)))
        return Result(TWIN, run, losses, grads, weights, 0)

    def run_all(self) -> None:
        spec, first = self.spec, self.env.process_id == 0
        with jax.default_matmul_precision("float32"):
            self.progress(f"{SINGLE} start" + ("" if first else " (on process 0)"))
            if first:
                self.run_single().save(self.out_dir)
            if self.env.processes > 1:
                self.watchdog.pause(f"{SINGLE} (waiting for process 0)")
                multihost_utils.sync_global_devices(SINGLE)
            for i, strategy in enumerate(spec.strategies):
                self.progress(f"{strategy} start")
                fault = fault_step(spec, self.env.process_id) if i == 0 else None
                result = self.run_strategy(strategy, port_for(spec.plant, strategy), fault)
                if first:
                    result.save(self.out_dir)
        self.progress("done")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    process_id = int(os.environ.get(ENV_PROCESS_ID, "0") or 0)
    try:
        if len(args) != 2:
            raise ValueError("usage: python -m parity_tests.parallel_flax SPEC_JSON OUT_DIR")
        spec = ParallelSpec.load(Path(args[0]))
        check_spec(spec)
        env = WorkerEnv.from_environ(spec)
        watchdog = Watchdog(spec.timeout_s, env.process_id)
        start_jax(env, spec)
        Worker(spec, env, Path(args[1]), watchdog).run_all()
    except Exception as error:
        if os.environ.get(ENV_DEBUG):
            traceback.print_exc()
        fail(process_id, error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
