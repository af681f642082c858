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
from parity_tests import chapter5, defects, resume

from .. import reports
from ..common import non_negative, positive, seed_arg
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
        help="a preset or a JSON file with the book's keys (default: gpt2-small, at the chapter's context 256)",
    )
    t.add_argument("--epochs", type=non_negative, help="epochs (default: 10)")
    t.add_argument(
        "--dropout",
        choices=list(chapter5.DROPOUT_MODES),
        help="parity: the config's drop rate, masks both twins draw alike (default); off: drop rate 0",
    )
    t.add_argument("--seed", type=seed_arg, help="torch.manual_seed before the model (default: 123)")
    t.add_argument("--lr", type=float, help="AdamW's learning rate (default: 0.0004)")
    t.add_argument(
        "--steps",
        type=positive,
        help="train this many steps of the schedule, then stop (default: to its end); with --save-state, resumable",
    )
    t.add_argument(
        "--save-state",
        metavar="DIR",
        help="write each twin's training state (weights, AdamW moments and step, data position, dropout counter) "
        f"to DIR/{resume.STATE_FILES['torch']} and DIR/{resume.STATE_FILES['flax']} when it stops",
    )
    t.add_argument(
        "--resume",
        metavar="STATE",
        help="continue the run a training state holds (a file --save-state wrote, or its folder if it holds one), "
        "in the twin(s) of --twin: either twin resumes either twin's state; config, schedule, seed and dropout "
        "come from the state",
    )
    t.add_argument(
        "--snapshot-every",
        type=positive,
        metavar="K",
        help=f"also save each twin's training state every K steps, in OUT/{resume.SNAPSHOTS}/: what "
        "`gpt-parity diverge OUT` replays",
    )
    t.add_argument(
        "--plant-defect",
        type=_defect,
        metavar=defects.SPEC,
        help="train with a one-step defect: at STEP (from 0), TWIN's update of the parameter PARAM (or, with PART "
        "exp_avg or exp_avg_sq, that step's change of its AdamW moment) times FACTOR; to see `gpt-parity diverge` "
        "name it (recorded in train.json)",
    )
    t.add_argument(
        "--twin",
        choices=["torch", "flax", "both"],
        default="both",
        help="which twin trains; both compares them step by step (default)",
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


def _defect(text: str) -> defects.OneStepDefect:
    try:
        return defects.OneStepDefect.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


# What --resume takes from the state, and the default of each flag otherwise.
_FROM_STATE = {
    "config": "gpt2-small",
    "epochs": CHAPTER5.num_epochs,
    "dropout": "parity",
    "seed": CHAPTER5.seed,
    "lr": CHAPTER5.lr,
}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:

    if args.resume or args.steps is not None or args.save_state or args.twin != "both" or _segmented(args):
        return _run_segment(args, parser)
    try:
        text, source = _text(args)
        cfg, settings = _new_run(args, text, source)
        _make_folder(args.out, "--out")
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


def _text(args: argparse.Namespace) -> tuple[str, str]:
    """The text to train on, and how to name it."""
    from gpt_spec.data import the_verdict

    if args.text is None:
        return the_verdict(), "the book's the-verdict.txt"
    return _read_text(args.text), f"--text {args.text!r}"


def _new_run(args: argparse.Namespace, text: str, source: str):
    """A run from the start: the flags not given take their defaults, all checked before any model."""
    for key, default in _FROM_STATE.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    cfg = resolve_config(args.config)
    settings = dataclasses.replace(CHAPTER5, num_epochs=args.epochs, lr=args.lr)
    check_adamw(settings.lr, settings.weight_decay, (0.9, 0.999), 1e-8)
    check_seed(args.seed)
    _check_training_text(text, source, cfg, settings)
    return cfg, settings


def _make_folder(path: str, flag: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path!r}: {e.strerror}") from None


def _state_file(given: str) -> str:
    """--resume's state: the file, or the one state file in a folder --save-state wrote."""
    if not os.path.isdir(given):
        return given
    found = [name for name in resume.STATE_FILES.values() if os.path.isfile(os.path.join(given, name))]
    if len(found) != 1:
        held = " and ".join(found) if found else "no training state"
        raise ValueError(f"--resume {given!r} holds {held}: name the state file to resume")
    return os.path.join(given, found[0])


def _check_against_state(args: argparse.Namespace, resumed: resume.Resumed) -> None:
    """A flag given with --resume must say what the state says: one line naming the first that differs."""
    state = {
        "epochs": resumed.settings.num_epochs,
        "dropout": resumed.dropout,
        "seed": resumed.seed,
        "lr": resumed.settings.lr,
    }
    if args.config is not None:
        cfg = chapter5.chapter5_config(resolve_config(args.config), resumed.settings)
        if resumed.dropout == "off":
            cfg = cfg.replace(drop_rate=0.0)
        resumed.state.check_fits(cfg, source=f"--resume {args.resume!r}")
    for key, value in state.items():
        given = getattr(args, key)
        if given is not None and given != value:
            raise ValueError(f"--{key} {given!r} differs from the state's {key} {value!r} (--resume {args.resume!r})")


def _segmented(args: argparse.Namespace) -> bool:
    return args.snapshot_every is not None or args.plant_defect is not None


def _check_snapshots(args: argparse.Namespace, cfg: GPTConfig) -> None:
    """Snapshots go to a folder of their own: never beside another run's, which diverge would take
    for this run's."""
    if args.plant_defect is not None:
        args.plant_defect.check(cfg)
    folder = os.path.join(args.out, resume.SNAPSHOTS)
    if args.snapshot_every is not None and os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"--out {args.out!r} already holds another run's {resume.SNAPSHOTS}/: choose another folder")


