"""The canonical layout: every parameter's name and shape in each model, in the torch twin's order.

The names and `(out, in)` Linear layouts are those of the PyTorch twin's `state_dict()` (the
book's). Every reader and writer of state dicts (the file formats, both twins' checks) takes its
shapes from here, so a dict is checked against one table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .config import PRESETS, GPTConfig
from .models import FinalNorm, ModelClass
from .tensors import info, layer_count


def gpt_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The canonical `{name: shape}` of GPTModel(cfg), in the torch twin's order."""
    e, v = cfg.emb_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (v, e), "pos_emb.weight": (cfg.context_length, e)}
    for i in range(cfg.n_layers):
        b = f"trf_blocks.{i}."
        for proj in ("W_query", "W_key", "W_value"):
            shapes[f"{b}att.{proj}.weight"] = (e, e)
            if cfg.qkv_bias:
                shapes[f"{b}att.{proj}.bias"] = (e,)
        shapes |= {
            f"{b}att.out_proj.weight": (e, e),
            f"{b}att.out_proj.bias": (e,),
            f"{b}ff.layers.0.weight": (4 * e, e),
            f"{b}ff.layers.0.bias": (4 * e,),
            f"{b}ff.layers.2.weight": (e, 4 * e),
            f"{b}ff.layers.2.bias": (e,),
            f"{b}norm1.scale": (e,),
            f"{b}norm1.shift": (e,),
            f"{b}norm2.scale": (e,),
            f"{b}norm2.shift": (e,),
        }
    shapes |= {"final_norm.scale": (e,), "final_norm.shift": (e,), "out_head.weight": (v, e)}
    return shapes


def check_options(model: str, options: Any, source: str = "options") -> dict[str, Any]:
    """The constructor options a model accepts (DummyGPTModel's final_norm), or ValueError."""
    if model not in tuple(ModelClass):
        raise ValueError(f"{source}: model must be one of {', '.join(ModelClass)}, got {model!r}")
    if not isinstance(options, Mapping):
        raise ValueError(f"{source}: options must be a mapping, got {type(options).__name__}")
    allowed = {"final_norm": tuple(FinalNorm)} if model == ModelClass.DUMMY_GPT_MODEL else {}
    unknown = sorted(set(options) - set(allowed), key=str)
    if unknown:
        raise ValueError(
            f"{source}: {model} takes no option(s) {', '.join(map(repr, unknown))}"
            + (f"; it takes {', '.join(allowed)}" if allowed else "")
        )
    for key, values in allowed.items():
        if key in options and options[key] not in values:
            raise ValueError(f"{source}: {key} must be one of {', '.join(values)}, got {options[key]!r}")
    return dict(options)


def model_shapes(model: str, cfg: GPTConfig, options: Mapping[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """The canonical `{name: shape}` of `model` (GPTModel or DummyGPTModel) built with `cfg`."""
    options = check_options(model, options or {})
    if model == ModelClass.GPT_MODEL:
        return gpt_shapes(cfg)
    e, v = cfg.emb_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (v, e), "pos_emb.weight": (cfg.context_length, e)}
    if options.get("final_norm", FinalNorm.DUMMY) == FinalNorm.LAYER_NORM:
        shapes |= {"final_norm.scale": (e,), "final_norm.shift": (e,)}
    return shapes | {"out_head.weight": (v, e)}


def in_model_order(names: Iterable[str], cfg: GPTConfig) -> list[str]:
    """Canonical parameter names in the torch twin's (the book's) model order, which is the order
    both twins check a state dict in, so both name the same culprit first. Names the canonical
    layout does not know come last, sorted."""
    order = {name: i for i, name in enumerate(gpt_shapes(cfg))}
    return sorted(names, key=lambda name: (order.get(name, len(order)), name))


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


def config_of(source: str, **fields: Any) -> GPTConfig:
    """GPTConfig(**fields), its refusal (an n_heads given that does not divide emb_dim) naming the file."""
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def infer_config(
    sd: Mapping[str, Any], *, n_heads: int | None = None, drop_rate: float = 0.1, source: str = "state dict"
) -> GPTConfig:
    """The GPTModel config a canonical state dict implies. The tensors do not record n_heads: it
    is `n_heads`, or that of the published GPT-2 of this width and depth, or refused."""
    shapes = {k: info(sd, k)[0] for k in ("tok_emb.weight", "pos_emb.weight") if k in sd}
    for key in ("tok_emb.weight", "pos_emb.weight"):
        if key not in shapes:
            raise ValueError(f"{source}: missing tensor {key!r}")
        if len(shapes[key]) != 2:
            raise ValueError(f"{source}: tensor {key!r} has shape {shapes[key]}, expected 2 dimensions")
    vocab_size, emb_dim = shapes["tok_emb.weight"]
    n_layers = layer_count(sd, r"trf_blocks\.(\d+)\.", source)
    if n_layers == 0:
        raise ValueError(f"{source}: no transformer blocks (trf_blocks.N.*) found")
    if n_heads is None:
        n_heads = published_n_heads(emb_dim, n_layers, source)
    return config_of(
        source,
        vocab_size=vocab_size,
        context_length=shapes["pos_emb.weight"][0],
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        drop_rate=drop_rate,
        qkv_bias="trf_blocks.0.att.W_query.bias" in sd,
    )


__all__ = [
    "PUBLISHED_N_HEADS",
    "check_options",
    "config_of",
    "gpt_shapes",
    "in_model_order",
    "infer_config",
    "model_shapes",
    "published_n_heads",
]
