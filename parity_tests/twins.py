"""The twins as the parity suite handles them: build either from one config, run either on a
backend, and the numeric settings both run under.

Inputs are made once in numpy; torch runs under `no_grad()`; JAX runs the jitted forward by
default; `float32_matmuls()` pins matmuls to full float32 on both sides.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_flax.model import _GPT as FlaxGPT
from gpt_spec import GPTConfig, ModelKind
from gpt_spec.checkpoint import Checkpoint, load_checkpoint
from gpt_torch.model import _GPT as TorchGPT

from . import TWINS

MODES = ("eval", "train")
# short name -> the class each twin's module defines
MODELS: dict[str, str] = {kind: kind.model_class for kind in ModelKind}


def package(twin: str) -> Any:
    """The twin's package, gpt_torch or gpt_flax: the same public functions under the same names."""
    if twin not in TWINS:
        raise ValueError(f"a twin is torch or flax, got {twin!r}")
    return gpt_torch if twin == "torch" else gpt_flax


def _model_class(module: Any, kind: str):
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known models: {', '.join(MODELS)}")
    return getattr(module, MODELS[kind])


def build_torch(kind: str, cfg: GPTConfig, *, seed: int, **options: Any) -> TorchGPT:
    """The torch twin with torch's own init under `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return _model_class(gpt_torch, kind)(cfg, **options)


def build_flax(kind: str, cfg: GPTConfig, *, seed: int, **options: Any) -> FlaxGPT:
    """The Flax twin with its torch-like init from `nnx.Rngs(seed)`."""
    return _model_class(gpt_flax, kind)(cfg, **options, rngs=nnx.Rngs(seed))


def build_pair(
    kind: str, cfg: GPTConfig, *, source: str, seed: int = 0, mode: str = "eval", **options: Any
) -> tuple[TorchGPT, FlaxGPT]:
    """(torch twin, flax twin) holding the same weights: the `source` twin's own init, copied
    into the other by the production converters."""
    if source not in ("torch", "flax"):
        raise ValueError(f"source must be torch or flax, got {source!r}")
    tm = build_torch(kind, cfg, seed=seed, **options)
    fm = build_flax(kind, cfg, seed=seed, **options)
    if source == "torch":
        gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    else:
        gpt_torch.load_state_dict(tm, gpt_flax.state_dict(fm))
    set_mode(tm, mode)
    set_mode(fm, mode)
    return tm, fm


def read_checkpoint(path: str, *, config: GPTConfig | None = None, n_heads: int | None = None) -> Checkpoint:
    """Any checkpoint the twins read (gpt_spec.load_checkpoint): canonical or HF GPT-2 safetensors
    (a file or a snapshot folder, sharded or not), or a torch.save state dict (.pth/.pt)."""
    return load_checkpoint(path, config=config, n_heads=n_heads)


def set_mode(model: Any, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    model.eval() if mode == "eval" else model.train()


@dataclasses.dataclass(frozen=True)
class Backend:
    framework: str  # "torch" or "flax"
    device: Any  # a torch device string or a jax.Device

    @property
    def label(self) -> str:
        if self.framework == "flax":
            return f"flax/{self.device.platform}:{self.device.id}"
        return f"torch/{self.device}"


def discover_backends() -> tuple[list[Backend], list[tuple[str, str]]]:
    """Every backend this machine has, and each absent one with the reason it is skipped."""
    present: list[Backend] = []
    skipped: list[tuple[str, str]] = []
    for plat in ("cpu", "gpu", "tpu"):
        try:
            devices = jax.devices(plat)
        except RuntimeError:
            skipped.append((f"flax/{plat}", f"JAX {jax.__version__} sees no {plat.upper()} device"))
            continue
        present.extend(Backend("flax", d) for d in devices[:1])
    present.append(Backend("torch", "cpu"))
    if torch.cuda.is_available():
        present.append(Backend("torch", "cuda:0"))
    else:
        skipped.append(("torch/cuda", f"torch {torch.__version__} sees no CUDA device"))
    return present, skipped


@contextlib.contextmanager
def float32_matmuls() -> Iterator[str]:
    """Full-float32 matmuls on both sides: no TF32 on GPU, no bfloat16 passes on TPU."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with jax.default_matmul_precision("float32"):
            yield "float32 (jax.default_matmul_precision('float32'), torch 'highest')"
    finally:
        torch.set_float32_matmul_precision(before)


MATMUL_PRECISIONS = ("float32", "default")


@contextlib.contextmanager
def matmuls(precision: str = "float32") -> Iterator[str]:
    """ "float32": float32_matmuls(). "default": whatever each framework does unpinned (JAX: TF32
    on NVIDIA GPUs, one bfloat16 pass on TPUs; torch: its float32 matmul precision setting), to
    see what a parity check says about it. Yields the description for the report."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        with float32_matmuls() as described:
            yield described
        return
    # jax.config's options are attributes set at runtime: its type stubs do not declare them.
    jax_precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    yield (
        f"each framework's default (jax_default_matmul_precision={jax_precision}, "
        f"torch {torch.get_float32_matmul_precision()!r})"
    )


def numpy_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: numpy_tree(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.detach().float().cpu().numpy()
    return np.asarray(tree)


def run_torch(model: torch.nn.Module, ids: np.ndarray, device: str = "cpu", *, activations: bool = False) -> Any:
    """Logits (or every stage's output) as numpy, computed on `device` under no_grad."""
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    with torch.no_grad():
        return numpy_tree(model(torch.from_numpy(ids).to(device), return_activations=activations))


def run_flax(
    model: FlaxGPT, ids: np.ndarray, device: jax.Device | None = None, *, jit: bool = True, activations: bool = False
) -> Any:
    """Logits (or every stage's output) as numpy: jitted by default, or op by op."""
    if jit:
        return numpy_tree(gpt_flax.jit_forward(model, device=device, return_activations=activations)(ids))
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        return numpy_tree(model(ids, return_activations=activations))


def run_backend(backend: Backend, model: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    if backend.framework == "torch":
        return run_torch(model, ids, backend.device, activations=True)
    return run_flax(model, ids, backend.device, activations=True)


def submodule(model: Any, path: str) -> Any:
    """The module at a dotted path of canonical names ("trf_blocks.0.ff.layers.1") in either
    twin: nnx.Sequential keeps its children in `.layers` where nn.Sequential indexes them."""
    obj = model
    for part in path.split("."):
        if not part.isdigit():
            obj = getattr(obj, part)
        elif isinstance(obj, nnx.Sequential):
            obj = obj.layers[int(part)]
        else:
            obj = obj[int(part)]
    return obj


@jax.jit
def _module_call(graphdef: Any, state: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)


def call_module(backend: Backend, module: Any, x: np.ndarray) -> np.ndarray:
    """One module of a twin on a float32 input, on `backend`'s device: torch under no_grad, Flax
    jitted as production runs it (one program per module structure and shape: a model's twelve
    blocks share theirs)."""
    if backend.framework == "torch":
        if backend.device != "cpu":
            module = copy.deepcopy(module).to(backend.device)
        with torch.no_grad():
            return numpy_tree(module(torch.from_numpy(np.array(x, copy=True)).to(backend.device)))
    graphdef, state = nnx.split(module)
    state, x = jax.device_put((state, x), backend.device)
    return numpy_tree(_module_call(graphdef, state, x))


def token_batch(cfg: GPTConfig, batch: int, seq: int, seed: int) -> np.ndarray:
    """Random ids in [0, vocab_size), made once in numpy and fed to both twins."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int64)
