"""The KV cache (the book's chapter-4 variant) in both twins: same tokens with and without it, same
tokens in both twins, the same logits position by position, the same refusals."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from gpt_flax.generate import _generate_cached
from parity_tests.compare import assert_close
from parity_tests.configs import TINY, TINY_BIAS
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import build_pair, float32_matmuls
from tests import helpers


def _generate(tm, fm, prompt, max_new_tokens, context_size=None, use_cache=True):
    with float32_matmuls():
        t = gpt_torch.generate_text_simple_cached(
            tm, torch.from_numpy(prompt), max_new_tokens, context_size, use_cache=use_cache
        ).numpy()
        f = np.asarray(
            gpt_flax.generate_text_simple_cached(fm, prompt, max_new_tokens, context_size, use_cache=use_cache)
        )
    return t, f


@pytest.mark.parametrize(
    "cfg, batch, n_prompt, max_new_tokens, context_size",
    [(TINY, 3, 1, 10, None), (TINY, 2, 11, 1, None), (TINY, 2, 15, 1, 4), (TINY_BIAS, 4, 2, 3, None)],
    ids=["batch-to-the-end", "prompt-at-context", "prompt-cropped", "bias"],
)
def test_cached_equals_uncached_in_both_twins(cfg, batch, n_prompt, max_new_tokens, context_size):
    tm, fm = build_pair("gpt", cfg, source="torch", seed=5)
    prompt = np.random.default_rng(n_prompt).integers(0, cfg.vocab_size, (batch, n_prompt))
    size = cfg.context_length if context_size is None else context_size
    with float32_matmuls():
        plain = gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), max_new_tokens, size).numpy()
    t, f = _generate(tm, fm, prompt, max_new_tokens, context_size)
    assert t.shape == (batch, n_prompt + max_new_tokens)
    np.testing.assert_array_equal(t, plain)
    np.testing.assert_array_equal(f, plain)
    t0, f0 = _generate(tm, fm, prompt, max_new_tokens, context_size, use_cache=False)
    np.testing.assert_array_equal(t0, plain)
    np.testing.assert_array_equal(f0, plain)


def test_zero_new_tokens_returns_the_prompt():
    tm, fm = build_pair("gpt", TINY, source="torch")
    prompt = np.array([[4, 5, 6]])
    for out in _generate(tm, fm, prompt, 0):
        np.testing.assert_array_equal(out, prompt)


def test_logits_fed_piece_by_piece_equal_the_full_forward():
    """Prompt of 4, then chunks of 1 and 6 through the cache: each chunk's logits are the full
    forward's at those positions, in both twins (and both twins agree)."""
    tm, fm = build_pair("gpt", TINY, source="flax", seed=2)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, TINY.context_length))
    with float32_matmuls(), torch.no_grad():
        full = tm(torch.from_numpy(ids)).numpy()
        tm.reset_kv_cache()
        fm.reset_kv_cache(batch_size=2)
        for lo, hi in [(0, 4), (4, 5), (5, 11)]:
            t = tm(torch.from_numpy(ids[:, lo:hi]), use_cache=True).numpy()
            f = np.asarray(fm(ids[:, lo:hi], use_cache=True))
            assert_close(full[:, lo:hi], t, FP32_FORWARD, name=f"torch cached [{lo}:{hi})")
            assert_close(full[:, lo:hi], f, FP32_FORWARD, name=f"flax cached [{lo}:{hi})")
        assert tm.current_pos == int(fm.current_pos[...]) == TINY.context_length
        # Reset: the next cached call starts at position 0 again.
        tm.reset_kv_cache()
        fm.reset_kv_cache()
        assert_close(full[:, :3], tm(torch.from_numpy(ids[:, :3]), use_cache=True).numpy(), FP32_FORWARD)
        assert_close(full[:, :3], np.asarray(fm(ids[:, :3], use_cache=True)), FP32_FORWARD)


def _refusals(call_torch, call_flax):
    with pytest.raises(ValueError) as t_err:
        call_torch()
    with pytest.raises(ValueError) as f_err:
        call_flax()
    return str(t_err.value), str(f_err.value)


