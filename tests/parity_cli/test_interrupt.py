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
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest

from parity_cli.main import main
from tests import helpers

ROOT = str(helpers.ROOT)

# The steps at whose start each run is interrupted; each starts a step whose first call compiles
# (see `check --train-steps 3` on the tiny config: 5 forward steps, then building, loss and
# gradients, 3 AdamW steps).
INTERRUPT_AT = [
    "building both twins, each with its own init",
    "torch->flax: flax/cpu:0",  # jit of the forward
    "loss and gradients",  # jit of value_and_grad
    "AdamW step 1",  # jit of the AdamW step: the segfaults
    "AdamW step 3",  # the last step before PASS: a race with the outputs being written
]

# The console script, with a hook: the step named first on the command line sends this process
# SIGINT as it starts, so the signal lands inside that step's work, as a Ctrl-C would.
_HOOKED_ENTRY = """
import contextlib, os, signal, sys
from parity_cli import entry, render
at = sys.argv.pop(1)
step = render.Progress.step

@contextlib.contextmanager
def interrupting(self, what, *, phase=None):
    with step(self, what, phase=phase) as status:
        if what == at:
            os.kill(os.getpid(), signal.SIGINT)
        yield status

render.Progress.step = interrupting
sys.exit(entry.main())
"""


def _hooked(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """`script` (one of this file's hooked entry points) run with `args`, both streams captured."""
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _interrupted_run(argv: list[str], cwd, step: str) -> tuple[int, str, str]:
    proc = _hooked(_HOOKED_ENTRY, step, *argv, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.subprocess
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
        after = stderr.strip().splitlines()
        assert rc == 130, f"interrupted at {line!r}: exit {rc}\n{stderr[-3000:]}"
        written = ", ".join(repr(str(out / f)) for f in ("check.json", "check.png") if (out / f).exists())
        done = f" after writing {written}" if written else ""
        assert after[-1] == f"gpt-parity: interrupted{done}; nothing more was written (exit 130)", after
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
    from parity_cli import reports

    def broken(report, path):
        raise ValueError(f"cannot write plot {path!r}: No space left on device")

    monkeypatch.setattr(reports, "plot_parity", broken)
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


# --- outputs that would destroy inputs, or what the run prints --------------------------------


def _never_run(monkeypatch) -> None:
    from parity_bench import bench, load_memory
    from parity_tests import chapter5, forward, twins, zoo

    def never(*args, **kwargs):
        raise AssertionError("the command started its work before refusing its paths")

    for module, name in [
        (forward, "run_parity"),
        (twins, "read_checkpoint"),
        (twins, "build_pair"),
        (chapter5, "run_chapter5"),
        (load_memory, "run"),
        (bench, "run_bench"),
        (zoo, "run_zoo"),
    ]:
        monkeypatch.setattr(module, name, never)


@pytest.fixture
def clobber_case(tmp_path, tiny_cfg):
    """A checkpoint file, an HF snapshot folder (with config.json), a config file and a text."""
    import gpt_torch
    from gpt_spec import save_checkpoint, save_hf

    sd = gpt_torch.GPTModel(tiny_cfg).state_dict()
    save_checkpoint(str(tmp_path / "v.safetensors"), sd, tiny_cfg)
    save_hf(str(tmp_path / "snap"), sd, tiny_cfg)
    (tmp_path / "c.json").write_text(json.dumps(tiny_cfg.to_dict()))
    (tmp_path / "t.txt").write_text("text " * 2000)
    (tmp_path / "out").mkdir()
    (tmp_path / "sharded").mkdir()  # never read: the refusal comes first
    shards = {
        "tok_emb.weight": "model-00001-of-00002.safetensors",
        "pos_emb.weight": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    for shard in shards.values():
        (tmp_path / "sharded" / shard).write_bytes(b"a shard")
    os.symlink(tmp_path / "v.safetensors", tmp_path / "link.json")
    os.link(tmp_path / "c.json", tmp_path / "hard.json")
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["check", "--checkpoint", "v.safetensors", "--json", "v.safetensors"],
            "--json 'v.safetensors' is the same file as --checkpoint 'v.safetensors'",
        ),
        (
            ["check", "--checkpoint", "v.safetensors", "--json", "link.json"],
            "--json 'link.json' is the same file as --checkpoint 'v.safetensors'",
        ),
        (["check", "--config", "hard.json", "--json", "c.json"], "--json 'c.json' is the same file as --config"),
        (
            ["check", "--checkpoint", "snap", "--json", "snap/config.json"],
            "--json 'snap/config.json' is the same file as the config.json in --checkpoint 'snap/config.json'",
        ),
        (
            ["check", "--checkpoint", "sharded", "--json", "sharded/model-00002-of-00002.safetensors"],
            "is the same file as a shard in --checkpoint 'sharded/model-00002-of-00002.safetensors'",
        ),
        (
            ["generate", "hi", "--checkpoint", "snap/model.safetensors", "--json", "snap/config.json"],
            "--json 'snap/config.json' is the same file as the config.json beside --checkpoint",
        ),
        (
            ["bench", "--config", "c.json", "--plot", "c.json"],
            "--plot 'c.json' is the same file as --config 'c.json'",
        ),
        (["mutants", "--config", "c.json", "--json", "./c.json"], "--json './c.json' is the same file as --config"),
        (
            ["convert", "v.safetensors", "v.safetensors"],
            "the destination 'v.safetensors' is the same file as the source 'v.safetensors'",
        ),
        (
            ["convert", "snap", "snap", "--to", "hf"],
            "the destination 'snap/model.safetensors' is the same file as the model.safetensors in the source",
        ),
        (
            ["convert", "v.safetensors", "out", "--to", "hf", "--config", "out/config.json"],
            "the destination 'out/config.json' is the same file as --config 'out/config.json'",
        ),
        (
            ["train", "--text", "out/train.json", "--config", "c.json", "--out", "out"],
            "--out 'out/train.json' is the same file as --text 'out/train.json'",
        ),
        (
            ["load-memory", "--config", "c.json", "--dir", "out", "--json", "out/model-canonical.safetensors"],
            "--json 'out/model-canonical.safetensors' and --dir 'out/model-canonical.safetensors' name the same file",
        ),
        (["check", "--json", "out/x.png", "--plot", "out/./x.png"], "--json 'out/x.png' and --plot 'out/./x.png'"),
    ],
    ids=[
        "check-json-is-checkpoint",
        "symlink",
        "hard-link",
        "snapshot-config",
        "snapshot-shard",
        "config-beside-checkpoint",
        "bench-plot-is-config",
        "mutants-json-is-config",
        "convert-onto-source",
        "convert-hf-onto-source-folder",
        "convert-hf-config-is-config",
        "train-out-holds-text",
        "load-memory-json-is-scratch",
        "json-is-plot",
    ],
)
def test_an_output_that_would_overwrite_an_input_is_refused_before_any_work(
    clobber_case, capsys, monkeypatch, argv, message
):
    monkeypatch.chdir(clobber_case)
    if argv[0] == "convert" and argv[-1] == "out/config.json":
        (clobber_case / "out" / "config.json").write_text(json.dumps(json.loads((clobber_case / "c.json").read_text())))
    if argv[0] == "train":
        (clobber_case / "out" / "train.json").write_text("text " * 2000)
    before = {p: p.read_bytes() for p in clobber_case.rglob("*") if p.is_file()}
    _never_run(monkeypatch)
    err = _one_line_exit_2(capsys, argv)
    assert message in err, err
    assert {p: p.read_bytes() for p in clobber_case.rglob("*") if p.is_file()} == before


