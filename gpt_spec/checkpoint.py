"""Checkpoint files: what they hold, read faithfully or refused, and written safely.

A canonical checkpoint is the canonical state dict in safetensors with the config (and which of
the book's models it belongs to) in the file's metadata, so a file describes itself.
`load_checkpoint` also reads GPT-2 as HF transformers saves it (one `model.safetensors` or a
sharded snapshot, with its `config.json`; see `gpt_spec.formats.hf`) and the book's `torch.save` files.
Every shape, dtype and config field is checked against the file's headers before any tensor is
read or any model built; tensors are then read one at a time (`LazyStateDict`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
import pickle
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from .config import GPTConfig, parse_json, read_json
from .files import check_input_file
from .formats.hf import config_from_hf, from_hf, hf_config, is_hf_layout, published_n_heads, to_hf
from .models import DUMMY_GPT_MODEL, DUMMY_NORM, FINAL_NORMS, GPT_MODEL, LAYER_NORM, MODELS
from .tensors import (
    FLOAT_DTYPES,
    LazyStateDict,
    StateDict,
    as_numpy,
    check_state_dict,
    dtype_name,
    info,
    layer_count,
)

FORMAT = "gpt-twins/canonical-v1"
SAVE_DTYPES = ("float32", "bfloat16")
SAVE_SUFFIX = ".safetensors"
HF_INDEX = "model.safetensors.index.json"


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
    if model not in MODELS:
        raise ValueError(f"{source}: model must be one of {', '.join(MODELS)}, got {model!r}")
    if not isinstance(options, Mapping):
        raise ValueError(f"{source}: options must be a mapping, got {type(options).__name__}")
    allowed = {"final_norm": FINAL_NORMS} if model == DUMMY_GPT_MODEL else {}
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
    if model == GPT_MODEL:
        return gpt_shapes(cfg)
    e, v = cfg.emb_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (v, e), "pos_emb.weight": (cfg.context_length, e)}
    if options.get("final_norm", DUMMY_NORM) == LAYER_NORM:
        shapes |= {"final_norm.scale": (e,), "final_norm.shift": (e,)}
    return shapes | {"out_head.weight": (v, e)}


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
    return _config(
        source,
        vocab_size=vocab_size,
        context_length=shapes["pos_emb.weight"][0],
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        drop_rate=drop_rate,
        qkv_bias="trf_blocks.0.att.W_query.bias" in sd,
    )


def _config(source: str, **fields: Any) -> GPTConfig:
    """GPTConfig(**fields), its refusal (an n_heads given that does not divide emb_dim) naming the file."""
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# --- reading -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checked state dict read from a file, the config it belongs to, and which model.

    `state_dict` is lazy for safetensors files: each tensor is read when asked for.
    """

    state_dict: Mapping[str, np.ndarray]
    config: GPTConfig
    model: str = GPT_MODEL
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


def _safetensors_error(path: Path, e: Exception) -> ValueError:
    if isinstance(e, FileNotFoundError):
        return ValueError(f"checkpoint {str(path)!r} does not exist")
    if isinstance(e, IsADirectoryError):
        return ValueError(f"checkpoint {str(path)!r} is a directory without {HF_INDEX} or model.safetensors")
    if isinstance(e, PermissionError):
        return ValueError(f"cannot read checkpoint {str(path)!r}: {e.strerror}")
    return ValueError(f"{str(path)!r} is not a readable safetensors file: {e}")


def _dtype(raw: str) -> str:
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}.get(raw, raw.lower())


# A tensor larger than this is read in blocks of rows, each through its own mapping of the file.
READ_BLOCK_BYTES = 64 << 20


