"""What the subcommands share: argument types and groups, the model a command's arguments resolve
to, and how a report reaches the terminal, its JSON and its plot."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from gpt_spec import FinalNorm, GPTConfig, ModelClass, ModelKind
from gpt_spec.checks import DTYPES
from gpt_spec.config import resolve_config
from parity_tests import twins, zoo

from .render import (
    STDOUT,
    json_text,
    write_json,
)


class Parser(argparse.ArgumentParser):
    """Errors as one line on stderr and exit status 2: no usage dump, no traceback."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(minimum: int):
    word = "positive" if minimum == 1 else "non-negative"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {word} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {word} integer, got {value}")
        return value

    return parse


positive, non_negative = _int_at_least(1), _int_at_least(0)


SEED_MAX = 2**63 - 1  # jax.random.key takes a C long; torch.manual_seed and numpy take more


def seed_arg(text: str) -> int:
    value = non_negative(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {value}")
    return value


def positive_list(text: str) -> list[int]:
    """`4` or `1,4,8`: positive integers, for a benchmark grid."""
    return [positive(part.strip()) for part in text.split(",")]


def dtype_list(text: str) -> list[str]:
    dtypes = [part.strip() for part in text.split(",")]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"expected dtypes from {', '.join(DTYPES)}, got {bad[0]!r}")
    return dtypes


