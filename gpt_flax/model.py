"""The Flax NNX twin of gpt_torch.model: same classes, same names, same order.

Long on purpose: the book writes chapter 4 as one listing, and the torch twin is one file too;
keeping each twin's model in one file, in the book's order, lets the two be read side by side."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

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

from .dropout import ParityDropout


def check_ids(in_idx: Any, cfg: GPTConfig | ModelLimits, *, check_length: bool = True) -> jax.Array:
    """Refuse ids the embedding lookup would clamp, as torch's twin refuses them; return a jax array.

    Ids of any integer dtype are accepted and returned as int32 (as torch's twin returns int64),
    which holds every id in range. Inside a trace the values are unknown, so only shape and dtype
    are checked (and the ids returned as they are); the jitted entry points check values on the
    host before dispatch.
    """
    if isinstance(in_idx, jax.core.Tracer):
        check_token_ids(in_idx.shape, in_idx.dtype.kind, str(in_idx.dtype), None, None, cfg, check_length=check_length)
        return in_idx
    if isinstance(in_idx, jax.Array) and not in_idx.is_fully_addressable:
        # Split over processes (jax.distributed): each checks the part it holds, so all are checked.
        parts = [np.asarray(shard.data) for shard in in_idx.addressable_shards]
        shape, dtype = tuple(in_idx.shape), np.dtype(in_idx.dtype)
    else:
        parts = [np.asarray(in_idx)]
        shape, dtype = parts[0].shape, parts[0].dtype
    kind = dtype.kind
    lo = hi = None
    if kind in ("i", "u") and any(part.size for part in parts):
        lo = min(int(part.min()) for part in parts if part.size)
        hi = max(int(part.max()) for part in parts if part.size)
    check_token_ids(shape, kind, str(dtype), lo, hi, cfg, check_length=check_length)
    ids = jnp.asarray(in_idx)
    # Every id is in [0, vocab_size) and vocab_size <= 2**31 - 1: int32 holds it exactly, and one
    # dtype means one compiled program per shape whatever integer dtype the ids came in.
    return ids if ids.dtype == jnp.int32 else ids.astype(jnp.int32)


def dropout_rate_on(model: nnx.Module) -> float:
    """The largest rate of the dropouts of `model` that drop now (train mode), 0.0 if none does."""
    rates = [
        m.rate for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout | ParityDropout) and not m.deterministic
    ]
    return max(rates, default=0.0)


# Causal attention over at least MIN_BLOCKED_TOKENS tokens, in inference, runs as ATTENTION_BLOCKS
# pieces of queries, each skipping the keys the mask hides from all of it (see _attend_in_blocks).
ATTENTION_BLOCKS = 4
MIN_BLOCKED_TOKENS = 512


def _uniform(bound: float) -> nnx.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def dot_general_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """jax.lax.dot_general accumulating in float32 and rounded once to the inputs' dtype (or the
    preferred one): what torch's bfloat16 matmuls compute, and in float32 the plain product.

    Asking XLA for the float32 result is what makes its CPU backend use a bfloat16 GEMM kernel
    (docs/design-notes.md has the figures).
    """
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    out = jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32, **kwargs
    )
    return out.astype(out_dtype)


def round_bits_to_bfloat16(x: jax.Array) -> jax.Array:
    """round_to_bfloat16's values, without its derivative (integer ops have none): not for a
    value a gradient must flow through."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(rounded, jnp.float32))


@jax.custom_vjp
def round_to_bfloat16(x: jax.Array) -> jax.Array:
    """float32 `x` rounded to the nearest bfloat16 (ties to even), kept in float32: the values of
    x.astype(bfloat16).astype(float32), NaN and infinities included; and its derivative, the
    cotangent rounded to bfloat16, as the backward of torch's bfloat16 `.float()` gives it.

    Written on the bits, one fused integer pass: XLA's CPU converts between float32 and bfloat16
    are slow and a pair of them may be simplified away as excess precision. Integer ops have no
    derivative, so the derivative is stated here (without it every gradient behind the head is 0)."""
    return round_bits_to_bfloat16(x)


def _round_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return round_bits_to_bfloat16(x), None


def _round_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (round_bits_to_bfloat16(g),)


round_to_bfloat16.defvjp(_round_fwd, _round_bwd)