def test_a_full_cache_is_refused_alike():
    tm, fm = build_pair("gpt", TINY, source="torch")
    ids = np.ones((1, 8), np.int64)
    tm.reset_kv_cache()
    fm.reset_kv_cache()
    with torch.no_grad():
        tm(torch.from_numpy(ids), use_cache=True)
        fm(ids, use_cache=True)
        t, f = _refusals(
            lambda: tm(torch.from_numpy(ids[:, :4]), use_cache=True), lambda: fm(ids[:, :4], use_cache=True)
        )
    assert (
        t
        == f
        == (
            "sequence length 12 exceeds context_length 11 (8 cached + 4 new tokens; "
            "the KV cache does not slide: reset it)"
        )
    )


def test_a_different_batch_size_is_refused_alike():
    tm, fm = build_pair("gpt", TINY, source="torch")
    tm.reset_kv_cache()
    fm.reset_kv_cache()
    with torch.no_grad():
        tm(torch.ones((2, 3), dtype=torch.int64), use_cache=True)
        fm(np.ones((2, 3), np.int64), use_cache=True)
        t, f = _refusals(
            lambda: tm(torch.ones((3, 1), dtype=torch.int64), use_cache=True),
            lambda: fm(np.ones((3, 1), np.int64), use_cache=True),
        )
    assert t == f == "the KV cache holds batch size 2, got 3: reset it"


@pytest.mark.parametrize(
    "n_prompt, max_new_tokens, context_size, message",
    [
        (
            5,
            8,
            None,
            "cached generation would hold 12 tokens, more than context_size 11: the KV cache does "
            "not slide; use generate_text_simple, or fewer new tokens",
        ),
        (
            2,
            4,
            4,
            "cached generation would hold 5 tokens, more than context_size 4: the KV cache does not "
            "slide; use generate_text_simple, or fewer new tokens",
        ),
        (2, -1, None, "max_new_tokens must be >= 0, got -1"),
        (2, 3, 0, "context_size must be >= 1, got 0"),
    ],
    ids=["past-context", "past-context-size", "negative", "zero-window"],
)
def test_generation_the_cache_cannot_do_is_refused_alike(n_prompt, max_new_tokens, context_size, message):
    tm, fm = build_pair("gpt", TINY, source="torch")
    prompt = np.arange(1, n_prompt + 1)[None, :]
    t, f = _refusals(
        lambda: gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompt), max_new_tokens, context_size),
        lambda: gpt_flax.generate_text_simple_cached(fm, prompt, max_new_tokens, context_size),
    )
    assert t == f == message


def test_the_cached_decoder_compiles_once_per_shape():
    """One program per (batch, prompt length, new tokens): other prompts of that shape, and the
    growing sequence within a call, reuse it."""
    _, fm = build_pair("gpt", TINY, source="torch")
    prompt = np.array([[5, 6, 7, 8]])  # a shape no other test uses, so the first call compiles
    with helpers.compilations() as first:
        gpt_flax.generate_text_simple_cached(fm, prompt, 5)
    with helpers.compilations() as again:
        for shift in range(1, 4):
            gpt_flax.generate_text_simple_cached(fm, prompt + shift, 5)
    assert first["_generate_cached"] == 1 and again["_generate_cached"] == 0, (first, again)


def _while_bodies(hlo: str) -> list[str]:
    """The text of every while loop's body computation in an XLA HLO module's text."""
    names = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo)
    bodies = []
    for name in names:
        start = re.search(rf"^%?{re.escape(name)} \(", hlo, re.MULTILINE)
        assert start, name
        bodies.append(hlo[start.start() : hlo.index("\n}", start.start())])
    return bodies