def test_a_new_file_beside_a_snapshots_own_is_no_overwrite(clobber_case, capsys, monkeypatch):
    monkeypatch.chdir(clobber_case)
    _never_run(monkeypatch)
    with pytest.raises(AssertionError, match="started its work"):  # not refused: the run would start
        main(["check", "--checkpoint", "snap", "--json", "snap/report.json"])


def test_json_to_standard_output_is_spelled_dash_and_other_names_for_it_are_refused(
    tiny_json_path, capsys, monkeypatch
):
    _never_run(monkeypatch)
    for name in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        err = _one_line_exit_2(capsys, ["check", "--config", tiny_json_path, "--json", name])
        assert f"--json {name!r} is this process's standard output" in err and "--json -" in err, err


def test_json_to_the_file_standard_output_goes_to_is_refused(tmp_path, tiny_json_path, capsys, monkeypatch):
    """`gpt-parity check --json log > log` would replace the log with the report."""
    _never_run(monkeypatch)
    log = tmp_path / "log"
    saved = os.dup(1)
    try:
        with open(log, "w") as f:
            os.dup2(f.fileno(), 1)
        err = _one_line_exit_2(capsys, ["check", "--config", tiny_json_path, "--json", str(log)])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert f"--json {str(log)!r} is this process's standard output" in err


