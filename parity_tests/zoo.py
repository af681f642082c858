"""The planted-bug zoo against the suite: the classic porting bugs (zoo_catalog.py), each planted in
either twin in turn (zoo_plant.py), and the run that shows the suite catches every one where it was
planted: the default check for a model bug, the training evidence for an optimizer or loss bug, the
generation check (zoo_decoding.py) for a KV-cache or sampling bug.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from gpt_spec import GPTConfig, ModelKind

from . import TWINS, zoo_decoding, zoo_training
from .environment import versions
from .forward import DIRECTIONS, ParityOptions, run_parity
from .progress import Progress, silent
from .training import TrainingReport, run_training_parity
from .twins import build_flax, build_torch
from .zoo_catalog import (
    BF16,
    BF16_TRAINING,
    BY_NAME,
    DECODING_MUTANTS,
    FORWARD_MUTANTS,
    GENERATION,
    MUTANTS,
    OPTIMIZER_MUTANTS,
    SAMPLER,
    TF32,
    TRAINING_MUTANTS,
    Mutant,
    Swap,
    ZooRow,
    get,
)
from .zoo_plant import _LAYERS, _mutant_class, perturb, plant, planted

__all__ = [
    "BF16",
    "BF16_TRAINING",
    "BY_NAME",
    "DECODING_MUTANTS",
    "FORWARD_MUTANTS",
    "GENERATION",
    "MUTANTS",
    "OPTIMIZER_MUTANTS",
    "SAMPLER",
    "TF32",
    "TRAINING_MUTANTS",
    "TWINS",
    "Mutant",
    "Swap",
    "ZooReport",
    "ZooRow",
    "_LAYERS",
    "_mutant_class",
    "get",
    "perturb",
    "plant",
    "planted",
    "run_zoo",
]


# --- the zoo against the suite ----------------------------------------------------------------------


@dataclasses.dataclass
class ZooReport:
    config: GPTConfig
    batch: int
    seq: int
    precision: str
    rows: list[ZooRow]  # the control first

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "batch": self.batch,
            "seq": self.seq,
            "matmul_precision": self.precision,
            "passed": self.passed,
            "mutants": {m.name: {"bug": m.bug, "planted_at": m.where} for m in MUTANTS},
            "rows": [r.to_json() for r in self.rows],
            "versions": versions(),
        }


def _row(mutant: Mutant | None, twin: str, report) -> ZooRow:
    found = report.first_failure
    row = ZooRow(mutant.name if mutant else "", twin, mutant.where if mutant else "-", report.passed)
    if found is None and mutant is None:  # the control: how close its closest call came
        r, finding = max(((r, f) for r in report.rows for f in [*r.stages, *r.layers]), key=lambda rf: rf[1].margin)
        row.evidence, row.margin, row.direction = finding.evidence, finding.margin, f"{r.direction} {r.candidate}"
        row.describe = f"closest to failing: {finding.describe()}"
    if found is not None:
        r, finding = found
        row.first, row.evidence, row.margin = finding.name, finding.evidence, finding.margin
        row.direction, row.describe = f"{r.direction} {r.candidate}", finding.describe()
    return row


def run_zoo(
    cfg: GPTConfig,
    *,
    mutants: Sequence[Mutant] = MUTANTS,
    twins: Sequence[str] = TWINS,
    batch: int = 2,
    seq: int | None = None,
    seed: int = 0,
    directions: Sequence[str] = DIRECTIONS,
    matmul_precision: str = "float32",
    progress: Progress = silent,
) -> ZooReport:
    """`gpt-parity check` with its default arguments (whole forward and layer evidence, both
    directions, batch 2 x 128) with nothing planted, then with each mutant planted in each twin.
    Both twins are built once per config and reused."""
    seq = min(cfg.context_length, 128) if seq is None else seq
    built: dict[GPTConfig, dict[str, Any]] = {}

    def models(c: GPTConfig) -> dict[str, Any]:
        if c not in built:
            built[c] = {
                "torch": build_torch(ModelKind.GPT, c, seed=seed),
                "flax": build_flax(ModelKind.GPT, c, seed=seed),
            }
        return built[c]

    prog = progress(1 + len(mutants) * len(twins))
    opts = ParityOptions(batch=batch, seq=seq, seed=seed, directions=directions, matmul_precision=matmul_precision)
    check = functools.partial(run_parity, opts=opts)
    with prog.step("control: nothing planted"):
        control = check(cfg, models=models(cfg))
    rows = [_row(None, "-", control)]
    generation = None  # zoo_decoding.Runner: the generation check's models, built at the first decoding mutant
    for mutant in mutants:
        for twin in twins:
            with prog.step(f"{mutant.name} in {twin}", phase=f"{len(mutants)} mutants × {len(twins)} twins"):
                c = mutant.adapt(cfg)
                plant = functools.partial(planted, mutant, twin)
                if mutant.shows_in == BF16_TRAINING:
                    trained = run_training_parity(
                        c, batch=batch, seq=min(seq, 32), steps=1, seed=seed, dtype="bfloat16", plant=plant
                    )
                    rows.append(_training_row(mutant, twin, trained))
                elif mutant.shows_in == GENERATION:
                    generation = generation or zoo_decoding.Runner(seed)
                    rows.append(generation.run(c, mutant, twin))
                elif mutant.shows_in == zoo_training.TRAINING:
                    trained = run_training_parity(
                        c, batch=batch, seq=min(seq, 32), steps=zoo_training.STEPS, seed=seed, plant=plant
                    )
                    rows.append(_training_row(mutant, twin, trained))
                else:
                    rows.append(_row(mutant, twin, check(c, models=models(c), plant=plant)))
    if generation is not None:  # the clean generation check, after the planted ones on the same models
        generation.close(rows, cfg)
    return ZooReport(cfg, batch, seq, control.precision, rows)


def _training_row(mutant: Mutant, twin: str, report: TrainingReport) -> ZooRow:
    """A training mutant's row: the first of the loss, the gradients (in model order) and the weights
    after each step checked (in model order) to fail."""
    row = ZooRow(mutant.name, twin, mutant.where, report.passed, direction=f"torch->flax, {report.dtype}")
    found = report.first_failure()
    if found is not None:
        row.first, row.margin, row.describe = found
        row.evidence = "bound"
    return row
