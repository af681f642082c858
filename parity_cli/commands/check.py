"""`gpt-parity check`: copy weights both ways, compare every stage and layer, and train."""

from __future__ import annotations

import argparse

import gpt_flax
import gpt_torch
from gpt_spec import ModelKind
from gpt_spec.checks import FORWARD_DTYPES
from parity_tests import distribution, forward, mesh, training, twins, zoo, zoo_training

from .. import reports
from ..common import (
    Setup,
    add_model_args,
    add_precision_arg,
    non_negative,
    plant_arg,
    write_outputs,
)
from ..render import (
    progress,
)


def add_parser(sub) -> argparse.ArgumentParser:
    check = sub.add_parser(
        "check",
        help="copy weights both ways; compare every stage on every backend and "
        "every layer against float32's rounding envelope",
    )
    add_model_args(check)
    check.add_argument(
        "--mode",
        default="eval",
        choices=twins.MODES,
        help="eval (dropout off) or train (needs --drop-rate 0)",
    )
    check.add_argument(
        "--dtype",
        default="float32",
        choices=list(FORWARD_DTYPES),
        help="parameters and compute of both twins (default: float32); bfloat16 and float16 have their own "
        "bounds (float16: forward only, no --train-steps)",
    )
    check.add_argument("--layers", action="store_true", help="print max |Δ| of every stage")
    check.add_argument("--plot", metavar="PNG", help="save max |Δ| per stage as a log-scale plot")
    check.add_argument(
        "--train-steps",
        type=non_negative,
        default=0,
        metavar="N",
        help="also compare loss, every gradient and N AdamW steps (default: 0)",
    )
    check.add_argument(
        "--no-layer-evidence",
        action="store_true",
        help="compare the whole forward only, not each layer on its own inputs and traps",
    )
    check.add_argument(
        "--greedy",
        type=_greedy_arg,
        metavar="N:T",
        help=f"also continue N random prompts of {GREEDY_PROMPT} tokens greedily for T new tokens in both twins "
        "(same weights, this dtype) and report where their tokens first differ: median and 10th percentile",
    )
    add_precision_arg(check)
    check.add_argument(
        "--plant",
        type=plant_arg,
        metavar="MUTANT[@TWIN]",
        help="plant a bug of the zoo (`gpt-parity mutants --list`) in one twin "
        "(default: flax) for this check, to see what the suite says about it",
    )
    return check


GREEDY_PROMPT = 8  # tokens of each --greedy prompt


def _greedy_arg(text: str) -> tuple[int, int]:
    n, _, t = text.partition(":")
    try:
        prompts, tokens = int(n), int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:T (prompts:new tokens), got {text!r}") from None
    if prompts < 1 or tokens < 1:
        raise argparse.ArgumentTypeError(f"expected N:T with N, T >= 1, got {text!r}")
    return prompts, tokens


def _greedy(args: argparse.Namespace, setup: Setup) -> distribution.GreedyDivergence:
    """Both twins on the check's weights, in its dtype, continuing the same random prompts."""
    n, tokens = args.greedy
    tm, fm = twins.build_pair(setup.model, setup.cfg, source="torch", seed=args.seed, mode="eval", **setup.options)
    if setup.weights is not None:
        gpt_torch.load_state_dict(tm, setup.weights)
        gpt_flax.load_state_dict(fm, setup.weights)
    gpt_torch.cast(tm, args.dtype)
    gpt_flax.cast(fm, args.dtype)
    with twins.float32_matmuls():
        return distribution.greedy_divergence(tm, fm, twins.token_batch(setup.cfg, n, GREEDY_PROMPT, args.seed), tokens)


