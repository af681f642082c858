"""`gpt-parity train`: the book's chapter-5 pretraining in both twins side by side."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from gpt_spec import GPTConfig
from gpt_spec.checks import check_adamw
from gpt_spec.config import resolve_config
from gpt_spec.files import check_input_file
from gpt_spec.randomness import check_seed
from gpt_spec.training import CHAPTER5
from parity_tests import chapter5

from .. import reports
from ..common import non_negative, seed_arg
from ..plan import TRAIN_FILES
from ..render import (
    check_output,
    format_table,
    progress,
    write_json,
)


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train",
        help="the book's chapter-5 pretraining in both twins side by side: the same batches, the same "
        "dropout masks, losses compared step by step",
    )
    t.add_argument(
        "--text",
        metavar="PATH",
        help="the UTF-8 text to train on (default: the book's the-verdict.txt)",
    )
    t.add_argument(
        "--config",
        default="gpt2-small",
        help="a preset or a JSON file with the book's keys (default: gpt2-small, at the chapter's context 256)",
    )
    t.add_argument(
        "--epochs",
        type=non_negative,
        default=CHAPTER5.num_epochs,
        help="epochs (default: 10)",
    )
    t.add_argument(
        "--dropout",
        default="parity",
        choices=list(chapter5.DROPOUT_MODES),
        help="parity: the config's drop rate, masks both twins draw alike (default); off: drop rate 0",
    )
    t.add_argument(
        "--seed",
        type=seed_arg,
        default=CHAPTER5.seed,
        help="torch.manual_seed before the model (default: 123)",
    )
    t.add_argument(
        "--lr",
        type=float,
        default=CHAPTER5.lr,
        help="AdamW's learning rate (default: 0.0004)",
    )
    t.add_argument(
        "--out",
        default="train-out",
        metavar="DIR",
        help="where train.json, train.png and both trained models (torch.safetensors, flax.safetensors) go "
        "(default: train-out)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return t


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


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
            progress=progress(args.quiet),
        )
    except (
        ValueError,
        OSError,
    ) as e:  # bad input found while running too, e.g. a disk filling up
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
    print(reports.chapter5_table(report))
    print()
    print(reports.chapter5_samples(report))
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
    reports.plot_chapter5(report, os.path.join(args.out, "train.png"))
    print(f"wrote {args.out}/: {', '.join(TRAIN_FILES)}")
    print("PASS: the two runs are one run, within the bound" if report.passed else "FAIL")
    return 0 if report.passed else 1
