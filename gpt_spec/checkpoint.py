"""Checkpoint files: what they hold, read faithfully or refused.

`load_checkpoint` reads any file the twins take: the canonical file `save_checkpoint` writes (see
`gpt_spec.formats.canonical`), GPT-2 as HF transformers saves it (one `model.safetensors` or a
sharded snapshot, with its `config.json`; see `gpt_spec.formats.hf`) and the book's `torch.save`
files (`gpt_spec.formats.torch_save`). Every shape, dtype and config field is checked against the
file's headers before any tensor is read or any model built; tensors are then read one at a time
(`LazyStateDict`).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, overload

import numpy as np

from .config import GPTConfig, read_json
from .files import check_input_file
from .formats import canonical
from .formats.hf import from_hf, is_hf_layout
from .formats.safetensors_io import HF_INDEX, open_safetensors, open_sharded
from .formats.torch_save import read_torch_file
from .layout import config_of, infer_config, model_shapes
from .models import ModelClass
from .tensors import LazyStateDict, check_state_dict, info, layer_count


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checked state dict read from a file, the config it belongs to, and which model.

    `state_dict` is lazy for safetensors files: each tensor is read when asked for.
    """

    state_dict: Mapping[str, np.ndarray]
    config: GPTConfig
    model: ModelClass = ModelClass.GPT_MODEL
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layout: str = "canonical"  # "hf-gpt2", "torch.save"
    dtypes: tuple[str, ...] = ("float32",)  # the file's tensor dtypes
    config_source: str = "the file's metadata"
    files: tuple[str, ...] = ()

    @property
    def n_parameters(self) -> int:
        return sum(int(np.prod(info(self.state_dict, k)[0])) for k in self.state_dict)

    @property
    def compute_dtype(self) -> str:
        """The dtype the twins keep these weights in by default: bfloat16 for a bfloat16 file, else
        float32 (float16 widens to it exactly)."""
        return "bfloat16" if self.dtypes == ("bfloat16",) else "float32"


def _exists_in(folder: Path, name: str) -> bool:
    """Whether `folder` holds `name`; a folder that may not be searched is refused, naming it."""
    try:
        os.stat(folder / name)
    except PermissionError:
        raise ValueError(f"checkpoint folder {str(folder)!r} is not searchable (permission denied)") from None
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # a loop of symlinks: there, and check_input_file says what is wrong with it
        pass
    return True


def _dtypes(sd: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted({info(sd, k)[1] for k in sd}))


def _checked(
    sd: Mapping[str, Any], cfg: GPTConfig, model: str, options: Mapping[str, Any], source: str
) -> Mapping[str, np.ndarray]:
    return check_state_dict(model_shapes(model, cfg, options), sd, model, source)


@overload
def _with_n_heads(cfg: GPTConfig, n_heads: int | None, source: str) -> GPTConfig: ...
@overload
def _with_n_heads(cfg: None, n_heads: int | None, source: str) -> None: ...
def _with_n_heads(cfg: GPTConfig | None, n_heads: int | None, source: str) -> GPTConfig | None:
    if cfg is None or n_heads is None:
        return cfg
    try:
        return cfg.replace(n_heads=n_heads)
    except ValueError as e:  # an n_heads that does not divide emb_dim
        raise ValueError(f"{source}: {e}") from None


