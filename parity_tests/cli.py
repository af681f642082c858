"""`gpt-parity`: check, benchmark and generate with the twins from the shell.

Exit status: 0 when every comparison passes, 1 when one fails, 2 for bad arguments (one line on
stderr, no traceback), 130 for Ctrl-C, 141 when standard output's reader went away (the run
finishes silently and writes its files). An output path that is an input, another output or
standard output is refused before the run; `--json -` is standard output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from gpt_spec import (
    DTYPES,
    DUMMY,
    DUMMY_NORM,
    FINAL_NORMS,
    GPT,
    GPT_MODEL,
    MODEL_CLASSES,
    MODEL_KINDS,
    PRESETS,
    GPTConfig,
    check_adamw,
    resolve_config,
)
from gpt_spec.checkpoint import HF_INDEX
from gpt_spec.config import read_json
from gpt_spec.files import check_input_file
from gpt_spec.randomness import check_seed
from gpt_spec.training import CHAPTER5

from . import bench, chapter5, forward, mesh, training, twins, zoo
from .interrupt import exit_on_interrupt, missing_folders
from .output import (
    EXIT_READER_GONE,
    STDOUT,
    check_output,
    check_paths,
    format_table,
    guarded_streams,
    json_text,
    versions,
    write_json,
)


class _Parser(argparse.ArgumentParser):
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


_positive, _non_negative = _int_at_least(1), _int_at_least(0)
SEED_MAX = 2**63 - 1  # jax.random.key takes a C long; torch.manual_seed and numpy take more


def _seed(text: str) -> int:
    value = _non_negative(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {value}")
    return value


def _positive_list(text: str) -> list[int]:
    """`4` or `1,4,8`: positive integers, for a benchmark grid."""
    return [_positive(part.strip()) for part in text.split(",")]


def _dtype_list(text: str) -> list[str]:
    dtypes = [part.strip() for part in text.split(",")]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"expected dtypes from {', '.join(DTYPES)}, got {bad[0]!r}")
    return dtypes


def _mutant_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    bad = [n for n in names if n not in zoo.BY_NAME]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mutant {bad[0]!r}; `gpt-parity mutants --list` names them")
    return names


def _plant(text: str) -> tuple[str, str]:
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


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--matmul-precision",
        default="float32",
        choices=twins.MATMUL_PRECISIONS,
        help="float32 pins full-precision matmuls in both twins (default); default leaves "
        "each framework's own (JAX: TF32 on NVIDIA GPUs, bfloat16 passes on TPUs)",
    )


def _add_model_args(p: argparse.ArgumentParser, *, batch: bool = True, grid: bool = False) -> None:
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
        type=_positive,
        default=None,
        metavar="N",
        help="the head count of a --checkpoint that does not record it",
    )
    p.add_argument(
        "--model",
        default=None,
        choices=list(MODEL_CLASSES),
        help="the full GPTModel of §4.6 or the §4.1 DummyGPTModel (default: gpt, or what --checkpoint holds)",
    )
    p.add_argument(
        "--final-norm",
        choices=list(FINAL_NORMS),
        help="the dummy model's final norm: the book's placeholder (default) or a LayerNorm",
    )
    p.add_argument("--drop-rate", type=float, default=None, help="override the config's drop_rate")
    if grid:
        p.add_argument(
            "--batch", type=_positive_list, default=[4], metavar="B[,B...]", help="batch sizes of the grid (default: 4)"
        )
        p.add_argument(
            "--seq",
            type=_positive_list,
            default=None,
            metavar="T[,T...]",
            help="sequence lengths of the grid (default: 256, at most context_length)",
        )
    elif batch:
        p.add_argument("--batch", type=_positive, default=2, help="batch size (default: 2)")
        p.add_argument(
            "--seq", type=_positive, default=None, help="sequence length (default: 128, at most context_length)"
        )
    p.add_argument("--seed", type=_seed, default=0, help="seed for weights and token ids")
    if batch:
        p.add_argument(
            "--mesh",
            metavar="DxM[,DxM...]",
            help="also run the Flax twin sharded on (data x model) device meshes, e.g. 2x4",
        )
        p.add_argument(
            "--cpu-devices",
            type=_positive,
            metavar="N",
            help="simulate N CPU devices (for --mesh on a machine without N accelerators)",
        )
    p.add_argument("--json", metavar="PATH", help=JSON_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpt-parity",
        description="Check, benchmark and generate with the PyTorch and Flax NNX twins of the chapter-4 GPT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    check = sub.add_parser(
        "check",
        help="copy weights both ways; compare every stage on every backend and "
        "every layer against float32's rounding envelope",
    )
    _add_model_args(check)
    check.add_argument(
        "--mode", default="eval", choices=twins.MODES, help="eval (dropout off) or train (needs --drop-rate 0)"
    )
    check.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="parameters and compute of both twins (default: float32); bfloat16 has its own bound",
    )
    check.add_argument("--layers", action="store_true", help="print max |Δ| of every stage")
    check.add_argument("--plot", metavar="PNG", help="save max |Δ| per stage as a log-scale plot")
    check.add_argument(
        "--train-steps",
        type=_non_negative,
        default=0,
        metavar="N",
        help="also compare loss, every gradient and N AdamW steps (default: 0)",
    )
    check.add_argument(
        "--no-layer-evidence",
        action="store_true",
        help="compare the whole forward only, not each layer on its own inputs and traps",
    )
    _add_precision_arg(check)
    check.add_argument(
        "--plant",
        type=_plant,
        metavar="MUTANT[@TWIN]",
        help="plant a bug of the zoo (`gpt-parity mutants --list`) in one twin "
        "(default: flax) for this check, to see what the suite says about it",
    )
    z = sub.add_parser(
        "mutants",
        help="plant each bug of the zoo in each twin in turn and show that check catches it where it was planted",
    )
    z.add_argument("--config", default=None, help="a preset or a JSON file with the book's keys (default: gpt2-small)")
    z.add_argument(
        "--mutant", type=_mutant_list, default=None, metavar="NAME[,NAME...]", help="only these mutants (default: all)"
    )
    z.add_argument(
        "--twin",
        default="both",
        choices=["torch", "flax", "both"],
        help="the twin to plant each bug in (default: both, in turn)",
    )
    z.add_argument("--batch", type=_positive, default=2, help="batch size of each check (default: 2, as check's)")
    z.add_argument("--seq", type=_positive, default=None, help="sequence length (default: 128, at most context_length)")
    z.add_argument("--seed", type=_seed, default=0, help="seed for weights and token ids")
    _add_precision_arg(z)
    z.add_argument("--list", action="store_true", help="list the zoo and exit")
    z.add_argument("--json", metavar="PATH", help=JSON_HELP)
    z.add_argument("--plot", metavar="PNG", help="save each mutant's margin at its first failure as a plot")
    z.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b = sub.add_parser(
        "bench",
        help="time the jitted Flax forward against torch eager and torch.compile, "
        "as fractions of this machine's GEMM throughput",
    )
    _add_model_args(b, grid=True)
    b.add_argument(
        "--dtype",
        type=_dtype_list,
        default=["float32"],
        metavar="D[,D...]",
        help="float32 and/or bfloat16 (default: float32)",
    )
    b.add_argument("--repeats", type=_positive, default=3, help="timed calls per backend (default: 3)")
    b.add_argument("--warmup", type=_non_negative, default=1, help="untimed calls after the first")
    b.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    b.add_argument(
        "--decode",
        type=_non_negative,
        default=0,
        metavar="N",
        help="also time greedy decoding of N tokens at batch 1, with and without the KV "
        "cache, against the memory-bandwidth limit (default: 0, off)",
    )
    b.add_argument(
        "--decode-uncached",
        type=_positive,
        default=32,
        metavar="N",
        help="tokens timed without the cache, at most --decode (default: 32)",
    )
    b.add_argument(
        "--decode-batch",
        type=_positive_list,
        default=list(bench.DECODE_BATCHES),
        metavar="B[,B...]",
        help="batch sizes of the cached-decoding grid (default: %(default)s)",
    )
    b.add_argument(
        "--decode-prompt",
        type=_positive_list,
        default=list(bench.DECODE_PROMPTS),
        metavar="P[,P...]",
        help="prompt lengths of the cached-decoding grid, each at most context_length - N + 1; "
        "longer ones are left out with a note (default: %(default)s)",
    )
    b.add_argument(
        "--no-hugepages",
        action="store_true",
        help="leave glibc's malloc as it is (by default bench re-runs itself with "
        f"GLIBC_TUNABLES={bench.HUGEPAGE_TUNABLE}: see the README)",
    )
    b.add_argument(
        "--gemm-size",
        type=_positive,
        default=bench.GEMM_N,
        metavar="N",
        help=f"the N^3 matmul that measures GEMM throughput (default: {bench.GEMM_N})",
    )
    b.add_argument("--plot", metavar="PNG", help="save tokens/s against sequence length as a plot")
    g = sub.add_parser("generate", help="greedy text from a prompt, with either twin or both")
    g.add_argument("prompt", help="the text to continue")
    _add_model_args(g, batch=False)
    g.add_argument(
        "--backend",
        default="both",
        choices=["torch", "flax", "both"],
        help="which twin generates; both also checks that their tokens agree (default)",
    )
    g.add_argument("--max-new-tokens", type=_non_negative, default=20, help="tokens to add (default: 20)")
    c = sub.add_parser(
        "convert", help="write any checkpoint the twins read as a canonical safetensors file or an HF GPT-2 snapshot"
    )
    c.add_argument(
        "src", help="canonical or HF GPT-2 safetensors, an HF snapshot directory (sharded or not), or a .pth"
    )
    c.add_argument("dst", help="the .safetensors file to write (--to canonical) or the snapshot folder (--to hf)")
    c.add_argument(
        "--to",
        default="canonical",
        choices=["canonical", "hf"],
        help="canonical: the twins' file with its config in the metadata (default); hf: "
        "model.safetensors and config.json as transformers' GPT2LMHeadModel reads them",
    )
    c.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="the dtype written (default: bfloat16 for a bfloat16 source, else float32)",
    )
    c.add_argument("--config", default=None, help="override the config the source implies (preset or JSON)")
    c.add_argument(
        "--n-heads",
        type=_positive,
        default=None,
        metavar="N",
        help="the head count of a source that does not record it",
    )
    t = sub.add_parser(
        "train",
        help="the book's chapter-5 pretraining in both twins side by side: the same batches, the same "
        "dropout masks, losses compared step by step",
    )
    t.add_argument("--text", metavar="PATH", help="the UTF-8 text to train on (default: the book's the-verdict.txt)")
    t.add_argument(
        "--config",
        default="gpt2-small",
        help="a preset or a JSON file with the book's keys (default: gpt2-small, at the chapter's context 256)",
    )
    t.add_argument("--epochs", type=_non_negative, default=CHAPTER5.num_epochs, help="epochs (default: 10)")
    t.add_argument(
        "--dropout",
        default="parity",
        choices=list(chapter5.DROPOUT_MODES),
        help="parity: the config's drop rate, masks both twins draw alike (default); off: drop rate 0",
    )
    t.add_argument(
        "--seed", type=_seed, default=CHAPTER5.seed, help="torch.manual_seed before the model (default: 123)"
    )
    t.add_argument("--lr", type=float, default=CHAPTER5.lr, help="AdamW's learning rate (default: 0.0004)")
    t.add_argument(
        "--out",
        default="train-out",
        metavar="DIR",
        help="where train.json, train.png and both trained models (torch.safetensors, flax.safetensors) go "
        "(default: train-out)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    lm = sub.add_parser(
        "load-memory",
        help="peak resident memory of each twin loading a random checkpoint "
        "of a config's shape, against the file's size",
    )
    lm.add_argument("--config", default="gpt2-xl", help="a preset or JSON config (default: gpt2-xl)")
    lm.add_argument("--dir", required=True, help="a folder with room for the checkpoint (6.2 GB for gpt2-xl)")
    lm.add_argument("--layout", default="canonical,hf", help="canonical, hf or both (default: canonical,hf)")
    lm.add_argument("--json", metavar="PATH", help=JSON_HELP)
    lm.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


@dataclasses.dataclass
class _Setup:
    """What the model arguments resolve to: a config, which model, and weights if a file gave them."""

    cfg: GPTConfig
    label: str
    model: str
    options: dict
    weights: Mapping[str, np.ndarray] | None = None
    meshes: list[str] = dataclasses.field(default_factory=list)


def _setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> _Setup:
    if args.n_heads is not None and not args.checkpoint:
        parser.error("--n-heads applies to --checkpoint only")
    try:
        if args.checkpoint:
            override = resolve_config(args.config) if args.config else None
            ckpt = twins.read_checkpoint(args.checkpoint, config=override, n_heads=args.n_heads)
            setup = _Setup(
                ckpt.config,
                f"{args.checkpoint} ({ckpt.layout})",
                MODEL_KINDS[ckpt.model],
                dict(ckpt.options),
                ckpt.state_dict,
            )
            _agree_with_checkpoint(args, ckpt, parser)
        else:
            name = args.config or "gpt2-small"
            model = args.model or GPT
            if args.final_norm is not None and model != DUMMY:
                parser.error("--final-norm applies to --model dummy only")
            options = {"final_norm": args.final_norm} if args.final_norm else {}
            setup = _Setup(resolve_config(name), name, model, options)
        if args.drop_rate is not None:
            setup.cfg = setup.cfg.replace(drop_rate=args.drop_rate)
    except ValueError as e:
        parser.error(str(e))
    if getattr(args, "train_steps", 0) and setup.model != GPT:
        parser.error("--train-steps needs --model gpt (the dummy model has blocks without weights)")
    seqs = getattr(args, "seq", None)
    for seq in seqs if isinstance(seqs, list) else [seqs]:
        if seq is not None and seq > setup.cfg.context_length:
            parser.error(f"--seq {seq} exceeds context_length {setup.cfg.context_length}")
    if getattr(args, "mesh", None):
        if setup.model != GPT:
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
    kind = MODEL_KINDS[ckpt.model]
    if args.model is not None and args.model != kind:
        parser.error(f"--model {args.model} contradicts --checkpoint {args.checkpoint}, which holds a {ckpt.model}")
    if args.final_norm is not None:
        if kind != DUMMY:
            parser.error(
                f"--final-norm applies to --model dummy only; --checkpoint {args.checkpoint} holds a {ckpt.model}"
            )
        held = ckpt.options.get("final_norm", DUMMY_NORM)
        if args.final_norm != held:
            parser.error(
                f"--final-norm {args.final_norm} contradicts --checkpoint {args.checkpoint}, "
                f"whose DummyGPTModel has final_norm {held!r}"
            )


def _check(args: argparse.Namespace, setup: _Setup, parser: argparse.ArgumentParser) -> int:
    cfg = setup.cfg
    if args.mode == "train" and cfg.drop_rate != 0:
        parser.error("--mode train compares the twins at drop_rate 0; add --drop-rate 0")
    seq = args.seq or min(128, cfg.context_length)
    plant, planted = None, ""
    if args.plant:
        name, twin = args.plant
        if setup.model != GPT:
            parser.error("--plant needs --model gpt")
        mutant = zoo.get(name)
        if mutant.adapt(cfg) != cfg:
            parser.error(f"mutant {name} needs a config with {dict(mutant.needs)} to show")
        if mutant.shows_in == zoo.BF16_TRAINING and not (args.dtype == "bfloat16" and args.train_steps):
            parser.error(f"mutant {name} shows in bfloat16 training only: add --dtype bfloat16 --train-steps N")
        plant, planted = zoo.plant(name, twin), f", with {name} planted in the {twin} twin ({mutant.bug})"
    report = forward.run_parity(
        cfg,
        model=setup.model,
        batch=args.batch,
        seq=seq,
        seed=args.seed,
        mode=args.mode,
        options=setup.options,
        weights=setup.weights,
        progress=not args.quiet,
        dtype=args.dtype,
        layer_evidence=not args.no_layer_evidence,
        matmul_precision=args.matmul_precision,
        plant=plant,
    )
    print(
        f"{setup.model} model, {setup.label}, {args.mode} mode, {args.dtype}, batch {args.batch} x "
        f"{seq} tokens, matmuls {report.precision}{planted}"
    )
    print(report.format_table())
    evidence = report.format_evidence()
    if evidence:
        print()
        print(
            "layer evidence: each layer of each block fed the reference's own input to it, and inputs "
            "built to expose its traps;\nlimits derived from float32 rounding (envelope) and a test for "
            "systematic error (bias); |Δ|/allowed > 1 fails"
        )
        print(evidence)
    if args.layers:
        print()
        print(report.format_layers())
    result = {"forward": report.to_json()}
    passed = report.passed
    if args.train_steps:
        trained = training.run_training_parity(
            cfg,
            model=setup.model,
            batch=args.batch,
            seq=min(seq, 32),
            steps=args.train_steps,
            seed=args.seed,
            weights=setup.weights,
            progress=not args.quiet,
            dtype=args.dtype,
            plant=plant,
        )
        print()
        print(
            f"training, train mode at drop_rate 0, {args.dtype}, batch {args.batch} x {trained.seq} tokens, "
            f"AdamW lr {trained.lr:g}, weight decay {trained.weight_decay:g}"
        )
        print(trained.format_table())
        result["training"] = trained.to_json()
        passed = passed and trained.passed
    if setup.meshes:
        sharded = mesh.run_sharding_parity(
            cfg,
            setup.meshes,
            batch=args.batch,
            seq=min(seq, 32),
            seed=args.seed,
            weights=setup.weights,
            progress=not args.quiet,
        )
        print()
        print(
            f"Flax twin sharded vs one device, train mode at drop_rate 0, batch {sharded.batch} x "
            f"{sharded.seq} tokens, one AdamW step"
        )
        print(sharded.format_table())
        result["sharding"] = sharded.to_json()
        passed = passed and sharded.passed
    failures = report.failures()
    if failures:
        print()
        print("\n".join(failures))
    _write_outputs(args, result, report.plot)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def _mutants(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list:
        print(format_table(["mutant", "planted at", "the bug"], [(m.name, m.where, m.bug) for m in zoo.MUTANTS]))
        return 0
    try:
        cfg = resolve_config(args.config or "gpt2-small")
    except ValueError as e:
        parser.error(str(e))
    if args.seq is not None and args.seq > cfg.context_length:
        parser.error(f"--seq {args.seq} exceeds context_length {cfg.context_length}")
    chosen = [zoo.get(n) for n in args.mutant] if args.mutant else list(zoo.MUTANTS)
    report = zoo.run_zoo(
        cfg,
        mutants=chosen,
        twins=zoo.TWINS if args.twin == "both" else (args.twin,),
        batch=args.batch,
        seq=args.seq,
        seed=args.seed,
        matmul_precision=args.matmul_precision,
        progress=not args.quiet,
    )
    print(
        f"{args.config or 'gpt2-small'}: the default check (whole forward and layer evidence, both "
        f"directions), batch {report.batch} x {report.seq} tokens, matmuls {report.precision}"
    )
    _emit(report, args)
    return 0 if report.passed else 1


def _load_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import load_memory

    layouts = [x.strip() for x in args.layout.split(",")]
    if not layouts or any(x not in load_memory.LAYOUTS for x in layouts):
        parser.error(f"--layout takes {', '.join(load_memory.LAYOUTS)}, got {args.layout!r}")
    folder = Path(args.dir)
    if not folder.is_dir():
        parser.error(f"--dir {args.dir!r} is not a folder")
    report = load_memory.run(resolve_config(args.config), folder, layouts, quiet=args.quiet)
    print(load_memory.format_report(report))
    _write_outputs(args, report | {"versions": versions()})
    worst = max(r["peak_over_file"] for r in report["rows"])
    print(f"worst peak RSS / file size: {worst:.2f} (limit {load_memory.PEAK_OVER_FILE})")
    return 0 if worst <= load_memory.PEAK_OVER_FILE else 1


def _emit(report, args: argparse.Namespace) -> None:
    """A report's table on stdout, its JSON and plot where asked for."""
    print(report.format_table())
    _write_outputs(args, report.to_json(), report.plot)


