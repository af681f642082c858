"""`gpt-parity parallel`: both twins trained on their own distributed engines, each strategy held to
one device and to the other twin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt_spec.config import resolve_config
from parity_tests import parallel
from parity_tests.parallel_spec import DIST_BY_NAME, DIST_MUTANTS, DROPOUT_MODES, STRATEGIES, ParallelSpec

from .. import reports
from ..common import JSON_HELP, positive, seed_arg, write_outputs
from ..interrupt import also_on_interrupt
from ..render import format_table, progress


def strategy_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    bad = [n for n in names if n not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown strategy {bad[0]!r}; expected some of {', '.join(STRATEGIES)}")
    return tuple(dict.fromkeys(names))


def dist_plant_arg(text: str) -> tuple[str, str]:
    name, _, twin = text.partition("@")
    twin = twin or "flax"
    if name not in DIST_BY_NAME:
        raise argparse.ArgumentTypeError(f"unknown distributed mutant {name!r}; known: {', '.join(DIST_BY_NAME)}")
    if twin not in parallel.TWINS:
        raise argparse.ArgumentTypeError(f"unknown twin {twin!r} in {text!r}; expected torch or flax")
    return name, twin


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "parallel",
        help="train both twins on their own distributed engines (torch DDP, FSDP2, tensor parallel; "
        "JAX across processes) and hold each strategy to one device and to the other twin",
    )
    p.add_argument(
        "--config", help="a preset or a JSON file with the book's keys, e.g. examples/tiny-mesh.json (required)"
    )
    p.add_argument("--world-size", type=positive, default=2, help="ranks (torch) and devices (Flax) (default: 2)")
    p.add_argument(
        "--strategies",
        type=strategy_list,
        default=STRATEGIES,
        metavar="S[,S...]",
        help=f"some of {', '.join(STRATEGIES)} (default: all)",
    )
    p.add_argument("--train-steps", type=positive, default=3, help="AdamW steps of each run (default: 3)")
    p.add_argument("--batch", type=positive, default=8, help="the global batch, split over data-parallel ranks")
    p.add_argument("--seq", type=positive, default=8, help="tokens per row (at most context_length; default: 8)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the initial weights and the batches")
    p.add_argument(
        "--dropout",
        default="off",
        choices=list(DROPOUT_MODES),
        help="off: drop rate 0 (default); parity: the config's rate (0.1 if it has none), masks by global index",
    )
    p.add_argument(
        "--flax-processes",
        type=positive,
        default=2,
        help="JAX processes joined by jax.distributed, world-size/N CPU devices each (default: 2)",
    )
    p.add_argument(
        "--timeout",
        type=positive,
        default=120,
        metavar="S",
        help="seconds a collective may wait for a missing rank (process group, JAX coordinator) (default: 120)",
    )
    p.add_argument(
        "--plant",
        type=dist_plant_arg,
        default=None,
        metavar="MUTANT@TWIN",
        help=f"plant a distributed bug in one twin's ranks: {', '.join(DIST_BY_NAME)} (twin default: flax)",
    )
    p.add_argument("--list", action="store_true", help="list the distributed mutants and exit")
    p.add_argument("--json", metavar="PATH", help=JSON_HELP)
    p.add_argument("--plot", metavar="PNG", help="save each comparison's margins and the state per rank as a plot")
    p.add_argument("--keep", metavar="DIR", help="keep the ranks' results and logs in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list:
        rows = [[m.name, ",".join(m.strategies), m.bug] for m in DIST_MUTANTS]
        print(format_table(["mutant", "strategies", "bug"], rows))
        return 0
    if args.config is None:
        parser.error("parallel needs --config (a preset or a JSON file, e.g. examples/tiny-mesh.json)")
    cfg = resolve_config(args.config)
    name, twin = args.plant if args.plant else (None, None)
    spec = ParallelSpec(
        cfg.to_dict(),
        args.world_size,
        args.strategies,
        steps=args.train_steps,
        batch=args.batch,
        seq=args.seq,
        seed=args.seed,
        dropout=args.dropout,
        plant=name,
        timeout_s=float(args.timeout),
        flax_processes=min(args.flax_processes, args.world_size),
    )
    parallel.check_spec(spec)  # a ValueError: one line, exit 2
    with also_on_interrupt(parallel.abandon):  # the ranks run in sessions of their own
        report = parallel.run_parallel_parity(
            spec, plant_twin=twin, progress=progress(args.quiet), keep=Path(args.keep) if args.keep else None
        )
    planted = f", {name} planted in {twin}" if name else ""
    print(
        f"{args.config}: world size {spec.world} (torch: {spec.world} ranks; flax: {spec.flax_processes} processes x "
        f"{spec.world // spec.flax_processes} devices), {spec.steps} AdamW steps, batch {spec.batch} x {spec.seq}, "
        f"dropout {spec.dropout}{planted}"
    )
    if report.failure is not None:
        print(f"FAIL: {report.failure}", file=sys.stderr)
        write_outputs(args, report.to_json())
        return 1
    print(reports.parallel_table(report))
    for note in report.notes:
        print(f"note: {note}")
    write_outputs(args, report.to_json(), lambda path: reports.plot_parallel(report, path))
    for row in report.rows:
        if not row.passed:
            print(f"FAIL: {row.strategy}, {row.label}: {row.first_failure} past its bound")
    print("PASS: every strategy is the one-device run, in both twins" if report.passed else "FAIL")
    return 0 if report.passed else 1
