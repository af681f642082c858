"""What the suite writes: tables for the terminal (rich), progress of anything slow on stderr, and
strict JSON for machines (with the versions that produced it; null where a figure is NaN or infinite)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import rich.progress
from rich import box
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

TABLE_WIDTH = 10_000  # rendered for a file, not a window: a wide table is never wrapped or cut


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A rich table as plain text (no colour, no control codes: it goes to pipes and logs and into
    assertion messages as well as to terminals). A column of numbers is right-aligned."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i, header in enumerate(headers):
        numeric = bool(rows) and all(_is_number(row[i]) for row in rows)
        table.add_column(Text(str(header)), justify="right" if numeric else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(format_cell(v)) for v in row))
    text = io.StringIO()
    console = Console(
        file=text,
        width=TABLE_WIDTH,
        color_system=None,
        force_terminal=False,
        highlight=False,
        markup=False,
        emoji=False,
    )
    console.print(table)
    return "\n".join(line.rstrip() for line in text.getvalue().splitlines())


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_cell(v: object) -> str:
    """How a table writes a value: floats to 4 significant digits, or 3 in e-notation below 0.01."""
    if not isinstance(v, float):
        return str(v)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v == 0 or abs(v) >= 0.01:
        return f"{v:.4g}"
    return f"{v:.2e}"


# Every write of progress takes _OUTPUT, and silence_progress takes it for good: after Ctrl-C's line
# nothing of the progress is drawn again. _live_fd is the terminal a live line is drawn on, if any.
_OUTPUT = threading.Lock()
_live_fd: int | None = None
_REDRAW_S = 0.1
STATUS_EVERY_S = 10.0


class Progress:
    """The slow steps of a run, on stderr so stdout stays the tables. On a terminal, rich draws the
    running step as one live line (spinner, step, steps done, time so far); elsewhere (pipes, CI
    logs), where a live line would be control codes, a step's start is a line `[i/n] what ...`.
    Either way `[i/n] what: done in 1.2s` stays when it ends."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and _is_terminal(self.stream)
        # force_terminal: FORCE_COLOR in a CI log must not turn the lines into a live display
        self.console = Console(
            file=self.stream, force_terminal=self.live, soft_wrap=True, highlight=False, markup=False, emoji=False
        )

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[Callable[[str], None]]:
        """One step, as a context; it gives a function that shows a status beside the step's label
        (the current loss, say): on a live line, redrawn; elsewhere, as a line of its own at most
        every STATUS_EVERY_S seconds."""
        self.done += 1
        label = f"[{self.done}/{self.total}] {what}"
        t0 = time.perf_counter()
        if not self.enabled:
            yield lambda status: None
            return
        if self.live:
            with _LiveLine(self.console, label, self.done - 1, max(self.total, self.done)) as line:
                yield line.status
        else:
            self._print(f"{label} ...")
            last = time.perf_counter()

            def status(text: str) -> None:  # a line at most every STATUS_EVERY_S: a log, not a flood
                nonlocal last
                if time.perf_counter() - last >= STATUS_EVERY_S:
                    last = time.perf_counter()
                    self._print(f"{label} · {text}")

            yield status
        self._print(f"{label}: done in {time.perf_counter() - t0:.1f}s")

    def _print(self, line: str) -> None:
        with _OUTPUT:
            self.console.print(line)


def _is_terminal(stream: TextIO) -> bool:
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
    return tty and os.environ.get("TERM", "") not in ("dumb", "unknown")


class _LiveLine:
    """One step as rich's live display: transient (it leaves no trace on the screen), redrawn by a
    thread of ours rather than rich's own so that every redraw holds _OUTPUT."""

    def __init__(self, console: Console, label: str, done: int, total: int):
        # The description takes the room the others leave, cut short with an ellipsis: one line,
        # however narrow the terminal. stderr is redirected above the line, stdout left alone.
        description = Column(no_wrap=True, overflow="ellipsis", ratio=1)
        self.bar = rich.progress.Progress(
            rich.progress.SpinnerColumn(),
            rich.progress.TextColumn("{task.description}", markup=False, table_column=description),
            rich.progress.BarColumn(bar_width=20),
            rich.progress.TimeElapsedColumn(),
            console=console,
            transient=True,
            auto_refresh=False,
            expand=True,
            redirect_stdout=False,
            redirect_stderr=True,
        )
        self.label = label
        self.task = self.bar.add_task(label, total=total, completed=done)
        self.fd = console.file.fileno()
        self.stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="gpt-parity-progress", daemon=True)

    def __enter__(self) -> _LiveLine:
        global _live_fd
        with _OUTPUT:
            self.bar.start()  # hides the cursor
            _live_fd = self.fd
        self.ticker.start()
        return self

    def status(self, text: str) -> None:
        """Show `text` after the label, from the next redraw on."""
        with _OUTPUT:
            self.bar.update(self.task, description=f"{self.label} · {text}")

    def _tick(self) -> None:
        while not self.stop.wait(_REDRAW_S):
            with _OUTPUT:
                if _live_fd is None:
                    return
                self.bar.refresh()

    def __exit__(self, *exc: object) -> None:
        global _live_fd
        self.stop.set()
        self.ticker.join()
        with _OUTPUT:
            _live_fd = None
            self.bar.stop()  # clears the line, shows the cursor


def silence_progress() -> None:
    """End all progress output for good, for the Ctrl-C path (interrupt.py), which ends the process
    from its watcher thread right after: a live line is cleared and the cursor shown again, with a
    bare write (rich's locks may be held by the thread being abandoned). Waits at most a moment for
    a redraw in flight, never for the work."""
    _OUTPUT.acquire(timeout=0.5)  # not released: nothing draws after this
    if _live_fd is not None:
        with contextlib.suppress(OSError):
            os.write(_live_fd, b"\r\x1b[2K\x1b[?25h")  # to the start of the line, erase it, show the cursor


def check_output(path: str, flag: str, *, plot: bool = False) -> None:
    """Refuse, before a run, an output path the run could not write, so no result is computed only
    to be lost: a folder, a missing or read-only folder (gpt_spec's check_destination, which the
    savers use too), and for a plot a format matplotlib lacks."""
    from gpt_spec.checkpoint import check_destination

    check_destination(path, flag)
    if plot:
        try:
            plt = pyplot()
        except ImportError:
            raise ValueError(f"{flag} needs matplotlib: pip install 'gpt-twins[plot]'") from None
        formats = plt.figure().canvas.get_supported_filetypes()
        plt.close("all")
        suffix = os.path.splitext(path)[1].lstrip(".").lower()
        if suffix not in formats:
            raise ValueError(
                f"{flag} {path!r}: the file name must end in one of {', '.join('.' + f for f in sorted(formats))}"
            )


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Save and close `fig`; the file appears whole or not at all (written aside, then renamed)."""
    from gpt_spec.checkpoint import atomic_write

    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt), what="plot")
    finally:
        pyplot().close(fig)


def _finite(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None, in dicts, lists and tuples at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(data: dict[str, Any]) -> str:
    """Indented, strict JSON: a figure that is not a number (NaN, an infinity) is written as null,
    since JSON has no such numbers and strict parsers refuse Python's bare NaN and Infinity."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def write_json(data: dict[str, Any], path: str) -> None:
    """json_text(data) in a file that appears whole or not at all (written aside, then renamed)."""
    from gpt_spec.checkpoint import atomic_write

    text = json_text(data)  # serialised first: a failure leaves no file
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what="JSON")


def versions() -> dict[str, str]:
    import flax
    import jax
    import numpy as np
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
    }
