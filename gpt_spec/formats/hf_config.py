"""GPT-2's `config.json` as HF transformers reads it, and as this project writes it.

`config_from_hf` reads the config as transformers would (its defaults for absent keys), checks it
against the file's tensor shapes and refuses every field whose meaning the twins do not compute,
naming it: a file loads faithfully or not at all. `hf_config` gives the config of a GPT-2 that
computes what the twins compute.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

from ..config import GPTConfig
from ..tensors import layer_count

# What transformers' GPT2Config assumes for a key its config.json leaves out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "model_type": "gpt2",
}
# transformers' names for the tanh approximation of GELU the book writes out.
HF_GELUS = ("gelu_new", "gelu_pytorch_tanh")
BOOK_LAYER_NORM_EPS = 1e-5
# Keys that do not change what the forward computes: bookkeeping, tokens, generation defaults,
# the sequence-summary head of GPT2DoubleHeadsModel (whose tensors a GPT-2 file does not hold),
# and reorder_and_upcast_attn, which only reorders a float16 computation into float32: the
# twins compute attention scores in float32 already.
HF_IGNORED = frozenset(
    {
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
        "task_specific_params",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "output_past",
        "gradient_checkpointing",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "reorder_and_upcast_attn",
    }
)

# The JSON type of each field whose value the twins compute with: what transformers' GPT2 code can
# use (a float n_layer fails in `range`, a string n_embd in `nn.Embedding`, a null dropout in
# `nn.Dropout`). A field of another type is refused, naming it, before its value is looked at.
_JSON_TYPES = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "string": "a string",
    "integer or null": "an integer or null",
}
HF_FIELD_TYPES = {
    "vocab_size": "integer",
    "n_positions": "integer",
    "n_ctx": "integer",
    "n_embd": "integer",
    "n_layer": "integer",
    "n_head": "integer",
    "n_inner": "integer or null",
    "activation_function": "string",
    "model_type": "string",
    "resid_pdrop": "number",
    "embd_pdrop": "number",
    "attn_pdrop": "number",
    "layer_norm_epsilon": "number",
    "scale_attn_weights": "boolean",
    "scale_attn_by_inverse_layer_idx": "boolean",
    "add_cross_attention": "boolean",
    "tie_word_embeddings": "boolean",
}
# A refused value is shown up to this many characters of its repr.
SHOWN_CHARS = 60


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: null, boolean, integer, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((int, "integer"), (float, "number"), (str, "string"), (list, "array"), (Mapping, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _has_type(value: Any, kind: str) -> bool:
    if kind == "integer or null":
        return value is None or _has_type(value, "integer")
    if isinstance(value, bool):  # a bool is an int to Python, never to JSON
        return kind == "boolean"
    # numbers.*: a dict built in Python (hf_config=...) may hold numpy scalars where JSON has numbers
    types = {"integer": numbers.Integral, "number": numbers.Real, "boolean": bool, "string": str}
    return isinstance(value, types[kind])


def _refuse(source: str, field: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"{source}: config.json sets {field} = {_shown(value)}; the twins compute {supported}")


def _check_types(hf_config: Mapping[str, Any], source: str) -> None:
    """Every field the twins compute with has its JSON type (HF_FIELD_TYPES), or ValueError naming it."""
    for field, kind in HF_FIELD_TYPES.items():
        if field in hf_config and not _has_type(hf_config[field], kind):
            value = hf_config[field]
            raise ValueError(
                f"{source}: config.json sets {field} = {_shown(value)} (JSON {_json_type(value)}); "
                f"expected {_JSON_TYPES[kind]}"
            )


def config_from_hf(
    hf_config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    lm_head_differs: Callable[[], bool] | None = None,
    drop_rate_given: bool = False,
) -> GPTConfig:
    """The GPTConfig an HF GPT-2 config.json describes, checked against the file's tensor shapes
    (HF names without the `transformer.` prefix). Every field whose meaning the twins do not
    compute, and every key not known to leave the forward alone, is refused naming it."""
    if not isinstance(hf_config, Mapping):
        raise ValueError(f"{source}: config.json must hold a JSON object, got {type(hf_config).__name__}")
    unknown = sorted(set(hf_config) - set(HF_DEFAULTS) - HF_IGNORED - {"n_ctx"}, key=str)
    if unknown:
        raise ValueError(
            f"{source}: config.json has key(s) {', '.join(map(repr, unknown))} whose meaning the twins "
            "do not know; remove them if they leave GPT-2's forward unchanged"
        )
    _check_types(hf_config, source)
    c = {**HF_DEFAULTS, **hf_config}
    if c["model_type"] != "gpt2":
        raise _refuse(source, "model_type", c["model_type"], "GPT-2 ('gpt2')")
    if c["activation_function"] not in HF_GELUS:
        raise _refuse(
            source,
            "activation_function",
            c["activation_function"],
            f"the book's tanh GELU ({' or '.join(map(repr, HF_GELUS))})",
        )
    eps = c["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps != BOOK_LAYER_NORM_EPS:
        raise _refuse(source, "layer_norm_epsilon", eps, f"LayerNorm with eps {BOOK_LAYER_NORM_EPS}")
    for field, wanted, what in (
        ("scale_attn_weights", True, "scores scaled by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, "no per-layer score scaling"),
        ("add_cross_attention", False, "no cross-attention"),
    ):
        if c[field] is not wanted:
            raise _refuse(source, field, c[field], what)
    e_file = shapes["wte.weight"][1]
    if c["n_inner"] is not None and c["n_inner"] != 4 * e_file:
        raise _refuse(source, "n_inner", c["n_inner"], f"a feed-forward 4 x emb_dim = {4 * e_file} wide")
    found = {
        "vocab_size": shapes["wte.weight"][0],
        "n_embd": e_file,
        "n_positions": shapes["wpe.weight"][0],
        "n_layer": layer_count(shapes, r"h\.(\d+)\.", source),
    }
    for field, value in found.items():
        if c[field] != value:
            raise ValueError(f"{source}: config.json says {field} = {c[field]!r}, the tensors {value}")
    if "n_ctx" in hf_config and hf_config["n_ctx"] != found["n_positions"]:
        raise ValueError(
            f"{source}: config.json says n_ctx = {hf_config['n_ctx']!r}, the tensors {found['n_positions']} positions"
        )
    tied = c["tie_word_embeddings"]
    if tied not in (True, False):
        raise _refuse(source, "tie_word_embeddings", tied, "a head tied to wte (true) or not (false)")
    if not tied and "lm_head.weight" not in shapes:
        raise ValueError(f"{source}: config.json sets tie_word_embeddings = false but the file has no lm_head.weight")
    if tied and "lm_head.weight" in shapes and lm_head_differs is not None and lm_head_differs():
        raise ValueError(
            f"{source}: config.json sets tie_word_embeddings = true (the head is wte) but "
            "the file's lm_head.weight differs from wte.weight; set it false to use lm_head"
        )
    rates = {k: c[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(rates.values())) > 1 and not drop_rate_given:
        raise ValueError(
            f"{source}: config.json sets {rates}; the twins have one drop_rate (pass a config to choose it)"
        )
    try:
        return GPTConfig(
            vocab_size=found["vocab_size"],
            context_length=found["n_positions"],
            emb_dim=e_file,
            n_heads=c["n_head"],
            n_layers=found["n_layer"],
            drop_rate=rates["resid_pdrop"],
            qkv_bias=True,
        )
    except ValueError as e:  # n_head that does not divide n_embd, a drop rate outside [0, 1)
        raise ValueError(f"{source}: config.json describes no model the twins build: {e}") from e


def hf_config(cfg: GPTConfig, *, tied: bool) -> dict[str, Any]:
    """HF's config.json for a GPT-2 computing what the twins compute with `cfg`.

    cfg.kv_window_size is left out: it changes only the twins' cached decoding (how many past
    positions the KV cache keeps), not the forward the weights compute, and GPT2Config has no key
    for it. An HF snapshot read back has no window (None), as every HF GPT-2 has."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": BOOK_LAYER_NORM_EPS,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    } | ({} if cfg.vocab_size > 50256 else {"bos_token_id": None, "eos_token_id": None})


__all__ = [
    "BOOK_LAYER_NORM_EPS",
    "HF_DEFAULTS",
    "HF_FIELD_TYPES",
    "HF_GELUS",
    "HF_IGNORED",
    "config_from_hf",
    "hf_config",
]