def dot_general_logits(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """The vocabulary head's product: float32 logits, rounded to bfloat16 when the inputs are
    (what torch's bfloat16 head gives, cast to float32), without a bfloat16 array in between."""
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    out = dot_general_f32(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32, **kwargs)
    return round_to_bfloat16(out) if dtype == jnp.bfloat16 else out.astype(dtype)


def matmul_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b over the last two axes (leading axes batched), through dot_general_f32."""
    batch = tuple(range(a.ndim - 2))
    return dot_general_f32(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)))


def torch_linear(
    in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs, dot_general=None
) -> nnx.Linear:
    """nnx.Linear initialised as nn.Linear is: weight and bias U(+-1/sqrt(in_features)); its
    product accumulated in float32 (`dot_general`, default dot_general_f32)."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=_uniform(bound),
        bias_init=_uniform(bound),
        dot_general=dot_general or dot_general_f32,
        rngs=rngs,
    )


def torch_embedding(num_embeddings: int, features: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    """nnx.Embed initialised as nn.Embedding is: N(0, 1)."""
    return nnx.Embed(num_embeddings, features, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)


class LayerNorm(nnx.Module):
    """The book's LayerNorm: biased variance, eps 1e-5, parameters `scale` and `shift`.

    Not nnx.LayerNorm: its default eps is 1e-6 and its variance is E[x^2] - E[x]^2.
    """

    def __init__(self, emb_dim: int):
        self.eps = 1e-5
        self.scale = nnx.Param(jnp.ones(emb_dim))
        self.shift = nnx.Param(jnp.zeros(emb_dim))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # statistics in float32 whatever the parameter dtype
        mean = x32.mean(axis=-1, keepdims=True)
        var = x32.var(axis=-1, keepdims=True)  # biased (ddof=0), as torch's unbiased=False
        norm_x = (x32 - mean) / jnp.sqrt(var + self.eps)
        scale, shift = self.scale[...].astype(jnp.float32), self.shift[...].astype(jnp.float32)
        return (scale * norm_x + shift).astype(x.dtype)


class GELU(nnx.Module):
    """The book's GELU: the tanh approximation, written out (jax.nn.gelu's default is the same form),
    evaluated in float32 whatever the input dtype and rounded once, as torch's twin.

    In bfloat16, op by op, XLA's CPU backend converts around every one of the formula's operations,
    which is several times slower (docs/design-notes.md)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = 0.5 * x32 * (1 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * jnp.power(x32, 3))))
        return y.astype(x.dtype)


class FeedForward(nnx.Module):
    """emb_dim -> 4 * emb_dim -> GELU -> emb_dim."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.Sequential(
            torch_linear(cfg.emb_dim, 4 * cfg.emb_dim, use_bias=True, rngs=rngs),
            GELU(),
            torch_linear(4 * cfg.emb_dim, cfg.emb_dim, use_bias=True, rngs=rngs),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers(x)


class MultiHeadAttention(nnx.Module):
    """Causal multi-head self-attention with separate query, key and value projections."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        window_size: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = torch_linear(d_in, d_out, use_bias=qkv_bias, rngs=rngs)
        self.W_key = torch_linear(d_in, d_out, use_bias=qkv_bias, rngs=rngs)
        self.W_value = torch_linear(d_in, d_out, use_bias=qkv_bias, rngs=rngs)
        self.out_proj = torch_linear(d_out, d_out, use_bias=True, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # torch keeps a (context_length, context_length) mask buffer; here the mask is built from
        # the shapes at trace time, a constant.
        self.context_length = context_length
        # The KV cache: preallocated by init_cache (its shapes fixed, so a jitted decoder compiles
        # once), with a pointer to the next free slot, as the book's ptr_current_pos. With
        # `window_size` (the book's optimized variant) it holds the last window_size positions and
        # slides; without, every position. nnx.Cache is NNX's own type for decoding state: never
        # an nnx.Param, so never in a state dict.
        # Its layout is (batch * num_heads, slots, head_dim), the heads folded into the batch axis
        # (torch's twin keeps the book's (batch, num_heads, slots, head_dim)): XLA gives a dot one
        # batch axis, so a 4-axis cache reaches the attention's dots through a reshape; in the
        # decoding loop its CPU backend then fused that reshape with the cache's in-place update and
        # copied the whole cache about five times a step. Folded, the dots read the cache where it
        # lies (tests/parity_tests/test_kv_cache.py checks the compiled loop; docs/design-notes.md
        # has the figures).
        self.cache_k: nnx.Cache | None = nnx.data(None)  # data, not static: it becomes an nnx.Cache
        self.cache_v: nnx.Cache | None = nnx.data(None)
        self.ptr_current_pos = nnx.Cache(jnp.zeros((), jnp.int32))
        self.window_size = window_size
        self.cache_max_len = context_length  # positions a cache allocated at a cached call may reach

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> None:
        shape = (batch_size * self.num_heads, self.cache_slots(max_len), self.head_dim)
        self.cache_k = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_v = nnx.Cache(jnp.zeros(shape, dtype))
        self.ptr_current_pos = nnx.Cache(jnp.zeros((), jnp.int32))
        self.cache_max_len = max_len

    def reset_cache(self, max_len: int | None = None) -> None:
        self.cache_k, self.cache_v = nnx.data(None), nnx.data(None)
        self.ptr_current_pos = nnx.Cache(jnp.zeros((), jnp.int32))
        self.cache_max_len = self.context_length if max_len is None else max_len

    def cache_slots(self, max_len: int) -> int:
        """Slots of a cache for sequences of up to `max_len` positions: the window, if it is shorter."""
        return max_len if self.window_size is None else min(self.window_size, max_len)

    def check_cache_call(self, b: int, num_tokens: int) -> None:
        """Refuse a cached call of batch `b` and `num_tokens` new tokens this cache cannot take."""
        if self.cache_k is None:
            check_cache_call(None, b, num_tokens, self.cache_slots(self.cache_max_len))
        else:
            check_cache_call(self.cache_k.shape[0] // self.num_heads, b, num_tokens, self.cache_k.shape[1])

    def __call__(self, x: jax.Array, use_cache: bool = False) -> jax.Array:
        b, num_tokens, d_in = x.shape
        keys_new = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values_new = self.W_value(x)
        keys_new = keys_new.reshape(b, num_tokens, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        queries = queries.reshape(b, num_tokens, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        values_new = values_new.reshape(b, num_tokens, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        # (b, num_heads, num_tokens, head_dim)
        if use_cache:
            self.check_cache_call(b, num_tokens)
            if self.cache_k is None:
                self.init_cache(b, self.cache_max_len, keys_new.dtype)
            assert self.cache_k is not None and self.cache_v is not None  # init_cache allocates both
            slots = self.cache_k.shape[1]
            # (b * num_heads, num_tokens, head_dim): the cache's layout (see __init__)
            queries, keys_new, values_new = (
                t.reshape(b * self.num_heads, num_tokens, self.head_dim) for t in (queries, keys_new, values_new)
            )
            start = self.ptr_current_pos[...]
            cache_k, cache_v = self.cache_k[...], self.cache_v[...]  # (b * num_heads, slots, head_dim)
            if slots < self.cache_max_len:
                # The window can slide (known from the shapes, so a cache that cannot keeps the
                # plain path): the oldest `overflow` positions leave, slot j takes slot
                # j + overflow. The shift is traced, so every step runs one program; the slots
                # rolled round to the end lie past the new keys, where the mask hides them.
                overflow = jnp.maximum(start + num_tokens - slots, 0)
                cache_k = jnp.roll(cache_k, -overflow, axis=1)
                cache_v = jnp.roll(cache_v, -overflow, axis=1)
                start = start - overflow
            self.cache_k[...] = jax.lax.dynamic_update_slice(cache_k, keys_new, (0, start, 0))
            self.cache_v[...] = jax.lax.dynamic_update_slice(cache_v, values_new, (0, start, 0))
            self.ptr_current_pos[...] = start + num_tokens
            keys, values = self.cache_k[...], self.cache_v[...]  # (b * num_heads, slots, head_dim)
            # Query i sits in slot start + i: it sees keys up to there; the unfilled tail of
            # the cache lies beyond every query, so the same mask hides it.
            q_pos = start + jnp.arange(num_tokens)[:, None]
            mask_bool = jnp.arange(slots)[None, :] > q_pos
        else:
            keys, values = keys_new, values_new
            mask_bool = jnp.triu(jnp.ones((num_tokens, num_tokens), dtype=bool), k=1)
        # The book divides the scores by sqrt(head_dim); here the queries are scaled before the
        # product (exact where head_dim is a power of 4, as GPT-2's 64). Scaling after it, XLA's
        # CPU fusions recompute `scores * c` in each consumer and contract one copy into an FMA,
        # so `scores - max(scores)` came out far from 0 at scores ~1e16: every exp underflowed,
        # the row summed to 0, and the jitted forward returned NaN where torch and eager JAX did not.
        queries = queries * (1.0 / keys.shape[-1] ** 0.5)
        if not use_cache and num_tokens >= MIN_BLOCKED_TOKENS and self.dropout.deterministic is True:
            context = self._attend_in_blocks(queries, keys, values)
        else:
            context = self._attend(queries, keys, values, mask_bool)
        context = context.reshape(b, self.num_heads, num_tokens, self.head_dim)  # unfolds a cached call's heads
        context_vec = context.transpose(0, 2, 1, 3)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.reshape(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)

    def _attend(self, queries: jax.Array, keys: jax.Array, values: jax.Array, mask_bool: jax.Array) -> jax.Array:
        """softmax(queries @ keys^T, masked) @ values, with dropout on the weights: (..., num_queries,
        head_dim), the leading axes (b, num_heads), or b * num_heads for the cache's layout, batched.
        The queries come scaled."""
        if queries.shape[-2] == 1:
            # One query (a decoding step): keys @ query^T has the keys as the dot's left operand,
            # in the layout XLA's CPU dot wants; queries @ keys^T would transpose every key first.
            attn_scores = jnp.swapaxes(matmul_f32(keys, jnp.swapaxes(queries, -1, -2)), -1, -2)  # (..., 1, num_keys)
        else:
            attn_scores = matmul_f32(queries, jnp.swapaxes(keys, -1, -2))  # (..., num_queries, num_keys)
        attn_scores = jnp.where(mask_bool, -jnp.inf, attn_scores)
        attn_weights = jax.nn.softmax(attn_scores.astype(jnp.float32), axis=-1).astype(values.dtype)
        attn_weights = self.dropout(attn_weights)
        return matmul_f32(attn_weights, values)

    def _attend_in_blocks(self, queries: jax.Array, keys: jax.Array, values: jax.Array) -> jax.Array:
        """Causal attention without its fully masked blocks: the queries in ATTENTION_BLOCKS pieces,
        each against the keys up to its own last position (keys past it would get weight exactly 0).

        Only where dropout is off (a dropout mask's draws depend on the weights' shape). Below
        MIN_BLOCKED_TOKENS the whole forward gains nothing (docs/design-notes.md has the figures).
        The FLOP count of gpt_spec.flops still counts the whole product."""
        num_tokens = queries.shape[2]
        size = -(-num_tokens // ATTENTION_BLOCKS)
        pieces = []
        for lo in range(0, num_tokens, size):
            hi = min(lo + size, num_tokens)
            mask_bool = jnp.arange(hi)[None, :] > (lo + jnp.arange(hi - lo))[:, None]
            pieces.append(self._attend(queries[:, :, lo:hi], keys[:, :, :hi], values[:, :, :hi], mask_bool))
        return jnp.concatenate(pieces, axis=2)


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm block: attention and feed-forward, each with shortcut dropout and a residual add."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            num_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
            window_size=cfg.kv_window_size,
            rngs=rngs,
        )
        self.ff = FeedForward(cfg, rngs=rngs)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nnx.Dropout(cfg.drop_rate, rngs=rngs)

    def __call__(
        self, x: jax.Array, use_cache: bool = False, activations: dict[str, jax.Array] | None = None
    ) -> jax.Array:
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


class DummyTransformerBlock(nnx.Module):
    """Placeholder for the transformer block of §4.2-4.5: the identity."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs | None = None):
        pass

    def __call__(
        self, x: jax.Array, use_cache: bool = False, activations: dict[str, jax.Array] | None = None
    ) -> jax.Array:
        return x


class DummyLayerNorm(nnx.Module):
    """Placeholder for the final LayerNorm: the identity."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        pass

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _final_norm(kind: str) -> type[LayerNorm | DummyLayerNorm]:
    if kind not in tuple(FinalNorm):
        raise ValueError(f"final_norm must be one of {', '.join(FinalNorm)}, got {kind!r}")
    return LayerNorm if kind == FinalNorm.LAYER_NORM else DummyLayerNorm


class _GPT(nnx.Module):
    """What DummyGPTModel and GPTModel share: the book's modules, in the book's order, and __call__."""

    def _build(
        self,
        cfg: GPTConfig,
        block: type[TransformerBlock | DummyTransformerBlock],
        final_norm: type[LayerNorm | DummyLayerNorm],
        rngs: nnx.Rngs,
    ) -> None:
        self.cfg = cfg
        self.tok_emb = torch_embedding(cfg.vocab_size, cfg.emb_dim, rngs=rngs)
        self.pos_emb = torch_embedding(cfg.context_length, cfg.emb_dim, rngs=rngs)
        self.drop_emb = nnx.Dropout(cfg.drop_rate, rngs=rngs)
        self.trf_blocks = nnx.List([block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = final_norm(cfg.emb_dim)
        self.out_head = torch_linear(
            cfg.emb_dim, cfg.vocab_size, use_bias=False, rngs=rngs, dot_general=dot_general_logits
        )
        # Positions fed through the KV cache (a sliding one keeps fewer).
        self.current_pos = nnx.Cache(jnp.zeros((), jnp.int32))
        self.cache_max_len = cfg.context_length  # positions it may reach (see reset_kv_cache)

    def __call__(
        self, in_idx: Any, return_activations: bool = False, use_cache: bool = False, *, last_only: bool = False
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
        start: int | jax.Array = 0
        if use_cache:
            start = self.current_pos[...]
            self._check_cached_call(start, batch_size, seq_len)  # a refused call changes nothing
            self.current_pos[...] = start + seq_len
        tok_embeds = self.tok_emb(in_idx)  # (batch_size, seq_len, emb_dim)
        pos_embeds = self.pos_emb(start + jnp.arange(seq_len))  # (seq_len, emb_dim)
        x = self.drop_emb(tok_embeds + pos_embeds)
        activations = {"drop_emb": x}  # kept only when asked for: they hold every stage's memory
        for i, block in enumerate(self.trf_blocks):
            inner: dict[str, jax.Array] | None = {} if return_activations else None
            x = block(x, use_cache=use_cache, activations=inner)
            if inner is not None:
                activations.update({f"trf_blocks.{i}.{name}": value for name, value in inner.items()})
                activations[f"trf_blocks.{i}"] = x
        if last_only:
            x = x[:, -1:, :]  # (batch_size, 1, emb_dim)
        x = self.final_norm(x)
        logits = self.out_head(x).astype(jnp.float32)  # (batch_size, seq_len, vocab_size), float32 in any dtype
        if return_activations:
            return {**activations, "final_norm": x, "out_head": logits}
        return logits

    def _attention(self) -> list[MultiHeadAttention]:
        return [block.att for block in self.trf_blocks if isinstance(block, TransformerBlock)]

    def _check_cached_call(self, start: Any, batch_size: int, seq_len: int) -> None:
        """Everything that could refuse a cached call, checked before any position or cache moves."""
        check_cache_dropout(dropout_rate_on(self))
        if not isinstance(start, jax.core.Tracer):  # in a trace, the caller checked the room
            check_cache_room(int(start), seq_len, self.cfg, self.cache_max_len)
        attention = self._attention()
        for att in attention:
            att.check_cache_call(batch_size, seq_len)
        if attention and attention[0].cache_k is None:  # allocated by this call
            slots = attention[0].cache_slots(attention[0].cache_max_len)
            check_cache_fits(batch_size, slots, self.cfg, self._itemsize())

    def _itemsize(self) -> int:
        return jnp.dtype(self.tok_emb.embedding.dtype).itemsize

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
            check_cache_fits(batch_size, attention[0].cache_slots(max_len), self.cfg, self._itemsize())
        for att in attention:
            if batch_size is None:
                att.reset_cache(max_len)
            else:
                att.init_cache(batch_size, max_len, self.tok_emb.embedding.dtype)
        self.current_pos = nnx.Cache(jnp.zeros((), jnp.int32))
        self.cache_max_len = max_len


class DummyGPTModel(_GPT):
    """The §4.1 skeleton: embeddings, identity blocks, a final norm and the vocabulary head.

    `final_norm="layernorm"` puts a real LayerNorm where the book has its placeholder.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any], final_norm: str = FinalNorm.DUMMY, *, rngs: nnx.Rngs):
        self.final_norm_kind = final_norm
        cfg, norm = GPTConfig.coerce(cfg), _final_norm(final_norm)
        check_model_fits(ModelClass.DUMMY_GPT_MODEL, cfg, final_norm=final_norm)
        self._build(cfg, DummyTransformerBlock, norm, rngs)

    @property
    def options(self) -> dict[str, str]:
        """The constructor's options, as a checkpoint records them."""
        return {"final_norm": self.final_norm_kind}