def _write_outputs(args: argparse.Namespace, data: dict, plot: Callable[[str], None] | None = None) -> None:
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


def _bench(args: argparse.Namespace, setup: _Setup) -> int:
    backends = tuple(b for b in bench.BACKENDS if not (args.no_compile and b == "torch-compile"))
    report = bench.run_bench(
        setup.cfg,
        model=setup.model,
        batches=args.batch,
        seqs=args.seq or [min(256, setup.cfg.context_length)],
        dtypes=tuple(args.dtype),
        repeats=args.repeats,
        warmup=args.warmup,
        backends=backends,
        seed=args.seed,
        options=setup.options,
        weights=setup.weights,
        meshes=setup.meshes,
        decode=args.decode,
        decode_uncached=args.decode_uncached,
        decode_batches=args.decode_batch,
        decode_prompts=args.decode_prompt,
        gemm_n=args.gemm_size,
        progress=not args.quiet,
    )
    _emit(report, args)
    return 0


def _generate(args: argparse.Namespace, setup: _Setup, parser: argparse.ArgumentParser) -> int:
    import numpy as np
    import torch

    import gpt_flax
    import gpt_torch
    from gpt_spec import get_tokenizer

    cfg = setup.cfg
    tokenizer = get_tokenizer()
    ids = np.array([tokenizer.encode(args.prompt, allowed_special="all")], dtype=np.int64)
    if ids.size == 0:
        parser.error("the prompt encodes to no tokens")
    if ids.max() >= cfg.vocab_size:
        parser.error(f"the prompt has token id {ids.max()}, past the model's vocab_size {cfg.vocab_size}")
    tm, fm = twins.build_pair(setup.model, cfg, source="torch", seed=args.seed, mode="eval", **setup.options)
    if setup.weights is not None:
        gpt_torch.load_state_dict(tm, setup.weights)
        gpt_flax.load_state_dict(fm, setup.weights)
    wanted = ["torch", "flax"] if args.backend == "both" else [args.backend]
    outputs = {}
    with twins.float32_matmuls():
        try:
            if "torch" in wanted:
                outputs["torch"] = gpt_torch.generate_text_simple(
                    tm, torch.from_numpy(ids), args.max_new_tokens, cfg.context_length
                ).numpy()
            if "flax" in wanted:
                outputs["flax"] = np.asarray(
                    gpt_flax.generate_text_simple(fm, ids, args.max_new_tokens, cfg.context_length)
                )
        except ValueError as e:
            parser.error(str(e))
    source = setup.label if setup.weights is not None else f"{setup.label}, weights from torch.manual_seed({args.seed})"
    print(f"{setup.model} model, {source}, greedy, {args.max_new_tokens} new tokens")
    for name, out in outputs.items():
        print(f"[{name}] {tokenizer.decode(out[0].tolist())}")
    agree = len(outputs) < 2 or np.array_equal(outputs["torch"], outputs["flax"])
    if len(outputs) == 2:
        print("the twins generated the same token ids" if agree else "the twins' token ids DIFFER")
    _write_outputs(
        args,
        {
            "prompt": args.prompt,
            "max_new_tokens": args.max_new_tokens,
            "token_ids": {k: v[0].tolist() for k, v in outputs.items()},
            "text": {k: tokenizer.decode(v[0].tolist()) for k, v in outputs.items()},
            "agree": agree,
        },
    )
    return 0 if agree else 1


