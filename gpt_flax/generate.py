"""Greedy generation, the book's generate_text_simple, as one jitted loop over a fixed-size buffer."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpt_spec import check_generation

from .model import check_ids


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
