"""Greedy generation, the book's generate_text_simple, as one jitted loop over a fixed-size buffer."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpt_spec import check_cached_generation, check_generation

from .model import KVCache, check_ids


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "window"))
def _generate(graphdef, rng_state, params, prompt, *, max_new_tokens: int, window: int):
    batch, n_prompt = prompt.shape
    buf = jnp.zeros((batch, n_prompt + max_new_tokens), prompt.dtype)
    buf = buf.at[:, :n_prompt].set(prompt)

    def step(i, carry):
        buf, rng_state = carry
        n = n_prompt + i  # tokens so far
        # The book feeds idx[:, -context_size:]. A fixed-size window does the same: while fewer
        # than `window` tokens exist it starts at 0 and the causal mask hides the unfilled tail;
        # after that it slides, so its positions are 0..window-1 as the cropped input's are.
        start = jnp.maximum(0, n - window)
        idx_cond = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=1)
        model = nnx.merge(graphdef, rng_state, params)
        logits = model(idx_cond)  # (batch, window, vocab_size)
        logits = jax.lax.dynamic_index_in_dim(logits, n - 1 - start, axis=1, keepdims=False)
        probas = jax.nn.softmax(logits, axis=-1)
        idx_next = jnp.argmax(probas, axis=-1).astype(buf.dtype)  # (batch,)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, idx_next[:, None], n, axis=1)
        return buf, nnx.state(model, nnx.RngState)

    buf, rng_state = jax.lax.fori_loop(0, max_new_tokens, step, (buf, rng_state))
    return buf, rng_state


def generate_text_simple(model: nnx.Module, idx: Any, max_new_tokens: int, context_size: int) -> jax.Array:
    """Append `max_new_tokens` greedy tokens to `idx` (batch, n_tokens), feeding the model at most
    the last `context_size` tokens at each step. Returns (batch, n_tokens + max_new_tokens).

    The loop is one compiled program per (batch, n_tokens, max_new_tokens, window) shape: the
    tokens live in a preallocated buffer, so nothing recompiles as the sequence grows.
    """
    idx = check_ids(idx, model.cfg, check_length=False)
    max_new_tokens, context_size = check_generation(idx.shape[1], max_new_tokens, context_size, model.cfg)
    if max_new_tokens == 0:
        return idx
    window = min(context_size, idx.shape[1] + max_new_tokens - 1)
    graphdef, rng_state, params = nnx.split(model, nnx.RngState, ...)
    out, rng_state = _generate(graphdef, rng_state, params, idx, max_new_tokens=max_new_tokens, window=window)
    nnx.update(model, rng_state)  # dropout keys advance, as in the eager model
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_cached(graphdef, params, cache, rest, prompt, *, max_new_tokens: int):
    """Prefill the cache with the prompt, then one token per step; params stay constants of the
    program, only the cache (and dropout keys) are carried from step to step."""

    def run(cache, rest, ids):
        model = nnx.merge(graphdef, params, cache, rest)
        logits = model(ids, use_cache=True)[:, -1, :]  # (batch, vocab_size)
        _, _, cache, rest = nnx.split(model, nnx.Param, KVCache, ...)
        return logits, cache, rest

    def pick(logits):
        probas = jax.nn.softmax(logits, axis=-1)
        return jnp.argmax(probas, axis=-1).astype(prompt.dtype)  # (batch,)

    logits, cache, rest = run(cache, rest, prompt)
    tokens = jnp.zeros((prompt.shape[0], max_new_tokens), prompt.dtype)

    def step(i, carry):
        logits, tokens, cache, rest = carry
        idx_next = pick(logits)
        tokens = tokens.at[:, i].set(idx_next)
        logits, cache, rest = run(cache, rest, idx_next[:, None])
        return logits, tokens, cache, rest

    logits, tokens, cache, rest = jax.lax.fori_loop(0, max_new_tokens - 1, step, (logits, tokens, cache, rest))
    tokens = tokens.at[:, max_new_tokens - 1].set(pick(logits))  # the last token needs no logits
    return tokens, cache, rest


def generate_text_simple_cached(model: nnx.Module, idx: Any, max_new_tokens: int,
                                context_size: int | None = None, use_cache: bool = True) -> jax.Array:
    """generate_text_simple with the KV cache (the book's chapter-4 variant): the prompt is fed once,
    then one new token per step. Same tokens as generate_text_simple (the window must not slide).

    One compiled program per (batch, prompt, max_new_tokens): the cache is preallocated for exactly
    the positions this call needs, and every step has the same shapes.
    """
    idx = check_ids(idx, model.cfg, check_length=False)
    if not use_cache:
        size = model.cfg.context_length if context_size is None else context_size
        return generate_text_simple(model, idx, max_new_tokens, size)
    max_new_tokens, context_size = check_cached_generation(idx.shape[1], max_new_tokens, context_size, model.cfg)
    if max_new_tokens == 0:
        return idx
    prompt = idx[:, -context_size:]
    model.reset_kv_cache(batch_size=prompt.shape[0], max_len=prompt.shape[1] + max_new_tokens - 1)
    graphdef, params, cache, rest = nnx.split(model, nnx.Param, KVCache, ...)
    tokens, cache, rest = _generate_cached(graphdef, params, cache, rest, prompt, max_new_tokens=max_new_tokens)
    nnx.update(model, cache, rest)
    return jnp.concatenate([idx, tokens], axis=1)