def _read_text(path: str) -> str:
    check_input_file(path, "--text")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read --text {path!r}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path!r} is not UTF-8 text: {e}") from None


def _check_training_text(text: str, source: str, cfg: GPTConfig, settings) -> None:
    """Refuse, before any model is built, a text the chapter-5 run could not train and validate on:
    each part must hold a window of context_length + 1 tokens, the training part a full batch of
    windows (the book's loader drops a short last batch), and every id must be in the vocabulary."""
    from gpt_spec import get_tokenizer
    from gpt_spec.data import split_text

    tokenizer = get_tokenizer()
    size = chapter5.chapter5_config(cfg, settings).context_length
    train_text, val_text = split_text(text, settings.train_ratio)
    share = round(100 * settings.train_ratio)
    parts = {
        f"training part (the first {share}% of its characters)": train_text,
        f"validation part (the last {100 - share}% of its characters)": val_text,
    }
    ids = {part: tokenizer.encode(t, allowed_special={"<|endoftext|>"}) for part, t in parts.items()}
    for part, tokens in ids.items():
        if len(tokens) <= size:
            raise ValueError(f"{source}: its {part} has {len(tokens)} tokens; a window of {size} needs {size + 1}")
    windows = len(range(0, len(next(iter(ids.values()))) - size, size))  # the book's windows, stride = size
    if windows < settings.batch_size:
        raise ValueError(
            f"{source}: its training part makes {windows} window(s) of {size} tokens, fewer than one batch of "
            f"{settings.batch_size}"
        )
    top = max(max(tokens) for tokens in ids.values())
    if top >= cfg.vocab_size:
        raise ValueError(f"{source} has token id {top}, past the config's vocab_size {cfg.vocab_size}")
    prompt = tokenizer.encode(settings.start_context, allowed_special={"<|endoftext|>"})
    if max(prompt) >= cfg.vocab_size:
        raise ValueError(
            f"the chapter's sample prompt {settings.start_context!r} has token id {max(prompt)}, past the "
            f"config's vocab_size {cfg.vocab_size}"
        )


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gpt_spec.data import the_verdict

    try:
        if args.text is None:
            text, source = the_verdict(), "the book's the-verdict.txt"
        else:
            text, source = _read_text(args.text), f"--text {args.text!r}"
        cfg = resolve_config(args.config)
        settings = dataclasses.replace(CHAPTER5, num_epochs=args.epochs, lr=args.lr)
        check_adamw(settings.lr, settings.weight_decay, (0.9, 0.999), 1e-8)
        check_seed(args.seed)
        _check_training_text(text, source, cfg, settings)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file, not a folder")
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {args.out!r}: {e.strerror}") from None
        for name in ("train.json", "train.png"):
            check_output(os.path.join(args.out, name), "--out", plot=name.endswith(".png"))
        report = chapter5.run_chapter5(
            cfg,
            text,
            dropout=args.dropout,
            seed=args.seed,
            settings=settings,
            out_dir=args.out,
            progress=not args.quiet,
        )
    except (ValueError, OSError) as e:  # bad input found while running too, e.g. a disk filling up
        parser.error(str(e))
    if args.text is not None:
        source = args.text
    c, s = report.cfg, report.settings
    print(
        f"chapter 5 on {source}: {args.config} at context {c.context_length}, drop_rate {c.drop_rate} "
        f"(dropout {args.dropout}), {s.num_epochs} epochs x {report.n_train_batches} batches of "
        f"{s.batch_size}, {report.n_val_batches} validation batch(es), AdamW lr {s.lr:g} wd {s.weight_decay:g}, "
        f"seed {args.seed}, matmuls {report.precision}"
    )
    print(f"seconds: torch {report.torch.seconds:.1f}, flax {report.flax.seconds:.1f}")
    print(report.format_table())
    print()
    print(report.format_samples())
    print()
    texts = chapter5.decoded(report)
    rows = [
        [kind, name, texts[name][kind].replace("\n", " ")] for kind in ("greedy", "sampled") for name in chapter5.TWINS
    ]
    print(
        f"after training, {chapter5.SAMPLE_TOKENS} tokens (sampled: top_k {chapter5.SAMPLE_TOP_K}, temperature "
        f"{chapter5.SAMPLE_TEMPERATURE}, parity sampling with seed {args.seed})"
    )
    print(format_table(["how", "twin", "text"], rows))
    deltas = report.step_deltas()
    print(
        f"max |Δ training loss| over {len(deltas)} steps: {deltas.max() if len(deltas) else 0.0:.3g}; "
        f"max |Δ weight| after training: {report.weights_max_abs:.3g}"
    )
    for problem in report.failures():
        print(f"FAIL: {problem}")
    # The outputs before the verdict, as check writes them: a verdict means they are whole.
    write_json({**report.to_json(), "text": texts}, os.path.join(args.out, "train.json"))
    report.plot(os.path.join(args.out, "train.png"))
    print(f"wrote {args.out}/: {', '.join(TRAIN_FILES)}")
    print("PASS: the two runs are one run, within the bound" if report.passed else "FAIL")
    return 0 if report.passed else 1


