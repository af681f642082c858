"""How the engine reports its slow steps, without drawing them: each `run_*` takes a `Progress`
factory (called with the number of steps) and the CLI passes one that draws; the default is silent.

A step may name the phase it belongs to (the ten AdamW steps of a training check, say): a renderer
writing to a log shows one line per phase, a live terminal one per step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Status = Callable[[str], None]


class Steps(Protocol):
    def step(self, what: str, *, phase: str | None = None) -> contextlib.AbstractContextManager[Status]: ...


Progress = Callable[[int], Steps]


class _Silent:
    @contextlib.contextmanager
    def step(self, what: str, *, phase: str | None = None) -> Iterator[Status]:
        yield lambda status: None


def silent(total: int) -> Steps:
    """The default progress: nothing is shown."""
    return _Silent()
