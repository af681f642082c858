"""The PyTorch twin: the GPT of *Build a Large Language Model (From Scratch)*, chapter 4."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from gpt_spec import GPTConfig, check_token_ids

FINAL_NORMS = ("dummy", "layernorm")


def check_ids(in_idx: torch.Tensor, cfg: GPTConfig) -> None:
    """Refuse ids nn.Embedding would index out of range (or silently accept), as the Flax twin does."""
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; callers validate before compiling
    if not isinstance(in_idx, torch.Tensor):
        raise ValueError(f"token ids must be a torch.Tensor, got {type(in_idx).__name__}")
    dtype = in_idx.dtype
    if dtype == torch.bool:
        kind = "b"
    elif dtype.is_floating_point or dtype.is_complex:
        kind = "f"
    else:
        kind = "u" if dtype == torch.uint8 else "i"
    lo = hi = None
    if kind in ("i", "u") and in_idx.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(in_idx))
    check_token_ids(tuple(in_idx.shape), kind, str(dtype).removeprefix("torch."), lo, hi, cfg)


class LayerNorm(nn.Module):
    """The book's LayerNorm: biased variance, eps 1e-5, parameters `scale` and `shift`."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class DummyTransformerBlock(nn.Module):
    """Placeholder for the transformer block of §4.2-4.5: the identity."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DummyLayerNorm(nn.Module):
    """Placeholder for the final LayerNorm: the identity."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _final_norm(kind: str, emb_dim: int) -> nn.Module:
    if kind not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {', '.join(FINAL_NORMS)}, got {kind!r}")
    return LayerNorm(emb_dim) if kind == "layernorm" else DummyLayerNorm(emb_dim)


class DummyGPTModel(nn.Module):
    """The §4.1 skeleton: embeddings, identity blocks, a final norm and the vocabulary head.

    `final_norm="layernorm"` puts a real LayerNorm where the book has its placeholder (the
    variant of the other seed); it owns no random init, so it leaves the book's RNG order alone.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any], final_norm: str = "dummy"):
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        # Creation order is the book's: it fixes which numbers torch.manual_seed(123) gives each.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[DummyTransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = _final_norm(final_norm, cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len) integer ids -> (batch, seq_len, vocab_size) logits."""
        check_ids(in_idx, self.cfg)
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)  # (batch_size, seq_len, emb_dim)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))  # (seq_len, emb_dim)
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)  # (batch_size, seq_len, vocab_size)