# Checkpoint.config_source in words after "config"; any other value is the file it was read from.
_CONFIG_ORIGINS = {
    "given": "config from --config",
    "inferred from the tensors": "config inferred from the tensors",
    "none: a published GPT-2 shape": "config of the published GPT-2 of these shapes (no config.json)",
}


def _config_origin(source: str) -> str:
    return _CONFIG_ORIGINS.get(source, f"config from {source}")


def _convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gpt_spec import save_checkpoint, save_hf
    from gpt_spec.checkpoint import check_destination, check_hf_destination

    if args.to == "canonical" and not args.dst.endswith(".safetensors"):
        parser.error(f"the destination must be a .safetensors file, got {args.dst!r}")
    if args.to == "hf" and args.dst.endswith(".safetensors"):
        parser.error(f"--to hf writes a snapshot folder (model.safetensors, config.json), got {args.dst!r}")
    # The destination is checked before the source is read (gpt2-xl takes a while to read).
    try:
        if args.to == "hf":
            check_hf_destination(args.dst)
        else:
            check_destination(args.dst, "checkpoint")
    except ValueError as e:
        parser.error(str(e))
    try:
        ckpt = twins.read_checkpoint(
            args.src, config=resolve_config(args.config) if args.config else None, n_heads=args.n_heads
        )
        print(
            f"read {args.src}: {ckpt.layout}, {len(ckpt.files)} file(s), {'/'.join(ckpt.dtypes)}, "
            f"{ckpt.model}, {ckpt.n_parameters:,} parameters; {_config_origin(ckpt.config_source)}: "
            f"{json.dumps(ckpt.config.to_dict())}",
            flush=True,
        )
        dtype = args.dtype or ckpt.compute_dtype
        if args.to == "hf":
            if ckpt.model != GPT_MODEL:
                raise ValueError(f"--to hf writes a GPT-2; {args.src} holds a {ckpt.model}")
            save_hf(args.dst, ckpt.state_dict, ckpt.config, dtype=dtype)
        else:
            save_checkpoint(args.dst, ckpt.state_dict, ckpt.config, model=ckpt.model, options=ckpt.options, dtype=dtype)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.dst}: {args.to}, {dtype}, read back and verified")
    return 0


