"""`gpt-parity`: run the parity check or the benchmark from the shell.

Exit status: 0 when every comparison passes, 1 when one fails, 2 for bad arguments (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gpt_spec import GPTConfig, resolve_config

from . import bench, harness


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser, seq_default: int) -> None:
    p.add_argument("--config", default="gpt2-small",
                   help="a preset (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl) or a JSON file "
                        "with the book's keys (default: gpt2-small)")
    p.add_argument("--model", default="dummy", choices=sorted(harness.MODELS),
                   help="which model of the book to build (default: dummy)")
    p.add_argument("--final-norm", default="dummy", choices=["dummy", "layernorm"],
                   help="the dummy model's final norm: the book's placeholder or a real LayerNorm")
    p.add_argument("--drop-rate", type=float, default=None, help="override the config's drop_rate")
    p.add_argument("--batch", type=_positive, default=2, help="batch size (default: 2)")
    p.add_argument("--seq", type=_positive, default=None,
                   help=f"sequence length (default: {seq_default}, at most context_length)")
    p.add_argument("--seed", type=_non_negative, default=0, help="seed for weights and token ids")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr and exit status 2: no usage dump, no traceback."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpt-parity",
        description="Check and benchmark the PyTorch and Flax NNX twins of the chapter-4 GPT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser("check", help="copy weights both ways and compare logits on every backend")
    _add_model_args(check, seq_default=128)
    check.add_argument("--mode", default="eval", choices=harness.MODES,
                       help="eval (dropout off) or train (needs --drop-rate 0)")
    b = sub.add_parser("bench", help="time the jitted Flax forward against torch eager and torch.compile")
    _add_model_args(b, seq_default=128)
    b.add_argument("--repeats", type=_positive, default=5, help="timed calls per backend (default: 5)")
    b.add_argument("--warmup", type=_non_negative, default=1, help="untimed calls after the first")
    b.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[GPTConfig, int]:
    try:
        cfg = resolve_config(args.config)
        if args.drop_rate is not None:
            cfg = cfg.replace(drop_rate=args.drop_rate)
    except ValueError as e:
        parser.error(str(e))
    seq = args.seq if args.seq is not None else min(128, cfg.context_length)
    if seq > cfg.context_length:
        parser.error(f"--seq {seq} exceeds context_length {cfg.context_length}")
    return cfg, seq


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, seq = _config(args, parser)
    if args.command == "check":
        if args.mode == "train" and cfg.drop_rate != 0:
            parser.error("--mode train compares the twins at drop_rate 0; add --drop-rate 0")
        report = harness.run_parity(
            cfg, model=args.model, batch=args.batch, seq=seq, seed=args.seed, mode=args.mode,
            options={"final_norm": args.final_norm}, progress=not args.quiet,
        )
        print(f"{args.model} model, {args.config}, {args.mode} mode, batch {args.batch} x {seq} "
              f"tokens, matmuls {report.precision}")
        print(report.format_table())
        print("PASS" if report.passed else "FAIL")
        if args.json:
            report.write_json(args.json)
        return 0 if report.passed else 1
    backends = tuple(b for b in bench.BACKENDS if not (args.no_compile and b == "torch-compile"))
    report = bench.run_bench(
        cfg, model=args.model, batch=args.batch, seq=seq, repeats=args.repeats,
        warmup=args.warmup, backends=backends, seed=args.seed,
        options={"final_norm": args.final_norm}, progress=not args.quiet,
    )
    print(report.format_table())
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
