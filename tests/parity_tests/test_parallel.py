"""Distributed parity: what the launcher refuses, the data every rank sees, parity dropout by global
index, a dead rank, and (marked `distributed`: `make test-distributed`) every strategy and every
distributed mutant in both twins through their own engines."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt_torch
from gpt_spec import GPTConfig
from gpt_torch.dropout import ParityDropout, global_index
from parity_tests import parallel
from parity_tests.parallel_spec import DIST_MUTANTS, STRATEGIES, ParallelSpec, global_batch, rank_rows
from tests.helpers import ROOT

TINY_MESH = json.loads((ROOT / "examples" / "tiny-mesh.json").read_text())
TINY_ODD = json.loads((ROOT / "examples" / "tiny-odd.json").read_text())


def spec(**changes) -> ParallelSpec:
    return dataclasses.replace(ParallelSpec(TINY_MESH, 2, ("ddp", "fsdp", "tp")), **changes)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"world": 3}, ["batch 8", "world size 3"]),
        ({"config": TINY_ODD, "strategies": ("tp",)}, ["3 heads", "world size 2"]),
        ({"world": 1}, ["at least 2"]),
        ({"world": 4, "flax_processes": 3}, ["3 Flax processes", "world size 4"]),
        ({"seq": 12}, ["context_length=11"]),
        ({"plant": "same-dropout-mask"}, ["--dropout parity"]),
        ({"plant": "row-parallel-unreduced", "strategies": ("ddp",)}, ["only under tp"]),
        ({"plant": "no-such-bug"}, ["unknown distributed mutant"]),
    ],
)
def test_refused_in_one_line_naming_the_numbers(changes, words):
    with pytest.raises(ValueError) as e:
        parallel.check_spec(spec(**changes))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_tiny_odd_data_parallel_is_accepted():
    parallel.check_spec(spec(config=TINY_ODD, strategies=("ddp", "fsdp")))


def test_ranks_take_disjoint_rows_with_unequal_token_counts():
    s = spec(world=4)
    x, y, mask = global_batch(s, 1)
    rows = [np.arange(s.batch)[rank_rows(s, r)] for r in range(s.world)]
    assert np.array_equal(np.concatenate(rows), np.arange(s.batch))  # disjoint, in order, all of them
    counts = [mask[r].sum() for r in rows]
    assert len(set(counts)) == s.world, counts  # a per-rank mean differs from the global one
    assert np.array_equal(x[:, 1:], y[:, :-1])  # next-token windows
    assert not np.array_equal(global_batch(s, 2)[0], x)


@pytest.mark.parametrize("dim, count", [(0, 2), (0, 4), (1, 3)])
def test_a_part_draws_its_slice_of_the_whole_mask(dim, count):
    """The mask of a rank's part, drawn by global index, is that part of the one-device mask."""
    whole = torch.ones(4, 6, 5)
    full = ParityDropout(0.5, gpt_torch.dropout.DropoutCounter(), seed=7).train()
    expected = full(whole)
    size = whole.shape[dim] // count
    for index in range(count):
        part = ParityDropout(0.5, gpt_torch.dropout.DropoutCounter(), seed=7).train()
        part.shards = ((dim, index, count),)
        got = part(whole.narrow(dim, index * size, size))
        assert torch.equal(got, expected.narrow(dim, index * size, size)), index
        local = ParityDropout(0.5, gpt_torch.dropout.DropoutCounter(), seed=7).train()
        if index:  # by local index every part draws part 0's mask: the same-dropout-mask bug
            assert not torch.equal(local(whole.narrow(dim, index * size, size)), got)


def test_global_index_of_two_split_dimensions():
    whole = torch.arange(2 * 6 * 3).view(2, 6, 3)
    part = whole[1:2, 2:4]
    assert torch.equal(global_index((1, 2, 3), ((0, 1, 2), (1, 1, 3)), "cpu"), part.flatten())


def test_parallelize_refuses_an_unknown_strategy():
    from gpt_torch.distributed import parallelize

    with pytest.raises(ValueError, match="unknown strategy 'zero'"):
        parallelize(gpt_torch.GPTModel(GPTConfig.from_dict(TINY_MESH)), "zero", None)


def test_every_distributed_mutant_names_where_it_exists():
    for m in DIST_MUTANTS:
        assert m.strategies and set(m.strategies) <= set(STRATEGIES), m.name


@pytest.mark.subprocess
def test_a_killed_torch_rank_ends_the_run_in_one_line(tmp_path):
    s = spec(strategies=("ddp",), fault="1@2", timeout_s=30.0)
    parallel.write_init(s, tmp_path)
    start = time.monotonic()
    with pytest.raises(parallel.RankFailure) as e:
        parallel.launch(s, tmp_path, "torch")
    took = time.monotonic() - start
    message = str(e.value)
    assert "\n" not in message and "torch rank 1" in message and "SIGKILL" in message, message
    assert "during torch ddp: step 2" in message, message
    assert took < s.timeout_s, took  # ended by the launcher, not by the process group's timeout


