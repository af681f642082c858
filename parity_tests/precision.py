"""What each precision setting costs: every setting's logits and greedy text against the torch twin in
float32 with 'highest' matmuls, on one checkpoint.

The GPU and TPU matmul defaults cannot run on a CPU; here they are emulated by the zoo's exact operand
rounding (zoo_torch.round_mantissa and its Flax twin): TF32 keeps 10 explicit mantissa bits of each
operand, one bfloat16 pass 7; three bfloat16 passes (bf16_3x) keep about 16 (a bfloat16 pair's
significand, the dropped lo x lo product below that). Products are summed in float32, as the
hardware does. The parameter rows cast both the weights and the compute (the bfloat16 and float16
tiers). A row says which it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, ModelKind
from gpt_spec.checks import DTYPES

from . import twins
from .distribution import Distribution, GreedyDivergence, distribution
from .progress import Progress, silent
from .twins import build_flax, build_torch, float32_matmuls, token_batch
from .zoo_catalog import Mutant, Swap
from .zoo_plant import planted

GREEDY_PROMPTS = 32
PROMPT_TOKENS = 8
GREEDY_BUCKET = 16  # greedy steps run at lengths rounded up to this: few compiles, less than the whole context
TRAIN_STEPS = 10  # AdamW steps (the book's chapter-5 settings) each setting trains before its Δloss


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    twin: str
    what: str
    dtype: str = "float32"
    operand_bits: int | None = None  # emulated: matmul operands rounded to this many mantissa bits

    @property
    def emulated(self) -> bool:
        return self.operand_bits is not None


SETTINGS: tuple[Setting, ...] = (
    Setting("torch highest", "torch", "float32 matmuls: the reference"),
    Setting("torch high", "torch", "TF32 matmuls, as on an NVIDIA GPU", operand_bits=10),
    Setting("JAX float32", "flax", "jax.default_matmul_precision('float32')"),
    Setting("JAX default, GPU", "flax", "TF32 operands, JAX's default on NVIDIA GPUs", operand_bits=10),
    Setting("JAX bf16_3x", "flax", "three bfloat16 passes: about 16 significant bits", operand_bits=16),
    Setting("JAX bfloat16, TPU", "flax", "one bfloat16 pass, JAX's default on TPUs", operand_bits=7),
    Setting("bfloat16 parameters", "flax", "weights and compute in bfloat16 (the bfloat16 tier)", dtype="bfloat16"),
    Setting("float16 parameters", "flax", "weights and compute in float16 (the float16 tier)", dtype="float16"),
)


@dataclasses.dataclass
class PrecisionRow:
    setting: Setting
    logits_ulps: float  # max |Δ logits| in float32 ulps of the reference's largest logit
    logits_max_abs: float
    distribution: Distribution
    greedy: GreedyDivergence
    delta_loss: float | None  # after TRAIN_STEPS steps in the setting; None where its tier does not train

    def to_json(self) -> dict[str, Any]:
        s = self.setting
        return {
            "setting": s.name,
            "twin": s.twin,
            "what": s.what,
            "dtype": s.dtype,
            "operand_bits": s.operand_bits,
            "emulated": s.emulated,
            "logits_ulps": self.logits_ulps,
            "logits_max_abs": self.logits_max_abs,
            "distribution": self.distribution.to_json(),
            "greedy": self.greedy.to_json(),
            "delta_loss": self.delta_loss,
        }


@dataclasses.dataclass
class PrecisionReport:
    config: GPTConfig
    batch: int
    seq: int
    rows: list[PrecisionRow]
    reference_loss: float  # the reference's held-out loss after TRAIN_STEPS steps (each row's Δloss is from it)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "reference": "torch, float32, matmul precision 'highest'",
            "batch": self.batch,
            "seq": self.seq,
            "train_steps": TRAIN_STEPS,
            "reference_loss": self.reference_loss,
            "rows": [r.to_json() for r in self.rows],
        }


def _operands(bits: int) -> Mutant:
    swap = (("bug_operand_bits", bits),)
    return Mutant(f"operands-{bits}-bits", "", "", (Swap("Linear", swap), Swap("MultiHeadAttention", swap)))


def _forward(setting: Setting, model: Any) -> Callable[[np.ndarray], np.ndarray]:
    if setting.twin == "torch":

        def run(ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(ids)).float().numpy()

        return run
    compiled = gpt_flax.jit_forward(model)
    return lambda ids: np.asarray(compiled(ids), dtype=np.float32)


def _greedy(forward: Callable[[np.ndarray], np.ndarray], prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy continuation without a cache (the zoo's layers have none), at one fixed length: the
    placeholder tokens after the current one cannot reach it through the causal mask."""
    n, size = prompts.shape
    seq = np.zeros((n, size + new_tokens), np.int64)
    seq[:, :size] = prompts
    for t in range(new_tokens):
        length = min(size + new_tokens, -(-(size + t) // GREEDY_BUCKET) * GREEDY_BUCKET)  # a few shapes to compile
        seq[:, size + t] = forward(seq[:, :length])[:, size + t - 1].argmax(-1)
    return seq[:, size:]


def _ulps(max_abs: float, ref_max: float) -> float:
    return max_abs / float(np.spacing(np.float32(ref_max)))


def _batches(cfg: GPTConfig, batch: int, seq: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """TRAIN_STEPS training batches of random ids and one held-out batch after them: (inputs, targets)."""
    ids = [token_batch(cfg, batch, seq + 1, seed + 2 + i) for i in range(TRAIN_STEPS + 1)]
    return [(b[:, :-1], b[:, 1:]) for b in ids]


def _trained(setting: Setting, model: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict | None:
    """The weights after TRAIN_STEPS AdamW steps of `model` in the setting (dropout off: the model is in
    eval mode), or None where its dtype has no training tier (float16)."""
    if setting.dtype not in DTYPES:
        return None
    package = twins.package(setting.twin)
    optimizer = package.adamw(model)
    for x, y in batches:
        package.train_step(
            model, optimizer, *((torch.from_numpy(x), torch.from_numpy(y)) if setting.twin == "torch" else (x, y))
        )
    return package.state_dict(model)


def _held_loss(reference: Any, weights: Mapping[str, np.ndarray], held: tuple[np.ndarray, np.ndarray]) -> float:
    """The loss of `weights` on the held-out batch, by the reference forward (torch, float32)."""
    gpt_torch.load_state_dict(reference, {k: np.asarray(v, np.float32) for k, v in weights.items()})
    with torch.no_grad():
        return float(gpt_torch.calc_loss_batch(torch.from_numpy(held[0]), torch.from_numpy(held[1]), reference))


def run_precision(
    cfg: GPTConfig,
    weights: Mapping[str, np.ndarray],
    *,
    settings: Sequence[Setting] = SETTINGS,
    batch: int = 2,
    seq: int | None = None,
    new_tokens: int | None = None,
    seed: int = 0,
    progress: Progress = silent,
) -> PrecisionReport:
    """Each setting's logits on `batch` x `seq` random ids, its greedy continuation of GREEDY_PROMPTS
    random prompts for `new_tokens` (default: to the end of the context), against the torch twin's in
    float32; and the held-out loss (by the reference forward) of its weights after TRAIN_STEPS steps
    on random batches, less the reference's."""
    seq = min(cfg.context_length, 128) if seq is None else seq
    new_tokens = cfg.context_length - PROMPT_TOKENS if new_tokens is None else new_tokens
    ids = token_batch(cfg, batch, seq, seed)
    prompts = token_batch(cfg, GREEDY_PROMPTS, PROMPT_TOKENS, seed + 1)
    *train, held = _batches(cfg, batch, seq, seed)
    prog = progress(len(settings) + 1)
    with float32_matmuls():
        with prog.step("the reference: torch, float32, 'highest'"):
            ref_model = _built(SETTINGS[0], cfg, weights, seed)
            ref_forward = _forward(SETTINGS[0], ref_model)
            ref_logits, ref_tokens = ref_forward(ids), _greedy(ref_forward, prompts, new_tokens)
            ref_trained = _trained(SETTINGS[0], ref_model, train)
            assert ref_trained is not None
            ref_loss = _held_loss(ref_model, ref_trained, held)
        rows = []
        for s in settings:
            with prog.step(f"{s.name}: {s.what}"):
                model = _built(s, cfg, weights, seed)
                plant = (
                    planted(_operands(s.operand_bits), s.twin, {s.twin: model})
                    if s.operand_bits is not None
                    else contextlib.nullcontext()
                )
                with plant:
                    forward = _forward(s, model)
                    logits, tokens = forward(ids), _greedy(forward, prompts, new_tokens)
                    trained = _trained(s, model, train)
                delta = None if trained is None else _held_loss(ref_model, trained, held) - ref_loss
            diff = float(np.abs(logits.astype(np.float64) - ref_logits).max())
            differ = tokens != ref_tokens
            first = tuple(int(np.argmax(row)) if row.any() else new_tokens for row in differ)
            rows.append(
                PrecisionRow(
                    s,
                    _ulps(diff, float(np.abs(ref_logits).max())),
                    diff,
                    distribution(ref_logits, logits),
                    GreedyDivergence(PROMPT_TOKENS, new_tokens, first),
                    delta,
                )
            )
    return PrecisionReport(cfg, batch, seq, rows, ref_loss)


def _built(setting: Setting, cfg: GPTConfig, weights: Mapping[str, np.ndarray], seed: int) -> Any:
    """The setting's twin holding `weights`, in eval mode, cast to its dtype."""
    package = twins.package(setting.twin)
    model = (build_torch if setting.twin == "torch" else build_flax)(ModelKind.GPT, cfg, seed=seed)
    package.load_state_dict(model, weights)
    model.eval()
    package.cast(model, setting.dtype)
    return model
