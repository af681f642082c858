"""Distributed parity runs beyond the default run's one case (`make test-distributed`): world size
4 with parity dropout, the 3-head config, the Flax twin's 2 processes x 4 devices against 1 x 8,
and a Flax process killed mid-run."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from parity_tests import parallel
from parity_tests.parallel_spec import ParallelSpec, Result
from parity_tests.tolerances import LOSS
from tests.helpers import ROOT

pytestmark = pytest.mark.distributed

TINY_MESH = json.loads((ROOT / "examples" / "tiny-mesh.json").read_text())
TINY_ODD = json.loads((ROOT / "examples" / "tiny-odd.json").read_text())


def _failures(report: parallel.ParallelReport) -> list:
    return [(r.strategy, r.twin, r.first_failure) for r in report.rows if not r.passed]


def test_world_four_with_parity_dropout():
    report = parallel.run_parallel_parity(ParallelSpec(TINY_MESH, 4, ("ddp", "fsdp", "tp"), dropout="parity"))
    assert report.passed and report.failure is None, _failures(report) or report.failure
    own = [r for r in report.rows if r.against == "one device"]
    assert all(r.state_bytes <= 0.26 * r.single_bytes for r in own if r.strategy == "fsdp")  # a quarter, and biases
    assert all(r.state_bytes == r.single_bytes for r in own if r.strategy == "ddp")  # every rank holds it all


def test_three_heads_data_parallel_with_parity_dropout():
    report = parallel.run_parallel_parity(ParallelSpec(TINY_ODD, 2, ("ddp", "fsdp"), dropout="parity"))
    assert report.passed, _failures(report) or report.failure


def test_two_flax_processes_of_four_devices_are_one_process_of_eight(tmp_path):
    spec = ParallelSpec(TINY_MESH, 8, ("ddp", "fsdp", "tp"), dropout="parity")
    runs = {}
    for processes in (2, 1):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        parallel.write_init(spec, folder)
        parallel.launch(dataclasses.replace(spec, flax_processes=processes), folder, "flax")
        runs[processes] = folder
    for strategy in ("single", *spec.strategies):
        one, two = (Result.load(runs[p], "flax", strategy) for p in (1, 2))
        row = parallel.compare_pair(strategy, "flax", "1 x 8", one, two, spec)
        assert row.passed, (strategy, row.first_failure)
        if strategy != "single":  # and each is the one-device run
            assert parallel.compare_pair(
                strategy, "flax", "one device", Result.load(runs[2], "flax", "single"), two, spec
            ).passed


@pytest.mark.parametrize("process", [0, 1])
def test_a_killed_flax_process_ends_the_run_in_one_line(tmp_path, process):
    spec = ParallelSpec(TINY_MESH, 2, ("ddp",), fault=f"{process}@2", timeout_s=30.0)
    parallel.write_init(spec, tmp_path)
    start = time.monotonic()
    with pytest.raises(parallel.RankFailure) as e:
        parallel.launch(spec, tmp_path, "flax")
    message = str(e.value)
    assert "\n" not in message and f"flax process {process}" in message and "SIGKILL" in message, message
    assert time.monotonic() - start < spec.timeout_s + 30


_TWIN_STEPS = """
import json
import sys
import jax
processes, pid, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=processes, process_id=pid, initialization_timeout=60)
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import gpt_flax
from gpt_flax import sharding
from gpt_spec import GPTConfig
cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0, qkv_bias=False)
batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 9))
mesh = sharding.make_mesh((jax.device_count(), 1))
model = gpt_flax.GPTModel(cfg, rngs=nnx.Rngs(0))
sharding.shard_model(model, mesh, fsdp=True)
optimizer = gpt_flax.adamw(model)
rows = NamedSharding(mesh, P("data"))
share = 4 // jax.process_count()
mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
x, y = (jax.make_array_from_process_local_data(rows, a[mine]) for a in (batch[:, :-1], batch[:, 1:]))
print("LOSSES", json.dumps([gpt_flax.train_step(model, optimizer, x, y) for _ in range(3)]))
"""


def test_the_flax_twins_own_train_step_across_two_processes():
    """gpt_flax.train_step on arrays split over two processes (what docs/sharding.md shows for a
    cluster): every id checked by the process holding it, Adam's count placed across processes, the
    same losses as one process."""
    import os
    import socket
    import subprocess
    import sys

    def run(processes: int) -> list[list[float]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false"}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _TWIN_STEPS, str(processes), str(i), port],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=ROOT,
            )
            for i in range(processes)
        ]
        outs = [p.communicate(timeout=180)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        return [json.loads(out.split("LOSSES")[-1]) for out in outs]

    two, one = run(2), run(1)
    assert two[0] == two[1]  # both processes see the one global loss
    assert max(abs(a - b) for a, b in zip(two[0], one[0], strict=True)) <= LOSS.atol, (two, one)


@pytest.mark.parametrize("twin", parallel.TWINS)
def test_a_hung_rank_is_ended_by_the_timeouts(tmp_path, twin):
    """A rank alive but stopped: its peers' process-group timeout (torch) or watchdog (Flax) ends
    the run, well before the launcher's own deadline would."""
    spec = ParallelSpec(TINY_MESH, 2, ("ddp",), fault="1@2:hang", timeout_s=20.0)
    parallel.write_init(spec, tmp_path)
    start = time.monotonic()
    with pytest.raises(parallel.RankFailure) as e:
        parallel.launch(spec, tmp_path, twin)
    message = str(e.value)
    # torch: the hung rank is left for the launcher to stop. Flax: both processes' watchdogs run out
    # together; the hung one ends by its own, or (a race: process 0's ran out first, taking the JAX
    # coordinator with it) the coordination client aborts it, as it did once in CI.
    ended = (
        ("torch rank 1 still running: stopped",)
        if twin == "torch"
        else ("TimeoutError: no progress for 20 s", "flax process 1 failed (killed by SIGABRT")
    )
    assert "\n" not in message and any(words in message for words in ended), message
    assert time.monotonic() - start < spec.timeout_s + parallel.START_GRACE_S / 2, message
