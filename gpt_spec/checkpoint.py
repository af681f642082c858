"""The canonical state dict and its files.

The canonical state dict is a flat `{name: numpy array}` in the PyTorch twin's names and layouts.
Both twins' `load_state_dict` call `check_state_dict` before touching a parameter, so a dict with a
missing or extra key, a wrong shape or a non-float tensor is refused whole, with the same message.

A checkpoint file is that dict in safetensors, with the config (and which model it belongs to) in
the file's metadata, so a file describes itself. `load_checkpoint` also reads GPT-2 as the HF hub
publishes it (`model.safetensors`, Conv1D weights `(in, out)`, fused q/k/v, tied head) and maps it
onto the canonical layout; `to_hf` goes the other way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import GPTConfig

StateDict = dict[str, np.ndarray]

FORMAT = "gpt-twins/canonical-v1"
MODELS = ("GPTModel", "DummyGPTModel")
GPT2_HEAD_DIM = 64  # every published GPT-2 size; used only when a file does not say n_heads


def _names(keys) -> str:
    return ", ".join(repr(k) for k in sorted(keys))


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, object], model_name: str
) -> StateDict:
    """Validate `given` against the model's `{name: shape}`; return it as float numpy arrays.

    Raises ValueError naming every missing and unexpected key, or the first key whose shape or
    dtype is wrong. Nothing is converted in place; the caller assigns only after this returns.
    """
    if not isinstance(given, Mapping):
        raise ValueError(f"state dict must be a mapping of name -> array, got {type(given).__name__}")
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_names(unexpected)}")
        raise ValueError(f"state dict does not match {model_name}: {'; '.join(parts)}")
    arrays: StateDict = {}
    for name, shape in expected.items():
        try:
            value = np.asarray(given[name])
        except Exception as e:  # e.g. a torch tensor that requires grad, or a ragged list
            raise ValueError(f"state dict key {name!r} is not an array: {e}") from e
        if value.dtype.kind != "f":
            raise ValueError(
                f"state dict key {name!r} has dtype {value.dtype}, expected a floating-point array"
            )
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"state dict key {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        arrays[name] = value
    return arrays


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
        shapes |= {f"{b}att.out_proj.weight": (e, e), f"{b}att.out_proj.bias": (e,),
                   f"{b}ff.layers.0.weight": (4 * e, e), f"{b}ff.layers.0.bias": (4 * e,),
                   f"{b}ff.layers.2.weight": (e, 4 * e), f"{b}ff.layers.2.bias": (e,),
                   f"{b}norm1.scale": (e,), f"{b}norm1.shift": (e,),
                   f"{b}norm2.scale": (e,), f"{b}norm2.shift": (e,)}
    shapes |= {"final_norm.scale": (e,), "final_norm.shift": (e,), "out_head.weight": (v, e)}
    return shapes


def _layer_count(keys, pattern: str, what: str) -> int:
    found = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if found != list(range(len(found))):
        raise ValueError(f"{what}: transformer layers {found} are not numbered 0..n-1")
    return len(found)


def _n_heads(emb_dim: int, n_heads: int | None, source: str) -> int:
    if n_heads is not None:
        return n_heads
    if emb_dim % GPT2_HEAD_DIM:
        raise ValueError(
            f"{source}: cannot infer n_heads for emb_dim {emb_dim} (not a multiple of GPT-2's head "
            f"size {GPT2_HEAD_DIM}); pass the config"
        )
    return emb_dim // GPT2_HEAD_DIM


def _shape(sd: Mapping[str, np.ndarray], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{source}: missing tensor {key!r}")
    shape = tuple(np.shape(sd[key]))
    if len(shape) != ndim:
        raise ValueError(f"{source}: tensor {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_config(sd: Mapping[str, np.ndarray], *, n_heads: int | None = None,
                 drop_rate: float = 0.1, source: str = "state dict") -> GPTConfig:
    """The GPTModel config a canonical state dict implies (n_heads from GPT-2's head size 64
    unless given: the tensors do not record it)."""
    vocab_size, emb_dim = _shape(sd, "tok_emb.weight", 2, source)
    context_length, _ = _shape(sd, "pos_emb.weight", 2, source)
    n_layers = _layer_count(sd, r"trf_blocks\.(\d+)\.", source)
    if n_layers == 0:
        raise ValueError(f"{source}: no transformer blocks (trf_blocks.N.*) found")
    return GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                     n_heads=_n_heads(emb_dim, n_heads, source), n_layers=n_layers,
                     drop_rate=drop_rate, qkv_bias="trf_blocks.0.att.W_query.bias" in sd)


# --- the HF GPT-2 layout -------------------------------------------------------------------------
# Per block: HF name -> canonical name(s). Conv1D keeps its weight (in, out), the transpose of
# nn.Linear's (out, in); c_attn fuses query, key and value along its output axis.
_HF_BLOCK = {
    "ln_1.weight": "norm1.scale", "ln_1.bias": "norm1.shift",
    "ln_2.weight": "norm2.scale", "ln_2.bias": "norm2.shift",
    "attn.c_proj.weight": "att.out_proj.weight", "attn.c_proj.bias": "att.out_proj.bias",
    "mlp.c_fc.weight": "ff.layers.0.weight", "mlp.c_fc.bias": "ff.layers.0.bias",
    "mlp.c_proj.weight": "ff.layers.2.weight", "mlp.c_proj.bias": "ff.layers.2.bias",
}
_HF_QKV = ("att.W_query", "att.W_key", "att.W_value")
_HF_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers some files carry


def is_hf_layout(keys) -> bool:
    return any(k in ("wte.weight", "transformer.wte.weight") for k in keys)


def from_hf(hf: Mapping[str, np.ndarray], hf_config: Mapping[str, Any] | None = None,
            *, source: str = "HF GPT-2 state dict") -> tuple[StateDict, GPTConfig]:
    """Map a GPT-2 state dict in the HF layout onto the canonical layout, with its config.

    Sizes come from the tensors (n_heads from `hf_config["n_head"]` when given, else GPT-2's head
    size 64); qkv_bias is True, as GPT-2 has q/k/v biases. A file whose tensors do not make one
    consistent GPT-2 is refused, naming the tensor.
    """
    sd = {k.removeprefix("transformer."): v for k, v in hf.items()}
    hf_config = dict(hf_config or {})
    vocab_size, emb_dim = _shape(sd, "wte.weight", 2, source)
    context_length, _ = _shape(sd, "wpe.weight", 2, source)
    n_layers = _layer_count(sd, r"h\.(\d+)\.", source)
    if n_layers == 0:
        raise ValueError(f"{source}: no transformer blocks (h.N.*) found")
    cfg = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                    n_heads=_n_heads(emb_dim, hf_config.get("n_head"), source), n_layers=n_layers,
                    drop_rate=float(hf_config.get("resid_pdrop", 0.1)), qkv_bias=True)
    e = emb_dim
    expected = {"wte.weight": (vocab_size, e), "wpe.weight": (context_length, e),
                "ln_f.weight": (e,), "ln_f.bias": (e,)}
    for i in range(n_layers):
        expected |= {f"h.{i}.attn.c_attn.weight": (e, 3 * e), f"h.{i}.attn.c_attn.bias": (3 * e,),
                     f"h.{i}.attn.c_proj.weight": (e, e), f"h.{i}.attn.c_proj.bias": (e,),
                     f"h.{i}.mlp.c_fc.weight": (e, 4 * e), f"h.{i}.mlp.c_fc.bias": (4 * e,),
                     f"h.{i}.mlp.c_proj.weight": (4 * e, e), f"h.{i}.mlp.c_proj.bias": (e,),
                     f"h.{i}.ln_1.weight": (e,), f"h.{i}.ln_1.bias": (e,),
                     f"h.{i}.ln_2.weight": (e,), f"h.{i}.ln_2.bias": (e,)}
    if "lm_head.weight" in sd:
        expected["lm_head.weight"] = (vocab_size, e)
    for key in sd:
        if key not in expected and not (key.startswith("h.") and key.endswith(_HF_BUFFERS)):
            raise ValueError(f"{source}: unexpected tensor {key!r} for a GPT-2")
    for key, shape in expected.items():
        if key not in sd:
            raise ValueError(f"{source}: missing tensor {key!r}")
        if tuple(np.shape(sd[key])) != shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(np.shape(sd[key]))}, expected {shape}")
        if np.asarray(sd[key]).dtype.kind != "f":
            raise ValueError(f"{source}: tensor {key!r} has dtype {np.asarray(sd[key]).dtype}, expected floats")
    out: StateDict = {"tok_emb.weight": np.asarray(sd["wte.weight"]), "pos_emb.weight": np.asarray(sd["wpe.weight"])}
    for i in range(n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        weights = np.split(np.asarray(sd[h + "attn.c_attn.weight"]), 3, axis=1)
        biases = np.split(np.asarray(sd[h + "attn.c_attn.bias"]), 3)
        for proj, w, bias in zip(_HF_QKV, weights, biases):
            out[f"{b}{proj}.weight"] = np.ascontiguousarray(w.T)
            out[f"{b}{proj}.bias"] = np.ascontiguousarray(bias)
        for hf_name, name in _HF_BLOCK.items():
            value = np.asarray(sd[h + hf_name])
            out[b + name] = np.ascontiguousarray(value.T) if value.ndim == 2 else value
    out["final_norm.scale"] = np.asarray(sd["ln_f.weight"])
    out["final_norm.shift"] = np.asarray(sd["ln_f.bias"])
    out["out_head.weight"] = np.asarray(sd.get("lm_head.weight", sd["wte.weight"]))  # tied in GPT-2
    return {k: out[k] for k in gpt_shapes(cfg)}, cfg


def to_hf(sd: Mapping[str, np.ndarray], cfg: GPTConfig) -> StateDict:
    """The canonical GPTModel state dict in the HF GPT-2 layout (`transformer.*`, `lm_head.weight`)."""
    if not cfg.qkv_bias:
        raise ValueError("the HF GPT-2 layout has query/key/value biases; the model has qkv_bias=False")
    sd = check_state_dict(gpt_shapes(cfg), sd, "GPTModel")
    out: StateDict = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        out[h + "attn.c_attn.weight"] = np.concatenate([sd[f"{b}{p}.weight"].T for p in _HF_QKV], axis=1)
        out[h + "attn.c_attn.bias"] = np.concatenate([sd[f"{b}{p}.bias"] for p in _HF_QKV])
        for hf_name, name in _HF_BLOCK.items():
            value = sd[b + name]
            out[h + hf_name] = np.ascontiguousarray(value.T) if value.ndim == 2 else value
    out["transformer.ln_f.weight"] = sd["final_norm.scale"]
    out["transformer.ln_f.bias"] = sd["final_norm.shift"]
    out["lm_head.weight"] = sd["out_head.weight"]
    return out


# --- files --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A state dict read from a file, the config it belongs to, and which of the book's models."""

    state_dict: StateDict
    config: GPTConfig
    model: str = "GPTModel"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layout: str = "canonical"  # or "hf-gpt2"