class GPTModel(_GPT):
    """The GPT of §4.6: n_layers transformer blocks between the embeddings and the head."""

    def __init__(self, cfg: GPTConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
        cfg = GPTConfig.coerce(cfg)
        check_model_fits(ModelClass.GPT_MODEL, cfg)
        self._build(cfg, TransformerBlock, LayerNorm, rngs)


def _concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _mesh_home(leaves: list[jax.Array]) -> NamedSharding | None:
    """Replicated over the one mesh the committed arrays are placed on, if they are on one."""
    meshes = {x.sharding.mesh for x in leaves if x.committed and isinstance(x.sharding, NamedSharding)}
    return NamedSharding(meshes.pop(), PartitionSpec()) if len(meshes) == 1 else None


def commit(*objs: Any) -> None:
    """Commit every uncommitted array of these models and optimizers: where it already is (no
    copy), or replicated over the mesh the others are placed on (a sharded model's Adam count).

    A jitted function compiles once per placement of its arguments as well as per shape: arrays
    made eagerly (an init, a load from numpy) are uncommitted, a jitted call's outputs committed,
    so a first training step would compile for the one and the second again for the other. Each
    jitted entry point commits its state first, so its first call's program serves every later call."""
    states = [nnx.state(obj) for obj in objs]
    leaves = [x for state in states for x in jax.tree.leaves(state) if _concrete(x)]
    if all(x.committed for x in leaves):
        return
    home = _mesh_home(leaves)
    for obj, state in zip(objs, states, strict=True):
        nnx.update(obj, jax.tree.map(lambda x: _committed(x, home), state))


def placed(model: nnx.Module, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """`arrays` (a loop's carried buffers) committed as commit() commits the model's own."""
    home = _mesh_home([x for x in jax.tree.leaves(nnx.state(model)) if _concrete(x)])
    return tuple(_committed(x, home) for x in arrays)


def _committed(x: Any, home: NamedSharding | None) -> Any:
    return put(x, home or x.sharding) if _concrete(x) and not x.committed else x


def put(tree: Any, shardings: Any) -> Any:
    """jax.device_put(tree, shardings), also where a sharding spans other processes' devices (after
    jax.distributed.initialize), which device_put refuses: there each process builds its own
    devices' shards from the value it holds, which must be the same on every process (as when every
    process loads the same weights)."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = jax.tree.leaves(shardings)
    if all(s.is_fully_addressable for s in targets):
        return jax.device_put(tree, shardings)
    return jax.tree.unflatten(treedef, [_put_global(x, s) for x, s in zip(leaves, targets, strict=True)])


def _put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # an RNG key: placed as its raw data
        return jax.random.wrap_key_data(_put_global(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@functools.partial(jax.jit, static_argnames=("graphdef", "return_activations"))
def _forward(graphdef, rng_state, params, in_idx, *, return_activations: bool):
    m = nnx.merge(graphdef, rng_state, params)
    return m(in_idx, return_activations), nnx.state(m, nnx.RngState)


def jit_forward(model: _GPT, *, device: jax.Device | None = None, return_activations: bool = False):
    """The model's forward as one compiled function of the ids, for inference and benchmarks.

    `nnx.split` runs once here, not per call, and one module-level `jax.jit` of the pure function
    serves every model: it compiles once per graph definition (the model's structure, classes and
    modes), dtypes and shapes, so a second model of the same shape, or a second `jit_forward` of
    this one, reuses the program. The weights are those the model holds now. Ids are checked on
    the host before dispatch (inside the trace their values are unknown). Dropout keys advance
    from call to call as in the eager model. With `device`, weights and ids live on that device.
    Returns `forward(ids)`, giving what `model(ids, return_activations)` gives.
    """
    cfg = model.cfg
    commit(model)
    graphdef, *states = nnx.split(model, nnx.RngState, ...)
    rng_state, params = states
    if device is not None:
        rng_state, params = jax.device_put((rng_state, params), device)

    def forward(in_idx: Any):
        nonlocal rng_state
        ids = check_ids(in_idx, cfg)
        if device is not None:
            ids = jax.device_put(ids, device)
        out, rng_state = _forward(graphdef, rng_state, params, ids, return_activations=return_activations)
        return out

    return forward
