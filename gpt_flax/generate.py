"""Generation for any model with the book's interface: chapter 4's greedy generate_text_simple (as
jitted chunks of steps over a fixed-size buffer) and its KV-cache variant, chapter 5's generate with
temperature, top-k and eos, and the chapter's text_to_token_ids / token_ids_to_text."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_spec import GPTConfig
from gpt_spec.checks import (
    ModelLimits,
    check_cache_dropout,
    check_cached_generation,
    check_generation,
    check_id_dtype,
    check_logits,
    check_output_fits,
    check_sampling,
    default_context_size,
    unpickable_logits,
)
from gpt_spec.data import check_text
from gpt_spec.randomness import pick_token

from .model import _GPT, check_ids, commit, dropout_rate_on, placed

# Greedy steps per compiled call. The Python loop waits for each chunk before it dispatches the
# next, so Ctrl-C lands between chunks instead of after the whole generation; the chunk's bounds
# are arguments, not constants, so every chunk of a generation runs the same compiled program.
GENERATE_CHUNK = 32


def model_limits(model: nnx.Module) -> GPTConfig | ModelLimits:
    """The twins' GPTConfig, or for any other model with the book's interface the sizes its
    tok_emb and pos_emb tell, each None where it has none."""
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, GPTConfig):
        return cfg
    tok_emb, pos_emb = getattr(model, "tok_emb", None), getattr(model, "pos_emb", None)
    return ModelLimits(
        vocab_size=tok_emb.num_embeddings if isinstance(tok_emb, nnx.Embed) else None,
        context_length=pos_emb.num_embeddings if isinstance(pos_emb, nnx.Embed) else None,
    )


def _dtype_name(idx: Any) -> str:
    """The prompt's own dtype (numpy's int64, before jnp makes it int32), as torch's twin sees it."""
    dtype = getattr(idx, "dtype", None)
    return np.dtype(dtype).name if dtype is not None else np.asarray(idx).dtype.name


def _unpickable(logits: jax.Array) -> jax.Array:
    """(batch,) bool: rows of (batch, vocab_size) logits with no token to pick (a NaN or +inf among
    them, or nothing but -inf), as the torch twin's check_pickable finds them."""
    return jnp.isnan(logits).any(-1) | jnp.isposinf(logits).any(-1) | (logits.max(-1) == -jnp.inf)


def _note_unpickable(bad: jax.Array, step: jax.Array, logits: jax.Array) -> jax.Array:
    """`bad`, (first unpickable step, its first row) or (-1, -1), with this step's logits noted:
    the jitted loops go on and the host refuses after the chunk."""
    rows = _unpickable(logits)
    first = jnp.stack([jnp.asarray(step, jnp.int32), jnp.argmax(rows).astype(jnp.int32)])
    return jnp.where((bad[0] < 0) & rows.any(), first, bad)


def _raise_unpickable(bad: jax.Array) -> None:
    step, row = (int(v) for v in np.asarray(bad))
    if step >= 0:
        raise unpickable_logits(step, row)


def check_pickable(logits: jax.Array, step: int) -> jax.Array:
    """Refuse (batch, vocab_size) logits that give some row no token to pick, as torch's twin does."""
    rows = np.asarray(_unpickable_jit(logits))
    if rows.any():
        raise unpickable_logits(step, int(np.argmax(rows)))
    return logits


_unpickable_jit = jax.jit(_unpickable)
NO_UNPICKABLE = (-1, -1)


def _check_prompt(model: nnx.Module, idx: Any) -> tuple[GPTConfig | ModelLimits, jax.Array, str]:
    """(the model's limits, the prompt as a jax array of its dtype as jnp holds it, the prompt's own
    dtype name) after checking
    the prompt against them; refuses a prompt whose dtype cannot hold every id the model may
    generate, when the vocabulary is known before a step."""
    limits = model_limits(model)
    ids = check_ids(idx, limits, check_length=False)  # int32
    dtype_name = _dtype_name(idx)
    if limits.vocab_size is not None:
        check_id_dtype(dtype_name, limits.vocab_size)
    return limits, ids.astype(jax.dtypes.canonicalize_dtype(np.dtype(dtype_name))), dtype_name


