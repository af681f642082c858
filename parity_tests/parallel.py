"""Distributed parity: each twin trained on its own framework's distributed engine (torch: DDP,
FSDP2 and tensor parallelism on DTensor over a gloo or NCCL process group; Flax: GSPMD on a
device mesh spanning processes joined by `jax.distributed`), held to its own one-device run and
to the other twin's run of the same strategy.

`run_parallel_parity` starts the ranks itself (parallel_torch.py and parallel_flax.py, one OS
process each), watches them and collects what rank 0 wrote. A rank that dies ends the run at once
with one line naming it; a run past its deadline is ended the same way; Ctrl-C ends every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt_spec.layout import in_model_order

from . import TWINS
from .compare import Comparison, compare
from .environment import versions
from .parallel_spec import (
    FINISHED,
    INIT_FILE,
    SINGLE,
    ParallelSpec,
    Result,
    check_spec,
)
from .progress import Progress, silent
from .tolerances import GRADS, LOSS
from .training import WeightCheck, weights_check

# What a rank may take beyond the process group's timeout (imports, compiles) before the run is
# ended as hung.
START_GRACE_S = 120.0
FAILURE_SETTLE_S = 1.0  # how long the other ranks get to end after one has failed, before naming one


# What a process ending abruptly (Ctrl-C in gpt-parity ends it with os._exit) must not leave behind:
# ranks in sessions of their own, and the launcher's temporary folders. See abandon().
_LIVE_RANKS: set[subprocess.Popen] = set()
_TEMPORARY: set[Path] = set()
# Held while a rank starts and is recorded, so that abandon() (on Ctrl-C's watcher thread) never
# misses one the main thread has just started; abandon() keeps it, so none starts after.
_STARTING = threading.Lock()
ABANDON_WAIT_S = 10.0  # how long abandon() waits for a killed rank to be gone


def abandon() -> None:
    """Kill every rank this process started that is still running and delete its temporary
    folders: for a caller about to end the process without unwinding (no finally runs)."""
    _STARTING.acquire()
    for proc in list(_LIVE_RANKS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in list(_LIVE_RANKS):
        # Reaped, not only signalled: a rank killed but not yet gone would outlive the launcher.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=ABANDON_WAIT_S)
    for folder in list(_TEMPORARY):
        shutil.rmtree(folder, ignore_errors=True)


class RankFailure(RuntimeError):
    """A rank died, or the run passed its deadline: the message is the one line to show."""


def write_init(spec: ParallelSpec, folder: Path) -> None:
    """The canonical initial weights every worker of both twins loads: the torch twin's init."""
    import torch

    import gpt_torch

    torch.manual_seed(spec.seed)
    weights: dict[str, Any] = gpt_torch.state_dict(gpt_torch.GPTModel(spec.cfg))
    np.savez(folder / INIT_FILE, **weights)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # Ranks share this machine's cores: one thread each, as the process group's peers expect.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    # Each rank compiles its own programs: none shares a persistent cache with another process.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.update(extra)
    return env


@dataclasses.dataclass
class _Rank:
    name: str  # "torch rank 1", "flax process 0"
    proc: subprocess.Popen
    log: Path

    def last_line(self, prefix: str = "") -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        lines = [ln for ln in lines if ln.startswith(prefix)] if prefix else lines
        return lines[-1] if lines else ""

    def written_at(self) -> int:
        """When the rank last wrote to its log (its one-line error, for a rank that failed)."""
        try:
            return self.log.stat().st_mtime_ns
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        _LIVE_RANKS.discard(self.proc)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


@contextlib.contextmanager
def _ranks(commands: Sequence[tuple[str, list[str], dict[str, str]]], folder: Path) -> Iterator[list[_Rank]]:
    """Start every rank in a session of its own (the launcher, not the terminal, ends them) and
    end whatever is still running on the way out, Ctrl-C included."""
    ranks: list[_Rank] = []
    try:
        for name, argv, env in commands:
            log = folder / f"{name.replace(' ', '-')}.log"
            with _STARTING, open(log, "w") as out:
                proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=_worker_env(env), start_new_session=True
                )
                _LIVE_RANKS.add(proc)
            ranks.append(_Rank(name, proc, log))
        yield ranks
    finally:
        for r in ranks:
            r.stop()


def _what_happened(rank: _Rank, code: int) -> str:
    """A dead rank in a few words: its own one-line error where it wrote one (exit status 1), else
    how it ended and the step it had reached (a signal, or an abort's trace, says nothing useful)."""
    said = rank.last_line()
    if code > 0 and said.startswith(rank.name):
        return said
    reached = rank.last_line("PROGRESS ").removeprefix("PROGRESS ")
    return f"{_exit_text(code)} during {reached}" if reached else _exit_text(code)


