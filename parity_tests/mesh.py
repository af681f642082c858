"""Mesh parity: the Flax twin sharded on (data, model) device meshes against itself on one device."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

import gpt_flax
from gpt_flax.weights import canonical_name
from gpt_spec import GPTConfig, ModelKind

from .compare import Comparison, compare
from .environment import versions
from .progress import Progress, silent
from .tolerances import ADAMW_OUTLIER_FRACTION, FP32_FORWARD, GRADS
from .training import WeightCheck, weights_check
from .twins import build_flax, float32_matmuls, token_batch


@dataclasses.dataclass
class MeshRow:
    mesh: str
    logits: Comparison
    tokens_equal: bool  # greedy generation, 4 tokens from each row's first 2
    grads: list[Comparison]
    weights: WeightCheck
    bytes_per_device: int  # the most parameter bytes any device holds
    bytes_total: int  # all parameters, as one device holds them
    bytes_split_per_device: int  # of the parameters a rule split: the most any device holds
    bytes_split_total: int
    notes: list[str]

    @property
    def passed(self) -> bool:
        return self.logits.passed and self.tokens_equal and all(g.passed for g in self.grads) and self.weights.passed


@dataclasses.dataclass
class ShardingReport:
    config: GPTConfig
    batch: int
    seq: int
    precision: str
    rows: list[MeshRow]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "batch": self.batch,
            "seq": self.seq,
            "matmul_precision": self.precision,
            "passed": self.passed,
            "meshes": [
                {
                    "mesh": r.mesh,
                    "passed": r.passed,
                    "logits": r.logits.to_json(),
                    "generated_tokens_equal": r.tokens_equal,
                    "grads": [g.to_json() for g in r.grads],
                    "weights": r.weights.to_json(),
                    "param_bytes_per_device": r.bytes_per_device,
                    "param_bytes_total": r.bytes_total,
                    "split_param_bytes_per_device": r.bytes_split_per_device,
                    "split_param_bytes_total": r.bytes_split_total,
                    "notes": r.notes,
                }
                for r in self.rows
            ],
            "devices": [str(d) for d in jax.devices()],
            "versions": versions(),
        }


def _flax_step_results(fm, opt, x, y, ids):
    """Logits, greedy tokens, gradients and the weights after one AdamW step of a Flax model."""
    logits = np.asarray(gpt_flax.jit_forward(fm)(ids))
    fm.eval()
    tokens = np.asarray(gpt_flax.generate_text_simple(fm, ids[:, :2], 4, fm.cfg.context_length))
    fm.train()
    _, grads = gpt_flax.loss_and_grads(fm, x, y)
    gpt_flax.train_step(fm, opt, x, y)
    return logits, tokens, grads, gpt_flax.state_dict(fm)


def run_sharding_parity(
    cfg: GPTConfig,
    meshes: Sequence[str],
    *,
    batch: int = 8,
    seq: int = 16,
    seed: int = 0,
    lr: float = 4e-4,
    weights: Mapping[str, np.ndarray] | None = None,
    progress: Progress = silent,
) -> ShardingReport:
    """For each mesh: the Flax twin's logits, gradients and weights after one AdamW step, sharded,
    against the same model on one device (train mode at drop_rate 0, float32 matmuls)."""
    from gpt_flax import sharding

    cfg = cfg.replace(drop_rate=0.0)
    seq = min(seq, cfg.context_length - 1) if cfg.context_length > 1 else 1
    prog = progress(1 + len(meshes))
    data = token_batch(cfg, batch, seq + 1, seed)
    x, y = data[:, :-1], data[:, 1:]
    rows = []
    with float32_matmuls() as precision:
        with prog.step("one device: logits, gradients, one AdamW step"):
            fm = build_flax(ModelKind.GPT, cfg, seed=seed)
            if weights is not None:
                gpt_flax.load_state_dict(fm, weights)
            start = gpt_flax.state_dict(fm)
            fm.train()
            ref_logits, ref_tokens, ref_grads, ref_after = _flax_step_results(fm, gpt_flax.adamw(fm, lr=lr), x, y, x)
            total = sum(v.nbytes for v in start.values())
        for text in meshes:
            with prog.step(f"mesh {text}: shard, logits, gradients, one AdamW step"):
                mesh = sharding.make_mesh(text)
                fm = build_flax(ModelKind.GPT, cfg, seed=seed)
                gpt_flax.load_state_dict(fm, start)
                fm.train()
                plan = sharding.shard_model(fm, mesh)
                opt = gpt_flax.adamw(fm, lr=lr)  # after: its moments take the parameters' sharding
                per_device = sharding.param_bytes_per_device(fm)
                split = {p for p, s in plan.specs.items() if any(a is not None for a in s)}
                split_total, split_most = split_bytes(fm, split)
                xs, ys = sharding.shard_batch(x, mesh), sharding.shard_batch(y, mesh)
                logits, tokens, grads, after = _flax_step_results(fm, opt, xs, ys, xs)
            notes = plan.describe()
            placed = xs.sharding
            assert isinstance(placed, jax.sharding.NamedSharding)  # as shard_batch places a batch
            if placed.spec[0] is None and mesh.shape["data"] > 1:
                notes.append(f"batch {batch} not divisible by data axis {mesh.shape['data']}: replicated")
            rows.append(
                MeshRow(
                    text,
                    compare("logits", ref_logits, logits, FP32_FORWARD),
                    bool(np.array_equal(tokens, ref_tokens)),
                    [compare(f"grad {k}", ref_grads[k], grads[k], GRADS) for k in ref_grads],
                    weights_check(1, ref_after, after, lr, ADAMW_OUTLIER_FRACTION),
                    max(per_device.values()),
                    total,
                    split_most,
                    split_total,
                    notes,
                )
            )
    return ShardingReport(cfg, batch, seq, precision, rows)


def split_bytes(model: nnx.Module, split_names: set[str]) -> tuple[int, int]:
    """(total bytes, most bytes on one device) of the parameters a partition rule split, named
    canonically (as ShardingPlan.specs names them)."""
    total = 0
    per_device: dict[jax.Device, int] = {}
    for keys, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if canonical_name(keys)[0] not in split_names:
            continue
        value = var[...]
        total += value.nbytes
        for shard in value.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return total, max(per_device.values(), default=0)
