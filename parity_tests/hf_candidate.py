"""An HF transformers GPT2LMHeadModel as the candidate of a check, the torch twin as its reference.

The candidate is transformers' own model, read from a snapshot folder (config.json and the
safetensors) and computing what its config.json says. `HFGPT` shows it under the twins' names: its
stages are recorded by hooks on transformers' modules as its own forward runs (the residual is
the input to ln_2), and each module a layer probe calls is transformers' (a projection of the fused
c_attn is its columns). The reference is the torch twin holding the same file's weights, read as
the book's GPT-2 whatever config.json says LayerNorm's eps, the GELU and the score scaling are:
where the two differ, `diagnose` has a difference to explain, and `meaning` lists what config.json
set, to hold the verdict against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gpt_torch
from gpt_spec import GPTConfig, ModelKind
from gpt_spec.checkpoint import load_checkpoint
from gpt_spec.config import read_json
from gpt_spec.files import check_input_file
from gpt_spec.formats.hf_config import BOOK_LAYER_NORM_EPS, HF_GELUS

from .forward import DTYPE_BOUNDS, ParityOptions, ParityReport, Reference
from .twins import Backend, build_torch, float32_matmuls, set_mode, token_batch

NAME = "transformers"  # how reports name the candidate
DIRECTION = f"torch->{NAME}"
# config.json fields whose meaning the twins do not compute: the reference reads the weights as
# the book's GPT-2 (these values); the candidate computes what the file says.
BOOK_MEANING: dict[str, Any] = {
    "layer_norm_epsilon": BOOK_LAYER_NORM_EPS,
    "activation_function": HF_GELUS[0],
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}


class _Columns(torch.nn.Module):
    """Columns [start, stop) of a transformers Conv1D (x @ weight + bias, weight stored (in, out)):
    one of the query, key and value projections fused in c_attn."""

    def __init__(self, conv: Any, start: int, stop: int) -> None:
        super().__init__()
        self.conv, self.start, self.stop = conv, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.conv.weight[:, self.start : self.stop], self.conv.bias[self.start : self.stop]
        return x @ w + b


class _Attention(torch.nn.Module):
    """transformers' GPT2Attention called on its own as GPT2Model calls it: with the causal mask
    (eager attention adds it to the scores; called without one, it would attend to the future)."""

    def __init__(self, attn: Any, emb_dim: int) -> None:
        super().__init__()
        self.attn = attn
        self.W_query, self.W_key, self.W_value = (
            _Columns(attn.c_attn, k * emb_dim, (k + 1) * emb_dim) for k in range(3)
        )
        self.out_proj = attn.c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-2]
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
        return self.attn(x, attention_mask=mask[None, None])[0]


class _FeedForward(torch.nn.Module):
    def __init__(self, mlp: Any) -> None:
        super().__init__()
        self.mlp = mlp
        self.layers = torch.nn.Sequential(mlp.c_fc, mlp.act, mlp.c_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _Block(torch.nn.Module):
    def __init__(self, block: Any, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = block.ln_1, block.ln_2
        self.att = _Attention(block.attn, emb_dim)
        self.ff = _FeedForward(block.mlp)


class HFGPT(torch.nn.Module):
    """A transformers GPT2LMHeadModel under the torch twin's module and stage names."""

    def __init__(self, hf: Any) -> None:
        super().__init__()
        self.hf = hf
        body = hf.transformer
        self.trf_blocks = torch.nn.ModuleList(_Block(b, hf.config.n_embd) for b in body.h)
        self.final_norm, self.out_head = body.ln_f, hf.lm_head

    def forward(self, ids: torch.Tensor, return_activations: bool = False) -> Any:
        body: Any = self.hf.transformer
        acts: dict[str, Any] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(module: Any, args: Any, out: Any) -> None:
                acts[name] = out[0] if isinstance(out, tuple) else out

            return hook

        def keep_input(name: str) -> Callable[..., None]:
            def hook(module: Any, args: Any) -> None:
                acts[name] = args[0]

            return hook

        hooks = [body.drop.register_forward_hook(keep("drop_emb"))]
        for i, b in enumerate(body.h):
            p = f"trf_blocks.{i}"
            hooks += [
                b.ln_1.register_forward_hook(keep(f"{p}.norm1")),
                b.attn.register_forward_hook(keep(f"{p}.att")),
                b.ln_2.register_forward_pre_hook(keep_input(f"{p}.residual")),
                b.ln_2.register_forward_hook(keep(f"{p}.norm2")),
                b.mlp.register_forward_hook(keep(f"{p}.ff")),
                b.register_forward_hook(keep(p)),
            ]
        hooks += [body.ln_f.register_forward_hook(keep("final_norm"))]
        try:
            logits = self.hf(input_ids=ids.long(), use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
        return {**acts, "out_head": logits} if return_activations else logits


@dataclasses.dataclass
class HFCandidate:
    """A snapshot read both ways: transformers' model of it, and the weights the reference holds."""

    folder: str
    model: HFGPT
    config: GPTConfig
    weights: Mapping[str, np.ndarray]
    meaning: dict[str, Any]  # config.json's fields that depart from the book's GPT-2, as the file sets them


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "an HF candidate is run by transformers, which is not installed: pip install 'gpt-twins[dev]' "
            "(or transformers>=4.56)"
        ) from None
    return transformers