def _run_segment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """--steps, --save-state, --resume, or one twin: the run in segments (parity_tests/resume.py)."""

    twins = chapter5.TWINS if args.twin == "both" else (args.twin,)
    try:
        text, source = _text(args)
        cfg: GPTConfig | None = None
        settings = CHAPTER5
        if args.resume:
            args.resume = _state_file(args.resume)
            resumed = resume.read_state(args.resume, text)
            _check_against_state(args, resumed)
            _check_snapshots(args, resumed.cfg)
        else:
            cfg, settings = _new_run(args, text, source)
            _check_snapshots(args, cfg)
        _make_folder(args.out, "--out")
        check_output(os.path.join(args.out, "train.json"), "--out")
        if len(twins) == 2:
            check_output(os.path.join(args.out, "train.png"), "--out", plot=True)
        if args.save_state:
            _make_folder(args.save_state, "--save-state")
            for twin in twins:
                check_output(os.path.join(args.save_state, resume.STATE_FILES[twin]), "--save-state")
        with defects.planted(args.plant_defect):
            segment = resume.run_segment(
                cfg,
                text,
                twins=twins,
                steps=args.steps,
                resume=args.resume,
                dropout=args.dropout or "parity",
                seed=CHAPTER5.seed if args.seed is None else args.seed,
                settings=settings,
                save_dir=args.save_state,
                snapshot_every=args.snapshot_every,
                snapshot_dir=args.out,
                progress=progress(args.quiet),
            )
    except (ValueError, OSError) as e:
        parser.error(str(e))
    report = segment.report
    c, s = report.cfg, report.settings
    total = s.num_epochs * report.n_train_batches
    origin = f"resumed from {args.resume} at step {segment.start}" if args.resume else "from the start"
    print(
        f"chapter 5 on {args.text or source}: steps {segment.start + 1}-{segment.stop} of {total} in "
        f"{' and '.join(twins)}, {origin}; context {c.context_length}, drop_rate {c.drop_rate} (dropout "
        f"{report.dropout}), AdamW lr {s.lr:g} wd {s.weight_decay:g}, seed {report.seed}, matmuls {report.precision}"
    )
    data = {
        **(report.to_json() if len(twins) == 2 else _one_twin_json(report)),
        "segment": {"start": segment.start, "stop": segment.stop, "twins": list(twins), "resumed_from": args.resume},
        "states": segment.states,
        "snapshot_every": args.snapshot_every,
        "planted": None if args.plant_defect is None else args.plant_defect.to_json(),
    }
    if len(twins) == 2:
        print(reports.chapter5_table(report))
        deltas = report.step_deltas()
        print(f"max |Δ training loss| over {len(deltas)} steps: {deltas.max() if len(deltas) else 0.0:.3g}")
        for problem in report.failures():
            print(f"FAIL: {problem}")
    else:
        print(reports.evaluations_table(report.runs[twins[0]]))
    write_json(data, os.path.join(args.out, "train.json"))
    if len(twins) == 2:
        reports.plot_chapter5(report, os.path.join(args.out, "train.png"))
    if args.plant_defect is not None:
        print(f"planted: {args.plant_defect.describe()}")
    if args.snapshot_every is not None:
        print(f"snapshots of both twins every {args.snapshot_every} steps in {args.out}/{resume.SNAPSHOTS}/")
    for twin, path in segment.states.items():
        print(f"wrote the {twin} twin's training state at step {segment.stop}: {path}")
    if len(twins) == 1:
        print(f"trained the {twins[0]} twin alone: nothing compared (use --twin both)")
        return 0
    print("PASS: the two runs are one run, within the bound" if report.passed else "FAIL")
    return 0 if report.passed else 1


def _one_twin_json(report: chapter5.Chapter5Report) -> dict:
    """A one-twin run's train.json: what Chapter5Report.to_json says, less the comparison."""
    return {
        "passed": None,  # nothing compared
        "failures": [],
        "config": report.cfg.to_dict(),
        "settings": dataclasses.asdict(report.settings),
        "dropout": report.dropout,
        "seed": report.seed,
        "batches": {"train": report.n_train_batches, "val": report.n_val_batches},
        "matmul_precision": report.precision,
        "runs": {name: dataclasses.asdict(run) for name, run in report.runs.items()},
    }
