"""`gpt-parity`'s entry point: Ctrl-C is handled from its first instructions, before the seconds
spent importing jax and torch, which would otherwise end in a KeyboardInterrupt traceback."""

from __future__ import annotations

import sys

from .interrupt import guard_startup, ignore_late_interrupts  # the standard library only

PROG = "gpt-parity"


def main() -> int:
    """The console script: this process's command line, run by parity_cli.main.main."""
    guard_startup(PROG)
    try:
        from .main import main as run

        return run()
    finally:
        ignore_late_interrupts()  # the command has ended: nothing is left to interrupt


if __name__ == "__main__":
    sys.exit(main())
