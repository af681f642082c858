"""The zoo's catalogue: every planted bug as a named mutant (what the port got wrong, where the suite
must name it first, the evidence that sees it), and the row that records one planting's verdict.
Planting is zoo_plant.py's; running the zoo against the suite, zoo.py's."""

from __future__ import annotations

import dataclasses
from typing import Any

from gpt_spec import GPTConfig
from gpt_spec.stages import in_stage, stage_of

from . import decoding, zoo_training


@dataclasses.dataclass(frozen=True)
class Swap:
    """Every module of one kind (in the zoo's layer names) gets the zoo's class with these knobs."""

    layer: str  # LayerNorm, GELU, Linear, MultiHeadAttention, TransformerBlock, Dropout, GPT
    knobs: tuple[tuple[str, Any], ...]
    only: str | None = None  # only the module of this attribute name ("out_head")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # what the port got wrong
    where: str  # the stage the suite must name first: a sub-layer, or a block (any of its sub-layers)
    swaps: tuple[Swap, ...] = ()
    converter: bool = False  # the twin's weight converters leave square projections untransposed
    needs: tuple[tuple[str, Any], ...] = ()  # config fields without which the bug cannot show
    shows_in: str = "forward"  # or "bfloat16 training": the only evidence that can see it
    training: tuple[tuple[str, Any], ...] = ()  # knobs of the twin's adamw() and loss (zoo_training.py)

    def adapt(self, cfg: GPTConfig) -> GPTConfig:
        """The config to plant it in: `cfg`, with what the bug needs to exist (a qkv bias to drop,
        a dropout rate to leave on)."""
        changes = {k: v for k, v in self.needs if not (k == "drop_rate" and cfg.drop_rate > 0)}
        return cfg.replace(**changes) if changes else cfg


def _swap(layer: str, only: str | None = None, **knobs: Any) -> Swap:
    return Swap(layer, tuple(sorted(knobs.items())), only)


TF32, BF16 = 10, 7  # explicit mantissa bits
BF16_TRAINING = "bfloat16 training"

