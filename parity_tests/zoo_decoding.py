"""The decoding mutants of the zoo (zoo_catalog.DECODING_MUTANTS) against the generation check (decoding.py).

A KV-cache mutant swaps the `__class__` of the model or its attention modules for the zoo's
(zoo_torch.KVCacheGPT, KVCacheAttention and their Flax twins), as the forward mutants do: the class
is part of NNX's graph definition, so every jitted program (the check's cached calls, the twin's
decoding loop) traces the mutant anew and a clean run never reuses a planted program. A sampling
mutant replaces the `pick_token` the twin's generate module calls with parity_seed by the zoo's
Sampler with the bug's knobs (a host function: nothing compiled to go stale). Leaving the context
puts every class and function back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

from gpt_spec import GPTConfig

from . import decoding, zoo_flax, zoo_torch
from .zoo_catalog import SAMPLER, Mutant, ZooRow
from .zoo_plant import planted as planted_modules

_SAMPLERS: dict[str, type] = {"torch": zoo_torch.Sampler, "flax": zoo_flax.Sampler}


@functools.cache
def sampler_class(twin: str, knobs: tuple[tuple[str, Any], ...]) -> type:
    label = ",".join(f"{k.removeprefix('bug_')}={v}" for k, v in knobs)
    return type(f"Sampler[{label}]", (_SAMPLERS[twin],), dict(knobs))


@contextlib.contextmanager
def planted_sampler(twin: str, knobs: tuple[tuple[str, Any], ...]) -> Iterator[None]:
    """The twin's parity sampler replaced by the zoo's with these knobs, its distribution with it."""
    module = decoding.generate_module(twin)
    saved = module.pick_token
    sampler = sampler_class(twin, knobs)()

    def pick_token(logits, temperature, top_k, seed, step):
        return sampler.pick_token(logits, temperature, top_k, seed, step)

    pick_token.probabilities = sampler.probabilities  # type: ignore[attr-defined]  # decoding.sampler reads it
    module.pick_token = pick_token
    try:
        yield
    finally:
        module.pick_token = saved


@contextlib.contextmanager
def planted(mutant: Mutant, twin: str, models: dict[str, Any]) -> Iterator[None]:
    """Plant a decoding mutant (a Mutant) in `models[twin]`: its sampler swap, and its module
    swaps through zoo.planted."""
    samplers = [s for s in mutant.swaps if s.layer == SAMPLER]
    modules = dataclasses.replace(mutant, swaps=tuple(s for s in mutant.swaps if s.layer != SAMPLER))
    with contextlib.ExitStack() as stack:
        for swap in samplers:
            stack.enter_context(planted_sampler(twin, swap.knobs))
        stack.enter_context(planted_modules(modules, twin, models))
        yield


@dataclasses.dataclass
class GenerationRow(ZooRow):
    """A decoding mutant's row: named and located by the generation check's first finding (part,
    prompt, token position, and the stage for the cache), and ok only while the clean generation
    check on the same models passes too."""

    control_passed: bool = True

    @property
    def first_stage(self) -> str:
        return self.first

    @property
    def located(self) -> bool:
        return bool(self.first) and self.first == self.where

    @property
    def ok(self) -> bool:
        return self.control_passed and self.caught and self.located


def row(mutant: Mutant, twin: str, report: decoding.DecodingReport) -> GenerationRow:
    """A zoo row for a decoding mutant from its generation check."""
    found = report.first_failure
    r = GenerationRow(mutant.name, twin, mutant.where, report.passed, direction="generation")
    if found is not None:
        r.first, r.margin, r.describe = found.name, found.margin, found.describe()
        r.evidence = "bound" if found.bounded else found.what
    return r


class Runner:
    """The generation check's models for each config, built once: every mutant and the control
    run on the same models, one after another (a planted run must leave nothing behind)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.models: dict[GPTConfig, dict[str, dict[str, Any]]] = {}

    def check(self, cfg: GPTConfig, mutant: Mutant | None = None, twin: str = "") -> decoding.DecodingReport:
        if cfg not in self.models:
            self.models[cfg] = decoding.build_models(cfg, self.seed)
        plant = None if mutant is None else functools.partial(planted, mutant, twin)
        return decoding.run_generation_check(cfg, seed=self.seed, models=self.models[cfg], plant=plant)

    def run(self, cfg: GPTConfig, mutant: Mutant, twin: str) -> GenerationRow:
        return row(mutant, twin, self.check(cfg, mutant, twin))

    def close(self, rows: list[ZooRow], cfg: GPTConfig) -> decoding.DecodingReport:
        """The clean generation check after the planted ones, on the same models: each decoding row
        is ok only if it passes."""
        control = self.check(cfg)
        for r in rows:
            if isinstance(r, GenerationRow):
                r.control_passed = control.passed
                if not control.passed:
                    first = control.first_failure
                    r.describe = f"{r.describe}; the clean generation check FAILS: {first.describe() if first else ''}"
        return control
