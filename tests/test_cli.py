"""gpt-parity: tables on stdout, JSON on request, exit 0 / 1 (parity failed) / 2 (bad arguments)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from parity_tests import harness
from parity_tests.cli import main


@pytest.fixture
def tiny_json(tmp_path, tiny_cfg):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_cfg.to_dict()))
    return str(path)


def test_check_passes_prints_a_row_per_backend_and_writes_json(tiny_json, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["check", "--config", tiny_json, "--batch", "3", "--seq", "7", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "torch->flax  torch/cpu   flax/cpu:0" in stdout and stdout.rstrip().endswith("PASS")
    data = json.loads(out.read_text())
    assert data["passed"] and data["seq"] == 7 and data["config"]["vocab_size"] == 97
    assert all(r["passed"] and r["max_abs"] < r["atol"] for r in data["rows"])
    assert {r["candidate"] for r in data["rows"]} >= {"flax/cpu:0", "torch/cpu"}
    assert all(s["reason"] for s in data["skipped"])


def test_check_exits_1_when_the_twins_disagree(tiny_json, monkeypatch, capsys):
    real = harness.run_flax
    monkeypatch.setattr(harness, "run_flax", lambda *a, **k: real(*a, **k) + np.float32(1e-3))
    assert main(["check", "--config", tiny_json, "--seq", "5", "--quiet"]) == 1
    stdout = capsys.readouterr().out
    assert "FAIL" in stdout and "logits: FAILED: max |Δ| 0.001" in stdout


def test_train_mode_check(tiny_json, capsys):
    assert main(["check", "--config", tiny_json, "--mode", "train", "--drop-rate", "0", "--quiet"]) == 0
    assert "train mode" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--config", "gpt2-tiny"], "unknown preset 'gpt2-tiny'; known presets: gpt2-small"),
        (["check", "--batch", "0"], "argument --batch: expected a positive integer, got 0"),
        (["check", "--seq", "x"], "argument --seq: expected a positive integer, got 'x'"),
        (["check", "--seq", "1025"], "--seq 1025 exceeds context_length 1024"),
        (["check", "--mode", "train"], "--mode train compares the twins at drop_rate 0; add --drop-rate 0"),
        (["check", "--drop-rate", "1.5"], "drop_rate must be in [0, 1), got 1.5"),
        (["check", "--config", "missing/cfg.json"], "cannot read config file 'missing/cfg.json'"),
        (["bench", "--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("gpt-parity")


def test_console_script_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "parity_tests.cli", "check", "--config", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("unknown preset 'nope'; known presets: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl")
    assert "Traceback" not in proc.stderr


def test_bench_writes_json_with_every_backend(tiny_json, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--config", tiny_json, "--seq", "11", "--repeats", "3", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "[4/4] torch-compile" in captured.err  # progress on stderr, table on stdout
    for backend in ("flax-jit", "torch-eager", "torch-compile"):
        assert backend in captured.out
    data = json.loads(out.read_text())
    results = {r["backend"]: r for r in data["results"]}
    assert set(results) == {"flax-jit", "torch-eager", "torch-compile"}
    for r in results.values():
        assert len(r["times_s"]) == 3 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["tokens_per_s"] == pytest.approx(2 * 11 / r["median_s"])
    assert results["torch-eager"]["speedup_vs_torch_eager"] == 1.0