@pytest.mark.subprocess
def test_sharded_data_and_model_parallel_in_both_twins_are_the_one_device_run():
    """The default run's one end-to-end case: world 2, FSDP and tensor parallelism (DDP, and the
    rest, in `make test-distributed`), both twins on their own engines."""
    report = parallel.run_parallel_parity(spec(strategies=("fsdp", "tp"), steps=2))
    assert report.passed, [(r.strategy, r.twin, r.first_failure) for r in report.rows if not r.passed]
    assert [(r.strategy, r.twin) for r in report.rows] == [("single", "torch vs flax")] + [
        (s, t) for s in ("fsdp", "tp") for t in ("torch", "flax", "torch vs flax")
    ]
    own = {(r.strategy, r.twin): r for r in report.rows if r.against == "one device"}
    for twin in ("torch", "flax"):
        assert own["fsdp", twin].state_bytes <= 0.51 * own["fsdp", twin].single_bytes  # a half, and a bias
        assert own["tp", twin].state_bytes <= 0.61 * own["tp", twin].single_bytes
    row = report.rows[1]
    assert len(row.grads) == len(row.weights.tensors) == 2 * 16 + 5  # every parameter: 2 blocks and the rest
    assert len(report.losses["torch fsdp"]) == 2


@pytest.mark.subprocess
def test_ctrl_c_ends_every_rank_and_leaves_no_folder(tmp_path):
    """The ranks run in sessions of their own (a terminal's Ctrl-C reaches the launcher only), and
    the launcher ends with os._exit: it must kill them and delete its folder first."""
    import os
    import signal
    import subprocess
    import sys

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = [sys.executable, "-m", "parity_cli.main", "parallel", "--config", str(ROOT / "examples/tiny-mesh.json")]
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([*argv, "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not list(scratch.glob("*/torch-rank-1.log")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes()
        except OSError:
            continue
        if str(scratch).encode() in cmdline:
            survivors.append(cmdline)
    assert not survivors, survivors
    assert not list(scratch.iterdir())


def test_a_ctrl_c_while_a_rank_starts_still_ends_it(tmp_path, monkeypatch):
    """Ctrl-C's watcher thread calls abandon() whenever the signal comes, also between a rank's start
    and its record: it must wait for the record, and kill that rank too."""
    import subprocess
    import sys
    import threading

    monkeypatch.setattr(parallel, "_STARTING", threading.Lock())  # abandon() keeps the lock
    monkeypatch.setattr(parallel, "_LIVE_RANKS", set())
    monkeypatch.setattr(parallel, "_TEMPORARY", set())
    real_popen = subprocess.Popen
    watcher = threading.Thread(target=parallel.abandon)

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        watcher.start()
        watcher.join(0.5)  # the Ctrl-C lands now, the rank started but not yet recorded
        return proc

    monkeypatch.setattr(parallel.subprocess, "Popen", popen)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with parallel._ranks([("torch rank 0", sleeper, {})], tmp_path) as ranks:
        watcher.join(parallel.ABANDON_WAIT_S + 5)
        assert ranks[0].proc.poll() is not None, "abandon() left a rank that was starting running"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config", "examples/tiny-odd.json", "--strategies", "tp"], ["tp: 3 heads", "world size 2"]),
        (["--config", "examples/tiny-mesh.json", "--world-size", "3"], ["batch 8", "world size 3"]),
        (["--config", "examples/tiny-mesh.json", "--plant", "nope@torch"], ["unknown distributed mutant 'nope'"]),
        (["--config", "examples/tiny-mesh.json", "--plant", "grads-summed@jax"], ["unknown twin 'jax'"]),
        (["--config", "examples/tiny-mesh.json", "--strategies", "ddp,zero"], ["unknown strategy 'zero'"]),
        ([], ["parallel needs --config"]),
    ],
)
def test_the_command_refuses_before_any_rank_starts(args, words, capsys, monkeypatch):
    from parity_cli.main import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        main(["parallel", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_the_launcher_ends_ranks_that_all_stop_talking(tmp_path):
    """Its own deadline, from the last line any rank wrote: for ranks whose timeouts failed too."""
    import sys

    commands = [(f"torch rank {i}", [sys.executable, "-c", "import time; time.sleep(60)"], {}) for i in range(2)]
    start = time.monotonic()
    with parallel._ranks(commands, tmp_path) as ranks, pytest.raises(parallel.RankFailure) as e:
        parallel._watch(ranks, 1.0, lambda said: None)
    assert "no progress for 1 s: stopped torch rank 0, torch rank 1" in str(e.value)
    assert time.monotonic() - start < 10
    assert all(r.proc.poll() is not None for r in ranks)  # and they are gone


@pytest.mark.parametrize("finished", [True, False])
def test_a_rank_aborted_in_teardown_after_all_finished_is_a_note_not_a_failure(tmp_path, finished):
    """gloo may abort a rank whose peer has already closed its sockets: once every rank has said
    FINISHED (past the final barrier, every result written) that is a note; before, a failure."""
    import sys

    from parity_tests.parallel_spec import FINISHED

    said = (
        f"print('PROGRESS {FINISHED}', flush=True)"
        if finished
        else "print('PROGRESS torch tp: step 2 of 2', flush=True)"
    )
    quits = [
        f"{said}; import time; time.sleep(0.5)",
        f"{said}; import os, time, signal; time.sleep(0.2); os.kill(os.getpid(), signal.SIGABRT)",
    ]
    commands = [(f"torch rank {i}", [sys.executable, "-c", code], {}) for i, code in enumerate(quits)]
    with parallel._ranks(commands, tmp_path) as ranks:
        if finished:
            notes = parallel._watch(ranks, 30.0, lambda said: None)
            assert notes == [
                "torch rank 1 killed by SIGABRT in the process group's teardown, after every result was written"
            ]
        else:
            with pytest.raises(parallel.RankFailure, match="torch rank 1 failed \\(killed by SIGABRT during torch tp"):
                parallel._watch(ranks, 30.0, lambda said: None)