def save_checkpoint(path: str | os.PathLike[str], sd: Mapping[str, np.ndarray], cfg: GPTConfig,
                    *, model: str = "GPTModel", options: Mapping[str, Any] | None = None) -> None:
    """Write a canonical state dict as safetensors, with its config in the metadata.

    Written to a temporary file first and renamed, so an interrupted save leaves no half file.
    """
    from safetensors.numpy import save_file

    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if model == "GPTModel":
        sd = check_state_dict(gpt_shapes(cfg), sd, model)
    metadata = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), "model": model,
                "options": json.dumps(dict(options or {}))}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():
                try:
                    tensors[key] = f.get_tensor(key)
                except Exception as e:  # e.g. a dtype numpy has no type for (bfloat16)
                    raise ValueError(f"{path}: cannot read tensor {key!r}: {e}") from e
    except FileNotFoundError:
        raise ValueError(f"checkpoint {str(path)!r} does not exist") from None
    except PermissionError as e:
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {e.strerror}") from e
    except ValueError:
        raise
    except Exception as e:  # safetensors' own error: truncated, corrupt or not safetensors at all
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike[str], *, config: GPTConfig | None = None) -> Checkpoint:
    """Read a checkpoint: a canonical file written by `save_checkpoint`, a GPT-2 `model.safetensors`
    in the HF layout, or a directory holding `model.safetensors` (and HF's `config.json`).

    `config` overrides what the file says or implies. Raises ValueError naming the problem.
    """
    path = Path(path)
    hf_config: dict[str, Any] = {}
    if path.is_dir():
        config_json = path / "config.json"
        if config_json.is_file():
            try:
                hf_config = json.loads(config_json.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {config_json}: {e}") from e
        path = path / "model.safetensors"
    tensors, metadata = _read_safetensors(path)
    source = f"checkpoint {str(path)!r}"
    if metadata.get("format") == FORMAT:
        try:
            cfg = config or GPTConfig.from_dict(json.loads(metadata["config"]))
            model = metadata.get("model", "GPTModel")
            options = json.loads(metadata.get("options", "{}"))
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: its metadata is damaged: {e}") from e
        if model not in MODELS:
            raise ValueError(f"{source}: unknown model {model!r} in its metadata")
        return Checkpoint(tensors, cfg, model, options, "canonical")
    if is_hf_layout(tensors):
        sd, cfg = from_hf(tensors, hf_config, source=source)
        return Checkpoint(sd, config or cfg, "GPTModel", {}, "hf-gpt2")
    if "tok_emb.weight" in tensors:  # canonical names, no metadata: infer the config
        return Checkpoint(tensors, config or infer_config(tensors, source=source), "GPTModel", {}, "canonical")
    raise ValueError(
        f"{source} holds neither the canonical layout (tok_emb.weight, ...) nor HF GPT-2's "
        f"(wte.weight, ...); first keys: {_names(list(tensors)[:5])}"
    )
