"""Planting a mutant of the zoo (zoo_catalog.py) in one twin for the duration of a context.

A mutant swaps the `__class__` of the model's modules of one kind (all LayerNorms, every Linear,
...) for a subclass of that layer written as a porter might have (zoo_torch.py, zoo_flax.py) with
the bug's knob set; a converter mutant wraps the twin's state-dict functions instead; an optimizer
or loss mutant patches the twin's adamw() and loss (zoo_training.py). Leaving the context puts every
class and function back. The class is part of NNX's graph definition, so the jitted Flax forward
traces the mutant anew and never reuses a clean program.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from flax import nnx

import gpt_flax
import gpt_torch

from . import TWINS, twins, zoo_flax, zoo_torch, zoo_training
from .zoo_catalog import GENERATION, Mutant, get

# What each zoo layer replaces, per twin: (the class a module must be, the zoo's class).
_LAYERS: dict[str, dict[str, tuple[type, type]]] = {
    "torch": {
        "LayerNorm": (gpt_torch.LayerNorm, zoo_torch.LayerNorm),
        "GELU": (gpt_torch.GELU, zoo_torch.GELU),
        "Linear": (torch.nn.Linear, zoo_torch.Linear),
        "MultiHeadAttention": (gpt_torch.MultiHeadAttention, zoo_torch.MultiHeadAttention),
        "TransformerBlock": (gpt_torch.TransformerBlock, zoo_torch.TransformerBlock),
        "Dropout": (torch.nn.Dropout, zoo_torch.Dropout),
        "GPT": (gpt_torch.model._GPT, zoo_torch.GPT),
        "KVCacheGPT": (gpt_torch.model._GPT, zoo_torch.KVCacheGPT),
        "KVCacheAttention": (gpt_torch.MultiHeadAttention, zoo_torch.KVCacheAttention),
    },
    "flax": {
        "LayerNorm": (gpt_flax.LayerNorm, zoo_flax.LayerNorm),
        "GELU": (gpt_flax.GELU, zoo_flax.GELU),
        "Linear": (nnx.Linear, zoo_flax.Linear),
        "MultiHeadAttention": (gpt_flax.MultiHeadAttention, zoo_flax.MultiHeadAttention),
        "TransformerBlock": (gpt_flax.TransformerBlock, zoo_flax.TransformerBlock),
        "Dropout": (nnx.Dropout, zoo_flax.Dropout),
        "GPT": (gpt_flax.model._GPT, zoo_flax.GPT),
        "KVCacheGPT": (gpt_flax.model._GPT, zoo_flax.KVCacheGPT),
        "KVCacheAttention": (gpt_flax.MultiHeadAttention, zoo_flax.KVCacheAttention),
    },
}


@functools.cache
def _mutant_class(zoo_cls: type, cls: type, knobs: tuple[tuple[str, Any], ...]) -> type:
    if issubclass(cls, zoo_cls):  # a mutant already (diagnose.py plants one over another): both bugs
        bases: tuple[type, ...] = (cls,)
    else:
        bases = (zoo_cls,) if issubclass(zoo_cls, cls) else (zoo_cls, cls)
    label = ",".join(f"{k.removeprefix('bug_')}={v}" for k, v in knobs)
    return type(f"{cls.__name__}[{label}]", bases, dict(knobs))


def _modules(twin: str, model: Any) -> Iterator[tuple[str, Any]]:
    """(attribute name, module) for the model and every module in it."""
    if twin == "torch":
        for path, module in model.named_modules():
            yield path.rsplit(".", 1)[-1], module
    else:
        for path, module in nnx.iter_modules(model):
            yield (str(path[-1]) if path else ""), module


def _square_projection(name: str, value: np.ndarray) -> bool:
    return (
        name.endswith(("W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight"))
        and value.ndim == 2
        and value.shape[0] == value.shape[1]
    )


@contextlib.contextmanager
def _untransposed_squares(twin: str) -> Iterator[None]:
    """The twin's converters, as a port that transposes only where shapes disagree: a square
    projection goes in (and comes out) the other way round."""
    package = twins.package(twin)
    load, export = package.load_state_dict, package.state_dict

    def flip(sd):
        return {
            k: np.ascontiguousarray(np.asarray(v).T) if _square_projection(k, np.asarray(v)) else v
            for k, v in sd.items()
        }

    package.load_state_dict = lambda model, sd: load(model, flip(sd))
    package.state_dict = lambda model: flip(export(model))
    try:
        yield
    finally:
        package.load_state_dict, package.state_dict = load, export


@contextlib.contextmanager
def planted(mutant: Mutant, twin: str, models: dict[str, Any]) -> Iterator[None]:
    """Plant `mutant` in `models[twin]` (a dict of both twins, as forward.run_parity passes it)."""
    if twin not in TWINS:
        raise ValueError(f"twin must be one of {', '.join(TWINS)}, got {twin!r}")
    model = models[twin]
    swapped: list[tuple[Any, type]] = []
    try:
        for attr, module in list(_modules(twin, model)):
            for swap in mutant.swaps:
                base, zoo_cls = _LAYERS[twin][swap.layer]
                if isinstance(module, base) and swap.only in (None, attr):
                    cls: type = type(module)
                    swapped.append((module, cls))
                    object.__setattr__(module, "__class__", _mutant_class(zoo_cls, cls, swap.knobs))
                    break
        if mutant.swaps and not swapped:
            raise ValueError(f"mutant {mutant.name} has nothing to replace in {type(model).__name__}")
        with (
            _untransposed_squares(twin) if mutant.converter else contextlib.nullcontext(),
            zoo_training.patched(twin, mutant.training) if mutant.training else contextlib.nullcontext(),
        ):
            yield
    finally:
        for module, cls in reversed(swapped):
            object.__setattr__(module, "__class__", cls)


def plant(name: str, twin: str) -> Callable[[dict[str, Any]], contextlib.AbstractContextManager]:
    """For forward.run_parity(plant=...): the named mutant in one twin."""
    mutant = get(name)
    if mutant.shows_in == GENERATION:  # check runs no generation: say which command does
        raise ValueError(
            f"mutant {name} shows in generation only (the KV cache and sampling): "
            f"`gpt-parity mutants --mutant {name}` runs it through the generation check"
        )
    return functools.partial(planted, mutant, twin)


@contextlib.contextmanager
def _perturbed_loads(twin: str, param: str, eps: float, seed: int) -> Iterator[None]:
    """The twin's load_state_dict, multiplying `param` by 1 ± eps element by element (random signs):
    a perturbation of relative size eps in one tensor, which no bug of the zoo makes."""
    package = twins.package(twin)
    load = package.load_state_dict

    def perturbed(sd):
        if param not in sd:
            raise ValueError(f"no tensor {param!r} to perturb; the state dict holds {', '.join(sorted(sd))}")
        w = np.asarray(sd[param], np.float32)
        signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0], np.float32), w.shape)
        return {**sd, param: (w * (1 + np.float32(eps) * signs)).astype(np.float32)}

    package.load_state_dict = lambda model, sd: load(model, perturbed(sd))
    try:
        yield
    finally:
        package.load_state_dict = load


def perturb(param: str, eps: float, twin: str, seed: int = 0) -> Callable[[dict[str, Any]], Any]:
    """For forward.run_parity(plant=...): one weight tensor of one twin off by a relative eps."""
    if twin not in TWINS:
        raise ValueError(f"twin must be one of {', '.join(TWINS)}, got {twin!r}")
    if not eps > 0:
        raise ValueError(f"a perturbation needs eps > 0, got {eps}")
    return lambda models: _perturbed_loads(twin, param, eps, seed)
