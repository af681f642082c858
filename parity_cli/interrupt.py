"""Ctrl-C in `gpt-parity`: one line on stderr, exit status 130, no partial output, never a verdict.

Letting KeyboardInterrupt unwind through JAX and torch is what went wrong before: a traceback of
20-200 lines, a segfault when the interrupt landed while XLA compiled (the signal interrupted one
of XLA's threads, or the unwinding tore down a half-built executable), and once an interrupt raised
inside a weakref callback, where Python prints "Exception ignored" and carries on to print PASS.

So nothing unwinds. SIGINT is blocked in the main thread and so in every thread started after
(XLA's, torch's, the BLAS pool's), and one watcher thread waits for it (`sigwait`) and acts at
once, even in the middle of a compilation. The entry point (`guard_startup`) does this first thing,
before the heavy imports start those pools: until the command runs, Ctrl-C ends the process with
the one line. While it runs (`exit_on_interrupt`), the watcher deletes this process's temporary
output files (see `gpt_spec.formats.atomic`: finished outputs appear by rename, so an interrupted one
leaves nothing), the scratch files and the folders the command created, names the outputs it had
finished, and ends the process with `os._exit(130)`. Once the command has returned, its outputs and
verdict stand: a Ctrl-C does nothing, through interpreter shutdown too, where it would only print a
traceback or kill the process unexplained.

Called in a process not guarded so (the tests call `main` in-process), the block blocks SIGINT and
runs a watcher of its own, and puts SIGINT back as it was after; a thread started before the block
may then take the signal, which a Python-level handler doing the same covers (late, if the main
thread is in a long call), as it covers platforms without `pthread_sigmask`.

This module imports only the standard library, so that the entry point can use it first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's status for a process ended by Ctrl-C
_POLL_S = 0.1  # how often the watcher looks whether the command has finished


def _message(prog: str, written: Sequence[str] = ()) -> bytes:
    done = f" after writing {', '.join(map(repr, written))}" if written else ""
    return f"{prog}: interrupted{done}; nothing more was written (exit {EXIT_INTERRUPTED})\n".encode()


def _end(prog: str, written: Sequence[str] = ()) -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()  # what was printed before stays printed; no verdict was
    # os.write, not print: the main thread may be inside a buffered write to stderr.
    with contextlib.suppress(OSError):
        os.write(2, _message(prog, written))
    os._exit(EXIT_INTERRUPTED)


# In a process guarded from its start (guard_startup): what a SIGINT does now. None: nothing, the
# command has ended. The one watcher thread calls it, whatever the main thread is doing.
_action: Callable[[], None] | None = None
_guarded = False
# What a Ctrl-C does first, before the process ends without unwinding (see also_on_interrupt).
_first: list[Callable[[], None]] = []


@contextlib.contextmanager
def also_on_interrupt(action: Callable[[], None]) -> Iterator[None]:
    """Within the block, a Ctrl-C that ends the process runs `action` first: what no `finally` would
    get to do (stop child processes, delete their folders)."""
    _first.append(action)
    try:
        yield
    finally:
        _first.remove(action)


def _on_interrupt() -> None:
    action = _action
    if action is not None:
        action()


def guard_startup(prog: str) -> None:
    """Guard this whole process, from before its heavy imports: SIGINT blocked in the main thread,
    so in every thread started after (the BLAS, XLA and torch pools those imports start included),
    and one watcher thread that takes it. Until a command's own guard (exit_on_interrupt), Ctrl-C
    ends the process with the one line: nothing has been written yet."""
    global _action, _guarded
    _action = lambda: _end(prog)  # noqa: E731 - swapped by exit_on_interrupt
    signal.signal(signal.SIGINT, lambda signum, frame: _on_interrupt())  # where signals cannot be blocked
    if not (hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwait")):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def watch() -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            try:
                _on_interrupt()
            except BaseException:  # the one way Ctrl-C ends this process: a failure must end it too
                _end(prog)

    threading.Thread(target=watch, name="gpt-parity-interrupt", daemon=True).start()
    _guarded = True


def ignore_late_interrupts() -> None:
    """For a process whose command has ended: SIGINT does nothing through interpreter shutdown
    (Python restores the default action for a Python-level handler as it finalizes; SIG_IGN it
    keeps), since the outputs and the verdict are complete."""
    global _action
    _action = None
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def missing_folders(path: str) -> list[str]:
    """The folders that creating folder `path` (with its parents) would create, deepest first."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing


