"""`gpt-parity`: check, benchmark and generate with the twins from the shell.

Exit status: 0 when every comparison passes, 1 when one fails, 2 for bad arguments (one line on
stderr, no traceback), 130 for Ctrl-C, 141 when standard output's reader went away (the run
finishes silently and writes its files). An output path that is an input, another output or
standard output is refused before the run; `--json -` is standard output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import bench as bench_command
from .commands import (
    check,
    convert,
    diagnose,
    diverge,
    generate,
    load_memory,
    mutants,
    parallel,
    power,
    precision,
    train,
)
from .common import Parser, setup_model
from .interrupt import exit_on_interrupt
from .plan import plan_outputs
from .render import EXIT_READER_GONE, STDOUT, guarded_streams

COMMANDS = {
    "check": check,
    "mutants": mutants,
    "bench": bench_command,
    "generate": generate,
    "convert": convert,
    "train": train,
    "diverge": diverge,
    "diagnose": diagnose,
    "power": power,
    "precision": precision,
    "load-memory": load_memory,
    "parallel": parallel,
}
# Commands that read a model from the shared model arguments (--config, --checkpoint, ...).
_WITH_MODEL = ("check", "bench", "generate", "diagnose", "precision")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpt-parity",
        description="Check, benchmark and generate with the PyTorch and Flax NNX twins of the chapter-4 GPT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 (pass), 1 (parity failed), 2 (bad input: one line on stderr), 130 (Ctrl-C:
    one line, nothing half-written, no verdict), 141 (standard output closed by its reader, as in
    `| head`: the run went on, silently, and wrote its files).

    `argv` None: the command line of this process, which exits when main returns."""
    parser = build_parser()
    args = parser.parse_args(argv)
    plan = plan_outputs(args, parser)
    process = argv is None
    with exit_on_interrupt(
        parser.prog,
        plan.outputs,
        folders=plan.folders,
        scratch=plan.scratch,
        process=process,
    ):
        with guarded_streams(json_to_stdout=getattr(args, "json", None) == STDOUT) as streams:
            args.stdout = streams.stdout
            status = _run(args, parser)
        return EXIT_READER_GONE if streams.reader_gone else status


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    command = COMMANDS[args.command]
    if args.command not in _WITH_MODEL:
        if args.command in ("convert", "train"):  # they refuse their own bad input
            return command.run(args, parser)
        try:
            return command.run(args, parser)
        except (ValueError, OSError) as e:
            parser.error(str(e))
    setup = setup_model(args, parser)
    try:
        return command.run(args, setup, parser)
    except (
        ValueError,
        OSError,
    ) as e:  # bad input found while running, e.g. a disk filling up
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
