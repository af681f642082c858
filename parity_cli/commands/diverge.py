"""`gpt-parity diverge`: where a two-twin chapter-5 run parts, and whether it is rounding or a defect."""

from __future__ import annotations

import argparse
import os

from parity_tests import diverge
from parity_tests.diverge import DivergeReport
from parity_tests.step_evidence import Evidence
from parity_tests.tolerances import train_loss_bound

from ..common import JSON_HELP, write_outputs
from ..render import format_table, progress
from .train import _text


def _steps(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        a, b = int(first), int(last if sep else first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B (steps from 0, A <= B) or one step, got {text!r}") from None
    if not 0 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected A-B with 0 <= A <= B, got {text!r}")
    return a, b


def add_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser(
        "diverge",
        help="replay a train run saved with --snapshot-every from the snapshot before it parts and say, step by "
        "step, whether the twins compute the step alike from the same state (rounding carried in) or not (a "
        "defect, named at its first tensor)",
    )
    d.add_argument("run", metavar="RUN", help="the --out folder of `gpt-parity train --snapshot-every K`")
    d.add_argument(
        "--steps",
        type=_steps,
        metavar="A-B",
        help="judge these steps (from 0) instead of those up to the run's first evidence past its bound "
        "(or, in a run within its bound, its largest jump in |Δ training loss|)",
    )
    d.add_argument("--text", metavar="PATH", help="the text the run trained on (default: the book's the-verdict.txt)")
    d.add_argument("--json", metavar="PATH", help=JSON_HELP)
    d.add_argument(
        "--brief",
        action="store_true",
        help="in the JSON, each step's evidence by kind (the closest to its bound, how many failed), not every tensor",
    )
    d.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return d


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """0: the twins compute every step judged alike; 1: a defect is named; 2: bad input."""
    if not os.path.isdir(args.run):
        parser.error(f"RUN {args.run!r} is not a folder: give the --out folder of a gpt-parity train run")
    try:
        text, _ = _text(args)
        report = diverge.diverge(args.run, text, steps=args.steps, progress=progress(args.quiet))
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if report.reason:
        print(f"{args.run}: {report.reason}")
    if report.defect is not None:
        print(f"replayed with the defect the run was trained with: {report.defect.describe()}")
    if report.steps:
        a, b = report.window
        judged = f"step {a}" if a == b else f"steps {a}-{b}"
        print(f"replayed from the snapshot at step {report.snapshot}; judged {judged}")
        print(diverge_table(report))
        if not report.reproduced:
            print("note: the replay's losses are not the recorded run's (another machine or version?)")
    print(report.verdict())
    write_outputs(args, report.to_json(tensors=not args.brief))
    return 1 if report.kind == "defect" else 0


def _judged(evidence: Evidence) -> str:
    failure = evidence.first_failure()
    if failure is not None:
        return f"PAST: {failure[0]}"
    name, margin = evidence.worst()
    return f"ok ({margin:.2g} of bound: {name})"


def diverge_table(report: DivergeReport) -> str:
    """Each replayed step: the runs' losses and weights, and the step judged from the same state
    (a defect shows here) and from each twin's own (where the runs' difference shows)."""
    rows = [
        [
            r.step,
            r.losses["torch"],
            r.losses["flax"],
            abs(r.losses["torch"] - r.losses["flax"]),
            train_loss_bound(r.step),
            r.own.differed["weights"],
            r.weights_after,
            _judged(r.same),
            _judged(r.own),
        ]
        for r in report.steps
    ]
    headers = ["step", "loss torch", "loss flax", "|Δ loss|", "bound", "|Δw| before", "|Δw| after"]
    return format_table([*headers, "from the same state", "from their own states"], rows)
