"""The PyTorch twin: the GPT of *Build a Large Language Model (From Scratch)*, chapter 4."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from gpt_spec import FinalNorm, GPTConfig, ModelClass
from gpt_spec.checks import (
    ModelLimits,
    check_cache_call,
    check_cache_dropout,
    check_cache_fits,
    check_cache_room,
    check_kv_cache,
    check_last_only,
    check_model_fits,
    check_token_ids,
)
from gpt_spec.skeleton import canonical_state_dict, is_skeleton_layout

from .dropout import ParityDropout

_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)
_INDEX_DTYPES = (torch.int32, torch.int64)  # what nn.Embedding takes


def _id_range(ids: torch.Tensor) -> tuple[int, int]:
    """The exact smallest and largest id of a non-empty integer tensor, of any integer dtype
    (torch.aminmax has no uint16/32/64 kernels, and uint64 ids past 2**63 must not read negative)."""
    if ids.dtype in (torch.uint16, torch.uint32):
        ids = ids.to(torch.int64)  # exact: both fit
    if ids.dtype == torch.uint64:
        signed = ids.view(torch.int64)  # the same bits: ids >= 2**63 read as negatives
        high = signed < 0
        low_ids, high_ids = signed[~high], signed[high]
        lo = int(low_ids.min()) if low_ids.numel() else int(high_ids.min()) + 2**64
        hi = int(high_ids.max()) + 2**64 if high_ids.numel() else int(low_ids.max())
        return lo, hi
    lo_hi = torch.aminmax(ids)
    return int(lo_hi.min), int(lo_hi.max)


def as_index(ids: torch.Tensor) -> torch.Tensor:
    """Integer ids as nn.Embedding takes them: int32 and int64 as they are, any other integer dtype
    as int64 (callers have checked the values are in range: nothing wraps)."""
    return ids if ids.dtype in _INDEX_DTYPES else ids.long()


def check_ids(in_idx: torch.Tensor, cfg: GPTConfig | ModelLimits, *, check_length: bool = True) -> torch.Tensor:
    """Refuse ids nn.Embedding would index out of range (or silently accept), as the Flax twin does.

    Ids of any integer dtype are accepted; returns them as nn.Embedding takes them (int32 and
    int64 as they are, other integer dtypes as int64: the values are in range, nothing wraps).
    """
    if isinstance(in_idx, torch.Tensor) and torch.compiler.is_compiling():
        # A data-dependent check would break the graph; callers validate before compiling.
        return as_index(in_idx)
    if not isinstance(in_idx, torch.Tensor):
        raise ValueError(f"token ids must be a torch.Tensor, got {type(in_idx).__name__}")
    if in_idx.is_nested or in_idx.layout != torch.strided or in_idx.is_meta:
        kind = "nested" if in_idx.is_nested else "meta" if in_idx.is_meta else str(in_idx.layout).removeprefix("torch.")
        raise ValueError(f"token ids must be a dense tensor holding its values, got a {kind} tensor")
    dtype = in_idx.dtype
    if dtype == torch.bool:
        kind = "b"
    elif dtype.is_floating_point or dtype.is_complex:
        kind = "f"
    else:
        kind = "u" if dtype in _UNSIGNED else "i"
    lo = hi = None
    if kind in ("i", "u") and in_idx.numel() > 0:
        lo, hi = _id_range(in_idx)
    check_token_ids(
        tuple(in_idx.shape), kind, str(dtype).removeprefix("torch."), lo, hi, cfg, check_length=check_length
    )
    return as_index(in_idx)


def dropout_rate_on(model: nn.Module) -> float:
    """The largest rate of the dropouts of `model` that drop now (train mode), 0.0 if none does."""
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout | ParityDropout) and m.training]
    return max(rates, default=0.0)


class LayerNorm(nn.Module):
    """The book's LayerNorm: biased variance, eps 1e-5, parameters `scale` and `shift`."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # statistics in float32 whatever the parameter dtype (a no-op in float32)
        mean = x32.mean(dim=-1, keepdim=True)
        var = x32.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x32 - mean) / torch.sqrt(var + self.eps)
        return (self.scale.float() * norm_x + self.shift.float()).to(x.dtype)


