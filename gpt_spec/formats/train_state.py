"""The canonical training state: what resumes a run in either twin. One safetensors file holds the
weights, AdamW's first and second moments per parameter (canonical names and layouts), and the
run's own arrays (the data order); its metadata holds the config, the step count, the optimizer's
settings, the parity-dropout counter and the run's position (JSON). Written atomically and read
back bit for bit before it is renamed into place, so a half-written state is never read.

Each twin maps it exactly onto its optimizer: `torch.optim.AdamW.state_dict()` (per-parameter
`step`, `exp_avg`, `exp_avg_sq`) and optax's `ScaleByAdamState(count, mu, nu)` (through the one
table of renames and transposes in gpt_flax/weights.py): `gpt_torch.train_state` /
`gpt_flax.train_state` write it, `load_train_state` in each twin reads it. `read_torch_training`
reads the book's `model_and_optimizer.pth` (chapter 5's `torch.save` of both state dicts) as one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_adamw
from ..config import GPTConfig, parse_json
from ..layout import gpt_shapes, in_model_order, infer_config
from ..tensors import StateDict, check_state_dict
from . import safetensors_io
from .atomic import atomic_write
from .canonical import SAVE_SUFFIX, check_save
from .torch_save import read_torch_objects

FORMAT = "gpt-twins/train-state-v1"
_PARTS = ("weights", "exp_avg", "exp_avg_sq")  # tensor prefixes: "weights/tok_emb.weight", ...
_RUN = "run"  # prefix of the run's own arrays: "run/orders"


@dataclasses.dataclass(frozen=True)
class AdamWSettings:
    """AdamW's settings, as both twins' `adamw()` take them (checked by gpt_spec.checks.check_adamw)."""

    lr: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        lr, wd, betas, eps = check_adamw(self.lr, self.weight_decay, self.betas, self.eps)
        object.__setattr__(self, "betas", betas)

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "betas": list(self.betas), "eps": self.eps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdamWSettings:
        beta1, beta2 = data["betas"]
        return cls(data["lr"], data["weight_decay"], (beta1, beta2), data["eps"])


@dataclasses.dataclass
class TrainState:
    """A training run between two steps, in the canonical layout.

    `step` is the AdamW steps taken (torch's per-parameter `step`, optax's `count`); `exp_avg` and
    `exp_avg_sq` are AdamW's moments in canonical names and layouts; `dropout_counter` is the
    parity-dropout counter (None: the model draws no parity dropout); `run` (JSON) and `arrays`
    are the trainer's own: where its data stands, its schedule, what it recorded so far."""

    cfg: GPTConfig
    weights: StateDict
    exp_avg: StateDict
    exp_avg_sq: StateDict
    step: int
    adamw: AdamWSettings
    dropout_counter: int | None = None
    run: dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def check(self, source: str = "training state") -> None:
        """Refuse, naming the field, a state whose tensors do not fit its config or each other."""
        expected = gpt_shapes(self.cfg)
        for part in _PARTS:
            check_state_dict(expected, getattr(self, part), "GPTModel", f"{source}: its {part}")
        if isinstance(self.step, bool) or not isinstance(self.step, int | np.integer) or self.step < 0:
            raise ValueError(f"{source}: its step must be an integer >= 0, got {self.step!r}")
        if self.step == 0 and any(np.any(v) for v in self.exp_avg.values()):
            raise ValueError(f"{source}: its step is 0 but its moments are not zero")
        if any(np.any(v < 0) for v in self.exp_avg_sq.values()):
            raise ValueError(f"{source}: its exp_avg_sq holds a negative value")
        counter = self.dropout_counter
        if counter is not None and (isinstance(counter, bool) or not isinstance(counter, int) or counter < 0):
            raise ValueError(f"{source}: its dropout_counter must be an integer >= 0 or None, got {counter!r}")

    def check_fits(self, cfg: GPTConfig, adamw: AdamWSettings | None = None, source: str = "training state") -> None:
        """Refuse, in one line naming the first field that differs, a state for another config or
        (where `adamw` is given) other optimizer settings than the run resuming it."""
        mine, theirs = self.cfg.to_dict(), cfg.to_dict()
        for key in mine:
            if mine[key] != theirs.get(key):
                raise ValueError(f"{source}: its config has {key}={mine[key]!r}, the model {key}={theirs.get(key)!r}")
        if adamw is not None:
            for key, value in self.adamw.to_dict().items():
                if value != adamw.to_dict()[key]:
                    raise ValueError(
                        f"{source}: its optimizer has {key}={value!r}, the run asks for {key}={adamw.to_dict()[key]!r}"
                    )


def save_train_state(path: str | os.PathLike[str], state: TrainState) -> None:
    """Write `state` as one safetensors file (a name ending in .safetensors), checked first, written
    beside the destination, read back bit for bit, then renamed over it."""
    check_save(path)
    state.check(f"cannot write training state {os.fspath(path)!r}")
    tensors: dict[str, np.ndarray] = {}
    for part in _PARTS:
        for name, value in getattr(state, part).items():
            tensors[f"{part}/{name}"] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    for key, value in state.arrays.items():
        tensors[f"{_RUN}/{key}"] = np.ascontiguousarray(value)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(state.cfg.to_dict()),
        "step": str(int(state.step)),
        "adamw": json.dumps(state.adamw.to_dict()),
        "dropout_counter": json.dumps(state.dropout_counter),
        "run": json.dumps(state.run),
    }
    atomic_write(path, lambda tmp: safetensors_io.write_verified(tmp, tensors, metadata))


