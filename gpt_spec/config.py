"""One config schema for both twins: the book's GPT_CONFIG_124M keys, typed, frozen and checked."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import check_input_file
from .limits import MAX_SIZE, MAX_SIZE_TEXT

# Sizes from the book's chapter 5 table of GPT-2 models; the other fields are GPT_CONFIG_124M's.
_GPT2_BASE = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.1, "qkv_bias": False}
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {**_GPT2_BASE, "emb_dim": 768, "n_layers": 12, "n_heads": 12},  # 124M
    "gpt2-medium": {**_GPT2_BASE, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},  # 355M
    "gpt2-large": {**_GPT2_BASE, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},  # 774M
    "gpt2-xl": {**_GPT2_BASE, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},  # 1558M
}


# A config is a flat JSON object, and HF's config.json nests three levels at most. Python's parser
# gives up with RecursionError near 1000 levels, and putting a value a few hundred deep into a
# message can too: anything deeper than this is refused before any of it is used.
JSON_MAX_DEPTH = 64


def _json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (counted without recursing)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (json.loads would keep the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(data: str | bytes, what: str) -> Any:
    """`data` (text, or bytes that must be UTF-8) parsed as JSON, or a ValueError that starts with
    `what` (the file, or the field of one) and keeps the parser's reason; an object that gives a
    key twice is refused, at any depth."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 text: {e}") from e
    too_deep = f"{what} is nested too deeply (more than {JSON_MAX_DEPTH} levels of arrays and objects)"
    try:
        value = json.loads(data, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{what} has the key {e.key!r} more than once") from None
    except RecursionError as e:
        raise ValueError(too_deep) from e
    except ValueError as e:  # JSONDecodeError, or an integer past Python's int_max_str_digits
        raise ValueError(f"{what} is not valid JSON: {e}") from e
    if _json_depth(value) > JSON_MAX_DEPTH:
        raise ValueError(too_deep)
    return value


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON file at `path` (`what` it is: "config file", "HF config", ...), or a ValueError
    naming it: unreadable, not UTF-8, not JSON, or nested too deeply."""
    check_input_file(path, what)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {os.fspath(path)!r}: {e.strerror}") from e
    return parse_json(data, f"{what} {os.fspath(path)!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class GPTConfig:
    """Hyperparameters of the chapter-4 GPT, with the book's field names."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float
    qkv_bias: bool
    # The sliding KV cache of the book's optimized chapter-4 variant: each attention layer keeps the
    # keys and values of at most this many positions (None: context_length, nothing slides). Only
    # cached decoding reads it; the forward and the weights do not depend on it.
    kv_window_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
            value = int(value)  # exact for any Integral (numpy's integers too)
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
            if value > MAX_SIZE:
                raise ValueError(f"{name} must be at most {MAX_SIZE_TEXT}, got {value}")
            object.__setattr__(self, name, value)
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        rate = self.drop_rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise ValueError(f"drop_rate must be a number, got {rate!r} ({type(rate).__name__})")
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {rate}")
        object.__setattr__(self, "drop_rate", float(rate))
        # numpy.bool_ is not a bool subclass; accept it, refuse 0/1 and strings.
        if type(self.qkv_bias).__name__ not in ("bool", "bool_"):
            raise ValueError(f"qkv_bias must be a bool, got {self.qkv_bias!r} ({type(self.qkv_bias).__name__})")
        object.__setattr__(self, "qkv_bias", bool(self.qkv_bias))
        window = self.kv_window_size
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, numbers.Integral):
                raise ValueError(f"kv_window_size must be an int or None, got {window!r} ({type(window).__name__})")
            window = int(window)
            if window <= 0:
                raise ValueError(f"kv_window_size must be positive, got {window}")
            if window > self.context_length:
                raise ValueError(f"kv_window_size ({window}) must be at most context_length ({self.context_length})")
            object.__setattr__(self, "kv_window_size", window)

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def preset(cls, name: str) -> GPTConfig:
        """One of the book's GPT-2 sizes: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> GPTConfig:
        """Build from a plain dict such as the book's GPT_CONFIG_124M."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"config must be a mapping, got {type(cfg).__name__}")
        fields = dataclasses.fields(cls)
        known = [f.name for f in fields]
        unknown = sorted(set(cfg) - set(known), key=str)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
        # The book's keys are required; an optional one (kv_window_size) may be left out.
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in cfg]
        if missing:
            raise ValueError(f"missing config key(s): {', '.join(missing)}")
        return cls(**cfg)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> GPTConfig:
        """Read a JSON object with the book's keys; every refusal names the file."""
        data = read_json(path, "config file")
        if not isinstance(data, Mapping):
            raise ValueError(f"config file {os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"config file {os.fspath(path)!r}: {e}") from e

    @classmethod
    def coerce(cls, cfg: GPTConfig | Mapping[str, Any]) -> GPTConfig:
        """Accept a GPTConfig or the book's plain dict; the twins' constructors call this."""
        return cfg if isinstance(cfg, GPTConfig) else cls.from_dict(cfg)

    def to_dict(self) -> dict[str, Any]:
        """The book's keys, and kv_window_size only where it is set: a config without it writes
        (and a checkpoint's metadata records) exactly what it did before the field existed."""
        out = dataclasses.asdict(self)
        if out["kv_window_size"] is None:
            del out["kv_window_size"]
        return out

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)


def resolve_config(spec: str) -> GPTConfig:
    """A preset name or the path of a JSON config file (what the CLI's --config takes)."""
    if spec in PRESETS:
        return GPTConfig.preset(spec)
    if spec.endswith(".json") or os.path.sep in spec or os.path.exists(spec):
        return GPTConfig.from_json(spec)
    return GPTConfig.preset(spec)  # raises with the list of presets