class GELU(nn.Module):
    """The book's GELU: the tanh approximation (torch.nn.GELU() defaults to the exact erf form),
    evaluated in float32 whatever the input dtype and rounded once, as the Flax twin."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # float32 input: x itself
        y = 0.5 * x32 * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * torch.pow(x32, 3))))
        return y.to(x.dtype)


class FeedForward(nn.Module):
    """emb_dim -> 4 * emb_dim -> GELU -> emb_dim."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def causal_mask(context_length: int) -> torch.Tensor:
    """1 above the diagonal: the future positions a query may not attend to."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with separate query, key and value projections."""

    # Buffers, registered in __init__ (nn.Module's __getattr__ would type them Tensor | Module).
    mask: torch.Tensor
    cache_k: torch.Tensor | None
    cache_v: torch.Tensor | None

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        window_size: int | None = None,
    ):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # Not persistent: the mask is derived from context_length, so it stays out of the
        # canonical state dict (the book's own model.pth carries it; loaders drop it).
        self.register_buffer("mask", causal_mask(context_length), persistent=False)
        # The KV cache of the book's chapter-4 variant, preallocated by init_cache as the Flax
        # twin's is: keys and values of the positions fed so far, with a pointer to the next free
        # slot, as the book's ptr_current_pos. With `window_size` (the book's optimized variant)
        # it holds the last window_size positions and slides; without, every position.
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0
        self.window_size = window_size
        self.cache_max_len = context_length  # positions a cache allocated at a cached call may reach

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, self.num_heads, self.cache_slots(max_len), self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)
        self.ptr_current_pos = 0
        self.cache_max_len = max_len

    def reset_cache(self, max_len: int | None = None) -> None:
        self.cache_k, self.cache_v = None, None
        self.ptr_current_pos = 0
        self.cache_max_len = self.mask.shape[0] if max_len is None else max_len

    def cache_slots(self, max_len: int) -> int:
        """Slots of a cache for sequences of up to `max_len` positions: the window, if it is shorter."""
        return max_len if self.window_size is None else min(self.window_size, max_len)

    def check_cache_call(self, b: int, num_tokens: int) -> None:
        """Refuse a cached call of batch `b` and `num_tokens` new tokens this cache cannot take."""
        if self.cache_k is None:
            check_cache_call(None, b, num_tokens, self.cache_slots(self.cache_max_len))
        else:
            check_cache_call(self.cache_k.shape[0], b, num_tokens, self.cache_k.shape[2])

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        b, num_tokens, d_in = x.shape
        keys_new = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values_new = self.W_value(x)
        keys_new = keys_new.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values_new = values_new.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        # (b, num_heads, num_tokens, head_dim)
        if use_cache:
            self.check_cache_call(b, num_tokens)
            if self.cache_k is None:
                self.init_cache(b, self.cache_max_len, keys_new.dtype, keys_new.device)
            assert self.cache_k is not None and self.cache_v is not None  # init_cache allocates both
            slots = self.cache_k.shape[2]
            overflow = self.ptr_current_pos + num_tokens - slots
            if slots < self.cache_max_len and overflow > 0:
                # The window slides: the oldest `overflow` positions leave, slot j takes slot
                # j + overflow, and the new keys and values go after what is kept.
                kept = self.ptr_current_pos - overflow
                self.cache_k[:, :, :kept] = self.cache_k[:, :, overflow : self.ptr_current_pos].clone()
                self.cache_v[:, :, :kept] = self.cache_v[:, :, overflow : self.ptr_current_pos].clone()
                self.ptr_current_pos = kept
            start = self.ptr_current_pos
            self.ptr_current_pos += num_tokens
            self.cache_k[:, :, start : self.ptr_current_pos] = keys_new
            self.cache_v[:, :, start : self.ptr_current_pos] = values_new
            keys = self.cache_k[:, :, : self.ptr_current_pos]  # (b, num_heads, cached + num_tokens, head_dim)
            values = self.cache_v[:, :, : self.ptr_current_pos]
        else:
            keys, values, start = keys_new, values_new, 0
        # The book divides the scores by sqrt(head_dim); here, as in the Flax twin, the queries are
        # scaled before the product (exact where head_dim is a power of 4, as GPT-2's 64): the
        # product of unscaled queries and keys overflows float32 first (both twins then NaN alike,
        # or neither).
        queries = queries * (1.0 / keys.shape[-1] ** 0.5)
        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, num_keys)
        # Query i sits in slot start + i and sees the keys of slots up to there (a slid cache
        # holds the last keys only: the oldest it keeps is at slot 0).
        mask_bool = self.mask.bool()[start : start + num_tokens, : keys.shape[2]]
        attn_scores = attn_scores.masked_fill(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores.float(), dim=-1).to(values.dtype)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attention and feed-forward, each with shortcut dropout and a residual add."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            num_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
            window_size=cfg.kv_window_size,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self, x: torch.Tensor, use_cache: bool = False, activations: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """With `activations`, each sub-layer's output is also put in it by name: norm1, att,
        residual (after the attention's shortcut add), norm2, ff (the block's output is returned)."""
        out = {} if activations is None else activations
        shortcut = x
        x = out["norm1"] = self.norm1(x)
        x = out["att"] = self.att(x, use_cache=use_cache)
        x = self.drop_shortcut(x)
        x = out["residual"] = x + shortcut

        shortcut = x
        x = out["norm2"] = self.norm2(x)
        x = out["ff"] = self.ff(x)
        x = self.drop_shortcut(x)
        return x + shortcut