def test_json_dash_writes_only_strict_json_on_stdout_and_the_tables_on_stderr(tiny_json_path, capsys):
    argv = ["check", "--config", tiny_json_path, "--seq", "3", "--quiet", "--no-layer-evidence", "--json", "-"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert data["forward"]["passed"] and out.endswith("}\n")
    assert err.splitlines()[-1] == "PASS" and "torch->flax" in err


# --- Ctrl-C at the edges: start-up, writing, after the verdict; a closed stdout --------

INTERRUPTED = "gpt-parity: interrupted; nothing more was written (exit 130)\n"


def _console_script() -> str:
    """The installed `gpt-parity`, as users run it (its entry point is what is tested)."""
    script = os.path.join(os.path.dirname(sys.executable), "gpt-parity")
    assert os.path.exists(script), f"{script} is missing: pip install -e . installs it"
    return script


def _quick_check(config: str, *extra: str) -> list[str]:
    return ["check", "--config", config, "--seq", "3", "--quiet", "--no-layer-evidence", *extra]


def _piped_quick_check(cwd, config: str, json_out, **env: str) -> subprocess.Popen:
    """The console script's quick check writing --json `json_out`, both streams piped."""
    return subprocess.Popen(
        [_console_script(), *_quick_check(config, "--json", str(json_out))],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def _in_parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call on a thread of its own; their results, in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# The console script with a hook: SIGINT as the module named first on the command line starts to
# be imported (an audit hook sees every import), so it lands inside that import, as a Ctrl-C would.
_INTERRUPTED_IMPORTING = """
import os, signal, sys
at = sys.argv.pop(1)

def hook(event, args):
    global at
    if event == "import" and args[0] == at:
        at = None
        os.kill(os.getpid(), signal.SIGINT)

sys.addaudithook(hook)
from parity_cli import entry
sys.exit(entry.main())
"""


def _interrupted_importing(module: str, argv: list[str], cwd) -> tuple[int, str]:
    proc = _hooked(_INTERRUPTED_IMPORTING, module, *argv, cwd=cwd)
    return proc.returncode, proc.stderr


# Imported in this order as the command starts: the CLI, then the heavy imports it waits on.
STARTUP_IMPORTS = ("parity_cli.main", "numpy", "jax", "torch", "flax")


@pytest.mark.subprocess
def test_ctrl_c_while_the_command_starts_is_the_one_line_too(tmp_path, tiny_json_path):
    """The handler is in place before jax and torch are imported (seconds), not after: a SIGINT as
    each of them starts to be imported ends the run with the one line."""
    argv = _quick_check(tiny_json_path)
    results = _in_parallel(*(lambda m=m: _interrupted_importing(m, argv, tmp_path) for m in STARTUP_IMPORTS))
    for module, (rc, err) in zip(STARTUP_IMPORTS, results, strict=True):
        assert (rc, err) == (130, INTERRUPTED), f"Ctrl-C importing {module}: exit {rc}\n{err[-2000:]}"


# The console script with a hook at one point after the verdict: `check` (the command, outputs
# written, verdict printed, still inside its guard), `main` (returned from the guard, before the
# process exits) or `atexit` (the interpreter shutting down). Each sends SIGINT, waits until a
# thread has taken it (no longer pending) and gives whatever took it time to act.
_INTERRUPTED_AFTER = """
import atexit, functools, os, signal, sys, time
from parity_cli import entry, main
from parity_cli.commands import check
at = sys.argv.pop(1)

def interrupt():
    os.kill(os.getpid(), signal.SIGINT)
    while signal.SIGINT in signal.sigpending():
        time.sleep(0.001)
    time.sleep(0.5)

def then_interrupt(f):
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        result = f(*args, **kwargs)
        interrupt()
        return result
    return wrapped

if at == "atexit":
    atexit.register(interrupt)  # registered first, so run last
else:
    module, name = {"check": (check, "run"), "main": (main, "main")}[at]
    setattr(module, name, then_interrupt(getattr(module, name)))
sys.exit(entry.main())
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("at", ["check", "main", "atexit"])
def test_ctrl_c_once_the_verdict_is_printed_changes_nothing_and_prints_no_traceback(at, tmp_path, tiny_json_path):
    """Inside the command's guard, after the verdict: the line says the outputs were written, and
    they are whole. After the command returned, through the interpreter's shutdown: nothing."""
    out = tmp_path / "check.json"
    proc = _hooked(_INTERRUPTED_AFTER, at, *_quick_check(tiny_json_path, "--json", str(out)), cwd=tmp_path)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "PASS"
    if at == "check":
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert (
            proc.stderr == f"gpt-parity: interrupted after writing {str(out)!r}; nothing more was written (exit 130)\n"
        )
    else:
        assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(out.read_text())["forward"]["passed"]


_INTERRUPTED_IN = """
import json, os, signal, sys, time
from parity_cli.interrupt import guard_startup

guard_startup("gpt-parity")  # what the entry point does first

def interrupt():  # Ctrl-C, then the work would go on: only the interrupt's guard may end it
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)

exec(sys.argv[2])
import parity_cli.main as cli
sys.argv = ["gpt-parity", *json.loads(sys.argv[1])]
sys.exit(cli.main())
"""


def _interrupted_in(argv: list[str], patch: str, cwd) -> tuple[int, str, str]:
    """gpt-parity `argv` with `patch` run first: it makes something call interrupt()."""
    proc = _hooked(_INTERRUPTED_IN, json.dumps(argv), textwrap.dedent(patch), cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.subprocess
def test_ctrl_c_just_after_an_output_is_written_says_it_was(tmp_path, tiny_json_path):
    out = tmp_path / "check.json"
    patch = """
        import parity_cli.common as cli
        real = cli.write_json
        def write_then_interrupt(data, path):
            real(data, path)
            interrupt()
        cli.write_json = write_then_interrupt
    """
    rc, stdout, stderr = _interrupted_in(_quick_check(tiny_json_path, "--json", str(out)), patch, tmp_path)
    assert rc == 130 and "PASS" not in stdout, stderr[-3000:]
    assert stderr == f"gpt-parity: interrupted after writing {str(out)!r}; nothing more was written (exit 130)\n"
    assert json.loads(out.read_text())["forward"]["passed"]


_MID_WRITE = """
    from gpt_spec.formats import safetensors_io
    def half_then_interrupt(tmp, tensors, metadata):
        tmp.write_bytes(b"half a checkpoint")
        interrupt()
    safetensors_io.write_verified = half_then_interrupt
"""


@pytest.mark.subprocess
def test_ctrl_c_leaves_nothing_a_command_created_but_whole_outputs(tmp_path, tiny_cfg):
    """train saving its models (into the --out it created), convert --to hf writing into folders
    it created, load-memory between its scratch checkpoint and the loads: each leaves the folders
    as they were, without a temporary, an empty folder or a scratch file."""
    import gpt_torch
    from gpt_spec import save_checkpoint

    src = tmp_path / "src.safetensors"
    save_checkpoint(str(src), gpt_torch.GPTModel(tiny_cfg).state_dict(), tiny_cfg)
    (tmp_path / "c.json").write_text(json.dumps(tiny_cfg.to_dict()))
    (tmp_path / "text.txt").write_text(" word" * 800)
    for folder in ("train", "convert", "memory"):
        (tmp_path / folder).mkdir()
    train_saves = textwrap.dedent("""
        import os
        from gpt_spec.formats import atomic, safetensors_io
        from parity_tests import chapter5
        def saves_a_model(cfg, text, *, out_dir, **kwargs):  # as run_chapter5 ends: the models saved
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "torch.safetensors")
            atomic.atomic_write(path, lambda tmp: safetensors_io.write_verified(tmp, {}, None))
        chapter5.run_chapter5 = saves_a_model
    """) + textwrap.dedent(_MID_WRITE)
    measures = """
        from parity_bench import load_memory
        load_memory.measure = lambda file, twin: interrupt()
    """
    chapter5_tiny = os.path.join(ROOT, "examples", "chapter5-tiny.json")
    train = ["train", "--text", "text.txt", "--config", chapter5_tiny, "--out", "train/new/out", "--quiet"]
    convert = ["convert", str(src), "convert/new/deeper/snap", "--to", "hf"]
    memory = ["load-memory", "--config", "c.json", "--dir", "memory", "--layout", "canonical", "--quiet"]
    results = _in_parallel(
        lambda: _interrupted_in(train, train_saves, tmp_path),
        lambda: _interrupted_in(convert, _MID_WRITE, tmp_path),
        lambda: _interrupted_in(memory, measures, tmp_path),
    )
    for (rc, _, stderr), folder in zip(results, ("train", "convert", "memory"), strict=True):
        assert (rc, stderr.splitlines()[-1:]) == (130, [INTERRUPTED.strip()]), f"{folder}: {stderr[-3000:]}"
        assert os.listdir(tmp_path / folder) == [], f"{folder}: left {list((tmp_path / folder).rglob('*'))}"


def test_a_train_refused_while_running_removes_the_out_folder_it_made(tmp_path, capsys, monkeypatch):
    from parity_tests import chapter5

    def disk_full(cfg, text, *, out_dir, **kwargs):
        os.makedirs(out_dir, exist_ok=True)
        raise ValueError(f"cannot write checkpoint {out_dir}/torch.safetensors: No space left on device")

    monkeypatch.setattr(chapter5, "run_chapter5", disk_full)
    (tmp_path / "text.txt").write_text(" word" * 800)
    argv = ["train", "--text", str(tmp_path / "text.txt"), "--config", "examples/chapter5-tiny.json"]
    err = _one_line_exit_2(capsys, [*argv, "--out", str(tmp_path / "new" / "out"), "--quiet"])
    assert "No space left on device" in err
    assert sorted(os.listdir(tmp_path)) == ["text.txt"]
    (tmp_path / "kept").mkdir()  # a folder that was there before is the user's: it stays
    _one_line_exit_2(capsys, [*argv, "--out", str(tmp_path / "kept"), "--quiet"])
    assert sorted(os.listdir(tmp_path)) == ["kept", "text.txt"]


@pytest.mark.subprocess
def test_a_closed_stdout_still_gets_the_json_written_and_ends_quietly_with_141(tmp_path, tiny_json_path):
    """`gpt-parity check --json out.json | head -1`: the reader goes away; the run goes on."""
    out = tmp_path / "check.json"
    proc = _piped_quick_check(tmp_path, tiny_json_path, out)
    assert proc.stdout is not None
    proc.stdout.close()  # before anything is printed: every write finds the pipe closed
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, err) == (141, ""), err[-3000:]
    assert json.loads(out.read_text())["forward"]["passed"]


def test_load_memory_refuses_a_dir_holding_a_file_of_the_name_it_writes_and_deletes(tmp_path, capsys, monkeypatch):
    _never_run(monkeypatch)
    (tmp_path / "model-canonical.safetensors").write_bytes(b"the user's")
    err = _one_line_exit_2(capsys, ["load-memory", "--config", "gpt2-small", "--dir", str(tmp_path)])
    assert f"--dir {str(tmp_path)!r} already holds 'model-canonical.safetensors', which load-memory writes" in err
    assert (tmp_path / "model-canonical.safetensors").read_bytes() == b"the user's"


def test_an_output_that_is_a_device_is_refused(tiny_json_path, capsys, monkeypatch):
    """Written aside and renamed into place, a report would replace /dev/null itself."""
    _never_run(monkeypatch)
    err = _one_line_exit_2(capsys, ["check", "--config", tiny_json_path, "--json", "/dev/null"])
    device, stdout = "is not a regular file (a device, pipe or socket)", "is this process's standard output"
    assert "--json '/dev/null' " in err and (device in err or stdout in err), err  # stdout may be /dev/null
