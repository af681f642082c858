"""`gpt-parity load-memory`: peak resident memory of loading a checkpoint, against its size."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt_spec.config import resolve_config
from parity_tests.environment import versions

from .. import bench_reports
from ..common import JSON_HELP, write_outputs
from ..render import (
    progress,
)


def add_parser(sub) -> argparse.ArgumentParser:
    lm = sub.add_parser(
        "load-memory",
        help="peak resident memory of each twin loading a random checkpoint "
        "of a config's shape, against the file's size",
    )
    lm.add_argument("--config", default="gpt2-xl", help="a preset or JSON config (default: gpt2-xl)")
    lm.add_argument(
        "--dir",
        required=True,
        help="a folder with room for the checkpoint (6.2 GB for gpt2-xl)",
    )
    lm.add_argument(
        "--layout",
        default="canonical,hf",
        help="canonical, hf or both (default: canonical,hf)",
    )
    lm.add_argument("--json", metavar="PATH", help=JSON_HELP)
    lm.add_argument("--quiet", action="store_true", help="no progress lines")
    return lm


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from parity_bench import load_memory

    layouts = [x.strip() for x in args.layout.split(",")]
    if not layouts or any(x not in load_memory.LAYOUTS for x in layouts):
        parser.error(f"--layout takes {', '.join(load_memory.LAYOUTS)}, got {args.layout!r}")
    folder = Path(args.dir)
    if not folder.is_dir():
        parser.error(f"--dir {args.dir!r} is not a folder")
    report = load_memory.run(resolve_config(args.config), folder, layouts, progress=progress(args.quiet))
    print(bench_reports.load_memory_table(report))
    write_outputs(args, report | {"versions": versions()})
    worst = max(r["peak_over_file"] for r in report["rows"])
    print(f"worst peak RSS / file size: {worst:.2f} (limit {load_memory.PEAK_OVER_FILE})")
    return 0 if worst <= load_memory.PEAK_OVER_FILE else 1
