"""gpt-parity under Ctrl-C and with outputs it cannot write: one line, the right exit status, and
no file half-written or written over a good one.

SIGINT is sent to real `gpt-parity check --train-steps` processes at the points where it did harm
before: while XLA compiles the jitted forward, the loss-and-gradients program and the AdamW step
(segfaults), and in the last step before the verdict (once swallowed, then PASS with exit 0).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from parity_tests.cli import main

# The progress line (on stderr) at whose appearance each run is interrupted; each starts a step
# whose first call compiles (see `check --train-steps 3` on the tiny config: 5 forward steps, then
# building, loss and gradients, 3 AdamW steps).
INTERRUPT_AT = [
    "[1/5] building both twins, each with its own init ...",
    "[3/5] torch->flax: flax/cpu:0 ...",  # jit of the forward
    "[2/5] loss and gradients ...",  # jit of value_and_grad
    "[3/5] AdamW step 1 ...",  # jit of the AdamW step: the segfaults
    "[5/5] AdamW step 3 ...",  # the last step before PASS: a race with the outputs being written
]
INTERRUPT_DELAY_S = 0.3  # after the line: inside the step, not before it


def _interrupted_run(argv: list[str], cwd, line: str) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "parity_tests.cli", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.stdout, proc.stderr
    assert out is not None and err is not None  # both piped
    stderr: list[str] = []
    sent = threading.Event()

    def read() -> None:
        for text in err:
            stderr.append(text)
            if text.rstrip("\n") == line and not sent.is_set():
                threading.Timer(INTERRUPT_DELAY_S, proc.send_signal, [signal.SIGINT]).start()
                sent.set()

    reader = threading.Thread(target=read)
    reader.start()
    stdout = out.read()
    proc.wait(timeout=300)
    reader.join()
    assert sent.is_set(), f"the run never printed {line!r}:\n{''.join(stderr)}"
    return proc.returncode, stdout, "".join(stderr)


def test_ctrl_c_anywhere_in_check_says_so_in_one_line_exits_130_and_writes_nothing(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            {
                "vocab_size": 97,
                "context_length": 11,
                "emb_dim": 24,
                "n_heads": 3,
                "n_layers": 2,
                "drop_rate": 0.0,
                "qkv_bias": False,
            }
        )
    )
    results = {}

    def run(line: str, k: int) -> None:
        out = tmp_path / f"run{k}"
        out.mkdir()
        argv = [
            "check",
            "--config",
            str(config),
            "--train-steps",
            "3",
            "--json",
            str(out / "check.json"),
            "--plot",
            str(out / "check.png"),
        ]
        results[line] = (out, _interrupted_run(argv, tmp_path, line))

    # Two at a time: the machine has two cores, and each run is mostly waiting on compiles.
    for pair in (INTERRUPT_AT[i : i + 2] for i in range(0, len(INTERRUPT_AT), 2)):
        threads = [threading.Thread(target=run, args=(line, INTERRUPT_AT.index(line))) for line in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for line, (out, (rc, stdout, stderr)) in results.items():
        after = stderr.split(line, 1)[1].strip().splitlines()
        assert rc == 130, f"interrupted at {line!r}: exit {rc}\n{stderr[-3000:]}"
        assert after[-1] == "gpt-parity: interrupted; nothing more was written (exit 130)", after
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
        assert len([x for x in after if not x.startswith("[")]) == 1, after  # progress, then one line
        if line != INTERRUPT_AT[-1] or "PASS" not in stdout:
            assert "PASS" not in stdout and "FAIL" not in stdout
        else:  # the race this case runs: the signal came after the verdict, as the command returned;
            # check writes its outputs before the verdict, so both are there, whole (below).
            assert sorted(os.listdir(out)) == ["check.json", "check.png"]
        left = sorted(os.listdir(out))
        assert not [f for f in left if f.endswith(".partial")], f"interrupted at {line!r}, left {left}"
        if line != INTERRUPT_AT[-1]:
            assert left == [], f"interrupted at {line!r}, left {left}"
        elif "check.json" in left:  # the run had finished when the signal came: the file is whole
            assert json.loads((out / "check.json").read_text())["training"]["passed"]


def test_the_interrupt_guard_is_lifted_when_the_command_returns(tiny_json_path, capsys):
    """Run in-process (as the tests do), main leaves SIGINT as it found it: handler and mask."""
    # Python's own handler, whatever pytest inherited (a background job starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["check", "--config", tiny_json_path, "--seq", "3", "--no-layer-evidence", "--quiet"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.fixture
def tiny_json_path(tmp_path, tiny_cfg):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_cfg.to_dict()))
    return str(path)


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(r"gpt-parity( [a-z-]+)?: error: ", err), err
    return err


@pytest.mark.parametrize(
    "where, message",
    [
        ("missing/out.json", "/missing' does not exist"),
        ("readonly/out.json", "/readonly' is not writable"),
        ("adir", "it is a directory"),
    ],
)
def test_an_unwritable_json_path_is_refused_before_the_run(
    tmp_path, tiny_json_path, capsys, monkeypatch, where, message
):
    (tmp_path / "readonly").mkdir(mode=0o500)
    (tmp_path / "adir").mkdir()
    if os.geteuid() == 0:  # root may write anywhere: the folder as a user who may not write it sees it
        readonly, real_access = (tmp_path / "readonly").resolve(), os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: False if os.path.realpath(p) == str(readonly) else real_access(p, mode, **kw),
        )
    from parity_tests import forward

    def never(*args, **kwargs):
        raise AssertionError("the run started before its output path was checked")

    monkeypatch.setattr(forward, "run_parity", never)
    err = _one_line_exit_2(capsys, ["check", "--config", tiny_json_path, "--json", str(tmp_path / where)])
    assert message in err and "--json" in err


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_run(tmp_path, tiny_json_path, capsys):
    err = _one_line_exit_2(capsys, ["check", "--config", tiny_json_path, "--plot", str(tmp_path / "p.xyz")])
    assert "--plot" in err and ".png" in err


def test_json_and_plot_on_one_path_are_refused(tmp_path, tiny_json_path, capsys):
    same = str(tmp_path / "out.png")
    err = _one_line_exit_2(capsys, ["check", "--config", tiny_json_path, "--json", same, "--plot", same])
    assert "the same file" in err


def test_a_failing_plot_does_not_keep_the_json_from_being_written(tmp_path, tiny_json_path, capsys, monkeypatch):
    from parity_tests import forward

    def broken(self, path):
        raise ValueError(f"cannot write plot {path!r}: No space left on device")

    monkeypatch.setattr(forward.ParityReport, "plot", broken)
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    err = _one_line_exit_2(
        capsys,
        [
            "check",
            "--config",
            tiny_json_path,
            "--seq",
            "3",
            "--quiet",
            "--no-layer-evidence",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert "No space left on device" in err
    assert json.loads(out.read_text())["forward"]["passed"] and not png.exists()


def test_a_write_that_fails_half_way_leaves_the_old_json_whole(tmp_path, tiny_json_path, capsys, monkeypatch):
    """A disk filling up mid-write: the old file stays as it was, no temporary file is left."""
    out = tmp_path / "out.json"
    out.write_text('{"old": true}\n')
    real_write_text = type(out).write_text

    def half(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(out), "write_text", half)
    err = _one_line_exit_2(
        capsys,
        ["check", "--config", tiny_json_path, "--seq", "3", "--quiet", "--no-layer-evidence", "--json", str(out)],
    )
    assert "No space left on device" in err
    assert out.read_text() == '{"old": true}\n'
    assert sorted(os.listdir(tmp_path)) == ["out.json", "tiny.json"]


@pytest.mark.parametrize("seed", [str(2**63), str(2**64), str(10**30)])
def test_a_seed_beyond_63_bits_is_refused_naming_seed(tiny_json_path, capsys, seed):
    err = _one_line_exit_2(capsys, ["check", "--config", tiny_json_path, "--seed", seed])
    assert "--seed" in err and "2**63 - 1" in err


def test_the_largest_seed_runs(tiny_json_path, capsys):
    assert (
        main(
            [
                "check",
                "--config",
                tiny_json_path,
                "--seq",
                "3",
                "--quiet",
                "--no-layer-evidence",
                "--seed",
                str(2**63 - 1),
            ]
        )
        == 0
    )


def _dummy_checkpoint(tmp_path, tiny_cfg, final_norm: str) -> str:
    import gpt_torch
    from gpt_spec import save_checkpoint

    model = gpt_torch.DummyGPTModel(tiny_cfg, final_norm=final_norm)
    path = str(tmp_path / f"dummy-{final_norm}.safetensors")
    save_checkpoint(path, model.state_dict(), tiny_cfg, model="DummyGPTModel", options={"final_norm": final_norm})
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "dummy"], "--model dummy contradicts --checkpoint"),
        (["--model", "dummy", "--final-norm", "layernorm"], "--model dummy contradicts --checkpoint"),
        (["--final-norm", "layernorm"], "--final-norm applies to --model dummy only; --checkpoint"),
    ],
)
def test_model_flags_that_contradict_a_gptmodel_checkpoint_are_refused(tmp_path, tiny_cfg, capsys, flags, message):
    import gpt_torch
    from gpt_spec import save_checkpoint

    path = str(tmp_path / "gpt.safetensors")
    save_checkpoint(path, gpt_torch.GPTModel(tiny_cfg).state_dict(), tiny_cfg)
    err = _one_line_exit_2(capsys, ["check", "--checkpoint", path, *flags])
    assert message in err


def test_a_final_norm_that_contradicts_a_dummy_checkpoint_is_refused(tmp_path, tiny_cfg, capsys):
    path = _dummy_checkpoint(tmp_path, tiny_cfg, "dummy")
    err = _one_line_exit_2(capsys, ["check", "--checkpoint", path, "--final-norm", "layernorm"])
    assert "--final-norm layernorm contradicts" in err and "'dummy'" in err


def test_flags_that_agree_with_the_checkpoint_run(tmp_path, tiny_cfg, capsys):
    path = _dummy_checkpoint(tmp_path, tiny_cfg, "layernorm")
    assert (
        main(
            [
                "check",
                "--checkpoint",
                path,
                "--model",
                "dummy",
                "--final-norm",
                "layernorm",
                "--seq",
                "3",
                "--quiet",
                "--no-layer-evidence",
            ]
        )
        == 0
    )
    assert "dummy model" in capsys.readouterr().out


def test_convert_checks_its_destination_before_reading_the_source(tmp_path, capsys, monkeypatch):
    from parity_tests import twins

    def never(*args, **kwargs):
        raise AssertionError("the source was read before the destination was checked")

    monkeypatch.setattr(twins, "read_checkpoint", never)
    (tmp_path / "file").write_text("")
    err = _one_line_exit_2(capsys, ["convert", "src.safetensors", str(tmp_path / "no" / "out.safetensors")])
    assert "cannot write checkpoint" in err and "/no' does not exist" in err
    err = _one_line_exit_2(capsys, ["convert", "src.safetensors", str(tmp_path / "file" / "snap"), "--to", "hf"])
    assert "cannot write HF snapshot" in err and "/file' is not a folder" in err
