"""parity_cli.render: tables as plain text wherever they go, progress as lines in logs and as one
live line on a terminal that Ctrl-C leaves clean."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from parity_cli.render import Progress, format_cell, format_table
from tests import helpers

ROOT = str(helpers.ROOT)


@pytest.mark.parametrize(
    "value, text",
    [
        (2.86e-6, "2.86e-06"),
        (0.12954, "0.1295"),
        (0.0, "0"),
        (12345.6, "12,346"),
        (float("nan"), "nan"),
        (7, "7"),
        ("pass", "pass"),
    ],
)
def test_cells_write_figures_as_the_json_holds_them_to_four_digits(value, text):
    assert format_cell(value) == text


def test_a_table_has_its_headers_its_rows_and_numbers_right_aligned():
    lines = format_table(
        ["direction", "max |Δ|", "result"], [("torch->flax", 2.86e-6, "pass"), ("flax->torch", 0.5, "FAIL")]
    ).splitlines()
    assert lines[0].split() == ["direction", "max", "|Δ|", "result"]
    assert [line.split() for line in lines[2:]] == [["torch->flax", "2.86e-06", "pass"], ["flax->torch", "0.5", "FAIL"]]
    assert len({lines[2].index("2.86e-06") + 8, lines[3].index("0.5") + 3, lines[0].index("|Δ|") + 3}) == 1
    assert lines[2].index("pass") == lines[3].index("FAIL") == lines[0].index("result")


def test_a_wide_table_is_plain_text_on_one_line_a_row_whatever_the_environment(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("FORCE_COLOR", "1")
    headers = [f"column {i} of a wide table" for i in range(12)]
    text = format_table(headers, [[f"row {r}", *(r * 1e-7 * i for i in range(11))] for r in range(3)])
    lines = text.splitlines()
    assert len(lines) == 5 and len(lines[0]) > 300 and "\x1b" not in text
    assert all(line.split()[:2] == ["row", str(r)] for r, line in enumerate(lines[2:]))


def test_progress_off_a_terminal_is_a_line_per_start_and_end_and_none_on_failure():
    stream = io.StringIO()
    progress = Progress(3, stream=stream)
    with progress.step("building"):
        pass
    with pytest.raises(RuntimeError), progress.step("failing"):
        raise RuntimeError
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["[1/3] building ...", lines[1]] and lines[1].startswith("[1/3] building: done in ")
    assert lines[2:] == ["[2/3] failing ..."] and "\x1b" not in stream.getvalue()
    quiet = io.StringIO()
    with Progress(1, stream=quiet, enabled=False).step("building") as status:
        status("loss 1.0")
    assert quiet.getvalue() == ""


def test_in_a_log_the_steps_of_a_phase_are_one_line_at_its_start_and_one_at_its_end():
    stream = io.StringIO()
    progress = Progress(6, stream=stream)
    with progress.step("building"):
        pass
    for step in range(1, 4):
        with progress.step(f"AdamW step {step}", phase="3 AdamW steps"):
            pass
    with progress.step("mutant a", phase="2 mutants"):
        pass
    with progress.step("mutant b", phase="2 mutants"):
        pass
    lines = [line.split(": done in ")[0] for line in stream.getvalue().splitlines()]
    assert lines == [
        "[1/6] building ...",
        "[1/6] building",
        "[2/6] 3 AdamW steps ...",
        "[2-4/6] 3 AdamW steps",
        "[5/6] 2 mutants ...",
        "[5-6/6] 2 mutants",
    ]


def test_a_status_off_a_terminal_is_a_line_at_most_every_few_seconds(monkeypatch):
    import parity_cli.render as output

    stream = io.StringIO()
    with Progress(1, stream=stream).step("training") as status:
        status("loss 2.0")  # within STATUS_EVERY_S of the start: not shown
        monkeypatch.setattr(output, "STATUS_EVERY_S", 0.0)
        status("loss 1.0")
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["[1/1] training ...", "[1/1] training · loss 1.0"] and len(lines) == 3


_ON_A_TERMINAL = """
import sys, time
from parity_cli.interrupt import exit_on_interrupt
from parity_cli.render import Progress

progress = Progress(2)
with exit_on_interrupt("demo"):
    with progress.step("quick"):
        time.sleep(0.3)
    with progress.step("slow") as status:
        status("loss 1.234")
        time.sleep(float(sys.argv[1]))
print("the end")
"""


def _on_a_terminal(slow_s: float, *, interrupt: bool = False, **env: str) -> tuple[int, str]:
    """Run two steps with stdout and stderr on a pseudo-terminal; what the terminal received."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", _ON_A_TERMINAL, str(slow_s)],
        cwd=ROOT,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color", **env},
    )
    os.close(slave)
    received = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process has ended and closed the terminal
            break
        if not chunk:
            break
        received += chunk
        if interrupt and b"[2/2] slow" in received:
            interrupt = False
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
    os.close(master)
    return proc.wait(timeout=60), received.decode()


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_on_a_terminal_is_a_live_line_that_leaves_the_done_lines_and_the_cursor():
    rc, screen = _on_a_terminal(0.5)
    assert rc == 0
    assert "\x1b[?25l" in screen and screen.rstrip().endswith("the end")  # drawn live, cursor hidden
    assert screen.count("\x1b[?25l") == screen.count("\x1b[?25h") == 2  # and shown again after each step
    assert "[1/2] quick ...\r\n" not in screen and "[1/2] quick: done in 0." in screen
    assert "[2/2] slow: done in 0." in screen
    assert "[2/2] slow · loss 1.234" in screen  # the status, on the live line


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_ctrl_c_under_a_live_line_clears_it_shows_the_cursor_and_says_so_on_its_own_line():
    rc, screen = _on_a_terminal(30, interrupt=True)
    assert rc == 130
    cleared = "\r\x1b[2K\x1b[?25h"  # to the line's start, erase it, show the cursor
    assert screen.endswith(f"{cleared}demo: interrupted; nothing more was written (exit 130)\r\n"), screen[-300:]
    assert "the end" not in screen and "slow: done" not in screen


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_color_and_dumb_terminals_are_respected(env):
    rc, screen = _on_a_terminal(0.3, **env)
    assert rc == 0 and "[2/2] slow: done in 0." in screen
    assert "\x1b[3" not in screen  # no colour
    if "TERM" in env:  # no live line either: the lines a log gets
        assert "\x1b" not in screen and "[1/2] quick ...\r\n" in screen


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def test_json_has_null_where_a_figure_is_not_a_number_so_strict_parsers_read_it(tmp_path):
    import numpy as np

    from parity_cli.render import write_json

    path = tmp_path / "out.json"
    data = {"max_abs": float("nan"), "rows": [{"margin": float("inf")}, -float("inf"), np.float64("nan")], "ok": 1.5}
    write_json(data, str(path))
    assert json.loads(path.read_text(), parse_constant=_refuse) == {
        "max_abs": None,
        "rows": [{"margin": None}, None, None],
        "ok": 1.5,
    }
    assert data["max_abs"] != data["max_abs"]  # the caller's data is left as it was
