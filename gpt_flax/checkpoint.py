"""The Flax twin's own checkpoint: model and optimizer saved with Orbax (`orbax.checkpoint`), the way
the Flax NNX docs recommend, and converted both ways to the canonical training state.

A checkpoint directory holds one folder per step (the `CheckpointManager`'s step numbers), newest
`max_to_keep` kept. Each step is a `Composite` of three items: `params` (the model's `nnx.Param`
state), `optimizer` (the whole `nnx.Optimizer` state: its step and optax's chain state, moments
included), both pure pytrees (`StandardSave`), and `meta` (`JsonSave`: the format, the config, the
AdamW settings, the parity-dropout counter and the run's JSON); a fourth, `arrays`, holds the run's
own arrays where it has any. Orbax writes a step into a temporary folder and renames it when every
item is written, so a half-written step is never listed, nor read.

Restoring reads into an abstract state built from the target's own variables (shape, dtype and
sharding: `jax.ShapeDtypeStruct(..., sharding=...)`), then `nnx.update`: each array is read
straight into the target's placement, whatever mesh (or one device) the checkpoint was saved from.
The torch twin's gpt_torch/checkpoint.py has the same functions over torch.save and DCP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp  # type: ignore[import-untyped]  # orbax ships no py.typed
from flax import nnx

from gpt_spec import GPTConfig
from gpt_spec.formats.train_state import AdamWSettings, TrainState
from gpt_spec.layout import in_model_order
from gpt_spec.training import check_dropout_counter

from .dropout import use_parity_dropout
from .model import _GPT, GPTModel
from .train import _adam_state, _adamw_tx, _settings, adamw, check_optimizer, load_train_state
from .weights import to_canonical

FORMAT = "gpt-twins/orbax-checkpoint-v1"


def _path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory).absolute()  # Orbax refuses a relative path


def _manager(directory: str | os.PathLike[str], max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=max_to_keep is not None)
    # Each item's handler named up front: Orbax then reads any item alone, without a warning per item.
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "optimizer": ocp.StandardCheckpointHandler(),
        "arrays": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(_path(directory), options=options, item_handlers=handlers)


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps `directory` holds a finished checkpoint of, oldest first ([] for none, or no folder)."""
    if not _path(directory).is_dir():
        return []
    with _manager(directory) as manager:
        return sorted(manager.all_steps())