def _read_tensor(path: Path, key: str) -> np.ndarray:
    from safetensors import safe_open

    # The file is mapped for each read and unmapped after it, and a large tensor is read in
    # blocks of rows: the file's pages never sit resident beside the model being filled, and a
    # load's peak is the model plus about one tensor (docs/checkpoints.md: gpt-parity load-memory).
    try:
        with safe_open(str(path), framework="numpy") as f:
            shape = tuple(f.get_slice(key).get_shape())
            if len(shape) < 2 or np.prod(shape) * 4 <= READ_BLOCK_BYTES:
                return f.get_tensor(key)
        rows = max(1, READ_BLOCK_BYTES // (4 * int(np.prod(shape[1:]))))
        out = None
        for start in range(0, shape[0], rows):
            stop = min(start + rows, shape[0])  # safetensors' slices do not clamp
            with safe_open(str(path), framework="numpy") as f:
                block = f.get_slice(key)[start:stop]
                if out is None:
                    out = np.empty(shape, block.dtype)
                out[start:stop] = block
            del f, block
        assert out is not None  # shape[0] > 0: an empty tensor was returned whole above
        return out
    except Exception as e:
        raise ValueError(f"{str(path)!r}: cannot read tensor {key!r}: {e}") from e


def _open_safetensors(
    path: Path, what: str = "checkpoint"
) -> tuple[dict[str, tuple[tuple[int, ...], str, Callable]], dict[str, str]]:
    """`{key: (shape, dtype, read)}` and the metadata of one file, from its header alone."""
    from safetensors import safe_open

    check_input_file(path, what)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            entries = {}
            for key in f.keys():
                s = f.get_slice(key)
                entries[key] = (
                    tuple(int(n) for n in s.get_shape()),
                    _dtype(s.get_dtype()),
                    lambda key=key: _read_tensor(path, key),
                )
    except Exception as e:
        raise _safetensors_error(path, e) from e
    return entries, metadata


def _open_sharded(index: Path) -> tuple[LazyStateDict, tuple[str, ...]]:
    """A sharded HF snapshot (`model.safetensors.index.json` + shards) as one lazy state dict."""
    check_input_file(index, "shard index")
    data = read_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"shard index {str(index)!r} has no weight_map")
    for shard in weight_map.values():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ValueError(f"shard index {str(index)!r} names {shard!r}, not a file beside it")
    entries: dict[str, tuple] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        found, _ = _open_safetensors(index.parent / shard, "shard")
        for key, entry in found.items():
            if key in entries:
                raise ValueError(f"{str(index.parent)!r}: tensor {key!r} is in more than one shard")
            if weight_map.get(key) != shard:
                raise ValueError(
                    f"{str(index.parent / shard)!r} holds {key!r}, which the index places in {weight_map.get(key)!r}"
                )
            entries[key] = entry
    missing = set(weight_map) - set(entries)
    if missing:
        raise ValueError(f"shard index {str(index)!r} lists tensor(s) no shard holds: {', '.join(sorted(missing)[:5])}")
    return LazyStateDict(entries), tuple(str(index.parent / s) for s in shards)


def read_torch_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A state dict saved with `torch.save` (the book's `model.pth`, or its chapter-5 dict with a
    `model_state_dict` entry) as numpy arrays, loaded with `weights_only=True`, so no pickled code
    runs. The book's `att.mask` buffers stay in: `check_state_dict` checks and drops them."""
    import torch

    check_input_file(path, "checkpoint")
    what = f"checkpoint {os.fspath(path)!r}"
    try:
        with warnings.catch_warnings():
            # torch warns before it refuses a TorchScript archive; the refusal below says it all
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{what} does not exist") from None
    except pickle.UnpicklingError as e:
        raise ValueError(_unpickling_refusal(path, e)) from e
    except Exception as e:  # a truncated zip, or not a torch file at all; an empty one is a bare EOFError
        if "TorchScript" in str(e):
            raise ValueError(
                f"{what} is a TorchScript archive (a program, not a state dict); refused, nothing was run"
            ) from e
        reason = _torch_reason(e) or (
            "it ends before its first record (empty or cut short)" if isinstance(e, EOFError) else type(e).__name__
        )
        raise ValueError(f"{os.fspath(path)!r} is not a readable torch.save file: {reason}") from e
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict of tensors")
    return {str(name): _torch_array(path, str(name), tensor) for name, tensor in obj.items()}


