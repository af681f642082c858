"""GPT-2 as HF transformers stores it: the tensor layout, and what its `config.json` means.

A GPT-2 in the HF layout keeps Conv1D weights `(in, out)` (the transpose of nn.Linear's), fuses
query, key and value into one `c_attn`, and ties the head to `wte` unless the config says not to.
`from_hf` maps it onto the canonical layout; `to_hf` goes the other way. `config_from_hf` reads the
config as transformers would (its defaults for absent keys) and refuses every field whose meaning
the twins do not compute, naming it: a file loads faithfully or not at all.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..config import PRESETS, GPTConfig
from ..models import GPT_MODEL
from ..tensors import FLOAT_DTYPES, LazyStateDict, StateDict, info, layer_count

# Per block: HF name -> canonical name. Conv1D keeps its weight (in, out), the transpose of
# nn.Linear's (out, in); c_attn fuses query, key and value along its output axis.
_HF_BLOCK = {
    "ln_1.weight": "norm1.scale",
    "ln_1.bias": "norm1.shift",
    "ln_2.weight": "norm2.scale",
    "ln_2.bias": "norm2.shift",
    "attn.c_proj.weight": "att.out_proj.weight",
    "attn.c_proj.bias": "att.out_proj.bias",
    "mlp.c_fc.weight": "ff.layers.0.weight",
    "mlp.c_fc.bias": "ff.layers.0.bias",
    "mlp.c_proj.weight": "ff.layers.2.weight",
    "mlp.c_proj.bias": "ff.layers.2.bias",
}
_HF_QKV = ("att.W_query", "att.W_key", "att.W_value")

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

# The published GPT-2 sizes, the only ones whose n_heads a file without a config implies.
PUBLISHED_N_HEADS = {(p["emb_dim"], p["n_layers"]): p["n_heads"] for p in PRESETS.values()}


def published_n_heads(emb_dim: int, n_layers: int, source: str) -> int:
    """n_heads of the published GPT-2 of this width and depth; refused for any other shape."""
    if (emb_dim, n_layers) in PUBLISHED_N_HEADS:
        return PUBLISHED_N_HEADS[(emb_dim, n_layers)]
    shapes = ", ".join(f"{e}x{n}" for e, n in PUBLISHED_N_HEADS)
    raise ValueError(
        f"{source}: cannot tell n_heads: the file does not record it, and emb_dim {emb_dim} x "
        f"n_layers {n_layers} is none of the published GPT-2 shapes ({shapes}); pass it "
        f"(--n-heads N, n_heads=N, a config, or HF's config.json beside the file)"
    )


def is_hf_layout(keys) -> bool:
    return any(k in ("wte.weight", "transformer.wte.weight") for k in keys)


def _strip_prefix(hf: Mapping[str, Any], source: str) -> dict[str, str]:
    """HF name without `transformer.` -> the name in the file; a name present both ways is refused."""
    names: dict[str, str] = {}
    for key in hf:
        short = key.removeprefix("transformer.")
        if short in names:
            raise ValueError(f"{source}: holds both {names[short]!r} and {key!r}; which one is meant?")
        names[short] = key
    return names


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


def hf_shapes(cfg: GPTConfig, *, lm_head: bool) -> dict[str, tuple[int, ...]]:
    """`{HF name (no prefix): shape}` of a GPT-2 of this config."""
    e, v = cfg.emb_dim, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"wte.weight": (v, e), "wpe.weight": (cfg.context_length, e)}
    for i in range(cfg.n_layers):
        out |= {
            f"h.{i}.ln_1.weight": (e,),
            f"h.{i}.ln_1.bias": (e,),
            f"h.{i}.attn.c_attn.weight": (e, 3 * e),
            f"h.{i}.attn.c_attn.bias": (3 * e,),
            f"h.{i}.attn.c_proj.weight": (e, e),
            f"h.{i}.attn.c_proj.bias": (e,),
            f"h.{i}.ln_2.weight": (e,),
            f"h.{i}.ln_2.bias": (e,),
            f"h.{i}.mlp.c_fc.weight": (e, 4 * e),
            f"h.{i}.mlp.c_fc.bias": (4 * e,),
            f"h.{i}.mlp.c_proj.weight": (4 * e, e),
            f"h.{i}.mlp.c_proj.bias": (e,),
        }
    out |= {"ln_f.weight": (e,), "ln_f.bias": (e,)}
    if lm_head:
        out["lm_head.weight"] = (v, e)
    return out


def _check_buffer(name: str, value: np.ndarray, n_positions: int, source: str) -> None:
    """The causal-mask buffers older HF files carry: a lower-triangular `attn.bias` of ones and the
    `attn.masked_bias` fill value; anything else would mean a different attention."""
    if name.endswith("attn.bias"):
        want = np.tril(np.ones((n_positions, n_positions), bool))[None, None]
        if (
            value.shape != want.shape
            or not np.array_equal(value.astype(bool), want)
            or not np.isin(value, (0, 1)).all()
        ):
            raise ValueError(f"{source}: buffer {name!r} is not GPT-2's causal mask of {n_positions} positions")
    elif value.shape != () or not value.astype(np.float64) <= -1e4:
        raise ValueError(f"{source}: buffer {name!r} is not a masked-score fill value (a scalar <= -1e4)")


def _check_embeddings(names: Mapping[str, str], shapes: Mapping[str, Any], source: str) -> None:
    for short in ("wte.weight", "wpe.weight"):
        if short not in names:
            raise ValueError(f"{source}: missing tensor {short!r}")
        if len(shapes[short]) != 2:
            raise ValueError(f"{source}: tensor {short!r} has shape {shapes[short]}, expected 2 dimensions")


def from_hf(
    hf: Mapping[str, np.ndarray],
    hf_config: Mapping[str, Any] | None = None,
    *,
    config: GPTConfig | None = None,
    source: str = "HF GPT-2 state dict",
) -> tuple[Mapping[str, np.ndarray], GPTConfig]:
    """Map a GPT-2 state dict in the HF layout onto the canonical layout, with its config.

    `hf_config` is HF's config.json as a dict (None: the file has none, and only the published
    GPT-2 shapes are recognised); `config` overrides the sizes and drop rate it implies. A lazy
    `hf` (`LazyStateDict`) gives a lazy result: nothing is read until a tensor is asked for.
    Every tensor, buffer and config field is checked before anything is read.
    """
    names = _strip_prefix(hf, source)
    shapes = {short: info(hf, key)[0] for short, key in names.items()}
    _check_embeddings(names, shapes, source)

    def read(short: str) -> np.ndarray:
        return np.asarray(hf[names[short]])

    def lm_head_differs() -> bool:
        return not np.array_equal(read("lm_head.weight"), read("wte.weight"))

    if hf_config is not None:
        cfg = config_from_hf(
            hf_config, shapes, source=source, lm_head_differs=lm_head_differs, drop_rate_given=config is not None
        )
        tied = hf_config.get("tie_word_embeddings", True)
    else:
        vocab, e = shapes["wte.weight"]
        n_layers = layer_count(shapes, r"h\.(\d+)\.", source)
        n_heads = config.n_heads if config else published_n_heads(e, n_layers, source)
        cfg = GPTConfig(
            vocab_size=vocab,
            context_length=shapes["wpe.weight"][0],
            emb_dim=e,
            n_heads=n_heads,
            n_layers=n_layers,
            drop_rate=0.1,
            qkv_bias=True,
        )
        tied = "lm_head.weight" not in shapes
    if cfg.n_layers == 0:
        raise ValueError(f"{source}: no transformer blocks (h.N.*) found")
    if config is not None:
        if not config.qkv_bias:
            raise ValueError(f"{source}: GPT-2 has query/key/value biases; the given config has qkv_bias=False")
        cfg = config
    expected = hf_shapes(cfg, lm_head="lm_head.weight" in shapes)
    buffers = {f"h.{i}.{b}" for i in range(cfg.n_layers) for b in ("attn.bias", "attn.masked_bias")}
    for short in names:
        if short not in expected and short not in buffers:
            raise ValueError(f"{source}: unexpected tensor {names[short]!r} for a GPT-2")
    for short, shape in expected.items():
        if short not in names:
            raise ValueError(f"{source}: missing tensor {short!r}")
        got, dtype = info(hf, names[short])
        if got != shape:
            raise ValueError(f"{source}: tensor {short!r} has shape {got}, expected {shape}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{source}: tensor {short!r} has dtype {dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
    for short in sorted(buffers & set(names)):
        _check_buffer(short, read(short), cfg.context_length, source)
    head = "wte.weight" if tied else "lm_head.weight"

    def plain(short: str) -> Callable[[], np.ndarray]:
        return lambda: read(short)

    def transposed(short: str) -> Callable[[], np.ndarray]:
        return lambda: np.ascontiguousarray(read(short).T)

    def qkv(short: str, part: int, weight: bool) -> Callable[[], np.ndarray]:
        e = cfg.emb_dim
        if weight:
            return lambda: np.ascontiguousarray(read(short)[:, part * e : (part + 1) * e].T)
        return lambda: np.ascontiguousarray(read(short)[part * e : (part + 1) * e])

    entries: dict[str, tuple[tuple[int, ...], str, Callable[[], np.ndarray]]] = {}

    def add(name: str, short: str, fn: Callable[[], np.ndarray], shape: tuple[int, ...]) -> None:
        entries[name] = (shape, info(hf, names[short])[1], fn)

    e = cfg.emb_dim
    add("tok_emb.weight", "wte.weight", plain("wte.weight"), expected["wte.weight"])
    add("pos_emb.weight", "wpe.weight", plain("wpe.weight"), expected["wpe.weight"])
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for part, proj in enumerate(_HF_QKV):
            add(f"{b}{proj}.weight", h + "attn.c_attn.weight", qkv(h + "attn.c_attn.weight", part, True), (e, e))
            add(f"{b}{proj}.bias", h + "attn.c_attn.bias", qkv(h + "attn.c_attn.bias", part, False), (e,))
        for hf_name, name in _HF_BLOCK.items():
            shape = expected[h + hf_name]
            if len(shape) == 2:
                add(b + name, h + hf_name, transposed(h + hf_name), shape[::-1])
            else:
                add(b + name, h + hf_name, plain(h + hf_name), shape)
    add("final_norm.scale", "ln_f.weight", plain("ln_f.weight"), (e,))
    add("final_norm.shift", "ln_f.bias", plain("ln_f.bias"), (e,))
    add("out_head.weight", head, plain(head), (cfg.vocab_size, e))
    from ..checkpoint import gpt_shapes

    lazy = LazyStateDict({name: entries[name] for name in gpt_shapes(cfg)})
    if isinstance(hf, LazyStateDict):
        return lazy, cfg
    return {k: lazy[k] for k in lazy}, cfg


def to_hf(sd: Mapping[str, np.ndarray], cfg: GPTConfig, *, tied: bool | None = None) -> StateDict:
    """The canonical GPTModel state dict in the HF GPT-2 layout (`transformer.*`, `lm_head.weight`
    when the head is not tied), every array C-contiguous.

    A model without q/k/v biases (the book's GPT_CONFIG_124M) gets zero biases: adding +0.0
    changes no value. `tied` None: tied when the head equals the token embedding.
    """
    from ..checkpoint import gpt_shapes
    from ..tensors import check_state_dict

    sd = check_state_dict(gpt_shapes(cfg), sd, GPT_MODEL)
    sd = {k: np.asarray(sd[k]) for k in sd}
    if tied is None:
        tied = np.array_equal(sd["out_head.weight"], sd["tok_emb.weight"])
    elif tied and not np.array_equal(sd["out_head.weight"], sd["tok_emb.weight"]):
        raise ValueError("tied=True but the model's out_head.weight differs from tok_emb.weight")
    e = cfg.emb_dim
    out: StateDict = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        out[h + "attn.c_attn.weight"] = np.concatenate([sd[f"{b}{p}.weight"].T for p in _HF_QKV], axis=1)
        dtype = sd[f"{b}att.W_query.weight"].dtype
        out[h + "attn.c_attn.bias"] = np.concatenate(
            [sd[f"{b}{p}.bias"] if cfg.qkv_bias else np.zeros(e, dtype) for p in _HF_QKV]
        )
        for hf_name, name in _HF_BLOCK.items():
            value = sd[b + name]
            out[h + hf_name] = value.T if value.ndim == 2 else value
    out["transformer.ln_f.weight"] = sd["final_norm.scale"]
    out["transformer.ln_f.bias"] = sd["final_norm.shift"]
    if not tied:
        out["lm_head.weight"] = sd["out_head.weight"]
    # safetensors writes an array's memory as it lies: a transposed view must be copied first.
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


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