def _check_model_output(
    graphdef, rng_state, params, ids: jax.ShapeDtypeStruct, limits: GPTConfig | ModelLimits, dtype_name: str
) -> None:
    """For a model that is not a twin's: its logits' shape, from a trace (nothing runs), checked
    as torch's twin checks them at each step."""

    def forward(rng_state, params, ids):
        return nnx.merge(graphdef, rng_state, params)(ids)

    out = jax.eval_shape(forward, rng_state, params, ids)
    shape = tuple(getattr(out, "shape", ()))
    batch, seq_len = ids.shape
    check_logits(shape, batch, seq_len, limits.vocab_size)
    if limits.vocab_size is None:  # a model that tells its vocabulary only by its logits
        check_id_dtype(dtype_name, shape[-1])


@functools.partial(jax.jit, static_argnames=("graphdef", "n_prompt", "window"), donate_argnames=("buf",))
def _generate(graphdef, rng_state, params, buf, bad, lo, hi, *, n_prompt: int, window: int):
    """Steps lo..hi-1 of a generation into `buf` (batch, n_prompt + max_new_tokens); `bad` notes
    the first step whose logits give a row no token to pick."""

    def step(i, carry):
        buf, rng_state, bad = carry
        n = n_prompt + i  # tokens so far
        logits, rng_state = _window_logits(graphdef, rng_state, params, buf, n, window)
        bad = _note_unpickable(bad, i, logits)
        probas = jax.nn.softmax(logits, axis=-1)
        # argmax is int32 and vocab_size <= 2**31 - 1; the prompt's dtype was checked to hold it.
        idx_next = jnp.argmax(probas, axis=-1).astype(buf.dtype)  # (batch,)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, idx_next[:, None], n, axis=1)
        return buf, rng_state, bad

    return jax.lax.fori_loop(lo, hi, step, (buf, rng_state, bad))


def _window_logits(graphdef, rng_state, params, buf, n, window: int):
    """The logits (batch, vocab_size) at the last of the first `n` tokens in `buf`, the model fed at
    most the last `window` of them; and the model's rng state after.

    The book feeds idx[:, -context_size:]. A fixed-size window does the same: while fewer than
    `window` tokens exist it starts at 0 and the causal mask hides the unfilled tail; after that
    it slides, so its positions are 0..window-1 as the cropped input's are."""
    start = jnp.maximum(0, n - window)
    idx_cond = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=1)
    model = nnx.merge(graphdef, rng_state, params)
    logits = model(idx_cond)  # (batch, window, vocab_size)
    logits = jax.lax.dynamic_index_in_dim(logits, n - 1 - start, axis=1, keepdims=False)
    return logits, nnx.state(model, nnx.RngState)


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _next_logits(graphdef, rng_state, params, buf, n, *, window: int):
    return _window_logits(graphdef, rng_state, params, buf, n, window)


@functools.partial(jax.jit, static_argnames=("top_k",))
def _filter_top_k(logits, *, top_k: int | None):
    """The book's top-k: logits below the k-th largest of their row become -inf."""
    if top_k is None:
        return logits
    min_val = jax.lax.top_k(logits, top_k)[0][:, -1:]
    return jnp.where(logits < min_val, -jnp.inf, logits)


def _prepare(model: nnx.Module, ids: jax.Array, max_new_tokens: int, context_size: int, limits, dtype_name: str):
    """What a generation over a fixed window needs: the window (at most context_size, never more
    than the longest input), the model split (graph, rng state, the rest), and the buffer of
    prompt and new tokens. A model that is not a twin's has its logits' shape checked first."""
    batch, n_prompt = ids.shape
    window = min(context_size, n_prompt + max_new_tokens - 1)
    commit(model)
    graphdef, *states = nnx.split(model, nnx.RngState, ...)
    rng_state, params = states
    if not isinstance(getattr(model, "cfg", None), GPTConfig):
        window_ids = jax.ShapeDtypeStruct((batch, window), ids.dtype)
        _check_model_output(graphdef, rng_state, params, window_ids, limits, dtype_name)
    (buf,) = placed(model, jnp.concatenate([ids, jnp.zeros((batch, max_new_tokens), ids.dtype)], axis=1))
    return window, graphdef, rng_state, params, buf