# What train writes in --out: its report, its plot and chapter5.run_chapter5's models.
TRAIN_FILES = ("train.json", "train.png", *chapter5.MODEL_FILES.values())


@dataclasses.dataclass
class _Plan:
    """What a command will write, known before any work (see interrupt.exit_on_interrupt)."""

    outputs: list[str]  # files written whole
    folders: list[str]  # folders it will create
    scratch: list[str]  # what it creates and deletes itself


def _shards(index: str) -> list[str]:
    """The files a shard index names beside it; none where it is no regular file or cannot be
    read (the run refuses it then)."""
    if not os.path.isfile(index):
        return []
    try:
        names = read_json(index, "shard index")["weight_map"].values()
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    folder = os.path.dirname(index)
    return [os.path.join(folder, n) for n in sorted({n for n in names if isinstance(n, str)})]


def _read_paths(flag: str, path: str) -> list[tuple[str, str]]:
    """What reading a checkpoint may read, each named for a message: from a snapshot folder its
    model.safetensors, shard index, shards and config.json; from a file, the file, its shards
    (a shard index) and the config.json beside it."""
    if os.path.isdir(path):
        index = os.path.join(path, HF_INDEX)
        named = [(f"the {n} in {flag}", os.path.join(path, n)) for n in ("model.safetensors", HF_INDEX, "config.json")]
        return named + [(f"a shard in {flag}", shard) for shard in _shards(index)]
    beside = os.path.join(os.path.dirname(path) or ".", "config.json")
    shards = _shards(path) if path.endswith(".index.json") else []
    return [(flag, path), (f"the config.json beside {flag}", beside)] + [(f"a shard of {flag}", s) for s in shards]