def _pick(manager: ocp.CheckpointManager, directory: str | os.PathLike[str], step: int | None) -> int:
    """`step`, or the latest where None; refused in one line where the directory has no such step."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"{os.fspath(directory)!r} holds no Orbax checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"{os.fspath(directory)!r} holds no checkpoint of step {step}; it holds steps {steps}")
    return step


def _read_meta(manager: ocp.CheckpointManager, step: int, source: str) -> dict[str, Any]:
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ValueError(f"{source} is not a gpt-twins checkpoint (its 'meta' item is unreadable: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{source} is not a gpt-twins checkpoint (its meta has no format {FORMAT!r})")
    return meta


def _saved(meta: dict[str, Any], source: str) -> TrainState:
    """The config and settings a checkpoint's meta records, as a tensorless TrainState (to check fit)."""
    try:
        cfg, settings = GPTConfig.from_dict(meta["config"]), AdamWSettings.from_dict(meta["adamw"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: its meta holds a bad config or optimizer: {e}") from None
    return TrainState(cfg, {}, {}, {}, int(meta["step"]), settings, meta.get("dropout_counter"), meta.get("run", {}))


def _abstract(state: nnx.State) -> Any:
    """Each array of `state` as a ShapeDtypeStruct with its own sharding: Orbax reads into that."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _write(
    directory: str | os.PathLike[str],
    step: int,
    max_to_keep: int,
    params: nnx.State,
    opt_state: nnx.State,
    meta: dict[str, Any],
    arrays: dict[str, Any] | None,
) -> Path:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"a checkpoint's step must be an integer >= 0, got {step!r}")
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise ValueError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
    items: dict[str, Any] = {
        "params": ocp.args.StandardSave(params),
        "optimizer": ocp.args.StandardSave(opt_state),
        "meta": ocp.args.JsonSave({"format": FORMAT, **meta, "arrays": bool(arrays)}),
    }
    if arrays:
        items["arrays"] = ocp.args.StandardSave({k: np.asarray(v) for k, v in arrays.items()})
    with _manager(directory, max_to_keep) as manager:
        if int(step) in manager.all_steps():
            raise ValueError(f"{os.fspath(directory)!r} already holds a checkpoint of step {int(step)}")
        manager.save(int(step), args=ocp.args.Composite(**items))
        manager.wait_until_finished()
    return _path(directory) / str(int(step))


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: _GPT,
    optimizer: nnx.Optimizer,
    *,
    step: int,
    max_to_keep: int = 3,
    run: dict[str, Any] | None = None,
    arrays: dict[str, Any] | None = None,
) -> Path:
    """Save `model` and `optimizer` (made by adamw(model)) with Orbax as step `step` of `directory`,
    keeping its newest `max_to_keep` steps; `run` (JSON) and `arrays` are the caller's own. Returns
    the step's folder. A step the directory already holds is refused."""
    check_optimizer(model, optimizer)
    counter = getattr(model, "dropout_counter", None)
    meta = {
        "config": model.cfg.to_dict(),
        "step": int(np.asarray(optimizer.step[...])),
        "adamw": _settings(optimizer).to_dict(),
        "dropout_counter": None if counter is None else int(np.asarray(counter[...])),
        "run": dict(run or {}),
    }
    return _write(directory, step, max_to_keep, nnx.state(model, nnx.Param), nnx.state(optimizer), meta, arrays)


def restore_checkpoint(
    directory: str | os.PathLike[str], model: _GPT, optimizer: nnx.Optimizer, *, step: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Restore step `step` (the latest by default) of `directory` into `model` and `optimizer`,
    each array read straight into its target's sharding (any mesh, or one device); returns the
    step and the run's JSON. A checkpoint for another config, other AdamW settings or a model with
    (without) parity dropout where it has none (one) is refused in one line before anything changes."""
    check_optimizer(model, optimizer)
    source = f"checkpoint {os.fspath(directory)!r}"
    if not _path(directory).is_dir():
        raise ValueError(f"{os.fspath(directory)!r} holds no Orbax checkpoint (no such folder)")
    with _manager(directory) as manager:
        step = _pick(manager, directory, step)
        source = f"{source} step {step}"
        saved = _saved(_read_meta(manager, step, source), source)
        saved.check_fits(model.cfg, _settings(optimizer), source)
        counter = getattr(model, "dropout_counter", None)
        check_dropout_counter(saved.dropout_counter, counter is not None)
        targets = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.state(model, nnx.Param))),
            optimizer=ocp.args.StandardRestore(_abstract(nnx.state(optimizer))),
        )
        restored = manager.restore(step, args=targets)
    nnx.update(model, restored.params)
    nnx.update(optimizer, restored.optimizer)
    if counter is not None:
        counter[...] = jax.numpy.asarray(saved.dropout_counter, dtype=counter.dtype)
    return step, saved.run


def checkpoint_to_train_state(directory: str | os.PathLike[str], step: int | None = None) -> TrainState:
    """Step `step` (the latest by default) of an Orbax checkpoint as the canonical training state,
    with no model given: the abstract model and optimizer are built from the config it records,
    and every array read onto one device."""
    source = f"checkpoint {os.fspath(directory)!r}"
    if not _path(directory).is_dir():
        raise ValueError(f"{os.fspath(directory)!r} holds no Orbax checkpoint (no such folder)")
    with _manager(directory) as manager:
        step = _pick(manager, directory, step)
        source = f"{source} step {step}"
        meta = _read_meta(manager, step, source)
        saved, saved_arrays = _saved(meta, source), meta.get("arrays", False)
        cfg, s = saved.cfg, saved.adamw

        def build() -> tuple[GPTModel, nnx.Optimizer]:
            model = GPTModel(cfg, rngs=nnx.Rngs(0))
            return model, nnx.Optimizer(model, _adamw_tx(s.lr, s.weight_decay, *s.betas, s.eps), wrt=nnx.Param)

        model, optimizer = nnx.eval_shape(build)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def abstract(state: nnx.State) -> Any:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)

        targets: dict[str, Any] = {
            "params": ocp.args.StandardRestore(abstract(nnx.state(model, nnx.Param))),
            "optimizer": ocp.args.StandardRestore(abstract(nnx.state(optimizer))),
        }
        if saved_arrays:
            targets["arrays"] = ocp.args.StandardRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**targets))
    nnx.update(model, restored.params)
    nnx.update(optimizer, restored.optimizer)
    adam = _adam_state(optimizer)
    weights = to_canonical(nnx.state(model, nnx.Param))
    order = in_model_order(weights, cfg)  # the torch twin's (NNX's own is sorted by path)
    mu, nu = to_canonical(adam.mu), to_canonical(adam.nu)
    arrays = restored.arrays if "arrays" in targets else {}
    state = TrainState(
        cfg,
        {n: weights[n] for n in order},
        {n: mu[n] for n in order},
        {n: nu[n] for n in order},
        int(np.asarray(adam.count[...])),
        s,
        saved.dropout_counter,
        saved.run,
        {k: np.asarray(v) for k, v in arrays.items()},
    )
    state.check(source)
    return state


def train_state_to_checkpoint(
    state: TrainState, directory: str | os.PathLike[str], *, step: int | None = None, max_to_keep: int = 3
) -> Path:
    """Write the canonical training state `state` as an Orbax checkpoint, as step `step` of
    `directory` (the state's own step by default); returns the step's folder."""
    state.check()
    s = state.adamw
    model = GPTModel(state.cfg, rngs=nnx.Rngs(0))  # every parameter overwritten below
    if state.dropout_counter is not None:
        use_parity_dropout(model)  # its counter is the state's; the seed is not saved by either form
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
