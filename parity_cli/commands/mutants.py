"""`gpt-parity mutants`: plant each bug of the zoo in each twin and show that check catches it."""

from __future__ import annotations

import argparse

from parity_tests import decoding, zoo, zoo_training

from .. import reports
from ..common import JSON_HELP, add_precision_arg, config_and_seq, emit, mutant_list, names_from, positive, seed_arg
from ..render import (
    format_table,
    progress,
)


def kind(mutant: zoo.Mutant) -> str:
    """A mutant's kind as the command line names it: the evidence that sees it."""
    return mutant.shows_in.replace(" ", "-")


KINDS = tuple(dict.fromkeys(kind(m) for m in zoo.MUTANTS))


kind_list = names_from(KINDS, "kind")


def add_parser(sub) -> argparse.ArgumentParser:
    z = sub.add_parser(
        "mutants",
        help="plant each bug of the zoo in each twin in turn and show that check catches it where it was planted",
    )
    z.add_argument(
        "--config",
        default=None,
        help="a preset or a JSON file with the book's keys (default: gpt2-small)",
    )
    z.add_argument(
        "--mutant",
        type=mutant_list,
        default=None,
        metavar="NAME[,NAME...]",
        help="only these mutants (default: all)",
    )
    z.add_argument(
        "--kind",
        type=kind_list,
        default=None,
        metavar="KIND[,KIND...]",
        help=f"only the mutants of these kinds, the evidence that sees them: {', '.join(KINDS)} (default: all)",
    )
    z.add_argument(
        "--twin",
        default="both",
        choices=["torch", "flax", "both"],
        help="the twin to plant each bug in (default: both, in turn)",
    )
    z.add_argument(
        "--batch",
        type=positive,
        default=2,
        help="batch size of each check (default: 2, as check's)",
    )
    z.add_argument(
        "--seq",
        type=positive,
        default=None,
        help="sequence length (default: 128, at most context_length)",
    )
    z.add_argument("--seed", type=seed_arg, default=0, help="seed for weights and token ids")
    add_precision_arg(z)
    z.add_argument("--list", action="store_true", help="list the zoo and exit")
    z.add_argument("--json", metavar="PATH", help=JSON_HELP)
    z.add_argument(
        "--plot",
        metavar="PNG",
        help="save each mutant's margin at its first failure as a plot",
    )
    z.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return z


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list:
        print(
            format_table(
                ["mutant", "kind", "planted at", "the bug"],
                [(m.name, kind(m), m.where, m.bug) for m in zoo.MUTANTS],
            )
        )
        return 0
    cfg = config_and_seq(args, parser)
    chosen = [zoo.get(n) for n in args.mutant] if args.mutant else list(zoo.MUTANTS)
    if args.kind:
        chosen = [m for m in chosen if kind(m) in args.kind]
        if not chosen:
            parser.error(f"no mutant of --mutant is of kind {', '.join(args.kind)}")
    report = zoo.run_zoo(
        cfg,
        mutants=chosen,
        twins=zoo.TWINS if args.twin == "both" else (args.twin,),
        batch=args.batch,
        seq=args.seq,
        seed=args.seed,
        matmul_precision=args.matmul_precision,
        progress=progress(args.quiet),
    )
    print(
        f"{args.config or 'gpt2-small'}: the default check (whole forward and layer evidence, both "
        f"directions), batch {report.batch} x {report.seq} tokens, matmuls {report.precision}"
    )
    if any(m.shows_in == zoo_training.TRAINING for m in chosen):
        print(
            f"optimizer and loss mutants: loss, every gradient and {zoo_training.STEPS} AdamW steps "
            f"(check --train-steps {zoo_training.STEPS}), batch {report.batch} x {min(report.seq, 32)} tokens"
        )
    if any(m.shows_in == zoo.GENERATION for m in chosen):
        print(f"decoding mutants: the generation check, {decoding.setup_text()}; then unplanted on the same models")
    emit(args, report, reports.zoo_table, reports.plot_zoo)
    return 0 if report.passed else 1
