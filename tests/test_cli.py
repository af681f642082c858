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
    data = json.loads(out.read_text())["forward"]
    assert data["passed"] and data["seq"] == 7 and data["config"]["vocab_size"] == 97
    assert data["model"] == "gpt" and len(data["rows"][0]["stages"]) == 2 + 2 + 1  # emb, 2 blocks, norm, head
    assert all(r["passed"] and r["logits"]["max_abs"] < r["logits"]["atol"] for r in data["rows"])
    assert {r["candidate"] for r in data["rows"]} >= {"flax/cpu:0", "torch/cpu"}
    assert all(s["reason"] for s in data["skipped"])


def test_check_layers_plot_and_training(tiny_json, tmp_path, capsys):
    png, out = tmp_path / "layers.png", tmp_path / "check.json"
    argv = ["check", "--config", tiny_json, "--drop-rate", "0", "--layers", "--plot", str(png),
            "--train-steps", "2", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "stage         torch->flax flax/cpu:0" in stdout and "trf_blocks.1" in stdout
    assert "weights after 2 AdamW step(s)" in stdout and stdout.rstrip().endswith("PASS")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    training = json.loads(out.read_text())["training"]
    assert training["passed"] and [w["step"] for w in training["weights"]] == [1, 2]


def test_generate_prints_both_twins_text(tiny_json, tmp_path, capsys):
    out = tmp_path / "gen.json"
    vocab = json.loads(open(tiny_json).read())
    big = tmp_path / "wide.json"  # the tokenizer's ids need the full GPT-2 vocabulary
    big.write_text(json.dumps({**vocab, "vocab_size": 50257, "context_length": 32}))
    assert main(["generate", "Hello, I am", "--config", str(big), "--max-new-tokens", "5",
                 "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "[torch] Hello, I am" in stdout and "[flax] Hello, I am" in stdout
    assert "the twins generated the same token ids" in stdout
    data = json.loads(out.read_text())
    assert data["agree"] and data["token_ids"]["torch"][:4] == [15496, 11, 314, 716]
    assert len(data["token_ids"]["flax"]) == 4 + 5


def test_check_exits_1_when_the_twins_disagree(tiny_json, monkeypatch, capsys):
    real = harness.run_backend

    def off_by_1e3(backend, model, ids):
        out = real(backend, model, ids)
        if backend.framework == "flax":
            out["out_head"] = out["out_head"] + np.float32(1e-3)
        return out

    monkeypatch.setattr(harness, "run_backend", off_by_1e3)
    assert main(["check", "--config", tiny_json, "--seq", "5", "--quiet"]) == 1
    stdout = capsys.readouterr().out
    assert stdout.rstrip().endswith("FAIL")
    assert "torch->flax flax/cpu:0: first stage past its bound: out_head: FAILED: max |Δ| 0.001" in stdout


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
        (["check", "--final-norm", "layernorm"], "--final-norm applies to --model dummy only"),
        (["check", "--model", "dummy", "--train-steps", "2"], "--train-steps needs --model gpt"),
        (["generate", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: expected a non-negative integer"),
        (["generate", "x", "--backend", "jax"], "argument --backend: invalid choice: 'jax'"),
        (["check", "--config", "tests", "--seq", "4"], "cannot read config file 'tests'"),
        (["check", "--mesh", "2y4"], "mesh must look like DATAxMODEL with positive sizes, e.g. 2x4; got '2y4'"),
        (["check", "--mesh", "3x3"], "mesh 3x3 needs 9 devices, this job has 1"),
        (["bench", "--mesh", "0x8"], "mesh must look like DATAxMODEL"),
        (["check", "--cpu-devices", "8"], "--cpu-devices goes with --mesh"),
        (["check", "--mesh", "2x4", "--cpu-devices", "8"], "--cpu-devices 8: JAX has already started with 1 CPU device(s)"),
        (["check", "--mesh", "1x1", "--model", "dummy"], "--mesh needs --model gpt"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    import jax

    jax.devices()  # JAX started, as in any process that already ran a model: --cpu-devices is too late
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
    assert 0 < data["id_check_s"] < results["flax-jit"]["median_s"]
    assert "host-side token-id check before dispatch" in captured.out