def _temporaries(paths: Sequence[str]) -> list[str]:
    """This process's unfinished outputs: atomic_write's `.NAME.PID.*.partial` beside each path,
    and inside a folder (an HF snapshot's files)."""
    found = []
    for path in map(os.path.realpath, paths):
        beside = os.path.join(glob.escape(os.path.dirname(path)), f".{glob.escape(os.path.basename(path))}")
        inside = os.path.join(glob.escape(path), ".*")
        for prefix in (beside, inside):
            found += glob.glob(f"{prefix}.{os.getpid()}.*.partial")
    return found


@dataclasses.dataclass
class _Cleanup:
    """What a command leaves if it ends early, recorded when it starts."""

    outputs: list[str]  # written whole or not at all; those finished are kept and named
    before: dict[str, tuple[int, int, int, int] | None]  # each output's identity at the start
    folders: list[str]  # folders the command may create, missing at the start, deepest first
    scratch: list[str]  # files and folders the command creates and deletes itself, missing at the start

    @classmethod
    def start(cls, outputs: Sequence[str], folders: Sequence[str], scratch: Sequence[str]) -> _Cleanup:
        outputs = [os.fspath(p) for p in outputs]
        created = sorted({os.path.abspath(f) for f in folders if not os.path.lexists(f)}, key=len, reverse=True)
        return cls(
            outputs,
            {p: _identity(p) for p in outputs},
            created,
            [os.fspath(p) for p in scratch if not os.path.lexists(p)],
        )

    def written(self) -> list[str]:
        """The outputs this command finished: a file that was not there, or another inode (a
        rename put it in place) or another modification than at the start."""
        return [p for p in self.outputs if _identity(p) not in (None, self.before[p])]

    def remove_leftovers(self) -> None:
        """Temporaries, scratch and the folders the command created if that leaves them empty:
        never a finished output, and never a folder that holds anything else."""
        for tmp in _temporaries([*self.outputs, *self.scratch]):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for path in self.scratch:
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        for folder in self.folders:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


@contextlib.contextmanager
def exit_on_interrupt(
    prog: str,
    outputs: Sequence[str] = (),
    *,
    folders: Sequence[str] = (),
    scratch: Sequence[str] = (),
    process: bool = False,
) -> Iterator[None]:
    """Within the block, Ctrl-C ends the process at once as the module docstring says. `outputs`
    are the files the command may write, `folders` those it may create (removed again if a Ctrl-C
    or a refusal, any exception out of the block, leaves them empty), `scratch` what it creates
    and deletes itself (removed on either). Outside the block, SIGINT behaves as before it; with
    `process` (the command is the whole process, which exits next), it is ignored after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; a caller on another thread keeps its own
        return
    from .render import silence_progress  # here, not in the handler: an import there could deadlock

    cleanup = _Cleanup.start(outputs, folders, scratch)

    def die() -> None:
        for action in list(_first):
            with contextlib.suppress(Exception):
                action()
        with contextlib.suppress(Exception):  # whatever is left behind, the process ends
            cleanup.remove_leftovers()
        with contextlib.suppress(Exception):
            silence_progress()  # a live progress line is cleared, the cursor shown, and nothing drawn after
        _end(prog, cleanup.written())

    stop = _take_over(die, process) if _guarded else _watch(die, process)
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            cleanup.remove_leftovers()  # a refusal or a failure: nothing of this run is left but whole outputs
        raise
    finally:
        stop()


def _take_over(die: Callable[[], None], process: bool) -> Callable[[], None]:
    """Where guard_startup's watcher takes every SIGINT: `die` is what it does until stop()."""
    global _action
    saved, _action = _action, die

    def stop() -> None:
        global _action
        # Once the command has returned, its outputs and verdict stand: a SIGINT does nothing.
        _action = None if process else saved
        if process:
            ignore_late_interrupts()

    return stop


def _watch(die: Callable[[], None], process: bool) -> Callable[[], None]:
    """A watcher of the block's own (for callers in a process not guarded from its start): `die`
    on a SIGINT until stop(), which puts SIGINT's handling back as it was (or ignores it)."""
    done = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: die())
    blocking = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigtimedwait")
    watcher = None
    if blocking:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

        def watch() -> None:
            while not done.is_set():
                # Once the command has returned, its outputs and verdict stand: the signal is dropped.
                if signal.sigtimedwait({signal.SIGINT}, _POLL_S) is not None and not done.is_set():
                    die()

        watcher = threading.Thread(target=watch, name="gpt-parity-interrupt", daemon=True)
        watcher.start()

    def stop() -> None:
        done.set()
        if watcher is not None:
            watcher.join()
        if process:
            # Ignored before unblocking: a SIGINT pending since the command returned is discarded.
            ignore_late_interrupts()
        else:
            # A SIGINT pending since the command returned goes to the caller's own handler.
            signal.signal(signal.SIGINT, previous)
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    return stop