FORWARD_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "layernorm-eps-1e-6",
        "LayerNorm eps 1e-6 (nnx.LayerNorm's default), not the book's 1e-5",
        "trf_blocks.0.norm1",
        (_swap("LayerNorm", bug_eps=1e-6),),
    ),
    Mutant(
        "layernorm-eps-1e-12",
        "LayerNorm eps 1e-12 (BERT's), not the book's 1e-5",
        "trf_blocks.0.norm1",
        (_swap("LayerNorm", bug_eps=1e-12),),
    ),
    Mutant(
        "layernorm-unbiased-variance",
        "LayerNorm variance with Bessel's correction (torch.var's default)",
        "trf_blocks.0.norm1",
        (_swap("LayerNorm", bug_variance="unbiased"),),
    ),
    Mutant(
        "layernorm-moments-variance",
        "LayerNorm variance as E[x²] − E[x]² (nnx.LayerNorm's fast variance)",
        "trf_blocks.0.norm1",
        (_swap("LayerNorm", bug_variance="moments"),),
    ),
    Mutant(
        "layernorm-scale-shift-swapped",
        "LayerNorm scale and shift each in the other's place",
        "trf_blocks.0.norm1",
        (_swap("LayerNorm", bug_swap=True),),
    ),
    Mutant(
        "gelu-erf",
        "GELU in the exact erf form (torch.nn.GELU()'s default), not the tanh approximation",
        "trf_blocks.0.ff",
        (_swap("GELU", bug_form="erf"),),
    ),
    Mutant(
        "gelu-constant",
        "GELU's cubic constant 0.0447 for 0.044715",
        "trf_blocks.0.ff",
        (_swap("GELU", bug_constant=0.0447),),
    ),
    Mutant(
        "attention-unscaled",
        "attention scores not divided by sqrt(head_dim)",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_scale="none"),),
    ),
    Mutant(
        "attention-scaled-by-head-dim",
        "attention scores divided by head_dim, not its square root",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_scale="head_dim"),),
    ),
    Mutant(
        "mask-sees-next-token",
        "causal mask one off: each token also sees the next",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_mask_diagonal=2),),
    ),
    Mutant(
        "mask-hides-diagonal",
        "causal mask one off: a token cannot see itself",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_mask_diagonal=0),),
    ),
    Mutant(
        "heads-split-wrong-order",
        "heads split as (head_dim, n_heads), not (n_heads, head_dim)",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_split="dims"),),
    ),
    Mutant(
        "query-key-swapped",
        "the query and key projections swapped",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_swap_qk=True),),
    ),
    Mutant(
        "square-kernel-untransposed",
        "the square attention projections loaded untransposed (the converter transposes only where shapes disagree)",
        "trf_blocks.0.att",
        converter=True,
    ),
    Mutant(
        "softmax-wrong-axis",
        "attention softmax over the query axis, not the key axis",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_softmax_axis=-2),),
    ),
    Mutant("positions-off-by-one", "position ids counted from 1", "drop_emb", (_swap("GPT", bug_position_offset=1),)),
    Mutant(
        "missing-residual",
        "the attention's shortcut add left out",
        "trf_blocks.0",
        (_swap("TransformerBlock", bug_residual=False),),
    ),
    Mutant(
        "post-norm",
        "LayerNorm after each residual add (the 2017 Transformer), not before",
        "trf_blocks.0",
        (_swap("TransformerBlock", bug_post_norm=True),),
    ),
    Mutant(
        "dropout-in-eval", "dropout left on in eval mode", "drop_emb", (_swap("Dropout"),), needs=(("drop_rate", 0.1),)
    ),
    Mutant(
        "qkv-bias-dropped",
        "the query/key/value biases not applied",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_qkv_bias=False),),
        needs=(("qkv_bias", True),),
    ),
    Mutant(
        "head-tied-to-embedding",
        "logits from the token embedding's table (GPT-2's tying), not out_head",
        "out_head",
        (_swap("GPT", bug_tied_head=True),),
    ),
    Mutant(
        "logits-bfloat16",
        "the head computed in bfloat16",
        "out_head",
        (_swap("Linear", "out_head", bug_operand_bits=BF16, bug_output_bits=BF16),),
    ),
    Mutant(
        "softmax-bfloat16",
        "attention softmax computed in bfloat16",
        "trf_blocks.0.att",
        (_swap("MultiHeadAttention", bug_softmax_bf16=True),),
    ),
    Mutant(
        "matmul-tf32",
        "every matmul's operands rounded to TF32 (JAX's default on NVIDIA GPUs)",
        "trf_blocks.0.att",
        (_swap("Linear", bug_operand_bits=TF32), _swap("MultiHeadAttention", bug_operand_bits=TF32)),
    ),
    Mutant(
        "matmul-bfloat16-pass",
        "every matmul's operands rounded to bfloat16 (JAX's default on TPUs)",
        "trf_blocks.0.att",
        (_swap("Linear", bug_operand_bits=BF16), _swap("MultiHeadAttention", bug_operand_bits=BF16)),
    ),
)
# Bugs the forward cannot see: caught by the training evidence (training.py) of their tier.
TRAINING_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "rounding-without-derivative",
        "the head's bfloat16 rounding written with ops whose derivative is 0 (bit arithmetic, round()): "
        "the forward is right, every gradient behind the head is 0",
        "gradients",
        (_swap("Linear", "out_head", bug_round_without_derivative=True),),
        shows_in=BF16_TRAINING,
    ),
)
# Optimizer and loss bugs, planted by patching the twin's adamw() and calc_loss_batch
# (zoo_training.py): the forward is the book's, the float32 training evidence must see them.
OPTIMIZER_MUTANTS: tuple[Mutant, ...] = tuple(
    Mutant(name, bug, where, shows_in=zoo_training.TRAINING, training=knobs)
    for name, bug, where, knobs in (
        (
            "adam-coupled-l2",
            "weight decay added to the gradient (Adam's L2: torch.optim.Adam(weight_decay=...), "
            "optax.chain(add_decayed_weights, adam)), not AdamW's decoupled decay",
            zoo_training.OPTIMIZER,
            (("coupled_decay", True),),
        ),
        (
            "adam-eps-inside-sqrt",
            "Adam's eps inside the square root: sqrt(v_hat + eps), not sqrt(v_hat) + eps",
            zoo_training.OPTIMIZER,
            (("eps_in_sqrt", True),),
        ),
        (
            "adam-no-bias-correction",
            "Adam's moments not divided by 1 - beta^t",
            zoo_training.OPTIMIZER,
            (("bias_correction", False),),
        ),
        (
            "adam-betas-swapped",
            "betas (0.999, 0.9), not (0.9, 0.999)",
            zoo_training.LATER_STEPS,
            (("betas", (0.999, 0.9)),),
        ),
        ("adam-eps-1e-6", "Adam's eps 1e-6, not 1e-8", zoo_training.OPTIMIZER, (("eps", 1e-6),)),
        (
            "decay-masked-off-biases-and-norms",
            "no weight decay for biases and LayerNorm scales and shifts (nanoGPT's param groups, an optax mask)",
            zoo_training.DECAY_MASK,
            (("decay_matrices_only", True),),
        ),
        (
            "decay-not-scaled-by-lr",
            "weight decay as p -= wd * p, not p -= lr * wd * p",
            zoo_training.OPTIMIZER,
            (("decay_lr_scaled", False),),
        ),
        ("lr-off-by-1pct", "the learning rate 1.01 times the book's", zoo_training.OPTIMIZER, (("lr_factor", 1.01),)),
        (
            "grad-clip-one-side",
            "gradients clipped to global norm 1.0 before the update",
            zoo_training.OPTIMIZER,
            (("clip_norm", 1.0),),
        ),
        (
            "loss-summed",
            "cross-entropy summed over the batch's tokens, not averaged",
            zoo_training.LOSS,
            (("loss_reduction", "sum"),),
        ),
        (
            "labels-shifted-by-one",
            "targets shifted again inside the loss (a causal LM's own shift, on targets already shifted)",
            zoo_training.LOSS,
            (("label_shift", 1),),
        ),
    )
)
# KV-cache and sampling bugs: the forward is the book's, only the generation check (decoding.py)
# sees them, run by zoo_decoding.py; each is named by the check's first finding, its `where`.
GENERATION = "generation"
SAMPLER = "Sampler"  # a sampling mutant's "layer": the pick_token the twin's generate calls
DECODING_MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "kv-position-off-by-one",
        "a decoding step's position ids one past the tokens so far (the count after the token, not before)",
        f"cached prompt 0 position {decoding.PROMPT_LEN} drop_emb",
        (_swap("KVCacheGPT", bug_decode_position_offset=1),),
        shows_in=GENERATION,
    ),
    Mutant(
        "kv-cache-stale",
        "reset_kv_cache keeps an allocated cache (zeroes the position counter, not the blocks' keys and pointers)",
        "cached prompt 1 position 0 trf_blocks.0.att",
        (_swap("KVCacheGPT", bug_reset_blocks=False),),
        shows_in=GENERATION,
    ),
    Mutant(
        "kv-window-one-too-many",
        "the sliding cache keeps kv_window_size + 1 positions (the window counted besides the current token)",
        f"sliding prompt 0 position {decoding.WINDOW} trf_blocks.0.att",
        (_swap("KVCacheAttention", bug_window_extra=1),),
        shows_in=GENERATION,
    ),
    Mutant(
        "temperature-on-probabilities",
        "the temperature applied after top-k and softmax, to the probabilities (renormalising undoes it)",
        "sampling prompt 0 position 0 probabilities",
        (_swap(SAMPLER, bug_temperature="probabilities"),),
        shows_in=GENERATION,
    ),
    Mutant(
        "top-k-exactly-k",
        "top-k keeps exactly k (topk's indices), dropping logits tied with the k-th largest the book keeps",
        "sampling ties position 0 probabilities",
        (_swap(SAMPLER, bug_top_k_ties="exact"),),
        shows_in=GENERATION,
    ),
    Mutant(
        "sampling-softmax-bfloat16",
        "the sampling softmax computed in bfloat16",
        "sampling prompt 0 position 0 probabilities",
        (_swap(SAMPLER, bug_softmax_bf16=True),),
        shows_in=GENERATION,
    ),
)
MUTANTS = (*FORWARD_MUTANTS, *TRAINING_MUTANTS, *OPTIMIZER_MUTANTS, *DECODING_MUTANTS)
BY_NAME = {m.name: m for m in MUTANTS}