def load_candidate(folder: str | os.PathLike[str]) -> HFCandidate:
    """The snapshot at `folder` as transformers computes it (float32, eager attention, eval mode)
    and its weights as the book's GPT-2 reads them; ValueError naming what is missing or refused."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"HF snapshot {str(path)!r} is not a folder (config.json and model.safetensors)")
    check_input_file(path / "config.json", "HF config")
    raw = read_json(path / "config.json", "HF config")
    if not isinstance(raw, Mapping):
        raise ValueError(f"HF config {str(path / 'config.json')!r} must hold a JSON object")
    meaning = {
        k: raw[k]
        for k, book in BOOK_MEANING.items()
        if k in raw and raw[k] != book and not (k == "activation_function" and raw[k] in HF_GELUS)
    }
    checkpoint = load_checkpoint(path, hf_config={**raw, **BOOK_MEANING})
    transformers = _transformers()
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()  # its notes on tied weights and its loading bar are not the user's concern here
    log.disable_progress_bar()
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    hf.eval()
    weights = {k: np.asarray(checkpoint.state_dict[k], np.float32) for k in checkpoint.state_dict}
    return HFCandidate(str(path), HFGPT(hf), checkpoint.config, weights, meaning)


def check(
    candidate: HFCandidate,
    opts: ParityOptions = ParityOptions(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    plant: Callable[[dict[str, Any]], AbstractContextManager] | None = None,
    reference: torch.nn.Module | None = None,
) -> ParityReport:
    """`check` for an HF candidate: every stage and every layer probe of transformers' model against
    the torch twin holding the same weights (`plant(models)`: a bug put in the twin first, as
    diagnose does; `reference`: that twin ready built, of the candidate's config). float32, eval."""
    if opts.dtype != "float32" or opts.mode != "eval" or opts.model != ModelKind.GPT:
        raise ValueError("an HF candidate is checked in float32, eval mode, as the full GPT")
    cfg = candidate.config
    seq = min(cfg.context_length, 128) if opts.seq is None else opts.seq
    ids = token_batch(cfg, opts.batch, seq, opts.seed)
    cpu = Backend("torch", "cpu")
    twin = reference if reference is not None else build_torch(ModelKind.GPT, cfg, seed=opts.seed)
    with float32_matmuls() as precision, contextlib.ExitStack() as stack:
        if plant is not None:
            stack.enter_context(plant({"torch": twin}))
        gpt_torch.load_state_dict(twin, candidate.weights)  # inside: a converter bug acts on the load
        set_mode(twin, "eval")
        ref = Reference.run(cfg, ModelKind.GPT, cpu, twin, ids, seed=opts.seed, layers=opts.layer_evidence)
        row = ref.against(DIRECTION, cpu, candidate.model, ids, DTYPE_BOUNDS["float32"], "float32")
    return ParityReport(cfg, ModelKind.GPT, "eval", opts.batch, seq, opts.seed, precision, [row], [])
