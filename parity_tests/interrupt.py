"""Ctrl-C in `gpt-parity`: one line on stderr, exit status 130, no partial output, never a verdict.

Letting KeyboardInterrupt unwind through JAX and torch is what went wrong before: a traceback of
20-200 lines, a segfault when the interrupt landed while XLA compiled (the signal interrupted one
of XLA's threads, or the unwinding tore down a half-built executable), and once an interrupt raised
inside a weakref callback, where Python prints "Exception ignored" and carries on to print PASS.

So nothing unwinds. While a command runs, SIGINT is blocked in the main thread and in every thread
started after (XLA's, torch's), and one watcher thread waits for it with `sigtimedwait`; the
watcher deletes this process's temporary output files (see `gpt_spec.atomic_write`: finished
outputs appear by rename, so an interrupted one leaves nothing) and ends the process with
`os._exit(130)` at once, even in the middle of a compilation. Threads started before the block
(none in the CLI, but a library could) may still take the signal: a Python-level handler doing the
same covers that path, and platforms without `pthread_sigmask`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from .output import silence_progress

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's status for a process ended by Ctrl-C
_POLL_S = 0.1  # how often the watcher looks whether the command has finished


def _temporaries(outputs: Sequence[str]) -> list[str]:
    """This process's unfinished outputs: atomic_write's `.NAME.PID.*.partial` beside each path,
    and inside a folder output (an HF snapshot's files)."""
    found = []
    for path in map(os.path.realpath, outputs):
        beside = os.path.join(glob.escape(os.path.dirname(path)), f".{glob.escape(os.path.basename(path))}")
        inside = os.path.join(glob.escape(path), ".*")
        for prefix in (beside, inside):
            found += glob.glob(f"{prefix}.{os.getpid()}.*.partial")
    return found


def _die(prog: str, outputs: Sequence[str]) -> None:
    for tmp in _temporaries(outputs):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    with contextlib.suppress(Exception):
        sys.stdout.flush()  # what was printed before stays printed; no verdict was
    silence_progress()  # a live progress line is cleared, the cursor shown, and nothing drawn after
    # os.write, not print: the main thread may be inside a buffered write to stderr.
    os.write(2, f"{prog}: interrupted; nothing more was written (exit {EXIT_INTERRUPTED})\n".encode())
    os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def exit_on_interrupt(prog: str, outputs: Sequence[str] = ()) -> Iterator[None]:
    """Within the block, Ctrl-C ends the process at once as the module docstring says; `outputs`
    are the paths the command may write. Outside the block, SIGINT behaves as before it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; a caller on another thread keeps its own
        return
    outputs = [os.fspath(p) for p in outputs]
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _die(prog, outputs))
    blocking = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigtimedwait")
    done = threading.Event()
    watcher = None
    if blocking:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

        def watch() -> None:
            while not done.is_set():
                if signal.sigtimedwait({signal.SIGINT}, _POLL_S) is not None:
                    _die(prog, outputs)

        watcher = threading.Thread(target=watch, name="gpt-parity-interrupt", daemon=True)
        watcher.start()
    try:
        yield
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
            # A SIGINT still pending is delivered here, to the handler above: it was an interrupt.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)
