"""What a distributed parity run is, shared by the launcher and the workers of both twins: the run's
settings, the global batches every strategy trains on, and the files a worker hands back.

Every worker (a torch rank, a Flax process) reads one `ParallelSpec` from JSON, loads the same
initial weights, trains `steps` AdamW steps on `global_batch(spec, step)` (a data-parallel rank
takes its own rows of it) and, on rank 0, writes one `Result` per strategy: the loss at each step,
every gradient of the first step and every weight after the last, whole, in the canonical layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpt_spec import GPTConfig

STRATEGIES = ("ddp", "fsdp", "tp")
SINGLE = "single"  # the one-device run every strategy is held to
DROPOUT_MODES = ("off", "parity")
PARITY_DROP_RATE = 0.1  # --dropout parity on a config whose drop_rate is 0
INIT_FILE = "init.npz"  # the canonical initial weights every worker loads


# What a torch rank says once it has passed the final barrier: every result is written, only the
# process group's teardown is left.
FINISHED = "finished: every result written"


@dataclasses.dataclass(frozen=True)
class ParallelSpec:
    config: dict[str, Any]
    world: int
    strategies: tuple[str, ...]
    steps: int = 3
    batch: int = 8
    seq: int = 8
    seed: int = 0
    lr: float = 4e-4
    weight_decay: float = 0.1
    dropout: str = "off"
    plant: str | None = None  # a distributed mutant's name, planted in this worker's twin
    timeout_s: float = 120.0  # the process group's and the JAX coordinator's
    flax_processes: int = 2  # the Flax twin's processes, world // flax_processes CPU devices each
    fault: str | None = None  # tests only: "RANK@STEP" kills that rank at that step, "RANK@STEP:hang" stops it

    @property
    def cfg(self) -> GPTConfig:
        cfg = GPTConfig.from_dict(self.config)
        if self.dropout == "parity":
            return cfg if cfg.drop_rate > 0 else cfg.replace(drop_rate=PARITY_DROP_RATE)
        return cfg.replace(drop_rate=0.0)

    @property
    def rows_per_rank(self) -> int:
        return self.batch // self.world

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "strategies": list(self.strategies)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParallelSpec:
        return cls(**{**data, "strategies": tuple(data["strategies"])})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> ParallelSpec:
        return cls.from_json(json.loads(path.read_text()))


def global_batch(spec: ParallelSpec, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step `step`'s (inputs, targets, loss mask), each (batch, seq): windows of random ids, with
    the last `row % seq` targets of each row masked out (padding), so that data-parallel ranks
    hold unequal numbers of counted tokens and a per-rank mean differs from the global one."""
    rng = np.random.default_rng([spec.seed, step])
    data = rng.integers(0, GPTConfig.from_dict(spec.config).vocab_size, (spec.batch, spec.seq + 1), dtype=np.int64)
    counted = spec.seq - np.arange(spec.batch) % spec.seq
    mask = (np.arange(spec.seq)[None, :] < counted[:, None]).astype(np.float32)
    return data[:, :-1], data[:, 1:], mask


def rank_rows(spec: ParallelSpec, rank: int) -> slice:
    """The rows of every global batch that data-parallel rank `rank` trains on: disjoint, in order."""
    n = spec.rows_per_rank
    return slice(rank * n, (rank + 1) * n)


