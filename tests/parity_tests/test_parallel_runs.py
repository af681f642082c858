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
from tests.helpers import ROOT

pytestmark = pytest.mark.distributed

TINY_MESH = json.loads((ROOT / "examples" / "tiny-mesh.json").read_text())
TINY_ODD = json.loads((ROOT / "examples" / "tiny-odd.json").read_text())


def _failures(report: parallel.ParallelReport) -> list:
    return [(r.strategy, r.twin, r.first_failure) for r in report.rows if not r.passed]


def test_world_four_with_parity_dropout():
    report = parallel.run_parallel_parity(ParallelSpec(TINY_MESH, 4, ("ddp", "fsdp", "tp"), dropout="parity"))
    assert report.passed and report.failure is None, _failures(report) or report.failure
    own = [r for r in report.rows if r.against == "one device" and r.strategy == "fsdp"]
    assert all(r.state_bytes <= 0.26 * r.single_bytes for r in own)  # a quarter each, and the biases


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