def generate_text_simple(model: nnx.Module, idx: Any, max_new_tokens: int, context_size: int) -> jax.Array:
    """Append `max_new_tokens` greedy tokens to `idx` (batch, n_tokens), feeding the model at most
    the last `context_size` tokens at each step. Returns (batch, n_tokens + max_new_tokens), in
    the prompt's dtype as jnp holds it (one that cannot hold every id of the vocabulary is refused).

    `model` is any nnx.Module with the book's interface, ids (batch, seq) -> logits (batch, seq,
    vocab). One compiled program per (batch, n_tokens, max_new_tokens, window) shape runs the
    steps, GENERATE_CHUNK at a time: the tokens live in a preallocated buffer, so nothing
    recompiles as the sequence grows, and Ctrl-C stops the loop between chunks.
    """
    limits, ids, dtype_name = _check_prompt(model, idx)
    batch, n_prompt = ids.shape
    max_new_tokens, context_size = check_generation(n_prompt, max_new_tokens, context_size, limits)
    check_output_fits(batch, n_prompt, max_new_tokens, dtype_name)
    if max_new_tokens == 0:
        return ids
    if dropout_rate_on(model) > 0:
        return _generate_as_the_book(model, ids, max_new_tokens, context_size, limits, dtype_name)
    window, graphdef, rng_state, params, buf = _prepare(model, ids, max_new_tokens, context_size, limits, dtype_name)
    (bad,) = placed(model, jnp.asarray(NO_UNPICKABLE, jnp.int32))
    try:
        for lo in range(0, max_new_tokens, GENERATE_CHUNK):
            hi = min(lo + GENERATE_CHUNK, max_new_tokens)
            buf, rng_state, bad = _generate(
                graphdef, rng_state, params, buf, bad, lo, hi, n_prompt=n_prompt, window=window
            )
            jax.block_until_ready(buf)  # a KeyboardInterrupt lands here, between chunks
            _raise_unpickable(bad)
    finally:
        nnx.update(model, rng_state)  # dropout keys advance, as in the eager model (to the last chunk run)
    return buf


def _book_logits(model: nnx.Module, ids: jax.Array, context_size: int, limits, dtype_name: str, step: int):
    """The logits at the last of the last `context_size` of `ids`, the model fed exactly those (the
    book's loop, one forward per step): where dropout is on, its masks are the torch twin's."""
    window = ids[:, -context_size:]
    logits = model(window)
    check_logits(tuple(logits.shape), window.shape[0], window.shape[1], limits.vocab_size)
    if limits.vocab_size is None:
        check_id_dtype(dtype_name, logits.shape[-1])
    return check_pickable(logits[:, -1, :], step)


def _generate_as_the_book(
    model: nnx.Module, ids: jax.Array, max_new_tokens: int, context_size: int, limits, dtype_name
):
    """generate_text_simple as the book's loop: a growing input, one eager forward per step."""
    for step in range(max_new_tokens):
        logits = _book_logits(model, ids, context_size, limits, dtype_name, step)
        idx_next = jnp.argmax(jax.nn.softmax(logits, axis=-1), axis=-1).astype(ids.dtype)
        ids = jnp.concatenate([ids, idx_next[:, None]], axis=1)
    return ids