@dataclasses.dataclass
class Result:
    """One strategy's run in one twin, as rank 0 saw it (every tensor gathered whole)."""

    twin: str
    strategy: str
    losses: list[float]  # the global loss of each step, before its update
    grads: dict[str, np.ndarray]  # canonical name -> the first step's gradient
    weights: dict[str, np.ndarray]  # canonical name -> the weights after the last step
    state_bytes: int  # parameters + optimizer state on the rank that holds the most
    notes: list[str] = dataclasses.field(default_factory=list)

    def save(self, folder: Path) -> None:
        arrays: dict[str, Any] = {f"grad/{k}": v for k, v in self.grads.items()} | {
            f"weight/{k}": v for k, v in self.weights.items()
        }
        np.savez(folder / f"{self.twin}-{self.strategy}.npz", **arrays)
        meta = {"losses": self.losses, "state_bytes": self.state_bytes, "notes": self.notes}
        (folder / f"{self.twin}-{self.strategy}.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path, twin: str, strategy: str) -> Result:
        meta = json.loads((folder / f"{twin}-{strategy}.json").read_text())
        with np.load(folder / f"{twin}-{strategy}.npz") as z:
            grads = {k[5:]: z[k] for k in z.files if k.startswith("grad/")}
            weights = {k[7:]: z[k] for k in z.files if k.startswith("weight/")}
        return cls(twin, strategy, meta["losses"], grads, weights, meta["state_bytes"], meta["notes"])


def fault_step(spec: ParallelSpec, rank: int) -> int | None:
    """The step at which the test-only fault strikes `rank`, if it does."""
    if spec.fault is None:
        return None
    who, _, step = spec.fault.removesuffix(":hang").partition("@")
    return int(step) if int(who) == rank else None


def strike(spec: ParallelSpec) -> None:
    """The test-only fault: this process killed (SIGKILL), or stopped where it is, alive, forever
    (":hang"), which only the others' timeouts can end."""
    if spec.fault is not None and spec.fault.endswith(":hang"):
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class DistMutant:
    """A distributed porting bug, plantable in either twin's workers (parallel_torch.py and
    parallel_flax.py each write it as a user of that framework would)."""

    name: str
    bug: str
    strategies: tuple[str, ...]  # the strategies it exists in; the others run clean
    needs_dropout: bool = False


DIST_MUTANTS: tuple[DistMutant, ...] = (
    DistMutant("grads-summed", "data-parallel gradients summed over ranks, not averaged", ("ddp", "fsdp")),
    DistMutant(
        "per-rank-mean",
        "the loss averaged per rank over its own token count, then over ranks (unequal counts)",
        ("ddp", "fsdp"),
    ),
    DistMutant("row-parallel-unreduced", "a row-parallel projection's partial sums never all-reduced", ("tp",)),
    DistMutant("row-parallel-reduced-twice", "a row-parallel projection's output all-reduced twice", ("tp",)),
    DistMutant(
        "same-dropout-mask",
        "every data-parallel rank draws the same dropout mask (masks by local, not global, index)",
        ("ddp", "fsdp"),
        needs_dropout=True,
    ),
    DistMutant(
        "unsynced-param",
        "one parameter left out of data-parallel synchronisation: its gradient never reduced",
        ("ddp", "fsdp"),
    ),
)
DIST_BY_NAME = {m.name: m for m in DIST_MUTANTS}
UNSYNCED_PARAM = "trf_blocks.0.norm1.scale"  # the parameter unsynced-param leaves out


def check_spec(spec: ParallelSpec) -> None:
    """Refuse what cannot be split or planted, with one line naming the numbers (exit 2 in the CLI)."""
    cfg = GPTConfig.from_dict(spec.config)
    if spec.world < 2:
        raise ValueError(f"world size must be at least 2, got {spec.world}")
    unknown = [s for s in spec.strategies if s not in STRATEGIES]
    if unknown or not spec.strategies:
        raise ValueError(f"strategies must be some of {', '.join(STRATEGIES)}; got {', '.join(spec.strategies)}")
    if any(s in ("ddp", "fsdp") for s in spec.strategies) and spec.batch % spec.world:
        raise ValueError(f"batch {spec.batch} cannot be split over world size {spec.world} (data-parallel ranks)")
    if "tp" in spec.strategies:
        if cfg.n_heads % spec.world:
            raise ValueError(f"tp: {cfg.n_heads} heads cannot be split over world size {spec.world}")
        if (4 * cfg.emb_dim) % spec.world:
            raise ValueError(
                f"tp: the MLP's {4 * cfg.emb_dim} hidden units cannot be split over world size {spec.world}"
            )
    if spec.world % spec.flax_processes:
        raise ValueError(f"{spec.flax_processes} Flax processes cannot split world size {spec.world} evenly")
    if not 1 <= spec.seq <= cfg.context_length:
        raise ValueError(f"seq must be in [1, context_length={cfg.context_length}], got {spec.seq}")
    if spec.steps < 1:
        raise ValueError(f"train steps must be >= 1, got {spec.steps}")
    if spec.dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {', '.join(DROPOUT_MODES)}, got {spec.dropout!r}")
    if spec.plant is not None:
        mutant = DIST_BY_NAME.get(spec.plant)
        if mutant is None:
            raise ValueError(f"unknown distributed mutant {spec.plant!r}; known: {', '.join(DIST_BY_NAME)}")
        if mutant.needs_dropout and spec.dropout != "parity":
            raise ValueError(f"{mutant.name} can only show with --dropout parity")
        if not set(mutant.strategies) & set(spec.strategies):
            raise ValueError(f"{mutant.name} exists only under {', '.join(mutant.strategies)}")