def _given_n_heads(n_heads: Any, source: str) -> int | None:
    """An n_heads passed to load: None (not given) or an int >= 1, else refused naming the file."""
    if n_heads is None:
        return None
    if isinstance(n_heads, bool) or not isinstance(n_heads, numbers.Integral) or n_heads < 1:
        raise ValueError(f"{source}: n_heads must be an int >= 1, got {n_heads!r}")
    return int(n_heads)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: GPTConfig | None = None,
    n_heads: int | None = None,
    hf_config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Read and check a checkpoint, reading no tensor yet.

    `path` is a canonical file written by `save_checkpoint`; a GPT-2 `model.safetensors` in the HF
    layout (its `config.json` read from beside it); an HF snapshot directory (`model.safetensors`
    or `model.safetensors.index.json` with its shards, and `config.json`); or a `torch.save` file
    (`.pth`, `.pt`). `config` overrides the config the file says or implies, `n_heads` only its
    head count, `hf_config` names (or is) the HF config to use. Raises ValueError naming the problem.
    """
    path = Path(path)
    n_heads = _given_n_heads(n_heads, f"checkpoint {str(path)!r}")
    if path.suffix in (".pth", ".pt"):
        sd = read_torch_file(path)
        source = f"checkpoint {str(path)!r}"
        cfg = config or infer_config(sd, n_heads=n_heads, source=source)
        cfg = _with_n_heads(cfg, n_heads, source)
        return Checkpoint(
            _checked(sd, cfg, ModelClass.GPT_MODEL, {}, source),
            cfg,
            layout="torch.save",
            dtypes=_dtypes(sd),
            config_source="given" if config else "inferred from the tensors",
            files=(str(path),),
        )
    try:
        is_folder = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:  # missing or out of reach: check_input_file says which, naming it
        is_folder = False
    folder = path if is_folder else path.parent
    if is_folder:
        use_index = _exists_in(path, HF_INDEX) and not _exists_in(path, "model.safetensors")
        path = path / (HF_INDEX if use_index else "model.safetensors")
    source = f"checkpoint {str(path)!r}"
    if path.name.endswith(".index.json"):
        tensors, files = open_sharded(path)
        metadata: dict[str, str] = {}
    else:
        entries, metadata = open_safetensors(path)
        tensors, files = LazyStateDict(entries), (str(path),)
    if canonical.is_canonical(metadata):
        cfg, model, options = canonical.read_metadata(metadata, config, source)
        cfg = _with_n_heads(cfg, n_heads, source)
        return Checkpoint(
            _checked(tensors, cfg, model, options, source),
            cfg,
            model,
            options,
            "canonical",
            _dtypes(tensors),
            "given" if config else "the file's metadata",
            files,
        )
    if is_hf_layout(tensors):
        if hf_config is None and _exists_in(folder, "config.json"):
            hf_config = folder / "config.json"
        config_source = "none: a published GPT-2 shape" if hf_config is None else "given"
        hf_mapping: Mapping[str, Any] | None
        if isinstance(hf_config, (str, os.PathLike)):
            config_source = str(hf_config)
            if Path(hf_config) != folder / "config.json":  # the messages say config.json: name this one
                source = f"{source} with HF config {config_source!r}"
            check_input_file(hf_config, "HF config")
            hf_mapping = read_json(hf_config, "HF config")
        else:
            hf_mapping = hf_config
        override = _with_n_heads(config, n_heads, source)
        if n_heads is not None and config is None:
            if hf_mapping is not None:
                _fits_the_tensors(n_heads, tensors, source)  # else config.json would take the blame
                hf_mapping = {**hf_mapping, "n_head": n_heads} if isinstance(hf_mapping, Mapping) else hf_mapping
            else:
                override = _n_heads_only(tensors, n_heads, source)
        converted, cfg = from_hf(tensors, hf_mapping, config=override, source=source)
        if config is not None:
            config_source = "given"
        return Checkpoint(
            _checked(converted, cfg, ModelClass.GPT_MODEL, {}, source),
            cfg,
            ModelClass.GPT_MODEL,
            {},
            "hf-gpt2",
            _dtypes(tensors),
            config_source,
            files,
        )
    if "tok_emb.weight" in tensors:  # canonical names, no metadata: infer the config
        cfg = config or infer_config(tensors, n_heads=n_heads, source=source)
        cfg = _with_n_heads(cfg, n_heads, source)
        return Checkpoint(
            _checked(tensors, cfg, ModelClass.GPT_MODEL, {}, source),
            cfg,
            layout="canonical",
            dtypes=_dtypes(tensors),
            config_source="given" if config else "inferred from the tensors",
            files=files,
        )
    raise ValueError(
        f"{source} holds neither the canonical layout (tok_emb.weight, ...) nor HF GPT-2's "
        f"(wte.weight, ...); first keys: {', '.join(repr(k) for k in list(tensors)[:5])}"
    )


def _n_heads_only(tensors: Mapping[str, Any], n_heads: int, source: str) -> GPTConfig:
    """The config an HF file without config.json implies, with the head count given."""
    names = {k.removeprefix("transformer."): k for k in tensors}
    if "wte.weight" not in names or "wpe.weight" not in names:
        raise ValueError(f"{source}: missing tensor 'wte.weight' or 'wpe.weight'")
    vocab, e = info(tensors, names["wte.weight"])[0]
    return config_of(
        source,
        vocab_size=vocab,
        context_length=info(tensors, names["wpe.weight"])[0][0],
        emb_dim=e,
        n_heads=n_heads,
        n_layers=layer_count(names, r"h\.(\d+)\.", source),
        drop_rate=0.1,
        qkv_bias=True,
    )


def _fits_the_tensors(n_heads: int, tensors: Mapping[str, Any], source: str) -> None:
    """An n_heads given for an HF file divides its width (wte's second axis), or is refused naming the file."""
    key = "wte.weight" if "wte.weight" in tensors else "transformer.wte.weight"
    shape = info(tensors, key)[0]
    if len(shape) == 2 and shape[1] % n_heads:
        raise ValueError(f"{source}: emb_dim ({shape[1]}) must be divisible by n_heads ({n_heads})")


__all__ = ["Checkpoint", "load_checkpoint"]