def run(args: argparse.Namespace, setup: Setup, parser: argparse.ArgumentParser) -> int:
    cfg = setup.cfg
    if args.mode == "train" and cfg.drop_rate != 0:
        parser.error("--mode train compares the twins at drop_rate 0; add --drop-rate 0")
    if args.greedy and (setup.model != ModelKind.GPT or GREEDY_PROMPT + args.greedy[1] > cfg.context_length):
        parser.error(
            f"--greedy needs --model gpt and {GREEDY_PROMPT} prompt + T new tokens within context_length "
            f"{cfg.context_length}"
        )
    if args.dtype == "float16" and args.train_steps:
        parser.error(
            "float16 is a forward tier only (without loss scaling its gradients underflow): "
            "drop --train-steps, or train in --dtype bfloat16"
        )
    seq = args.seq or min(128, cfg.context_length)
    plant, planted = None, ""
    if args.plant:
        name, twin = args.plant
        if setup.model != ModelKind.GPT:
            parser.error("--plant needs --model gpt")
        mutant = zoo.get(name)
        if mutant.adapt(cfg) != cfg:
            parser.error(f"mutant {name} needs a config with {dict(mutant.needs)} to show")
        if mutant.shows_in == zoo.BF16_TRAINING and not (args.dtype == "bfloat16" and args.train_steps):
            parser.error(f"mutant {name} shows in bfloat16 training only: add --dtype bfloat16 --train-steps N")
        if mutant.shows_in == zoo_training.TRAINING and not args.train_steps:
            parser.error(f"mutant {name} shows in training only (its forward is the book's): add --train-steps N")
        if mutant.where == zoo_training.LATER_STEPS and args.train_steps == 1:
            parser.error(f"mutant {name} shows from the second AdamW step on: add --train-steps 2 or more")
        plant, planted = (
            zoo.plant(name, twin),
            f", with {name} planted in the {twin} twin ({mutant.bug})",
        )
    report = forward.run_parity(
        cfg,
        forward.ParityOptions(
            model=setup.model,
            batch=args.batch,
            seq=seq,
            seed=args.seed,
            mode=args.mode,
            model_options=setup.options,
            dtype=args.dtype,
            layer_evidence=not args.no_layer_evidence,
            matmul_precision=args.matmul_precision,
        ),
        weights=setup.weights,
        progress=progress(args.quiet),
        plant=plant,
    )
    print(
        f"{setup.model} model, {setup.label}, {args.mode} mode, {args.dtype}, batch {args.batch} x "
        f"{seq} tokens, matmuls {report.precision}{planted}"
    )
    print(reports.parity_table(report))
    evidence = reports.parity_evidence(report)
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
        print(reports.parity_layers(report))
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
            progress=progress(args.quiet),
            dtype=args.dtype,
            plant=plant,
        )
        print()
        print(
            f"training, train mode at drop_rate 0, {args.dtype}, batch {args.batch} x {trained.seq} tokens, "
            f"AdamW lr {trained.lr:g}, weight decay {trained.weight_decay:g}"
        )
        print(reports.training_table(trained))
        found = trained.first_failure()
        if found is not None:
            print(f"training: first failure at {found[0]}: {found[2]}")
        result["training"] = trained.to_json()
        passed = passed and trained.passed
    if args.greedy:
        greedy = _greedy(args, setup)
        print()
        print(f"greedy decoding, {args.dtype}: {greedy.describe()}")
        result["greedy"] = greedy.to_json()
    if setup.meshes:
        sharded = mesh.run_sharding_parity(
            cfg,
            setup.meshes,
            batch=args.batch,
            seq=min(seq, 32),
            seed=args.seed,
            weights=setup.weights,
            progress=progress(args.quiet),
        )
        print()
        print(
            f"Flax twin sharded vs one device, train mode at drop_rate 0, batch {sharded.batch} x "
            f"{sharded.seq} tokens, one AdamW step"
        )
        print(reports.sharding_table(sharded))
        result["sharding"] = sharded.to_json()
        passed = passed and sharded.passed
    failures = report.failures()
    if failures:
        print()
        print("\n".join(failures))
    write_outputs(args, result, lambda path: reports.plot_parity(report, path))
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1