def get(name: str) -> Mutant:
    if name not in BY_NAME:
        raise ValueError(f"unknown mutant {name!r}; known mutants: {', '.join(BY_NAME)}")
    return BY_NAME[name]


@dataclasses.dataclass
class ZooRow:
    mutant: str  # "" for the control: nothing planted
    twin: str
    where: str
    passed: bool  # the check's verdict: the control must pass, a mutant must not
    first: str = ""  # the first finding's name
    evidence: str = ""
    margin: float = float("nan")  # |Δ| / allowed of the first finding
    direction: str = ""
    describe: str = ""

    @property
    def caught(self) -> bool:
        return not self.passed

    @property
    def first_stage(self) -> str:
        """Where the first failure is: a forward stage, or a training mutant's gradient."""
        if not self.first:
            return ""
        return self.first if self.where == "gradients" or self.where in zoo_training.WHERES else stage_of(self.first)

    @property
    def located(self) -> bool:
        if self.where == "gradients":  # a training mutant: named by the first gradient it spoils
            return self.first.startswith("grad ")
        if self.where in zoo_training.WHERES:  # named by the loss, or a parameter's weights after a step
            return zoo_training.located(self.where, self.first)
        return bool(self.first) and in_stage(self.first, self.where)

    @property
    def ok(self) -> bool:
        return self.passed if not self.mutant else (self.caught and self.located)

    def to_json(self) -> dict[str, Any]:
        return {
            "mutant": self.mutant or None,
            "twin": self.twin,
            "planted_at": self.where,
            "check_passed": self.passed,
            "caught": self.caught if self.mutant else None,
            "first_failure": self.first or None,
            "first_stage": self.first_stage or None,
            "evidence": self.evidence or None,
            "margin": self.margin,
            "direction": self.direction or None,
            "located": self.located if self.mutant else None,
            "ok": self.ok,
            "describe": self.describe,
        }
