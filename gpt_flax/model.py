"""The Flax NNX twin of gpt_torch.model: same classes, same names, same order."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_spec import GPTConfig, check_token_ids

FINAL_NORMS = ("dummy", "layernorm")


def check_ids(in_idx: Any, cfg: GPTConfig) -> jax.Array:
    """Refuse ids the embedding lookup would clamp, as torch's twin refuses them; return a jax array.

    Inside a trace the values are unknown, so only shape and dtype are checked; the jitted entry
    points check values on the host before dispatch.
    """
    if isinstance(in_idx, jax.core.Tracer):
        check_token_ids(in_idx.shape, in_idx.dtype.kind, str(in_idx.dtype), None, None, cfg)
        return in_idx
    host = np.asarray(in_idx)
    kind = host.dtype.kind
    lo = hi = None
    if kind in ("i", "u") and host.size > 0:
        lo, hi = int(host.min()), int(host.max())
    check_token_ids(host.shape, kind, str(host.dtype), lo, hi, cfg)
    return jnp.asarray(in_idx)


def _uniform(bound: float) -> nnx.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def torch_linear(in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear initialised as nn.Linear is: weight and bias U(+-1/sqrt(in_features))."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=_uniform(bound),
        bias_init=_uniform(bound),
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
        mean = x.mean(axis=-1, keepdims=True)
        var = x.var(axis=-1, keepdims=True)  # biased (ddof=0), as torch's unbiased=False
        norm_x = (x - mean) / jnp.sqrt(var + self.eps)
        return self.scale[...] * norm_x + self.shift[...]


class DummyTransformerBlock(nnx.Module):
    """Placeholder for the transformer block of §4.2-4.5: the identity."""

    def __init__(self, cfg: GPTConfig):
        pass

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class DummyLayerNorm(nnx.Module):
    """Placeholder for the final LayerNorm: the identity."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        pass

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _final_norm(kind: str, emb_dim: int) -> nnx.Module:
    if kind not in FINAL_NORMS:
        raise ValueError(f"final_norm must be one of {', '.join(FINAL_NORMS)}, got {kind!r}")
    return LayerNorm(emb_dim) if kind == "layernorm" else DummyLayerNorm(emb_dim)


class DummyGPTModel(nnx.Module):
    """The §4.1 skeleton: embeddings, identity blocks, a final norm and the vocabulary head.

    `final_norm="layernorm"` puts a real LayerNorm where the book has its placeholder.
    """

    def __init__(
        self, cfg: GPTConfig | Mapping[str, Any], final_norm: str = "dummy", *, rngs: nnx.Rngs
    ):
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = torch_embedding(cfg.vocab_size, cfg.emb_dim, rngs=rngs)
        self.pos_emb = torch_embedding(cfg.context_length, cfg.emb_dim, rngs=rngs)
        self.drop_emb = nnx.Dropout(cfg.drop_rate, rngs=rngs)
        self.trf_blocks = nnx.Sequential(*[DummyTransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = _final_norm(final_norm, cfg.emb_dim)
        self.out_head = torch_linear(cfg.emb_dim, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, in_idx: Any) -> jax.Array:
        """(batch, seq_len) integer ids -> (batch, seq_len, vocab_size) logits."""
        in_idx = check_ids(in_idx, self.cfg)
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)  # (batch_size, seq_len, emb_dim)
        pos_embeds = self.pos_emb(jnp.arange(seq_len))  # (seq_len, emb_dim)
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)  # (batch_size, seq_len, vocab_size)


def jit_forward(model: nnx.Module, *, device: jax.Device | None = None):
    """The model's forward as one compiled function of the ids, for inference and benchmarks.

    `nnx.split` runs once here, not per call, and `jax.jit` traces the pure function of the state,
    so a call costs one dispatch. Ids are checked on the host before dispatch (inside the trace
    their values are unknown). Dropout keys advance from call to call as in the eager model.
    Returns `forward(ids) -> logits`; with `device`, weights and ids live on that device.
    """
    cfg = model.cfg
    graphdef, rng_state, params = nnx.split(model, nnx.RngState, ...)
    if device is not None:
        rng_state, params = jax.device_put((rng_state, params), device)

    @jax.jit
    def pure_forward(rng_state, params, in_idx):
        m = nnx.merge(graphdef, rng_state, params)
        return m(in_idx), nnx.state(m, nnx.RngState)

    def forward(in_idx: Any) -> jax.Array:
        nonlocal rng_state
        ids = check_ids(in_idx, cfg)
        if device is not None:
            ids = jax.device_put(ids, device)
        logits, rng_state = pure_forward(rng_state, params, ids)
        return logits

    return forward