def _in_teardown(ranks: list[_Rank], failed: list[tuple[_Rank, int]]) -> list[str]:
    """Ranks ended by a signal after every rank passed the final barrier (gloo can abort a rank
    whose peer has already closed its sockets): each named in a note, or [] where any rank had not
    finished, which stays a failure."""
    if not failed or any(code > 0 for _, code in failed):
        return []
    if any(r.last_line("PROGRESS ").removeprefix("PROGRESS ") != FINISHED for r in ranks):
        return []
    return [
        f"{r.name} {_exit_text(code)} in the process group's teardown, after every result was written"
        for r, code in failed
    ]


def _watch(ranks: list[_Rank], deadline_s: float, status) -> list[str]:
    """Wait for every rank; the first to fail, or `deadline_s` without a line from any rank, ends
    them all with one line. Returns notes on ranks that died after all had finished."""
    start = time.time_ns()
    while True:
        codes = [r.proc.poll() for r in ranks]
        if any(code not in (None, 0) for code in codes):
            # The one that failed first sets off its peers' errors (a connection reset): a moment
            # for them to end, then name a rank ended by a signal, else the first to write its error.
            time.sleep(FAILURE_SETTLE_S)
            failed = [(r, c) for r in ranks if (c := r.proc.poll())]
            notes = _in_teardown(ranks, failed)
            if notes and all(r.proc.poll() is not None for r in ranks):
                return notes
            r, code = min(failed, key=lambda rc: (rc[1] > 0, rc[0].written_at()))
            running = [other.name for other in ranks if other.proc.poll() is None]  # a hung one among them
            rest = f"{', '.join(running)} still running: stopped" if running else "no rank left running"
            raise RankFailure(f"{r.name} failed ({_what_happened(r, code)}); {rest}")
        if all(code == 0 for code in codes):
            return []
        if (time.time_ns() - max(start, *(r.written_at() for r in ranks))) / 1e9 > deadline_s:
            alive = ", ".join(r.name for r, c in zip(ranks, codes, strict=True) if c is None)
            raise RankFailure(f"no progress for {deadline_s:.0f} s: stopped {alive} (a hung collective?)")
        said = ranks[0].last_line("PROGRESS ").removeprefix("PROGRESS ")
        if said:
            status(said)
        time.sleep(0.1)


