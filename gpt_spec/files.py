"""Input files, checked before they are opened: every reader of this project's files (checkpoints,
configs, texts) calls check_input_file first."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def unsearchable(path: Path) -> Path:
    """The folder whose missing search permission hides `path`: the nearest one that can be reached."""
    for folder in path.parents:
        with contextlib.suppress(OSError):
            os.stat(folder)
            return folder
    return path.parent


def check_input_file(path: str | os.PathLike[str], what: str) -> None:
    """`path` is a regular file this process may read, or a ValueError naming it (`what` it is).
    Every reader of an input calls this before opening it: a FIFO would block the reader, deaf to
    Ctrl-C, until a writer came."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except PermissionError:
        folder = unsearchable(path)
        raise ValueError(
            f"{what} {str(path)!r} cannot be reached: folder {str(folder)!r} is not searchable (permission denied)"
        ) from None
    except OSError as e:  # a loop of symlinks, a name too long
        raise ValueError(f"cannot read {what} {str(path)!r}: {e.strerror}") from e
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
        raise ValueError(f"{what} {str(path)!r} is {kind}, not a regular file")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except PermissionError:
        raise ValueError(f"{what} {str(path)!r} is not readable (permission denied)") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e.strerror}") from e


__all__ = ["check_input_file", "unsearchable"]