def config_and_seq(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GPTConfig:
    """--config (a preset or a JSON file; default gpt2-small) for commands without the model
    arguments, with --seq held to its context; a bad one refused in one line."""
    try:
        cfg = resolve_config(args.config or "gpt2-small")
    except ValueError as e:
        parser.error(str(e))
    if args.seq is not None and args.seq > cfg.context_length:
        parser.error(f"--seq {args.seq} exceeds context_length {cfg.context_length}")
    return cfg


def names_from(known: Collection[str], what: str, hint: str | None = None) -> Callable[[str], list[str]]:
    """An argparse type for NAME[,NAME...] of `known` names; an unknown one is refused naming them
    (or with `hint`, where the list is long)."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",")]
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {bad[0]!r}; {hint or f'known {what}s: ' + ', '.join(known)}"
            )
        return names

    return parse


mutant_list = names_from(zoo.BY_NAME, "mutant", "`gpt-parity mutants --list` names them")


def plant_arg(text: str) -> tuple[str, str]:
    name, _, twin = text.partition("@")
    twin = twin or "flax"
    if name not in zoo.BY_NAME:
        raise argparse.ArgumentTypeError(f"unknown mutant {name!r}; `gpt-parity mutants --list` names them")
    if twin not in zoo.TWINS:
        raise argparse.ArgumentTypeError(f"unknown twin {twin!r} in {text!r}; expected torch or flax")
    return name, twin


JSON_HELP = (
    "also write the results as JSON to PATH (null where a figure is NaN or infinite); - writes it to "
    "standard output instead of the tables, which then go to standard error"
)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--matmul-precision",
        default="float32",
        choices=twins.MATMUL_PRECISIONS,
        help="float32 pins full-precision matmuls in both twins (default); default leaves "
        "each framework's own (JAX: TF32 on NVIDIA GPUs, bfloat16 passes on TPUs)",
    )


def add_model_args(p: argparse.ArgumentParser, *, batch: bool = True, grid: bool = False) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="a preset (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl) or a JSON file "
        "with the book's keys (default: gpt2-small)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="weights (and config) from a file: canonical or HF GPT-2 safetensors, an HF "
        "snapshot directory, or the book's torch.save model.pth",
    )
    p.add_argument(
        "--n-heads",
        type=positive,
        default=None,
        metavar="N",
        help="the head count of a --checkpoint that does not record it",
    )
    p.add_argument(
        "--model",
        default=None,
        choices=list(ModelKind),
        help="the full GPTModel of §4.6 or the §4.1 DummyGPTModel (default: gpt, or what --checkpoint holds)",
    )
    p.add_argument(
        "--final-norm",
        choices=list(FinalNorm),
        help="the dummy model's final norm: the book's placeholder (default) or a LayerNorm",
    )
    p.add_argument("--drop-rate", type=float, default=None, help="override the config's drop_rate")
    if grid:
        p.add_argument(
            "--batch",
            type=positive_list,
            default=[4],
            metavar="B[,B...]",
            help="batch sizes of the grid (default: 4)",
        )
        p.add_argument(
            "--seq",
            type=positive_list,
            default=None,
            metavar="T[,T...]",
            help="sequence lengths of the grid (default: 256, at most context_length)",
        )
    elif batch:
        p.add_argument("--batch", type=positive, default=2, help="batch size (default: 2)")
        p.add_argument(
            "--seq",
            type=positive,
            default=None,
            help="sequence length (default: 128, at most context_length)",
        )
    p.add_argument("--seed", type=seed_arg, default=0, help="seed for weights and token ids")
    if batch:
        p.add_argument(
            "--mesh",
            metavar="DxM[,DxM...]",
            help="also run the Flax twin sharded on (data x model) device meshes, e.g. 2x4",
        )
        p.add_argument(
            "--cpu-devices",
            type=positive,
            metavar="N",
            help="simulate N CPU devices (for --mesh on a machine without N accelerators)",
        )
    p.add_argument("--json", metavar="PATH", help=JSON_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


@dataclasses.dataclass
class Setup:
    """What the model arguments resolve to: a config, which model, and weights if a file gave them."""

    cfg: GPTConfig
    label: str
    model: str
    options: dict
    weights: Mapping[str, np.ndarray] | None = None
    meshes: list[str] = dataclasses.field(default_factory=list)


def setup_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Setup:
    if args.n_heads is not None and not args.checkpoint:
        parser.error("--n-heads applies to --checkpoint only")
    try:
        if args.checkpoint:
            override = resolve_config(args.config) if args.config else None
            ckpt = twins.read_checkpoint(args.checkpoint, config=override, n_heads=args.n_heads)
            setup = Setup(
                ckpt.config,
                f"{args.checkpoint} ({ckpt.layout})",
                ModelClass(ckpt.model).kind,
                dict(ckpt.options),
                ckpt.state_dict,
            )
            _agree_with_checkpoint(args, ckpt, parser)
        else:
            name = args.config or "gpt2-small"
            model = args.model or ModelKind.GPT
            if args.final_norm is not None and model != ModelKind.DUMMY:
                parser.error("--final-norm applies to --model dummy only")
            options = {"final_norm": args.final_norm} if args.final_norm else {}
            setup = Setup(resolve_config(name), name, model, options)
        if args.drop_rate is not None:
            setup.cfg = setup.cfg.replace(drop_rate=args.drop_rate)
    except ValueError as e:
        parser.error(str(e))
    if getattr(args, "train_steps", 0) and setup.model != ModelKind.GPT:
        parser.error("--train-steps needs --model gpt (the dummy model has blocks without weights)")
    seqs = getattr(args, "seq", None)
    for seq in seqs if isinstance(seqs, list) else [seqs]:
        if seq is not None and seq > setup.cfg.context_length:
            parser.error(f"--seq {seq} exceeds context_length {setup.cfg.context_length}")
    if getattr(args, "mesh", None):
        if setup.model != ModelKind.GPT:
            parser.error("--mesh needs --model gpt")
        if args.cpu_devices:
            import jax

            try:  # JAX fixes its device count when its backends start
                jax.config.update("jax_num_cpu_devices", args.cpu_devices)
            except RuntimeError:
                if len(jax.devices("cpu")) != args.cpu_devices:
                    parser.error(
                        f"--cpu-devices {args.cpu_devices}: JAX has already started with "
                        f"{len(jax.devices('cpu'))} CPU device(s) in this process"
                    )
        from gpt_flax.sharding import make_mesh

        setup.meshes = [m.strip() for m in args.mesh.split(",")]
        try:
            for text in setup.meshes:
                make_mesh(text)
        except ValueError as e:
            parser.error(str(e))
    elif getattr(args, "cpu_devices", None):
        parser.error("--cpu-devices goes with --mesh")
    return setup


def _agree_with_checkpoint(args: argparse.Namespace, ckpt, parser: argparse.ArgumentParser) -> None:
    """--model and --final-norm describe the model a file holds: saying otherwise is refused, never
    silently overruled by the file (or the file by them)."""
    kind = ModelClass(ckpt.model).kind
    if args.model is not None and args.model != kind:
        parser.error(f"--model {args.model} contradicts --checkpoint {args.checkpoint}, which holds a {ckpt.model}")
    if args.final_norm is not None:
        if kind != ModelKind.DUMMY:
            parser.error(
                f"--final-norm applies to --model dummy only; --checkpoint {args.checkpoint} holds a {ckpt.model}"
            )
        held = ckpt.options.get("final_norm", FinalNorm.DUMMY)
        if args.final_norm != held:
            parser.error(
                f"--final-norm {args.final_norm} contradicts --checkpoint {args.checkpoint}, "
                f"whose DummyGPTModel has final_norm {held!r}"
            )


def emit(
    args: argparse.Namespace,
    report,
    table: Callable[[Any], str],
    plot: Callable[[Any, str], None],
) -> None:
    """A report's table on stdout, its JSON and plot where asked for."""
    print(table(report))
    write_outputs(args, report.to_json(), lambda path: plot(report, path))


def write_outputs(args: argparse.Namespace, data: dict, plot: Callable[[str], None] | None = None) -> None:
    """--json, then --plot: each appears whole or not at all, and one failing (a disk filling up:
    the paths were checked before the run) does not keep the other from being written."""
    errors = []
    if getattr(args, "json", None) == STDOUT:
        args.stdout.write(json_text(data))
        args.stdout.flush()
    elif getattr(args, "json", None):
        try:
            write_json(data, args.json)
        except ValueError as e:
            errors.append(str(e))
    if getattr(args, "plot", None) and plot is not None:
        try:
            plot(args.plot)
            print(f"plot written to {args.plot}")
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("; ".join(errors))
