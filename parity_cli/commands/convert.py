"""`gpt-parity convert`: any checkpoint the twins read, written canonical or as an HF snapshot."""

from __future__ import annotations

import argparse
import json

from gpt_spec import ModelClass
from gpt_spec.config import resolve_config
from parity_tests import twins

from ..common import positive


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "convert",
        help="write any checkpoint the twins read as a canonical safetensors file or an HF GPT-2 snapshot",
    )
    c.add_argument(
        "src",
        help="canonical or HF GPT-2 safetensors, an HF snapshot directory (sharded or not), or a .pth",
    )
    c.add_argument(
        "dst",
        help="the .safetensors file to write (--to canonical) or the snapshot folder (--to hf)",
    )
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
    c.add_argument(
        "--config",
        default=None,
        help="override the config the source implies (preset or JSON)",
    )
    c.add_argument(
        "--n-heads",
        type=positive,
        default=None,
        metavar="N",
        help="the head count of a source that does not record it",
    )
    return c


# Checkpoint.config_source in words after "config"; any other value is the file it was read from.
_CONFIG_ORIGINS = {
    "given": "config from --config",
    "inferred from the tensors": "config inferred from the tensors",
    "none: a published GPT-2 shape": "config of the published GPT-2 of these shapes (no config.json)",
}


def _config_origin(source: str) -> str:
    return _CONFIG_ORIGINS.get(source, f"config from {source}")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gpt_spec import save_checkpoint, save_hf
    from gpt_spec.formats.atomic import check_destination
    from gpt_spec.formats.hf import check_hf_destination

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
            args.src,
            config=resolve_config(args.config) if args.config else None,
            n_heads=args.n_heads,
        )
        print(
            f"read {args.src}: {ckpt.layout}, {len(ckpt.files)} file(s), {'/'.join(ckpt.dtypes)}, "
            f"{ckpt.model}, {ckpt.n_parameters:,} parameters; {_config_origin(ckpt.config_source)}: "
            f"{json.dumps(ckpt.config.to_dict())}",
            flush=True,
        )
        dtype = args.dtype or ckpt.compute_dtype
        if args.to == "hf":
            if ckpt.model != ModelClass.GPT_MODEL:
                raise ValueError(f"--to hf writes a GPT-2; {args.src} holds a {ckpt.model}")
            save_hf(args.dst, ckpt.state_dict, ckpt.config, dtype=dtype)
        else:
            save_checkpoint(
                args.dst,
                ckpt.state_dict,
                ckpt.config,
                model=ckpt.model,
                options=ckpt.options,
                dtype=dtype,
            )
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.dst}: {args.to}, {dtype}, read back and verified")
    return 0