class DummyTransformerBlock(nn.Module):
    """Placeholder for the transformer block of §4.2-4.5: the identity."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()

    def forward(
        self, x: torch.Tensor, use_cache: bool = False, activations: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return x


class DummyLayerNorm(nn.Module):
    """Placeholder for the final LayerNorm: the identity."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _final_norm(kind: str) -> type[nn.Module]:
    if kind not in tuple(FinalNorm):
        raise ValueError(f"final_norm must be one of {', '.join(FinalNorm)}, got {kind!r}")
    return LayerNorm if kind == FinalNorm.LAYER_NORM else DummyLayerNorm


def _skeleton_layout(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A load_state_dict pre-hook: the skeleton layout's keys (gpt_spec.skeleton) renamed, in the
    copy torch loads from, to this model's, through the same check and table as load_state_dict;
    a skeleton dict that does not fit is refused with its ValueError, whatever `strict` says."""
    own = {key[len(prefix) :]: key for key in state_dict if key.startswith(prefix)}
    if not is_skeleton_layout(own):
        return
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    mapped = canonical_state_dict(expected, {name: state_dict[key] for name, key in own.items()}, type(module).__name__)
    for key in own.values():
        del state_dict[key]
    state_dict.update({prefix + name: value for name, value in mapped.items()})


class _GPT(nn.Module):
    """What DummyGPTModel and GPTModel share: the book's modules, in the book's order, and forward."""

    def _build(self, cfg: GPTConfig, block: type[nn.Module], final_norm: type[nn.Module]) -> None:
        self.register_load_state_dict_pre_hook(_skeleton_layout)
        self.cfg = cfg
        # Creation order is the book's: it fixes which numbers torch.manual_seed(123) gives each.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[block(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = final_norm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # Positions fed through the KV cache (a sliding one keeps fewer).
        self.current_pos = 0
        self.cache_max_len = cfg.context_length  # positions it may reach (see reset_kv_cache)

    def forward(
        self,
        in_idx: torch.Tensor,
        return_activations: bool = False,
        use_cache: bool = False,
        *,
        last_only: bool = False,
    ):
        """(batch, seq_len) integer ids -> (batch, seq_len, vocab_size) logits.

        With `return_activations`, a dict of every stage's output instead, each named by the module
        that produced it: drop_emb; for each block i, trf_blocks.{i}.norm1, .att, .residual, .norm2,
        .ff and its output trf_blocks.{i}; final_norm; out_head (the logits).
        With `use_cache`, the ids continue the sequence the KV cache holds (see reset_kv_cache).
        With `last_only`, the final norm and the head run on the last position only: logits
        (batch, 1, vocab_size), what generation needs (the head is the largest matmul of a prefill).
        """
        check_last_only(last_only, return_activations)
        in_idx = check_ids(in_idx, self.cfg, check_length=not use_cache)
        batch_size, seq_len = in_idx.shape
        start = 0
        if use_cache:
            self._check_cached_call(batch_size, seq_len)  # a refused call changes nothing
            start, self.current_pos = self.current_pos, self.current_pos + seq_len
        tok_embeds = self.tok_emb(in_idx)  # (batch_size, seq_len, emb_dim)
        pos_ids = torch.arange(start, start + seq_len, device=in_idx.device)
        pos_embeds = self.pos_emb(pos_ids)  # (seq_len, emb_dim)
        x = self.drop_emb(tok_embeds + pos_embeds)
        activations = {"drop_emb": x}  # kept only when asked for: they hold every stage's memory
        for i, block in enumerate(self.trf_blocks):
            inner: dict[str, torch.Tensor] | None = {} if return_activations else None
            x = block(x, use_cache=use_cache, activations=inner)
            if inner is not None:
                activations.update({f"trf_blocks.{i}.{name}": value for name, value in inner.items()})
                activations[f"trf_blocks.{i}"] = x
        if last_only:
            x = x[:, -1:, :]  # (batch_size, 1, emb_dim)
        x = self.final_norm(x)
        logits = self.out_head(x).float()  # (batch_size, seq_len, vocab_size), float32 in any dtype
        if return_activations:
            return {**activations, "final_norm": x, "out_head": logits}
        return logits

    def _attention(self) -> list[MultiHeadAttention]:
        return [block.att for block in self.trf_blocks if isinstance(block, TransformerBlock)]

    def _check_cached_call(self, batch_size: int, seq_len: int) -> None:
        """Everything that could refuse a cached call, checked before any position or cache moves."""
        check_cache_dropout(dropout_rate_on(self))
        check_cache_room(self.current_pos, seq_len, self.cfg, self.cache_max_len)
        attention = self._attention()
        for att in attention:
            att.check_cache_call(batch_size, seq_len)
        if attention and attention[0].cache_k is None:  # allocated by this call
            slots = attention[0].cache_slots(attention[0].cache_max_len)
            check_cache_fits(batch_size, slots, self.cfg, self.tok_emb.weight.element_size())

    def reset_kv_cache(self, batch_size: int | None = None, max_len: int | None = None) -> None:
        """Empty every block's KV cache; the next cached call starts at position 0.

        A cached sequence may reach `max_len` positions (default context_length): a cached call
        that would pass them is refused. Each block's cache has min(cfg.kv_window_size, max_len)
        slots (max_len without a window): past them it slides, keeping the last kv_window_size
        positions (the book's optimized variant), and a call of more new tokens is refused. It is
        preallocated: with `batch_size`, now, for that batch; without, at the first cached call,
        for its batch.
        """
        batch_size, max_len = check_kv_cache(batch_size, max_len, self.cfg)
        attention = self._attention()
        if batch_size is not None and attention:
            check_cache_fits(
                batch_size, attention[0].cache_slots(max_len), self.cfg, self.tok_emb.weight.element_size()
            )
        for att in attention:
            if batch_size is None:
                att.reset_cache(max_len)
            else:
                att.init_cache(batch_size, max_len, self.tok_emb.weight.dtype, self.tok_emb.weight.device)
        self.current_pos = 0
        self.cache_max_len = max_len


class DummyGPTModel(_GPT):
    """The §4.1 skeleton: embeddings, identity blocks, a final norm and the vocabulary head.

    `final_norm="layernorm"` puts a real LayerNorm where the book has its placeholder (the
    variant of the other seed); it owns no random init, so it leaves the book's RNG order alone.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any], final_norm: str = FinalNorm.DUMMY):
        super().__init__()
        self.final_norm_kind = final_norm
        cfg, norm = GPTConfig.coerce(cfg), _final_norm(final_norm)
        check_model_fits(ModelClass.DUMMY_GPT_MODEL, cfg, final_norm=final_norm)
        self._build(cfg, DummyTransformerBlock, norm)

    @property
    def options(self) -> dict[str, str]:
        """The constructor's options, as a checkpoint records them."""
        return {"final_norm": self.final_norm_kind}


class GPTModel(_GPT):
    """The GPT of §4.6: n_layers transformer blocks between the embeddings and the head."""

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]):
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        check_model_fits(ModelClass.GPT_MODEL, cfg)
        self._build(cfg, TransformerBlock, LayerNorm)
