"""`gpt-parity precision`: what each precision setting costs, against the torch twin in float32."""

from __future__ import annotations

import argparse

import gpt_torch
from gpt_spec import ModelKind
from parity_tests import precision
from parity_tests.twins import build_torch

from ..common import Setup, add_model_args, positive, write_outputs
from ..render import format_table, progress


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "precision",
        help="each precision setting (torch highest/high, JAX float32/default/bf16_3x/bfloat16 passes, bfloat16 "
        "and float16 parameters) against the torch twin in float32: logits error in ulps, KL, top-10 agreement, "
        "where greedy text parts, the loss after 10 training steps",
    )
    add_model_args(p)
    p.add_argument(
        "--new-tokens",
        type=positive,
        default=None,
        metavar="T",
        help=f"greedy tokens after each of {precision.GREEDY_PROMPTS} prompts of {precision.PROMPT_TOKENS} "
        "(default: to the end of the context)",
    )
    return p


def precision_table(report: precision.PrecisionReport) -> str:
    rows = []
    for r in report.rows:
        s, d, g = r.setting, r.distribution, r.greedy
        rows.append(
            [
                s.name,
                f"emulated: {s.operand_bits}-bit operands" if s.emulated else "run",
                round(r.logits_ulps, 1),
                f"{d.kl_mean:.2g}",
                f"{d.kl_max:.2g}",
                round(d.topk_mean, 4),
                g.median,
                g.p10,
                f"{g.never}/{len(g.first)}",
                "– (no training tier)" if r.delta_loss is None else f"{r.delta_loss:+.2g}",
            ]
        )
    head = [
        "setting",
        "how",
        "logits ulps",
        "KL mean",
        "KL max",
        "top-10",
        "greedy median",
        "greedy p10",
        "never",
        f"Δloss, {precision.TRAIN_STEPS} steps",
    ]
    return format_table(head, rows)


def run(args: argparse.Namespace, setup: Setup, parser: argparse.ArgumentParser) -> int:
    cfg = setup.cfg
    if setup.model != ModelKind.GPT:
        parser.error("precision runs the full GPT: needs --model gpt")
    new_tokens = args.new_tokens or cfg.context_length - precision.PROMPT_TOKENS
    if new_tokens < 1 or precision.PROMPT_TOKENS + new_tokens > cfg.context_length:
        parser.error(
            f"{precision.PROMPT_TOKENS} prompt + {new_tokens} new tokens must fit context_length {cfg.context_length}"
        )
    weights = setup.weights
    if weights is None:  # the torch twin's own init at --seed
        weights = gpt_torch.state_dict(build_torch(ModelKind.GPT, cfg, seed=args.seed))
    report = precision.run_precision(
        cfg,
        weights,
        batch=args.batch,
        seq=args.seq,
        new_tokens=new_tokens,
        seed=args.seed,
        progress=progress(args.quiet),
    )
    print(
        f"{setup.label}: each setting against the torch twin in float32 ('highest'); logits of batch {report.batch} x "
        f"{report.seq}; greedy: {precision.GREEDY_PROMPTS} prompts of {precision.PROMPT_TOKENS} tokens, {new_tokens} "
        f"new; Δloss: held-out loss (torch, float32) after {precision.TRAIN_STEPS} AdamW steps on random batches, less the "
        "reference's; 'emulated': the GPU/TPU setting's operand rounding on this CPU (the zoo's exact rounding, its "
        "gradient rounded alike)"
    )
    print(precision_table(report))
    print(f"the reference's held-out loss after {precision.TRAIN_STEPS} steps: {report.reference_loss:.6g}")
    write_outputs(args, report.to_json())
    return 0
