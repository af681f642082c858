"""What the suite writes: plain-text tables for the terminal, progress lines on stderr for
anything slow, and JSON for machines (with the versions that produced it)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: object) -> str:
    if not isinstance(v, float):
        return str(v)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v == 0 or abs(v) >= 0.01:
        return f"{v:.4g}"
    return f"{v:.2e}"


class Progress:
    """`[i/n] what ... done in 1.2s` lines on stderr, so stdout stays a clean table."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled

    def step(self, what: str):
        return _Step(self, what)


class _Step:
    def __init__(self, progress: Progress, what: str):
        self.progress = progress
        self.what = what

    def __enter__(self):
        p = self.progress
        p.done += 1
        self.t0 = time.perf_counter()
        if p.enabled:
            print(f"[{p.done}/{p.total}] {self.what} ...", file=p.stream, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        p = self.progress
        if p.enabled and exc_type is None:
            print(f"[{p.done}/{p.total}] {self.what}: done in {time.perf_counter() - self.t0:.1f}s",
                  file=p.stream, flush=True)
        return False


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
            raise ValueError(f"{flag} {path!r}: the file name must end in one of "
                             f"{', '.join('.' + f for f in sorted(formats))}")


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


def write_json(data: dict[str, Any], path: str) -> None:
    """Indented JSON; the file appears whole or not at all (written aside, then renamed)."""
    from gpt_spec.checkpoint import atomic_write

    text = json.dumps(data, indent=2) + "\n"  # serialised first: a failure leaves no file
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