def _torch_reason(e: BaseException) -> str:
    """torch's reason in one line, without its advice to load with weights_only=False (which would
    run whatever code the pickle holds)."""
    import torch.serialization

    text = str(e).replace(getattr(torch.serialization, "UNSAFE_MESSAGE", "\0"), "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """An 8-byte little-endian header length within the file, then the header's JSON object."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(9)
        return (
            len(head) == 9
            and head[8:] == b"{"
            and int.from_bytes(head[:8], "little") <= os.fstat(f.fileno()).st_size - 8
        )
    return False


def _unpickling_refusal(path: str | os.PathLike[str], e: pickle.UnpicklingError) -> str:
    """Why torch's weights-only unpickler stopped, in one line. torch raises its advice `from None`:
    the unpickler's own reason is the exception's context."""
    name = f"checkpoint {os.fspath(path)!r}"
    reason = str(e.__context__ or e)
    found = re.search(r"GLOBAL (\S+)", reason)
    if found:
        return (
            f"{name}: its pickle would run code (a global {found.group(1)!r} outside the tensors and containers a "
            "state dict holds); refused, nothing was run"
        )
    if _looks_like_safetensors(path):
        return (
            f"{name} holds safetensors, but a name ending in .pth or .pt is read as a torch.save file; "
            "rename it to end in .safetensors"
        )
    return (
        f"{name}: its pickle holds more than the tensors and containers a state dict holds "
        f"({_torch_reason(e.__context__ or e)}); refused, nothing was run"
    )


def _torch_array(path: str | os.PathLike[str], name: str, tensor: Any) -> np.ndarray:
    """One tensor of a torch.save file as numpy (bfloat16 as ml_dtypes', exactly); a tensor no numpy
    array holds (float8, quantized, sparse, on the meta device) is refused naming it."""
    import torch

    source = f"checkpoint {os.fspath(path)!r}: state dict key {name!r}"
    if tensor.layout != torch.strided:
        raise ValueError(f"{source} is a {str(tensor.layout).removeprefix('torch.')} tensor; expected a dense one")
    if tensor.is_meta:
        raise ValueError(f"{source} is a meta tensor (a shape without values)")
    try:
        return as_numpy(tensor)
    except ValueError as e:
        raise ValueError(
            f"{source} has dtype {dtype_name(tensor)}, which numpy cannot hold; expected one of "
            f"{', '.join(FLOAT_DTYPES)}"
        ) from e


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
            _checked(sd, cfg, GPT_MODEL, {}, source),
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
        tensors, files = _open_sharded(path)
        metadata: dict[str, str] = {}
    else:
        entries, metadata = _open_safetensors(path)
        tensors, files = LazyStateDict(entries), (str(path),)
    if metadata.get("format") == FORMAT:
        if "config" not in metadata:
            raise ValueError(f"{source}: its metadata is damaged: it has no 'config'")
        if config is None:
            data = parse_json(metadata["config"], f"{source}: its metadata field 'config'")
            try:
                cfg = GPTConfig.from_dict(data)
            except ValueError as e:
                raise ValueError(f"{source}: its metadata holds a bad config: {e}") from e
        else:
            cfg = config
        model = metadata.get("model", GPT_MODEL)
        options = parse_json(metadata.get("options", "{}"), f"{source}: its metadata field 'options'")
        options = check_options(model, options, source)
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
            _checked(converted, cfg, GPT_MODEL, {}, source),
            cfg,
            GPT_MODEL,
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
            _checked(tensors, cfg, GPT_MODEL, {}, source),
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
    return _config(
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


# --- writing -------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Temp files an earlier save to `target` left when it was killed (`.NAME.PID.*.partial` of a
    process that no longer runs); nobody else's files are touched."""
    for tmp in target.parent.glob(f".{target.name}.*.partial"):
        parts = tmp.name[len(target.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _check_folder(folder: Path, refusal: str) -> None:
    """`folder` exists, is a folder and this process may create files in it; else ValueError."""
    try:
        mode = os.stat(folder).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{refusal}: folder {str(folder)!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{refusal}: folder {str(folder)!r}: {e.strerror}") from e
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{refusal}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{refusal}: folder {str(folder)!r} is not writable")


def check_destination(path: str | os.PathLike[str], what: str) -> Path:
    """Where `path` will be written (a symlink followed), refused if it names a folder (one that
    exists, or any path ending in a separator), or if its folder is missing, not a folder, or not
    writable. The savers call this before any work, and so does `gpt-parity` for every path it
    will write, before it runs."""
    given = os.fspath(path)
    refusal = f"cannot write {what} {given!r}"
    if given.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        # realpath drops the separator: "xx/" would be written as a file xx
        raise ValueError(f"{refusal}: it ends in {given[-1]!r}, so it names a folder, not a file")
    target = Path(os.path.realpath(path))
    if os.path.isdir(target):
        raise ValueError(f"{refusal}: it is a directory")
    _check_folder(target.parent, refusal)
    return target


@contextlib.contextmanager
def _naming(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """A failure inside as a ValueError naming the destination, keeping the underlying reason."""
    try:
        yield
    except OSError as e:  # EFBIG past a file-size limit, ENOSPC, EIO, ...
        raise ValueError(f"cannot write {what} {os.fspath(path)!r}: {e.strerror or e}") from e
    except Exception as e:  # safetensors' SafetensorError (its wording of the same), a bad read-back
        raise ValueError(f"cannot write {what} {os.fspath(path)!r}: {e}") from e


def _atomic_write_all(outputs: Sequence[tuple[str | os.PathLike[str], Callable[[Path], object], str]]) -> list[Path]:
    """`(path, write, what)` each written to a temp file beside its path (`.NAME.PID.*.partial`),
    and renamed into place only once every one is written: a failure in any write leaves every
    old file as it was and no temp file behind."""
    targets = [check_destination(path, what) for path, _, what in outputs]
    temps: list[Path] = []
    try:
        for (path, write, what), target in zip(outputs, targets, strict=True):
            with _naming(path, what):
                _remove_stale_temps(target)
                fd, name = tempfile.mkstemp(
                    dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".partial"
                )
                os.close(fd)
                temps.append(Path(name))
                write(temps[-1])
                os.chmod(temps[-1], 0o666 & ~_umask())
        for (path, _, what), tmp, target in zip(outputs, temps, targets, strict=True):
            with _naming(path, what):
                os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return targets


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], what: str = "checkpoint") -> Path:
    """Run `write(tmp)` then rename tmp onto `path`: an interrupted or failed write leaves the old
    file (if any) as it was and no temp file. A symlinked `path` is written where it points; the
    file gets the mode a plain `open` would (0666 less the umask). A missing, non-folder or
    read-only folder is refused before `write` runs; every error is a ValueError naming the file."""
    return _atomic_write_all([(path, write, what)])[0]


def _as_dtype(name: str, value: Any, dtype: str) -> np.ndarray:
    import ml_dtypes

    array = np.asarray(as_numpy(value))
    target = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    if array.dtype == np.float64:
        from .tensors import checked_array

        array = checked_array(name, array)
    if dtype == "bfloat16" and array.dtype != target and array.size:
        from .tensors import check_bfloat16_range

        finite = np.abs(array[np.isfinite(array)])
        check_bfloat16_range(f"state dict key {name!r}", float(finite.max()) if finite.size else 0.0)
    return np.ascontiguousarray(array.astype(target, copy=False))


def _write_verified(tmp: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> None:
    """safetensors' save, then every tensor read back and compared bit for bit."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    entries, _ = _open_safetensors(tmp)
    for key, value in tensors.items():
        back = entries[key][2]()
        if back.shape != value.shape or back.dtype != value.dtype or back.tobytes() != value.tobytes():
            raise ValueError(f"tensor {key!r} read back differs from what was written")


def _check_save_dtype(dtype: str) -> str:
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    return dtype


def check_save(path: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Refuse a checkpoint `save_checkpoint` could not write, or one `load_checkpoint` would not
    read back: the destination (see `check_destination`), a name not ending in .safetensors, a
    dtype other than float32 or bfloat16. Both twins' `save` call this before any work."""
    target = check_destination(path, "checkpoint")
    if not os.fspath(path).endswith(SAVE_SUFFIX):  # load would read a .pth or .pt as torch.save
        raise ValueError(
            f"cannot write checkpoint {os.fspath(path)!r}: a checkpoint is written as safetensors, "
            f"so its name must end in {SAVE_SUFFIX}"
        )
    _check_save_dtype(dtype)
    return target


def save_checkpoint(
    path: str | os.PathLike[str],
    sd: Mapping[str, Any],
    cfg: GPTConfig,
    *,
    model: str = GPT_MODEL,
    options: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> None:
    """Write a canonical state dict as safetensors (float32 or bfloat16), with its config in the
    metadata, to a path ending in .safetensors. The dict is checked against the model first; the file is written beside the
    destination, read back and compared, and only then renamed over it (see `atomic_write`)."""
    check_save(path, dtype)  # before any tensor is read or converted
    options = check_options(model, options or {})
    sd = check_state_dict(model_shapes(model, cfg, options), sd, model)
    try:
        tensors = {k: _as_dtype(k, sd[k], dtype) for k in sd}
    except ValueError as e:
        raise ValueError(f"cannot write checkpoint {os.fspath(path)!r}: {e}") from None
    metadata = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), "model": model, "options": json.dumps(options)}
    atomic_write(path, lambda tmp: _write_verified(tmp, tensors, metadata))


def _folders_to_create(folder: Path, refusal: str) -> list[Path]:
    """The folders missing on the way to `folder`, deepest first; the nearest one that exists must
    be a writable folder."""
    missing, current = [], Path(os.path.abspath(folder))
    while not os.path.exists(current):
        missing.append(current)
        current = current.parent
    if not missing and not os.path.isdir(current):
        raise ValueError(f"{refusal}: it is a file")
    _check_folder(current, refusal)
    return missing


def check_hf_destination(folder: str | os.PathLike[str]) -> list[Path]:
    """Refuse an HF snapshot folder save_hf could not write (as check_destination refuses a file);
    return the folders it will have to create, deepest first."""
    folder = Path(folder)
    created = _folders_to_create(folder, f"cannot write HF snapshot {str(folder)!r}")
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
    _check_save_dtype(dtype)
    folder = Path(folder)
    created = check_hf_destination(folder)
    hf = to_hf(sd, cfg)
    try:
        tensors = {k: _as_dtype(k, v, dtype) for k, v in hf.items()}
    except ValueError as e:
        raise ValueError(f"cannot write HF snapshot {os.fspath(folder)!r}: {e}") from None
    config = hf_config(cfg, tied="lm_head.weight" not in hf) | {"dtype": dtype}
    try:
        for path in reversed(created):
            with _naming(folder, "HF snapshot"):
                path.mkdir()
        _atomic_write_all(
            [
                (
                    folder / "model.safetensors",
                    lambda tmp: _write_verified(tmp, tensors, {"format": "pt"}),
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


__all__ = [
    "FLOAT_DTYPES",
    "FORMAT",
    "SAVE_DTYPES",
    "Checkpoint",
    "StateDict",
    "atomic_write",
    "check_destination",
    "check_input_file",
    "check_hf_destination",
    "check_options",
    "check_save",
    "check_state_dict",
    "config_from_hf",
    "from_hf",
    "gpt_shapes",
    "infer_config",
    "load_checkpoint",
    "model_shapes",
    "read_torch_file",
    "save_checkpoint",
    "save_hf",
    "to_hf",
]
