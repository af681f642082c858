"""gpt-parity: tables on stdout, JSON on request, exit 0 / 1 (parity failed) / 2 (bad arguments)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt_spec import GPTConfig
from gpt_spec.flops import forward_flops, weight_bytes_per_token
from parity_cli.main import main
from parity_cli.render import format_cell
from parity_tests import forward


def _row(stdout: str, *first: str) -> list[str]:
    """The words of the one table row of `stdout` whose first words are `first`."""
    rows = [line.split() for line in stdout.splitlines() if tuple(line.split()[: len(first)]) == first]
    assert len(rows) == 1, f"{len(rows)} rows start with {' '.join(first)!r}:\n{stdout}"
    return rows[0]


@pytest.fixture
def tiny_json(tmp_path, tiny_cfg):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_cfg.to_dict()))
    return str(path)


def test_check_passes_prints_a_row_per_backend_and_writes_json(tiny_json, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["check", "--config", tiny_json, "--batch", "3", "--seq", "7", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == "PASS"
    data = json.loads(out.read_text())["forward"]
    assert data["passed"] and data["seq"] == 7 and data["config"]["vocab_size"] == 97
    assert data["model"] == "gpt" and len(data["rows"][0]["stages"]) == 1 + 2 * 6 + 2  # emb, 2 blocks, norm, head
    assert all(r["passed"] and r["logits"]["margin"] < 1 and r["first_failure"] is None for r in data["rows"])
    layers = data["rows"][0]["layers"]
    assert {f["evidence"] for f in layers} == {"envelope", "bias"} and all(f["passed"] for f in layers)
    assert {r["candidate"] for r in data["rows"]} >= {"flax/cpu:0", "torch/cpu"}
    for r in data["rows"]:  # a table row per backend: the JSON's logits figure and verdict
        cells = _row(stdout, r["direction"], r["reference"], r["candidate"])
        assert cells[3] == format_cell(r["logits"]["max_abs"]) and cells[-1] == "pass"
    tiny = [f for r in data["rows"] for f in r["layers"] if f["name"].endswith("LayerNorm, rows of tiny variance")]
    cells = _row(stdout, "LayerNorm", "rows", "of", "tiny", "variance", "envelope")  # over both directions
    assert cells[6:8] == [str(len(tiny)), format_cell(max(f["margin"] for f in tiny))] and cells[-1] == "pass"
    assert all(s["reason"] for s in data["skipped"])


def test_check_layers_plot_and_training(tiny_json, tmp_path, capsys):
    png, out = tmp_path / "layers.png", tmp_path / "check.json"
    argv = [
        "check",
        "--config",
        tiny_json,
        "--drop-rate",
        "0",
        "--layers",
        "--plot",
        str(png),
        "--train-steps",
        "2",
        "--quiet",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == "PASS"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(out.read_text())
    forward_rows, training = data["forward"]["rows"], data["training"]
    assert training["passed"] and [w["step"] for w in training["weights"]] == [1, 2]
    # --layers: a column per backend, a row per stage with each backend's max |Δ| from the JSON
    assert _row(stdout, "stage") == ["stage", "torch->flax", "flax/cpu:0", "flax->torch", "torch/cpu", "result"]
    residual = [next(c for c in r["stages"] if c["name"] == "trf_blocks.1.residual") for r in forward_rows]
    assert _row(stdout, "trf_blocks.1.residual")[1:] == [*(format_cell(c["max_abs"]) for c in residual), "pass"]
    for w in training["weights"]:
        cells = _row(stdout, "weights", "after", f"{w['step']}", "AdamW", "step(s):")
        assert cells[-1] == "pass" and format_cell(w["max_abs"]) in cells


def test_generate_prints_both_twins_text(tiny_json, tmp_path, capsys):
    out = tmp_path / "gen.json"
    vocab = json.loads(open(tiny_json).read())
    big = tmp_path / "wide.json"  # the tokenizer's ids need the full GPT-2 vocabulary
    big.write_text(json.dumps({**vocab, "vocab_size": 50257, "context_length": 32}))
    assert main(["generate", "Hello, I am", "--config", str(big), "--max-new-tokens", "5", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "[torch] Hello, I am" in stdout and "[flax] Hello, I am" in stdout
    assert "the twins generated the same token ids" in stdout
    data = json.loads(out.read_text())
    assert data["agree"] and data["token_ids"]["torch"][:4] == [15496, 11, 314, 716]
    assert len(data["token_ids"]["flax"]) == 4 + 5


def test_check_exits_1_when_the_twins_disagree(tiny_json, monkeypatch, capsys):
    real = forward.run_backend

    def off_by_1e3(backend, model, ids):
        out = real(backend, model, ids)
        if backend.framework == "flax":
            out["out_head"] = out["out_head"] + np.float32(1e-3)
        return out

    monkeypatch.setattr(forward, "run_backend", off_by_1e3)
    assert main(["check", "--config", tiny_json, "--seq", "5", "--quiet"]) == 1
    stdout = capsys.readouterr().out
    assert stdout.rstrip().endswith("FAIL")
    assert (
        "torch->flax flax/cpu:0: first failure at out_head, bound evidence: out_head: FAILED: max |Δ| 0.001" in stdout
    )


def test_check_leaves_matmul_precision_to_each_framework_when_asked(tiny_json, capsys):
    assert (
        main(
            [
                "check",
                "--config",
                tiny_json,
                "--seq",
                "5",
                "--quiet",
                "--no-layer-evidence",
                "--matmul-precision",
                "default",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "matmuls each framework's default" in stdout and "layer evidence left out" in stdout


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
        (["check", "--config", "missing/cfg.json"], "config file 'missing/cfg.json' does not exist"),
        (["bench", "--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
        (["bench", "--batch", "4,0"], "argument --batch: expected a positive integer, got 0"),
        (["bench", "--seq", "64,2048"], "--seq 2048 exceeds context_length 1024"),
        (
            ["bench", "--dtype", "float32,float16"],
            "argument --dtype: expected dtypes from float32, bfloat16, got 'float16'",
        ),
        (["bench", "--decode", "1020"], "decoding 1020 tokens after a 8-token prompt exceeds context_length 1024"),
        (["bench", "--model", "dummy", "--decode", "8"], "decoding needs the gpt model"),
        (["check", "--final-norm", "layernorm"], "--final-norm applies to --model dummy only"),
        (["check", "--model", "dummy", "--train-steps", "2"], "--train-steps needs --model gpt"),
        (["generate", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: expected a non-negative integer"),
        (["generate", "x", "--backend", "jax"], "argument --backend: invalid choice: 'jax'"),
        (["check", "--config", "tests", "--seq", "4"], "config file 'tests' is a folder, not a regular file"),
        (["check", "--mesh", "2y4"], "mesh must look like DATAxMODEL with positive sizes, e.g. 2x4; got '2y4'"),
        (["check", "--mesh", "3x3"], "mesh 3x3 needs 9 devices, this job has 1"),
        (["bench", "--mesh", "0x8"], "mesh must look like DATAxMODEL"),
        (["check", "--cpu-devices", "8"], "--cpu-devices goes with --mesh"),
        (
            ["check", "--mesh", "2x4", "--cpu-devices", "8"],
            "--cpu-devices 8: JAX has already started with 1 CPU device(s)",
        ),
        (["check", "--mesh", "1x1", "--model", "dummy"], "--mesh needs --model gpt"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
        (["train", "--text", "missing.txt"], "--text 'missing.txt' does not exist"),
        (["train", "--seed", str(2**32)], "seed must be an integer in [0, 2**32), got 4294967296"),
        (["train", "--lr", "-1"], "lr must be a finite number >= 0, got -1.0"),
        (["train", "--dropout", "torch"], "argument --dropout: invalid choice: 'torch'"),
        (["train", "--config", "gpt2-tiny"], "unknown preset 'gpt2-tiny'"),
        (
            ["train", "--text", "README.md", "--config", "examples/chapter5-tiny.json", "--out", "README.md"],
            "--out 'README.md' is a file, not a folder",
        ),
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


@pytest.mark.subprocess
def test_console_script_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "parity_cli.main", "check", "--config", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "unknown preset 'nope'; known presets: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl"
    )
    assert "Traceback" not in proc.stderr


def test_bench_writes_json_with_every_backend(tiny_json, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [
        "bench",
        "--config",
        tiny_json,
        "--batch",
        "2",
        "--seq",
        "11",
        "--repeats",
        "3",
        "--gemm-size",
        "256",
        "--json",
        str(out),
        "--plot",
        str(png),  # one cell: bars per backend
    ]
    assert main(argv) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    assert "[3-5/6] forward grid: done in " in captured.err  # progress on stderr (a line per phase), table on stdout
    for backend in ("flax-jit", "torch-eager", "torch-compile"):
        assert backend in captured.out
    data = json.loads(out.read_text())
    results = {r["backend"]: r for r in data["results"]}
    assert set(results) == {"flax-jit", "torch-eager", "torch-compile"}
    gemm = data["gemm_flops_per_s"]["float32"]
    # sampled before and after the forwards, 3 calls each; the reference is the best sample
    assert gemm["n"] == 256 and len(gemm["xla"]["samples"]) == len(gemm["torch"]["samples"]) == 6
    assert gemm["throughput"] == max(gemm["xla"]["samples"] + gemm["torch"]["samples"]) > 0
    assert gemm["throughput"] >= max(gemm["xla"]["median"], gemm["torch"]["median"])
    for r in results.values():
        assert len(r["times_s"]) == 3 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["tokens_per_s"] == pytest.approx(2 * 11 / r["median_s"])
        assert r["flops"] == forward_flops(GPTConfig.from_dict(data["config"]), 2, 11)
        assert r["fraction_of_gemm"] == pytest.approx(r["flops"] / r["median_s"] / gemm["throughput"])
    assert results["torch-eager"]["speedup_vs_torch_eager"] == 1.0
    assert results["torch-compile"]["speedup_vs_torch_compile"] == 1.0
    assert results["flax-jit"]["speedup_vs_torch_compile"] == pytest.approx(
        results["torch-compile"]["median_s"] / results["flax-jit"]["median_s"]
    )
    assert 0 < data["id_check_s"] < results["flax-jit"]["median_s"]
    assert data["decode"] == [] and data["read_bytes_per_s"] is None
    assert "host-side token-id check before dispatch" in captured.out and "of GEMM" in captured.out


def test_bench_grid_dtypes_decoding_and_plot(tiny_json, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [
        "bench",
        "--config",
        tiny_json,
        "--batch",
        "1,3",
        "--seq",
        "9",
        "--dtype",
        "float32,bfloat16",
        "--no-compile",
        "--repeats",
        "2",
        "--gemm-size",
        "256",
        "--decode",
        "4",
        "--decode-uncached",
        "2",
        "--decode-batch",
        "1,2",
        "--decode-prompt",
        "3,30",
        "--quiet",
        "--plot",
        str(png),
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    cells = {(r["dtype"], r["batch"], r["seq"], r["backend"]) for r in data["results"]}
    assert cells == {
        (d, b, s, k) for d in ("float32", "bfloat16") for b in (1, 3) for s in (9,) for k in ("flax-jit", "torch-eager")
    }
    assert set(data["gemm_flops_per_s"]) == {"float32", "bfloat16"}
    decode = {(d["twin"], d["dtype"], d["kv_cache"], d["batch"], d["prompt_tokens"]): d for d in data["decode"]}
    # the cached grid: flax in every cell, torch at batch 1; prompt 30 + 4 new tokens would pass
    # context_length 32 and is left out, with a note; the uncached loop at batch 1 from 8 tokens
    assert set(decode) == {
        (t, d, True, b, 3) for d in ("float32", "bfloat16") for t, b in (("torch", 1), ("flax", 1), ("flax", 2))
    } | {(t, d, False, 1, 8) for t in ("torch", "flax") for d in ("float32", "bfloat16")}
    assert any("prompt(s) 30 left out" in note for note in data["notes"])
    assert {d["new_tokens"] for d in data["decode"] if d["kv_cache"]} == {4}
    assert {d["new_tokens"] for d in data["decode"] if not d["kv_cache"]} == {2}
    bandwidth = data["read_bytes_per_s"]["throughput"]
    for d in data["decode"]:
        assert d["steps"] == (3 if d["kv_cache"] else 2)
        assert d["limit_tokens_per_s"] == min(d["limit_bandwidth_tokens_per_s"], d["limit_compute_tokens_per_s"])
        if d["time_s"] is None:  # 3 cached steps can time below the noise: no rate, never a wrong one
            assert d["kv_cache"] and d["tokens_per_s"] is None and d["fraction_of_limit"] is None
            continue
        assert d["tokens_per_s"] == pytest.approx(d["batch"] * d["steps"] / d["time_s"]) and d["time_s"] > 0
        assert d["fraction_of_limit"] == pytest.approx(d["tokens_per_s"] / d["limit_tokens_per_s"])
        assert (d["prefill_s"] is not None) == d["kv_cache"]
    # bfloat16 reads half the bytes per token: twice the bandwidth limit
    f32, bf16 = decode[("flax", "float32", True, 1, 3)], decode[("flax", "bfloat16", True, 1, 3)]
    assert bf16["limit_bandwidth_tokens_per_s"] == pytest.approx(2 * f32["limit_bandwidth_tokens_per_s"])
    assert f32["limit_bandwidth_tokens_per_s"] < bandwidth / weight_bytes_per_token(GPTConfig.from_dict(data["config"]))
    # a batch of 2 reads the weights once for both rows: more than the batch-1 bandwidth limit
    assert (
        decode[("flax", "float32", True, 2, 3)]["limit_bandwidth_tokens_per_s"]
        > f32["limit_bandwidth_tokens_per_s"] * 1.5
    )
    gemm = data["gemm_flops_per_s"]["float32"]
    assert gemm["throughput"] == max(max(gemm["xla"]["samples"]), max(gemm["torch"]["samples"]))
    assert "limit = the lower of read bandwidth" in capsys.readouterr().out


@pytest.mark.subprocess
@pytest.mark.parametrize("tunables", ["glibc.malloc.check=0", "glibc.malloc.check=0:glibc.malloc.hugetlb=1"])
def test_bench_says_what_malloc_does_with_large_blocks(tiny_json, tmp_path, tunables):
    """The malloc setting changes the figures (glibc reads GLIBC_TUNABLES at start-up; the Makefile
    sets it for bench): the header and the JSON say which one this run had."""
    import os
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the tunable is glibc's")
    out = tmp_path / "bench.json"
    argv = ["bench", "--config", tiny_json, "--batch", "1", "--seq", "4", "--repeats", "1", "--warmup", "0"]
    argv += ["--no-compile", "--gemm-size", "64", "--quiet", "--json", str(out)]
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    proc = subprocess.run(
        [sys.executable, "-m", "parity_cli.main", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    malloc = json.loads(out.read_text())["malloc"]
    if "hugetlb" in tunables:
        assert malloc.startswith("glibc.malloc.hugetlb=1") and "malloc: glibc.malloc.hugetlb=1" in proc.stdout
    else:
        assert malloc.startswith("glibc defaults") and "malloc: glibc defaults" in proc.stdout


@pytest.mark.parametrize(
    "flags, origin",
    [([], "config inferred from the tensors: {"), (["--config", "CONFIG"], "config from --config: {")],
)
def test_convert_says_where_the_config_came_from_in_words(tmp_path, tiny_cfg, tiny_json, capsys, flags, origin):
    from safetensors.torch import save_file

    import gpt_torch

    src = tmp_path / "bare.safetensors"  # canonical names, no metadata: the config is inferred
    save_file(gpt_torch.GPTModel(tiny_cfg).state_dict(), str(src))
    flags = [tiny_json if f == "CONFIG" else f for f in flags]
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--n-heads", "3", *flags]) == 0
    out = capsys.readouterr().out
    assert origin in out and "config from inferred" not in out and "from given" not in out


def test_a_text_that_is_not_utf8_is_refused_naming_the_file(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("café ".encode("latin-1") * 100)
    with pytest.raises(SystemExit) as e:
        main(["train", "--text", str(text), "--config", "examples/chapter5-tiny.json", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"gpt-parity: error: --text {str(text)!r} is not UTF-8 text: "), err


TINY_CHAPTER5 = "examples/chapter5-tiny.json"  # context_length 64: a window needs 65 tokens


@pytest.mark.parametrize(
    "text, config, message",
    [
        ("", None, "its training part (the first 90% of its characters) has 0 tokens; a window of 64 needs 65"),
        ("Hello world", None, "its training part (the first 90% of its characters) has 2 tokens; a window of 64"),
        (" word" * 300, None, "its validation part (the last 10% of its characters) has 30 tokens; a window of 64"),
        (" the" * 90 + "🙂" * 40, None, "its training part makes 1 window(s) of 64 tokens, fewer than one batch of 2"),
        (" word" * 800, {"vocab_size": 100}, "has token id 1573, past the config's vocab_size 100"),
    ],
    ids=["empty", "two-tokens", "short-validation", "no-batch", "vocab"],
)
def test_a_text_train_cannot_learn_from_is_refused_in_one_line_before_any_work(tmp_path, capsys, text, config, message):
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    cfg = TINY_CHAPTER5
    if config:
        cfg = str(tmp_path / "c.json")
        Path(cfg).write_text(json.dumps({**json.loads(Path(TINY_CHAPTER5).read_text()), **config}))
    out = tmp_path / "new" / "out"
    with pytest.raises(SystemExit) as e:
        main(["train", "--text", str(path), "--config", cfg, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"gpt-parity: error: --text {str(path)!r}") and message in err, err
    assert not (tmp_path / "new").exists()  # nothing was created for a run that never started


def test_bench_never_reports_a_negative_or_zero_decoding_rate(tiny_json, tmp_path, capsys, monkeypatch):
    """The cached steps' time is a generation's less a 1-token one's; where the clock says the
    longer took no longer (noise at a few steps), the rate is unmeasured, never 0 or negative."""
    from parity_bench import bench

    ticks = iter(range(10**6))

    def shrinking(fn, sync):  # each call timed shorter than the one before: whole < prefill
        sync(fn())
        return 1.0 / (2 + next(ticks))

    monkeypatch.setattr(bench, "time_call", shrinking)
    monkeypatch.setattr(bench, "read_bandwidth", lambda: {"xla": 1e10, "torch": 1e10})  # not what is tested
    out = tmp_path / "bench.json"
    argv = ["bench", "--config", tiny_json, "--batch", "1", "--seq", "4", "--repeats", "1", "--no-compile"]
    argv += ["--gemm-size", "64", "--decode", "4", "--decode-uncached", "2", "--decode-batch", "1"]
    assert main([*argv, "--decode-prompt", "3", "--quiet", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads(out.read_text())
    cached = [d for d in data["decode"] if d["kv_cache"]]
    assert cached and all(d["tokens_per_s"] is None and d["fraction_of_limit"] is None for d in cached)
    assert all(d["tokens_per_s"] > 0 for d in data["decode"] if not d["kv_cache"])
    assert "cached decoding: the steps after the prefill took no measurable time" in stdout
    assert not [v for d in data["decode"] for v in d.values() if isinstance(v, (int, float)) and v < 0]


def test_bench_refuses_decoding_one_token_which_leaves_no_step_to_time(tiny_json, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--config", tiny_json, "--seq", "4", "--decode", "1", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "decode must be 0 (off) or at least 2, got 1: the first new token comes with the prefill" in err


@pytest.mark.subprocess
def test_a_fifo_as_a_config_or_a_text_is_refused_before_it_is_opened(tmp_path):
    """`--config` and `--text` read a FIFO as a file: the run blocked for ever in the read, waiting
    for a writer. Refused, as checkpoints are, before anything opens it."""
    import os

    os.mkfifo(tmp_path / "c.json")
    os.mkfifo(tmp_path / "t.txt")
    runs = [
        ["check", "--config", "c.json", "--quiet"],
        ["train", "--text", "t.txt", "--config", str(Path("examples/chapter5-tiny.json").resolve()), "--out", "o"],
    ]
    code = (
        "import json, sys\nfrom parity_cli.main import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        print(e.code, flush=True)\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(runs)], cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a run hung on the FIFO")
    assert proc.stdout.split() == ["2", "2"], proc.stderr
    assert proc.stderr.splitlines() == [
        "gpt-parity: error: config file 'c.json' is a FIFO, not a regular file",
        "gpt-parity: error: --text 't.txt' is a FIFO, not a regular file",
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("missing", ["rich", "jax", "torch"])
def test_without_the_parity_extra_the_command_says_what_to_install(missing):
    code = f"import sys; sys.modules[{missing!r}] = None; from parity_cli.entry import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (
        f"gpt-parity: needs both twins and the suite (no module {missing!r}): pip install 'gpt-twins[parity]'\n"
    )
