"""GPT-2 as HF transformers stores it: the tensor layout, mapped onto the canonical one and back,
and the snapshot folder (`model.safetensors` and its `config.json`, see `.hf_config`) written safely.

A GPT-2 in the HF layout keeps Conv1D weights `(in, out)` (the transpose of nn.Linear's), fuses
query, key and value into one `c_attn`, and ties the head to `wte` unless the config says not to.
`from_hf` maps it onto the canonical layout; `to_hf` goes the other way.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GPTConfig
from ..layout import gpt_shapes, published_n_heads
from ..models import ModelClass
from ..tensors import FLOAT_DTYPES, LazyStateDict, StateDict, check_state_dict, info, layer_count
from . import safetensors_io
from .atomic import atomic_write_all, check_destination, folders_to_create, naming
from .hf_config import config_from_hf, hf_config

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
    sd = check_state_dict(gpt_shapes(cfg), sd, ModelClass.GPT_MODEL)
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


def check_hf_destination(folder: str | os.PathLike[str]) -> list[Path]:
    """Refuse an HF snapshot folder save_hf could not write (as check_destination refuses a file);
    return the folders it will have to create, deepest first."""
    folder = Path(folder)
    created = folders_to_create(folder, f"cannot write HF snapshot {str(folder)!r}")
    if not created:
        check_destination(folder / "model.safetensors", "checkpoint")
        check_destination(folder / "config.json", "config")
    return created


def save_hf(folder: str | os.PathLike[str], sd: Mapping[str, Any], cfg: GPTConfig, *, dtype: str = "float32") -> None:
    """Write a GPTModel state dict as an HF GPT-2 snapshot: `model.safetensors` (HF's layout, head
    tied when it equals the token embedding) and the `config.json` transformers reads it with.

    The destination is checked before any work; the folder (and missing parents) is created only
    once the tensors are converted, both files are renamed into place only once both are written,
    and a failed save removes the folders it created."""
    safetensors_io.check_save_dtype(dtype)
    folder = Path(folder)
    created = check_hf_destination(folder)
    hf = to_hf(sd, cfg)
    try:
        tensors = {k: safetensors_io.as_dtype(k, v, dtype) for k, v in hf.items()}
    except ValueError as e:
        raise ValueError(f"cannot write HF snapshot {os.fspath(folder)!r}: {e}") from None
    config = hf_config(cfg, tied="lm_head.weight" not in hf) | {"dtype": dtype}
    try:
        for path in reversed(created):
            with naming(folder, "HF snapshot"):
                path.mkdir()
        atomic_write_all(
            [
                (
                    folder / "model.safetensors",
                    lambda tmp: safetensors_io.write_verified(tmp, tensors, {"format": "pt"}),
                    "checkpoint",
                ),
                (
                    folder / "config.json",
                    lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"),
                    "config",
                ),
            ]
        )
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


__all__ = ["check_hf_destination", "from_hf", "hf_shapes", "is_hf_layout", "save_hf", "to_hf"]
