"""`gpt-parity`'s entry point: Ctrl-C is handled from its first instructions, before the seconds
spent importing jax and torch, which would otherwise end in a KeyboardInterrupt traceback."""

from __future__ import annotations

import sys

from .interrupt import guard_startup, ignore_late_interrupts  # the standard library only

PROG = "gpt-parity"
# What the `parity` extra installs beyond the core; a core-only or one-twin install lacks some.
PARITY_EXTRA = ("torch", "jax", "flax", "optax", "rich", "matplotlib")


def main() -> int:
    """The console script: this process's command line, run by parity_cli.main.main."""
    guard_startup(PROG)
    try:
        try:
            from .main import main as run
        except ModuleNotFoundError as e:
            missing = (e.name or "").partition(".")[0]
            if missing not in PARITY_EXTRA:
                raise
            print(
                f"{PROG}: needs both twins and the suite (no module {missing!r}): pip install 'gpt-twins[parity]'",
                file=sys.stderr,
            )
            return 2
        return run()
    finally:
        ignore_late_interrupts()  # the command has ended: nothing is left to interrupt


if __name__ == "__main__":
    sys.exit(main())