def generate(
    model: nnx.Module,
    idx: Any,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    *,
    parity_seed: int | None = None,
    rngs: nnx.Rngs | None = None,
) -> jax.Array:
    """The book's chapter-5 generate: at each step the logits at the last of the (at most
    `context_size`) last tokens, the `top_k` largest kept (the others -inf); then with `temperature`
    0 the argmax, else a sample of softmax(logits / temperature): by jax.random.categorical with
    a key from `rngs` (JAX keeps no global generator: sampling without rngs or parity_seed is
    refused), or, with `parity_seed`, gpt_spec.randomness.pick_token's Gumbel-max over noise of
    (parity_seed, step): what the torch twin picks from equal logits.

    `eos_id` ends a row as in the torch twin: generation stops at the first step where every row
    has picked eos_id, without appending it; until then a row that has is filled with eos_id.
    Each step is one compiled forward over a fixed window (one program per shape, as
    generate_text_simple's). Returns (batch, n_tokens + tokens generated), in the prompt's dtype
    as jnp holds it.
    """
    limits, ids, dtype_name = _check_prompt(model, idx)
    batch, n_prompt = ids.shape
    max_new_tokens, context_size = check_generation(n_prompt, max_new_tokens, context_size, limits)
    temperature, top_k, eos_id = check_sampling(temperature, top_k, eos_id, parity_seed, limits.vocab_size)
    if temperature > 0.0 and parity_seed is None and rngs is None:
        raise ValueError("sampling (temperature > 0) needs rngs=nnx.Rngs(...) or parity_seed=")
    check_output_fits(batch, n_prompt, max_new_tokens, dtype_name)
    if max_new_tokens == 0:
        return ids
    exact = dropout_rate_on(model) > 0  # the book's shapes, for its dropout masks
    window, graphdef, rng_state, params, buf = _prepare(model, ids, max_new_tokens, context_size, limits, dtype_name)
    done = np.zeros(batch, dtype=bool)
    n = n_prompt
    try:
        for step in range(max_new_tokens):
            if exact:
                nnx.update(model, rng_state)
                logits = _book_logits(model, buf[:, :n], context_size, limits, dtype_name, step)
                rng_state = nnx.state(model, nnx.RngState)
            else:
                logits, rng_state = _next_logits(graphdef, rng_state, params, buf, n, window=window)
                check_pickable(logits, step)
            if temperature > 0.0 and parity_seed is not None:
                picked = pick_token(np.asarray(logits, dtype=np.float32), temperature, top_k, parity_seed, step)
            else:
                logits = _filter_top_k(logits, top_k=top_k)
                if temperature > 0.0:
                    assert rngs is not None  # checked above
                    # The largest logit taken off first (a tiny temperature would overflow the
                    # logits), and kept at 0 where the temperature rounds to 0 in float32.
                    shifted = logits - logits.max(axis=-1, keepdims=True)
                    scaled = jnp.where(shifted == 0, shifted, shifted / temperature)
                    picked = np.asarray(jax.random.categorical(rngs.sample(), scaled, axis=-1))
                else:
                    picked = np.asarray(jnp.argmax(logits, axis=-1))
            if eos_id is not None:
                picked = np.where(done, eos_id, picked)
                done |= picked == eos_id
                if done.all():
                    break
            buf = buf.at[:, n].set(jnp.asarray(picked, buf.dtype))
            n += 1
    finally:
        nnx.update(model, rng_state)  # dropout keys advance, as in the eager model
    return buf[:, :n]


def text_to_token_ids(text: str, tokenizer: Any) -> jax.Array:
    """The book's text_to_token_ids: (1, n_tokens) int32 (jnp's integer), `<|endoftext|>` allowed."""
    encoded = tokenizer.encode(check_text("text", text), allowed_special={"<|endoftext|>"})
    return jnp.asarray(encoded, dtype=jnp.int32)[None, :]  # add the batch dimension


def token_ids_to_text(token_ids: Any, tokenizer: Any) -> str:
    """The book's token_ids_to_text: the one row of (1, n_tokens) ids, decoded."""
    flat = np.asarray(token_ids).squeeze(0)  # remove the batch dimension
    return tokenizer.decode(flat.tolist())


def _run_cached(graphdef, params, cache, rest, ids):
    """The model's logits at the last of `ids`, fed through its KV cache; the cache and the other
    state (dropout keys) as they are after."""
    model = nnx.merge(graphdef, params, cache, rest)
    # The twins' forward can run its head on the last position only; another model's may not.
    last = {"last_only": True} if isinstance(model, _GPT) else {}
    logits = model(ids, use_cache=True, **last)[:, -1, :]  # (batch, vocab_size)
    _, _, cache, rest = nnx.split(model, nnx.Param, nnx.Cache, ...)
    return logits, cache, rest


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, params, cache, rest, prompt):
    """The prompt into the cache, in one call."""
    return _run_cached(graphdef, params, cache, rest, prompt)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "tokens"))
