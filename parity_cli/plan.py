"""What a command will read and write, known and checked before any work."""

from __future__ import annotations

import argparse
import dataclasses
import os

from gpt_spec import (
    PRESETS,
)
from gpt_spec.config import read_json
from gpt_spec.formats.safetensors_io import HF_INDEX
from parity_tests import chapter5

from .interrupt import missing_folders
from .render import (
    STDOUT,
    check_output,
    check_paths,
)

# What train writes in --out: its report, its plot and chapter5.run_chapter5's models.
TRAIN_FILES = ("train.json", "train.png", *chapter5.MODEL_FILES.values())


@dataclasses.dataclass
class Plan:
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


def plan_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
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
        from parity_bench import load_memory

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
    return Plan(written, folders, scratch)