@pytest.mark.parametrize("batch", [1, 3])
def test_the_decoding_loop_updates_the_cache_in_place(batch):
    """The compiled decoding loop writes each new key and value into the cache without copying
    the cache: no copy, and no more cache-shaped updates than one per cache (keys and values of
    each block). With the book's (batch, num_heads, slots, head_dim) layout, XLA's CPU backend
    reshaped the updated cache for the attention's dots and copied it several times a step, so a
    step grew with the cache (docs/design-notes.md)."""
    from flax import nnx

    from gpt_flax.generate import _prefill

    _, fm = build_pair("gpt", TINY, source="torch")
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (batch, 3)), jnp.int32)
    fm.reset_kv_cache(batch_size=batch, max_len=9)
    graphdef, params, cache, rest = nnx.split(fm, nnx.Param, nnx.Cache, ...)
    logits, cache, rest = _prefill(graphdef, params, cache, rest, prompt)
    tokens = jnp.zeros((batch, 7), jnp.int32)
    bad = jnp.asarray((-1, -1), jnp.int32)  # no unpickable step yet
    hlo = _generate_cached.lower(graphdef, params, cache, rest, logits, tokens, bad, 0, 6).compile().as_text()
    (body,) = _while_bodies(hlo)
    size = int(np.prod(fm.trf_blocks[0].att.cache_k.shape))
    written = []  # instructions of the loop body that produce a cache-sized array (views aside)
    for line in body.splitlines():
        result = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]*)\]\S* (\S+?)\(", line)
        if result and result.group(2) not in ("bitcast", "get-tuple-element", "parameter"):
            if int(np.prod([int(d) for d in result.group(1).split(",") if d])) == size:
                written.append(line.strip()[:120])
    # One update of each block's keys and values, in place: no copy, no transposed or second update.
    assert len(written) == 2 * TINY.n_layers, written
    assert all("dynamic-update-slice" in line for line in written), written


def test_the_flax_cache_is_nnx_cache_state_never_a_parameter():
    """Keys, values and positions are nnx.Cache: outside nnx.Param, so outside the state dict, the
    gradients and AdamW's state, allocated or not."""
    from flax import nnx

    _, fm = build_pair("gpt", TINY, source="torch")
    names = set(gpt_flax.state_dict(fm))
    for allocate in (False, True):
        fm.reset_kv_cache(batch_size=2 if allocate else None, max_len=6)
        fm(np.ones((2, 3), np.int64), use_cache=True)  # allocates the lazily reset cache too
        cache = nnx.to_flat_state(nnx.state(fm, nnx.Cache))
        paths = {"/".join(map(str, keys)) for keys, _ in cache}
        assert "trf_blocks/0/att/cache_k" in paths and "current_pos" in paths, paths
        assert len(paths) == 1 + 3 * TINY.n_layers  # current_pos; each block's keys, values, pointer
        assert not {"/".join(map(str, keys)) for keys, _ in nnx.to_flat_state(nnx.state(fm, nnx.Param))} & paths
        assert set(gpt_flax.state_dict(fm)) == names
        opt = gpt_flax.adamw(fm)
        assert not any(
            keys[-1] in ("cache_k", "cache_v", "ptr_current_pos", "current_pos")
            for keys, _ in nnx.to_flat_state(nnx.state(opt))
        )


@pytest.mark.parametrize("kind", ["gpt", "dummy"])
@pytest.mark.parametrize("cfg", [TINY, TINY_BIAS], ids=["tiny", "bias"])
def test_last_only_gives_the_last_row_of_the_full_forward(kind, cfg):
    """The head on the last position only (what generation reads), plain and through the cache."""
    tm, fm = build_pair(kind, cfg, source="torch", seed=1)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, cfg.context_length))
    with float32_matmuls(), torch.no_grad():
        full = tm(torch.from_numpy(ids)).numpy()
        t = tm(torch.from_numpy(ids), last_only=True).numpy()
        f = np.asarray(fm(ids, last_only=True))
        tm.reset_kv_cache()
        fm.reset_kv_cache()
        tc = tm(torch.from_numpy(ids[:, :3]), use_cache=True, last_only=True).numpy()
        fc = np.asarray(fm(ids[:, :3], use_cache=True, last_only=True))
    assert t.shape == f.shape == tc.shape == fc.shape == (2, 1, cfg.vocab_size)
    assert_close(full[:, -1:], t, FP32_FORWARD, name="torch last_only")
    assert_close(full[:, -1:], f, FP32_FORWARD, name="flax last_only")
    assert_close(full[:, 2:3], tc, FP32_FORWARD, name="torch cached last_only")
    assert_close(full[:, 2:3], fc, FP32_FORWARD, name="flax cached last_only")
    assert tm.current_pos == int(fm.current_pos[...]) == 3


def test_last_only_with_activations_is_refused_alike_before_anything_runs():
    tm, fm = build_pair("gpt", TINY, source="torch")
    ids = np.ones((1, 3), np.int64)
    tm.reset_kv_cache()
    fm.reset_kv_cache()
    with torch.no_grad():
        t, f = _refusals(
            lambda: tm(torch.from_numpy(ids), return_activations=True, use_cache=True, last_only=True),
            lambda: fm(ids, return_activations=True, use_cache=True, last_only=True),
        )
    assert t == f == "last_only and return_activations cannot be combined: the activations cover every position"
    assert tm.current_pos == int(fm.current_pos[...]) == 0
