"""The torch twin's own checkpoint: model and optimizer saved the PyTorch way, and converted both ways
to the canonical training state. The same functions as the Flax twin's gpt_flax/checkpoint.py.

A checkpoint directory holds one folder per step, its newest `max_to_keep` kept. In a single
process (no process group initialised) a step's folder holds the book's chapter-5 file,
`model_and_optimizer.pth`: `torch.save({"model_state_dict", "optimizer_state_dict"})` with the
format, config, AdamW settings, parity-dropout counter, run JSON and run arrays in extra keys,
read back with `torch.load(weights_only=True)`. Inside a process group (a model made by
`gpt_torch.distributed.parallelize`: DDP, FSDP2, tensor parallelism) it holds a
`torch.distributed.checkpoint` (DCP) checkpoint of `get_state_dict(model, optimizer)`, so the
saved layout is the full unsharded names whatever the sharding, and `checkpoint.json` beside it;
DCP reads it back into any sharding, or into a plain model in one process (DCP needs no process
group in this torch: without one it saves and loads in the calling process).

Each step is written into a hidden folder beside its destination and renamed into place when
whole, so a half-written step is never listed, nor read.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gpt_spec import GPTConfig
from gpt_spec.formats.train_state import AdamWSettings, TrainState
from gpt_spec.training import check_dropout_counter

from .dropout import use_parity_dropout
from .model import _GPT, GPTModel
from .train import adamw, check_optimizer, load_train_state, train_state

FORMAT = "gpt-twins/torch-checkpoint-v1"
BOOK_FILE = "model_and_optimizer.pth"  # the book's chapter-5 name
META_FILE = "checkpoint.json"  # beside a DCP checkpoint
ARRAYS_FILE = "arrays.pth"  # the run's arrays, beside a DCP checkpoint
_NO_GROUP = "torch.distributed is disabled, unavailable or uninitialized"  # DCP's warning without a group


def _dcp() -> tuple[Any, Any, Any]:
    """DCP and its state-dict helpers, imported when used: they double `import gpt_torch`'s time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    return dcp, get_state_dict, set_state_dict


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _inner(model: torch.nn.Module) -> Any:
    """The book's model inside a DDP wrapper (FSDP2 and tensor parallelism keep the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _finished(folder: Path) -> bool:
    return (folder / BOOK_FILE).is_file() or (folder / META_FILE).is_file()


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps `directory` holds a finished checkpoint of, oldest first ([] for none, or no folder)."""
    path = Path(directory)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir() and _finished(p))