def launch(spec: ParallelSpec, folder: Path, twin: str, status=lambda s: None) -> list[str]:
    """Run one twin's ranks to completion (their Results land in `folder`), or raise RankFailure;
    returns notes on ranks that died in teardown after every result was written."""
    spec_file = folder / "spec.json"
    spec.save(spec_file)
    port = str(_free_port())
    commands = []
    if twin == "torch":
        for rank in range(spec.world):
            env = {"RANK": str(rank), "WORLD_SIZE": str(spec.world), "LOCAL_RANK": str(rank)}
            env |= {"LOCAL_WORLD_SIZE": str(spec.world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            argv = [sys.executable, "-m", "parity_tests.parallel_torch", str(spec_file), str(folder)]
            commands.append((f"torch rank {rank}", argv, env))
    else:
        n = spec.flax_processes
        for i in range(n):
            env = {
                "PARITY_NUM_PROCESSES": str(n),
                "PARITY_PROCESS_ID": str(i),
                "PARITY_COORDINATOR": f"127.0.0.1:{port}",
                "PARITY_LOCAL_DEVICES": str(spec.world // n),
                "JAX_PLATFORMS": "cpu",
            }
            argv = [sys.executable, "-m", "parity_tests.parallel_flax", str(spec_file), str(folder)]
            commands.append((f"flax process {i}", argv, env))
    with _ranks(commands, folder) as ranks:
        return _watch(ranks, spec.timeout_s + START_GRACE_S, status)


@dataclasses.dataclass
class ParallelRow:
    """One comparison: a strategy's run in `twin` against `against` (one device, or the other twin)."""

    strategy: str
    twin: str  # "torch", "flax", or "torch vs flax"
    against: str  # "one device" or "the other twin"
    loss: Comparison
    grads: list[Comparison]
    weights: WeightCheck
    state_bytes: int  # parameters + AdamW moments on the rank holding the most (of `twin`'s run)
    single_bytes: int  # the same on one device
    notes: list[str]

    @property
    def passed(self) -> bool:
        return self.loss.passed and all(g.passed for g in self.grads) and self.weights.passed

    @property
    def label(self) -> str:
        """ "torch vs one device", or "torch vs flax"."""
        return self.twin if self.against == "the other twin" else f"{self.twin} vs {self.against}"

    @property
    def first_failure(self) -> str | None:
        """The first tensor past its bound: the loss, then gradients, then weights, canonical order."""
        if not self.loss.passed:
            return "loss"
        for g in self.grads:
            if not g.passed:
                return g.name
        for w in self.weights.tensors:
            if not w.passed:
                return f"weight {w.name}"
        return None if self.weights.passed else "weights: elements past the envelope"

    @property
    def worst_grad(self) -> Comparison:
        return max(self.grads, key=lambda c: c.margin if np.isfinite(c.margin) else np.inf)

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "twin": self.twin,
            "against": self.against,
            "passed": self.passed,
            "first_failure": self.first_failure,
            "loss": self.loss.to_json(),
            "grads": [g.to_json() for g in self.grads],
            "weights": self.weights.to_json(),
            "state_bytes_per_rank": self.state_bytes,
            "state_bytes_one_device": self.single_bytes,
            "notes": self.notes,
        }


@dataclasses.dataclass
class ParallelReport:
    spec: ParallelSpec
    rows: list[ParallelRow]
    losses: dict[str, list[float]]  # "twin strategy" -> each step's loss
    failure: str | None = None  # a rank's failure: the run ended without results
    plant_twin: str | None = None  # the twin whose ranks spec.plant was planted in
    notes: list[str] = dataclasses.field(default_factory=list)  # ranks that died after all had finished

    @property
    def passed(self) -> bool:
        return self.failure is None and bool(self.rows) and all(r.passed for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "passed": self.passed,
            "failure": self.failure,
            "planted_in": self.plant_twin if self.spec.plant else None,
            "rows": [r.to_json() for r in self.rows],
            "losses": self.losses,
            "notes": self.notes,
            "versions": versions(),
        }


def compare_pair(strategy: str, twin: str, against: str, ref: Result, cand: Result, spec: ParallelSpec) -> ParallelRow:
    """`cand` held to `ref`: the loss at every step, every gradient, the weights after the last step."""
    order = in_model_order(ref.weights, spec.cfg)  # "first past its bound" in the forward's order

    def held(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: got.get(k, np.full_like(want[k], np.nan)) for k in order}  # a missing tensor fails

    loss = compare("loss", np.asarray(ref.losses, np.float64), np.asarray(cand.losses, np.float64), LOSS)
    grads = [compare(f"grad {k}", ref.grads[k], v, GRADS) for k, v in held(cand.grads, ref.grads).items()]
    weights = weights_check(spec.steps, {k: ref.weights[k] for k in order}, held(cand.weights, ref.weights), spec.lr)
    return ParallelRow(strategy, twin, against, loss, grads, weights, cand.state_bytes, ref.state_bytes, cand.notes)


def compare_results(spec: ParallelSpec, results: dict[tuple[str, str], Result]) -> list[ParallelRow]:
    """Every strategy against its twin's one-device run, and each twin's run against the other's."""
    rows = [
        compare_pair(SINGLE, "torch vs flax", "the other twin", results["torch", SINGLE], results["flax", SINGLE], spec)
    ]
    for strategy in spec.strategies:
        for twin in TWINS:
            rows.append(
                compare_pair(strategy, twin, "one device", results[twin, SINGLE], results[twin, strategy], spec)
            )
        rows.append(
            compare_pair(
                strategy, "torch vs flax", "the other twin", results["torch", strategy], results["flax", strategy], spec
            )
        )
    return rows


def run_parallel_parity(
    spec: ParallelSpec,
    *,
    plant_twin: str | None = None,
    progress: Progress = silent,
    keep: Path | None = None,
) -> ParallelReport:
    """Both twins' ranks, one twin after the other (they would share this machine's cores), each
    strategy held to one device and to the other twin. `spec.plant` goes to `plant_twin`'s ranks
    only. `keep`: a folder for the ranks' files and logs (default: a temporary one)."""
    check_spec(spec)
    prog = progress(3)
    with contextlib.ExitStack() as stack:
        if keep is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt-parity-parallel-")))
            _TEMPORARY.add(folder)
            stack.callback(_TEMPORARY.discard, folder)
        else:
            folder = keep
        folder.mkdir(parents=True, exist_ok=True)
        with prog.step("initial weights"):
            write_init(spec, folder)
        notes: list[str] = []
        for twin in TWINS:
            twin_spec = dataclasses.replace(spec, plant=spec.plant if plant_twin == twin else None)
            with prog.step(f"{twin}: {spec.world} ranks, {', '.join(spec.strategies)}") as status:
                try:
                    notes += launch(twin_spec, folder, twin, status)
                except RankFailure as e:
                    return ParallelReport(spec, [], {}, failure=str(e), plant_twin=plant_twin)
        results = {(t, s): Result.load(folder, t, s) for t in TWINS for s in (SINGLE, *spec.strategies)}
    losses = {f"{t} {s}": r.losses for (t, s), r in results.items()}
    return ParallelReport(spec, compare_results(spec, results), losses, plant_twin=plant_twin, notes=notes)