def is_train_state(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a file this module wrote (from its header alone)."""
    try:
        _, metadata = safetensors_io.open_safetensors(Path(path), "training state")
    except ValueError:
        return False
    return metadata.get("format") == FORMAT


def load_train_state(path: str | os.PathLike[str], *, config: GPTConfig | None = None) -> TrainState:
    """Read and check a training state `save_train_state` wrote (or refuse it, naming the field);
    a `.pth` is read as the book's `model_and_optimizer.pth` (`read_torch_training`, `config`
    where its tensors do not imply one)."""
    path = Path(path)
    if path.suffix in (".pth", ".pt"):
        return read_torch_training(path, config=config)
    source = f"training state {str(path)!r}"
    entries, metadata = safetensors_io.open_safetensors(path, "training state")
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{source} is not a training state (its metadata has no format {FORMAT!r})")

    def field(key: str) -> Any:
        if key not in metadata:
            raise ValueError(f"{source}: its metadata is damaged: it has no {key!r}")
        return parse_json(metadata[key], f"{source}: its metadata field {key!r}")

    try:
        cfg = GPTConfig.from_dict(field("config"))
        adamw = AdamWSettings.from_dict(field("adamw"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: its metadata holds a bad config or optimizer: {e}") from None
    parts: dict[str, dict[str, np.ndarray]] = {part: {} for part in (*_PARTS, _RUN)}
    for key, (_, _, read) in entries.items():
        part, _, name = key.partition("/")
        if part not in parts or not name:
            raise ValueError(f"{source}: unexpected tensor {key!r}")
        parts[part][name] = read()
    state = TrainState(
        cfg,
        parts["weights"],
        parts["exp_avg"],
        parts["exp_avg_sq"],
        field("step"),
        adamw,
        field("dropout_counter"),
        field("run"),
        parts[_RUN],
    )
    state.check(source)
    return state


def from_torch_optimizer(
    weights: Mapping[str, np.ndarray], optimizer_state: Mapping[str, Any], source: str = "optimizer state"
) -> tuple[int, StateDict, StateDict, AdamWSettings]:
    """`torch.optim.AdamW.state_dict()` (its tensors as numpy arrays) over the parameters `weights`
    holds (in `model.parameters()` order) as (step, exp_avg, exp_avg_sq, settings) in canonical
    names. A parameter never stepped has no entry: its moments are zeros of its shape. Every
    stepped parameter must share one step (one optimizer over the whole model, as both twins'
    adamw() makes it)."""
    names = list(weights)
    groups = optimizer_state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 1:
        raise ValueError(f"{source}: expected one parameter group, got {len(groups or [])}")
    group = groups[0]
    if group.get("params") != list(range(len(names))):
        raise ValueError(
            f"{source}: its parameter group holds {len(group.get('params', []))} parameters, the model {len(names)}"
        )
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(f"{source}: {flag}=True is not the AdamW both twins compute")
    beta1, beta2 = group["betas"]
    settings = AdamWSettings(group["lr"], group["weight_decay"], (beta1, beta2), group["eps"])
    state = optimizer_state.get("state", {})
    steps = {float(np.asarray(s["step"])) for s in state.values()}
    if len(steps) > 1:
        raise ValueError(f"{source}: its parameters were stepped {len(steps)} different numbers of times")
    step = steps.pop() if steps else 0.0
    if step != math.floor(step) or step < 0:
        raise ValueError(f"{source}: its step {step!r} is not a count")
    exp_avg: StateDict = {}
    exp_avg_sq: StateDict = {}
    for index, name in enumerate(names):
        entry = state.get(index)
        for out, key in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
            out[name] = (
                np.zeros_like(weights[name], dtype=np.float32)
                if entry is None
                else np.asarray(entry[key], dtype=np.float32)
            )
    return int(step), exp_avg, exp_avg_sq, settings


def read_torch_training(path: str | os.PathLike[str], *, config: GPTConfig | None = None) -> TrainState:
    """The book's `model_and_optimizer.pth` ({"model_state_dict", "optimizer_state_dict"}, read with
    `weights_only=True`) as a training state; its config is `config`, else the one the tensors
    imply (the published GPT-2 head count for its width and depth)."""
    source = f"checkpoint {os.fspath(path)!r}"
    weights, optimizer_state = read_torch_objects(path)
    if optimizer_state is None:
        raise ValueError(f"{source} holds no optimizer_state_dict: it is weights only")
    cfg = config or infer_config(weights, source=source)
    weights = dict(check_state_dict(gpt_shapes(cfg), weights, "GPTModel", source))
    ordered = {name: weights[name] for name in in_model_order(weights, cfg)}
    step, exp_avg, exp_avg_sq, settings = from_torch_optimizer(ordered, optimizer_state, f"{source}: its optimizer")
    state = TrainState(cfg, ordered, exp_avg, exp_avg_sq, step, settings)
    state.check(source)
    return state


__all__ = [
    "FORMAT",
    "SAVE_SUFFIX",
    "AdamWSettings",
    "TrainState",
    "from_torch_optimizer",
    "is_train_state",
    "load_train_state",
    "read_torch_training",
    "save_train_state",
]