def _pick(directory: str | os.PathLike[str], step: int | None) -> int:
    """`step`, or the latest where None; refused in one line where the directory has no such step."""
    steps = checkpoint_steps(directory)
    if not steps:
        raise ValueError(f"{os.fspath(directory)!r} holds no torch checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"{os.fspath(directory)!r} holds no checkpoint of step {step}; it holds steps {steps}")
    return step


def _adam_step(optimizer: torch.optim.Optimizer) -> int:
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    return int(max(steps, default=0.0))


def _settings(optimizer: torch.optim.Optimizer) -> AdamWSettings:
    group = optimizer.param_groups[0]
    return AdamWSettings(group["lr"], group["weight_decay"], group["betas"], group["eps"])


def _saved(meta: dict[str, Any], source: str) -> TrainState:
    """The config and settings a checkpoint records, as a tensorless TrainState (to check fit)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{source} is not a gpt-twins checkpoint (it has no format {FORMAT!r})")
    try:
        cfg, settings = GPTConfig.from_dict(meta["config"]), AdamWSettings.from_dict(meta["adamw"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: it holds a bad config or optimizer: {e}") from None
    return TrainState(cfg, {}, {}, {}, int(meta["step"]), settings, meta.get("dropout_counter"), meta.get("run", {}))


def _read(folder: Path, source: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A step's metadata, and its torch.save dict (None for a DCP step)."""
    if (folder / BOOK_FILE).is_file():
        try:
            obj = torch.load(folder / BOOK_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip, or not a torch file at all
            raise ValueError(f"{source}: {BOOK_FILE} is not a readable torch.save file: {e}") from None
        if not isinstance(obj, dict) or "model_state_dict" not in obj:
            raise ValueError(f"{source}: {BOOK_FILE} holds no model_state_dict")
        if "optimizer_state_dict" not in obj:
            raise ValueError(f"{source} holds no optimizer_state_dict: it is weights only")
        return obj, obj
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8")), None
    except (OSError, ValueError) as e:
        raise ValueError(f"{source}: its {META_FILE} is unreadable: {e}") from None


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: _GPT,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    max_to_keep: int = 3,
    run: dict[str, Any] | None = None,
    arrays: dict[str, Any] | None = None,
) -> Path:
    """Save `model` and `optimizer` (made by adamw(model)) as step `step` of `directory`, keeping
    its newest `max_to_keep` steps: the book's torch.save file in one process, DCP inside a
    process group (every rank calls it); `run` (JSON) and `arrays` are the caller's own. Returns
    the step's folder. A step the directory already holds is refused."""
    check_optimizer(model, optimizer)
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"a checkpoint's step must be an integer >= 0, got {step!r}")
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise ValueError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
    path = Path(directory)
    final, tmp = path / str(int(step)), path / f".{int(step)}.tmp"
    if final.exists():
        raise ValueError(f"{os.fspath(directory)!r} already holds a checkpoint of step {int(step)}")
    inner = _inner(model)
    counter = getattr(inner, "dropout_counter", None)
    meta = {
        "format": FORMAT,
        "config": inner.cfg.to_dict(),
        "step": _adam_step(optimizer),
        "adamw": _settings(optimizer).to_dict(),
        "dropout_counter": None if counter is None else int(counter.value),
        "run": dict(run or {}),
    }
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in (arrays or {}).items()}
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a save cut short before
        tmp.mkdir(parents=True)
    _barrier()
    if _distributed():
        dcp, get_state_dict, _ = _dcp()
        model_sd, optim_sd = get_state_dict(model, optimizer)  # full names, each rank's shards
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
        if _rank0():
            torch.save(tensors, tmp / ARRAYS_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")  # last: marks it whole
    else:
        book = {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
        torch.save({**book, **meta, "arrays": tensors}, tmp / BOOK_FILE)
    _barrier()
    if _rank0():
        os.replace(tmp, final)
        for old in checkpoint_steps(path)[:-max_to_keep]:
            shutil.rmtree(path / str(old))
    _barrier()
    return final


def restore_checkpoint(
    directory: str | os.PathLike[str], model: _GPT, optimizer: torch.optim.Optimizer, *, step: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Restore step `step` (the latest by default) of `directory` into `model` and `optimizer`; a
    DCP step into any sharding (or a plain model), a torch.save step into a model in one process.
    Returns the step and the run's JSON. A checkpoint for another config, other AdamW settings or
    a model with (without) parity dropout where it has none (one) is refused in one line before
    anything changes."""
    check_optimizer(model, optimizer)
    step = _pick(directory, step)
    folder = Path(directory) / str(step)
    source = f"checkpoint {os.fspath(directory)!r} step {step}"
    meta, book = _read(folder, source)
    saved = _saved(meta, source)
    inner = _inner(model)
    saved.check_fits(inner.cfg, _settings(optimizer), source)
    counter = getattr(inner, "dropout_counter", None)
    check_dropout_counter(saved.dropout_counter, counter is not None)
    if book is not None:
        if _distributed():
            raise ValueError(f"{source} is a torch.save file for one process; a process group restores DCP steps")
        model.load_state_dict(book["model_state_dict"])
        optimizer.load_state_dict(book["optimizer_state_dict"])
    else:
        dcp, get_state_dict, set_state_dict = _dcp()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_GROUP)  # one process: meant
            dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if counter is not None:
        counter.value = int(saved.dropout_counter)  # type: ignore[arg-type]
    return step, saved.run


def _arrays(folder: Path, book: dict[str, Any] | None) -> dict[str, np.ndarray]:
    tensors = book.get("arrays", {}) if book is not None else torch.load(folder / ARRAYS_FILE, weights_only=True)
    return {k: v.numpy() for k, v in tensors.items()}


def checkpoint_to_train_state(directory: str | os.PathLike[str], step: int | None = None) -> TrainState:
    """Step `step` (the latest by default) of a torch checkpoint (torch.save or DCP) as the canonical
    training state, with no model given: a model and optimizer are built from the config it
    records, restored, and mapped by `gpt_torch.train_state`."""
    step = _pick(directory, step)
    folder = Path(directory) / str(step)
    source = f"checkpoint {os.fspath(directory)!r} step {step}"
    meta, book = _read(folder, source)
    saved = _saved(meta, source)
    with torch.random.fork_rng(devices=[]):  # building a model draws from torch's generator: not the caller's
        model = GPTModel(saved.cfg)
    if saved.dropout_counter is not None:
        use_parity_dropout(model)  # its counter is the checkpoint's; the seed is saved by neither form
    s = saved.adamw
    optimizer = adamw(model, s.lr, s.weight_decay, s.betas, s.eps)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_GROUP)
        restore_checkpoint(directory, model, optimizer, step=step)
    state = train_state(model, optimizer, run=saved.run, arrays=_arrays(folder, book))
    state.check(source)
    return state


def train_state_to_checkpoint(
    state: TrainState, directory: str | os.PathLike[str], *, step: int | None = None, max_to_keep: int = 3
) -> Path:
    """Write the canonical training state `state` as a torch checkpoint (the book's torch.save file
    in one process), as step `step` of `directory` (the state's own step by default); returns the
    step's folder."""
    state.check()
    with torch.random.fork_rng(devices=[]):
        model = GPTModel(state.cfg)  # every parameter overwritten below
    if state.dropout_counter is not None:
        use_parity_dropout(model)
    s = state.adamw
    optimizer = adamw(model, s.lr, s.weight_decay, s.betas, s.eps)
    load_train_state(model, optimizer, state)
    return save_checkpoint(
        directory,
        model,
        optimizer,
        step=state.step if step is None else step,
        max_to_keep=max_to_keep,
        run=state.run,
        arrays=state.arrays,
    )


__all__ = [
    "FORMAT",
    "checkpoint_steps",
    "checkpoint_to_train_state",
    "restore_checkpoint",
    "save_checkpoint",
    "train_state_to_checkpoint",
]
