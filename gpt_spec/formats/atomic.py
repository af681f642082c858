"""Writing files safely: every output of this project is written beside its destination and renamed
into place only once whole, so an interrupted or failed write leaves the old file (if any) as it was
and no temporary behind. Destinations are checked before any work (a folder, a missing or
read-only folder is refused), so a long run never ends unable to write its result.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new empty file beside `target`, and its mode: created with 0666, so the mode is what the
    kernel's umask makes of it, as for a plain open() (reading the umask itself needs os.umask,
    which sets it for the whole process, XLA's and torch's threads included)."""
    while True:
        tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Temp files an earlier save to `target` left when it was killed (`.NAME.PID.*.partial` of a
    process that no longer runs); nobody else's files are touched."""
    for tmp in target.parent.glob(f".{target.name}.*.partial"):
        parts = tmp.name[len(target.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _check_folder(folder: Path, refusal: str) -> None:
    """`folder` exists, is a folder and this process may create files in it; else ValueError."""
    try:
        mode = os.stat(folder).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{refusal}: folder {str(folder)!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{refusal}: folder {str(folder)!r}: {e.strerror}") from e
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{refusal}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{refusal}: folder {str(folder)!r} is not writable")


def check_destination(path: str | os.PathLike[str], what: str) -> Path:
    """Where `path` will be written (a symlink followed), refused if it names a folder (one that
    exists, or any path ending in a separator), or if its folder is missing, not a folder, or not
    writable. The savers call this before any work, and so does `gpt-parity` for every path it
    will write, before it runs."""
    given = os.fspath(path)
    refusal = f"cannot write {what} {given!r}"
    if given.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        # realpath drops the separator: "xx/" would be written as a file xx
        raise ValueError(f"{refusal}: it ends in {given[-1]!r}, so it names a folder, not a file")
    target = Path(os.path.realpath(path))
    if os.path.isdir(target):
        raise ValueError(f"{refusal}: it is a directory")
    _check_folder(target.parent, refusal)
    return target


@contextlib.contextmanager
def naming(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """A failure inside as a ValueError naming the destination, keeping the underlying reason."""
    try:
        yield
    except OSError as e:  # EFBIG past a file-size limit, ENOSPC, EIO, ...
        raise ValueError(f"cannot write {what} {os.fspath(path)!r}: {e.strerror or e}") from e
    except Exception as e:  # safetensors' SafetensorError (its wording of the same), a bad read-back
        raise ValueError(f"cannot write {what} {os.fspath(path)!r}: {e}") from e


def atomic_write_all(outputs: Sequence[tuple[str | os.PathLike[str], Callable[[Path], object], str]]) -> list[Path]:
    """`(path, write, what)` each written to a temp file beside its path (`.NAME.PID.*.partial`),
    and renamed into place only once every one is written: a failure in any write leaves every
    old file as it was and no temp file behind."""
    targets = [check_destination(path, what) for path, _, what in outputs]
    temps: list[Path] = []
    try:
        for (path, write, what), target in zip(outputs, targets, strict=True):
            with naming(path, what):
                _remove_stale_temps(target)
                tmp, mode = _create_temp(target)
                temps.append(tmp)
                write(tmp)
                os.chmod(tmp, mode)  # writers that replace the file (safetensors: 0600) lose it
        for (path, _, what), tmp, target in zip(outputs, temps, targets, strict=True):
            with naming(path, what):
                os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return targets


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], what: str = "checkpoint") -> Path:
    """Run `write(tmp)` then rename tmp onto `path`: an interrupted or failed write leaves the old
    file (if any) as it was and no temp file. A symlinked `path` is written where it points; the
    file gets the mode a plain `open` would (0666 less the umask). A missing, non-folder or
    read-only folder is refused before `write` runs; every error is a ValueError naming the file."""
    return atomic_write_all([(path, write, what)])[0]


def folders_to_create(folder: Path, refusal: str) -> list[Path]:
    """The folders missing on the way to `folder`, deepest first; the nearest one that exists must
    be a writable folder."""
    missing, current = [], Path(os.path.abspath(folder))
    while not os.path.exists(current):
        missing.append(current)
        current = current.parent
    if not missing and not os.path.isdir(current):
        raise ValueError(f"{refusal}: it is a file")
    _check_folder(current, refusal)
    return missing


__all__ = ["atomic_write", "atomic_write_all", "check_destination", "folders_to_create", "naming"]