def _generate_cached(graphdef, params, cache, rest, logits, tokens, bad, lo, hi):
    """Decode steps lo..hi-1: step i picks token i from the logits carried in and feeds it through
    the cache. Then token hi is picked from the last logits: the next chunk's first pick, or, at
    hi = max_new_tokens - 1, the last token (which needs no logits). Params stay constants of the
    program; the cache (and dropout keys) are carried from step to step. The cache is donated: a
    chunk updates it where it lies instead of copying it first (it is the prefill's output or the
    chunk before's, which nothing else holds)."""

    def pick(logits):
        probas = jax.nn.softmax(logits, axis=-1)
        return jnp.argmax(probas, axis=-1).astype(tokens.dtype)  # (batch,)

    def step(i, carry):
        logits, tokens, cache, rest, bad = carry
        bad = _note_unpickable(bad, i, logits)
        idx_next = pick(logits)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, idx_next, i, axis=1)
        logits, cache, rest = _run_cached(graphdef, params, cache, rest, idx_next[:, None])
        return logits, tokens, cache, rest, bad

    logits, tokens, cache, rest, bad = jax.lax.fori_loop(lo, hi, step, (logits, tokens, cache, rest, bad))
    bad = _note_unpickable(bad, hi, logits)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, pick(logits), hi, axis=1)
    return logits, tokens, cache, rest, bad


def generate_text_simple_cached(
    model: nnx.Module, idx: Any, max_new_tokens: int, context_size: int | None = None, use_cache: bool = True
) -> jax.Array:
    """generate_text_simple with the KV cache (the book's chapter-4 variant): the prompt, cropped to
    its last `context_size` tokens, is fed once, then one new token per step.

    Same tokens as generate_text_simple only while nothing slides. Without cfg.kv_window_size
    nothing may: a generation that would need it is refused. With it (the book's optimized
    variant) the cache keeps the last kv_window_size positions and slides past them, each token
    attending to those, while positions go on counting: the cropped prompt must fit in the
    window, and prompt + max_new_tokens - 1 positions within context_length.

    One compiled prefill per (batch, prompt) and one compiled chunk of decode steps per (batch,
    prompt, max_new_tokens): the cache is preallocated for exactly the positions this call needs
    (at most kv_window_size of them), every step has the same shapes, and a sliding cache shifts
    by a traced amount. A model without a KV cache (no `reset_kv_cache`) is run
    without one, after the same checks: the same tokens.
    """
    limits, ids, dtype_name = _check_prompt(model, idx)
    if not use_cache:
        size = default_context_size(ids.shape[1], max_new_tokens, context_size, limits)
        return generate_text_simple(model, idx, max_new_tokens, size)
    max_new_tokens, context_size = check_cached_generation(ids.shape[1], max_new_tokens, context_size, limits)
    reset_kv_cache = getattr(model, "reset_kv_cache", None)
    if reset_kv_cache is None:
        return generate_text_simple(model, idx, max_new_tokens, context_size)
    check_output_fits(ids.shape[0], ids.shape[1], max_new_tokens, dtype_name)
    if max_new_tokens == 0:
        return ids
    prompt = ids[:, -context_size:]
    if isinstance(model, _GPT):
        check_cache_dropout(dropout_rate_on(model))  # before the reset: a refusal changes nothing
    reset_kv_cache(batch_size=prompt.shape[0], max_len=prompt.shape[1] + max_new_tokens - 1)
    commit(model)
    graphdef, *states = nnx.split(model, nnx.Param, nnx.Cache, ...)
    params, cache, rest = states
    logits, cache, rest = _prefill(graphdef, params, cache, rest, prompt)
    tokens, bad = placed(
        model, jnp.zeros((prompt.shape[0], max_new_tokens), ids.dtype), jnp.asarray(NO_UNPICKABLE, jnp.int32)
    )
    try:
        for lo in range(0, max(max_new_tokens - 1, 1), GENERATE_CHUNK):
            hi = min(lo + GENERATE_CHUNK, max_new_tokens - 1)
            logits, tokens, cache, rest, bad = _generate_cached(
                graphdef, params, cache, rest, logits, tokens, bad, lo, hi
            )
            jax.block_until_ready(tokens)  # a KeyboardInterrupt lands here, between chunks
            _raise_unpickable(bad)
    finally:
        nnx.update(model, cache, rest)
    return jnp.concatenate([ids, tokens], axis=1)