def _inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Every path the command reads, named as the user gave it."""
    inputs = []
    config = getattr(args, "config", None)
    if config and config not in PRESETS:
        inputs.append(("--config", config))
    if getattr(args, "checkpoint", None):
        inputs += _read_paths("--checkpoint", args.checkpoint)
    if args.command == "convert":
        inputs += _read_paths("the source", args.src)
    if args.command == "train" and args.text:
        inputs.append(("--text", args.text))
    return inputs


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> _Plan:
    """The paths this command will write, each checked before any work: a run is never computed
    only to be lost to an unwritable path, nor allowed to overwrite what it reads or prints."""
    outputs: list[tuple[str, str]] = []
    folders: list[str] = []
    scratch: list[str] = []
    for flag in ("json", "plot"):
        path = getattr(args, flag, None)
        if path and not (flag == "json" and path == STDOUT):
            outputs.append((f"--{flag}", path))
    if args.command == "convert":
        if args.to == "hf":
            outputs += [("the destination", os.path.join(args.dst, n)) for n in ("model.safetensors", "config.json")]
            folders = missing_folders(args.dst)
        else:
            outputs.append(("the destination", args.dst))
    elif args.command == "train":
        outputs += [("--out", os.path.join(args.out, name)) for name in TRAIN_FILES]
        folders = missing_folders(args.out)
    elif args.command == "load-memory":
        from . import load_memory

        for layout in args.layout.split(","):
            name = load_memory.SCRATCH.get(layout.strip())
            if name is None:
                continue  # refused with the list of layouts by the command
            path = os.path.join(args.dir, name)
            if os.path.lexists(path):
                parser.error(
                    f"--dir {args.dir!r} already holds {name!r}, which load-memory writes and then deletes; "
                    "move it or choose another folder"
                )
            scratch.append(path)
            outputs.append(("--dir", path))
    try:
        check_paths(outputs, _inputs(args))
        for flag, path in outputs:
            if flag in ("--json", "--plot"):
                check_output(path, flag, plot=flag == "--plot")
    except ValueError as e:
        parser.error(str(e))
    written = [path for flag, path in outputs if flag != "--dir"]
    return _Plan(written, folders, scratch)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 (pass), 1 (parity failed), 2 (bad input: one line on stderr), 130 (Ctrl-C:
    one line, nothing half-written, no verdict), 141 (standard output closed by its reader, as in
    `| head`: the run went on, silently, and wrote its files).

    `argv` None: the command line of this process, which exits when main returns."""
    parser = build_parser()
    args = parser.parse_args(argv)
    plan = _plan(args, parser)
    process = argv is None
    if process and args.command == "bench" and not args.no_hugepages:
        bench.rerun_with_hugepages()  # returns only where it cannot (or already did)
    with exit_on_interrupt(parser.prog, plan.outputs, folders=plan.folders, scratch=plan.scratch, process=process):
        with guarded_streams(json_to_stdout=getattr(args, "json", None) == STDOUT) as streams:
            args.stdout = streams.stdout
            status = _run(args, parser)
        return EXIT_READER_GONE if streams.reader_gone else status


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "convert":
        return _convert(args, parser)
    if args.command == "train":
        return _train(args, parser)
    if args.command == "load-memory":
        try:
            return _load_memory(args, parser)
        except (ValueError, OSError) as e:
            parser.error(str(e))
    if args.command == "mutants":
        try:
            return _mutants(args, parser)
        except (ValueError, OSError) as e:
            parser.error(str(e))
    setup = _setup(args, parser)
    try:
        if args.command == "check":
            return _check(args, setup, parser)
        if args.command == "bench":
            return _bench(args, setup)
        return _generate(args, setup, parser)
    except (ValueError, OSError) as e:  # bad input found while running, e.g. a disk filling up
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
