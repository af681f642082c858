"""`gpt-parity generate`: greedy text from a prompt, with either twin or both."""

from __future__ import annotations

import argparse

from parity_tests import twins

from ..common import Setup, add_model_args, non_negative, write_outputs


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="greedy text from a prompt, with either twin or both")
    g.add_argument("prompt", help="the text to continue")
    add_model_args(g, batch=False)
    g.add_argument(
        "--backend",
        default="both",
        choices=["torch", "flax", "both"],
        help="which twin generates; both also checks that their tokens agree (default)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=non_negative,
        default=20,
        help="tokens to add (default: 20)",
    )
    return g


def run(args: argparse.Namespace, setup: Setup, parser: argparse.ArgumentParser) -> int:
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
    write_outputs(
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
