"""What the suite writes: tables for the terminal (rich), progress of anything slow on stderr, and
strict JSON for machines (with the versions that produced it; null where a figure is NaN or infinite)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import stat
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

from parity_tests.progress import Progress as ProgressFactory
from parity_tests.progress import silent

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
    logs), where a live line would be control codes, a step's start is a line `[i/n] what ...` and
    `[i/n] what: done in 1.2s` its end. In a log, the steps of one phase (the ten AdamW steps, say)
    are one line at the phase's start and one at its end."""

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
        self._phase: tuple[str, int, float] | None = None  # the open phase of a log: name, first step, start
        self._phase_last = 0  # the phase's last step finished

    @contextlib.contextmanager
    def step(self, what: str, *, phase: str | None = None) -> Iterator[Callable[[str], None]]:
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
            self._print(f"{label}: done in {time.perf_counter() - t0:.1f}s")
            return
        if self._phase is not None and self._phase[0] != phase:
            self._end_phase()
        if phase is not None and self._phase is None:
            self._phase = (phase, self.done, t0)
            self._print(f"[{self.done}/{self.total}] {phase} ...")
        elif phase is None:
            self._print(f"{label} ...")
        last = time.perf_counter()

        def status(text: str) -> None:  # a line at most every STATUS_EVERY_S: a log, not a flood
            nonlocal last
            if time.perf_counter() - last >= STATUS_EVERY_S:
                last = time.perf_counter()
                self._print(f"{label} · {text}")

        index = self.done
        yield status
        if phase is None:
            self._print(f"{label}: done in {time.perf_counter() - t0:.1f}s")
            return
        self._phase_last = index
        if index >= self.total:
            self._end_phase()

    def _end_phase(self) -> None:
        assert self._phase is not None
        name, first, t0 = self._phase
        self._phase = None
        steps = f"{first}-{self._phase_last}" if self._phase_last > first else str(first)
        self._print(f"[{steps}/{self.total}] {name}: done in {time.perf_counter() - t0:.1f}s")

    def _print(self, line: str) -> None:
        with _OUTPUT:
            self.console.print(line)


def progress(quiet: bool) -> ProgressFactory:
    """What the commands pass the engine: this module's Progress, or nothing shown with --quiet."""
    return silent if quiet else Progress


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
    from gpt_spec.formats.atomic import check_destination

    check_destination(path, flag)
    if plot:
        try:
            plt = pyplot()
        except ImportError:
            raise ValueError(f"{flag} needs matplotlib: pip install 'gpt-twins[parity]'") from None
        formats = plt.figure().canvas.get_supported_filetypes()
        plt.close("all")
        suffix = os.path.splitext(path)[1].lstrip(".").lower()
        if suffix not in formats:
            raise ValueError(
                f"{flag} {path!r}: the file name must end in one of {', '.join('.' + f for f in sorted(formats))}"
            )


STDOUT = "-"  # --json - : the JSON on standard output, the tables on standard error
EXIT_READER_GONE = 128 + 13  # 141, the shell's status for a process ended by SIGPIPE


class _Stream:
    """A text stream that outlives its reader: once a write finds the pipe closed (`| head -1`),
    this and every later write is dropped, so the run goes on to write its files."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def _gone(self) -> None:
        self.reader_gone = True
        # What is still buffered, and Python's own flush at exit, go to /dev/null instead: a dead
        # pipe would make them fail again, as "Exception ignored" on stderr.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@dataclasses.dataclass
class Streams:
    stdout: _Stream  # where --json - goes
    stderr: _Stream

    @property
    def reader_gone(self) -> bool:
        return self.stdout.reader_gone or self.stderr.reader_gone


@contextlib.contextmanager
def guarded_streams(*, json_to_stdout: bool = False) -> Iterator[Streams]:
    """sys.stdout and sys.stderr for one command: writes to a closed pipe are dropped (the caller
    ends with EXIT_READER_GONE once its files are written); with `json_to_stdout`, what would be
    printed goes to standard error, standard output being the JSON's."""
    saved = sys.stdout, sys.stderr
    streams = Streams(_Stream(sys.stdout), _Stream(sys.stderr))
    sys.stdout = streams.stderr if json_to_stdout else streams.stdout
    sys.stderr = streams.stderr
    try:
        yield streams
    finally:
        sys.stdout, sys.stderr = saved


_STREAMS = ((1, "standard output"), (2, "standard error"))


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)  # follows links, /proc's /dev/fd/N ones too
    except (OSError, ValueError):
        return None


def _same_file(a: str, b: str) -> bool:
    """Whether `a` and `b` are one file: one inode where both exist (symlinks, hard links and
    bind mounts included), else one path once links are resolved."""
    sa, sb = _stat(a), _stat(b)
    if sa is not None and sb is not None:
        return os.path.samestat(sa, sb)
    return os.path.realpath(a) == os.path.realpath(b)


def check_paths(outputs: Sequence[tuple[str, str]], inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse, before a run, an output that would destroy what the run reads or prints. Each is
    (what names it, path): an output may not be this process's standard output or error, an
    existing file that is not a regular one (a device: the run would put a new file in its place),
    an input, or another output."""
    for i, (flag, path) in enumerate(outputs):
        st = _stat(path)
        for fd, stream in _STREAMS:
            try:
                same = st is not None and os.path.samestat(st, os.fstat(fd))
            except OSError:  # the stream is closed
                same = False
            if same:
                hint = " (--json - writes the JSON there and the tables to standard error)" if fd == 1 else ""
                raise ValueError(
                    f"{flag} {path!r} is this process's {stream}: writing it would replace what the run prints{hint}"
                )
        if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{flag} {path!r} is not a regular file (a device, pipe or socket)")
        for in_flag, in_path in inputs:
            if _same_file(path, in_path):
                raise ValueError(f"{flag} {path!r} is the same file as {in_flag} {in_path!r}: it would be overwritten")
        for other_flag, other in outputs[:i]:
            if _same_file(path, other):
                raise ValueError(f"{other_flag} {other!r} and {flag} {path!r} name the same file")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Save and close `fig`; the file appears whole or not at all (written aside, then renamed)."""
    from gpt_spec.formats.atomic import atomic_write

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
    from gpt_spec.formats.atomic import atomic_write

    text = json_text(data)  # serialised first: a failure leaves no file
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what="JSON")
