"""The sliding KV cache (cfg.kv_window_size, the book's optimized chapter-4 variant) in both twins:
against an oracle written out by hand, against each other, compiled once, refused alike.

The oracle runs the whole sequence through the torch twin's weights in one uncached forward whose
attention mask says which keys each query saw when it was fed through a window of W slots: a
query at position q in a cached call that ends at position e - 1 sees positions max(0, e - W)..q.
Fed one token per step (e = q + 1) that is the banded causal mask max(0, q - W + 1)..q.
"""

import importlib

import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from parity_tests.compare import assert_close
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import build_pair, float32_matmuls
from tests import helpers

# Odd, distinct sizes; context 32 lets a window of 5 slide for 25 steps.
SLIDING = GPTConfig(
    vocab_size=97, context_length=32, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0, qkv_bias=True, kv_window_size=5
)


def _hidden(chunks: list[int], window: int) -> torch.Tensor:
    """(T, T) True where a key is hidden from a query, for ids fed in calls of these lengths."""
    total = sum(chunks)
    hidden = torch.ones((total, total), dtype=torch.bool)
    start = 0
    for n in chunks:
        end = start + n
        for q in range(start, end):
            hidden[q, max(0, end - window) : q + 1] = False
        start = end
    return hidden


def _oracle_logits(tm: gpt_torch.GPTModel, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The torch twin's forward written out (eval mode), attention masked by `hidden`."""
    b, t = ids.shape
    x = tm.tok_emb(ids) + tm.pos_emb(torch.arange(t))
    for block in tm.trf_blocks:
        assert isinstance(block, gpt_torch.TransformerBlock)
        att = block.att

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, att.num_heads, att.head_dim).transpose(1, 2)  # (b, heads, t, head_dim)

        h = block.norm1(x)
        q, k, v = heads(att.W_query(h)), heads(att.W_key(h)), heads(att.W_value(h))
        scores = (q @ k.transpose(2, 3)).masked_fill(hidden, -torch.inf) / att.head_dim**0.5
        context = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, att.d_out)
        x = x + att.out_proj(context)
        x = x + block.ff(block.norm2(x))
    return tm.out_head(tm.final_norm(x))


def _oracle_generate(tm, prompt: np.ndarray, max_new_tokens: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens (batch, prompt + new) and each step's logits (batch, new, vocab): the prompt in
    one call, then one token per call."""
    ids = torch.from_numpy(prompt)
    steps = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            chunks = [prompt.shape[1]] + [1] * (ids.shape[1] - prompt.shape[1])
            logits = _oracle_logits(tm, ids, _hidden(chunks, window))[:, -1]
            steps.append(logits.numpy())
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids.numpy(), np.stack(steps, axis=1)


@nnx.jit
def _flax_cached_call(model, ids):
    """One cached call, compiled (once per shape: eager, each new op of a step compiles alone)."""
    return model(ids, use_cache=True)


def _torch_cached(tm, calls: list[np.ndarray]) -> list[np.ndarray]:
    tm.reset_kv_cache()
    with torch.no_grad():
        return [tm(torch.from_numpy(ids), use_cache=True).numpy() for ids in calls]


def _flax_cached(fm, calls: list[np.ndarray]) -> list[np.ndarray]:
    fm.reset_kv_cache(batch_size=calls[0].shape[0])
    return [np.asarray(_flax_cached_call(fm, ids)) for ids in calls]


@pytest.mark.parametrize("window, n_prompt", [(5, 3), (5, 5), (1, 1)], ids=["w5-p3", "w5-p5", "w1-p1"])
def test_sliding_generation_equals_banded_attention_in_both_twins(window, n_prompt):
    """Generation slides far past the window (context 32, 25 new tokens); each step's logits are
    the banded oracle's, in both twins. Tried once each, these fail it: a shift by overflow + 1
    or overflow - 1 (in either twin; torch's - 1 overruns the cache), and a mask that shows one
    key more (in either twin)."""
    cfg = SLIDING.replace(kv_window_size=window)
    tm, fm = build_pair("gpt", cfg, source="torch", seed=11)
    prompt = np.random.default_rng(n_prompt).integers(0, cfg.vocab_size, (2, n_prompt))
    n_new = cfg.context_length - n_prompt + 1  # the last position fed is context_length - 1
    with float32_matmuls():
        tokens, logits = _oracle_generate(tm, prompt, n_new, window)
        # The window matters: without it (every key seen) the tokens differ.
        plain, _ = _oracle_generate(tm, prompt, n_new, cfg.context_length)
        assert not np.array_equal(tokens, plain)
        t = gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompt), n_new).numpy()
        f = np.asarray(gpt_flax.generate_text_simple_cached(fm, prompt, n_new))
        np.testing.assert_array_equal(t, tokens)
        np.testing.assert_array_equal(f, tokens)
        # Step by step, the oracle's tokens fed: the last logits of each call are the oracle's.
        calls = [prompt] + [tokens[:, i : i + 1] for i in range(n_prompt, tokens.shape[1] - 1)]
        t_steps, f_steps = _torch_cached(tm, calls), _flax_cached(fm, calls)
    for name, steps in (("torch", t_steps), ("flax", f_steps)):
        assert_close(logits, np.stack([s[:, -1] for s in steps], axis=1), FP32_FORWARD, name=f"{name} sliding")
    assert tm.current_pos == int(fm.current_pos[...]) == cfg.context_length
    # torch: (batch, num_heads, slots, head_dim); Flax folds the heads into the batch axis
    assert tm.trf_blocks[0].att.cache_k.shape[2] == fm.trf_blocks[0].att.cache_k.shape[1] == window


def test_chunks_through_a_sliding_cache_agree_in_both_twins_and_with_the_oracle():
    """A prompt the size of the window, then chunks of 1 and of 3: every position's logits are the
    oracle's (each chunk's queries see the window its last token leaves), in both twins."""
    tm, fm = build_pair("gpt", SLIDING, source="flax", seed=3)
    window = SLIDING.kv_window_size
    chunks = [window, 1, 3, 1, 3, 3, 1, 3]
    ids = np.random.default_rng(0).integers(0, SLIDING.vocab_size, (3, sum(chunks)))
    bounds = np.cumsum([0] + chunks)
    calls = [ids[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    with float32_matmuls(), torch.no_grad():
        expected = _oracle_logits(tm, torch.from_numpy(ids), _hidden(chunks, window)).numpy()
        t = np.concatenate(_torch_cached(tm, calls), axis=1)
        f = np.concatenate(_flax_cached(fm, calls), axis=1)
    assert_close(expected, t, FP32_FORWARD, name="torch chunks")
    assert_close(expected, f, FP32_FORWARD, name="flax chunks")
    assert_close(t, f, FP32_FORWARD, name="flax vs torch chunks")


def test_a_sliding_generation_compiles_its_decoder_once():
    """Many chunks of decode steps, the cache sliding in every one: one prefill and one decode
    program (the shift is traced, not a shape), and the torch twin's tokens."""
    flax_generate = importlib.import_module("gpt_flax.generate")
    cfg = GPTConfig(
        vocab_size=97, context_length=100, emb_dim=4, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=False
    ).replace(kv_window_size=7)
    tm, fm = build_pair("gpt", cfg, source="torch", seed=4)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 3))
    n_new = 2 * flax_generate.GENERATE_CHUNK + 5
    with float32_matmuls():
        expected = gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompt), n_new).numpy()
        with helpers.compilations() as compiled:
            out = np.asarray(gpt_flax.generate_text_simple_cached(fm, prompt, n_new))
    assert (compiled["_generate_cached"], compiled["_prefill"]) == (1, 1), compiled
    np.testing.assert_array_equal(out, expected)
    assert fm.trf_blocks[0].att.cache_k.shape == (2 * 1, 7, 4)  # (batch * num_heads, slots, head_dim)


def _same_refusal(call_torch, call_flax) -> str:
    with pytest.raises(ValueError) as t_err:
        call_torch()
    with pytest.raises(ValueError) as f_err:
        call_flax()
    assert str(t_err.value) == str(f_err.value)
    return str(t_err.value)


@pytest.mark.parametrize(
    "window, message",
    [
        (0, "kv_window_size must be positive, got 0"),
        (-1, "kv_window_size must be positive, got -1"),
        (True, "kv_window_size must be an int or None, got True (bool)"),
        (1.5, "kv_window_size must be an int or None, got 1.5 (float)"),
        (33, "kv_window_size (33) must be at most context_length (32)"),
    ],
)
def test_bad_windows_are_refused_by_both_constructors(window, message):
    from flax import nnx

    book = {**SLIDING.to_dict(), "kv_window_size": window}
    got = _same_refusal(lambda: gpt_torch.GPTModel(book), lambda: gpt_flax.GPTModel(book, rngs=nnx.Rngs(0)))
    assert got == message


@pytest.mark.parametrize(
    "n_prompt, max_new_tokens, context_size, message",
    [
        (
            6,
            2,
            None,
            "the prompt's 6 tokens do not fit in the KV cache's window of 5 positions (kv_window_size): "
            "crop it with a context_size of at most 5",
        ),
        (
            3,
            31,
            None,
            "cached generation would need 33 positions, more than context_length 32: the KV cache's "
            "window slides, its positions do not; use generate_text_simple, or fewer new tokens",
        ),
        (
            40,
            30,
            4,
            "cached generation would need 33 positions, more than context_length 32: the KV cache's "
            "window slides, its positions do not; use generate_text_simple, or fewer new tokens",
        ),
    ],
    ids=["prompt-past-window", "past-context", "cropped-prompt-past-context"],
)
def test_sliding_generation_is_refused_alike(n_prompt, max_new_tokens, context_size, message):
    tm, fm = build_pair("gpt", SLIDING, source="torch")
    prompt = np.arange(1, n_prompt + 1)[None, :]
    got = _same_refusal(
        lambda: gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompt), max_new_tokens, context_size),
        lambda: gpt_flax.generate_text_simple_cached(fm, prompt, max_new_tokens, context_size),
    )
    assert got == message


def test_the_cropped_prompt_is_what_must_fit_and_the_last_position_is_allowed():
    tm, fm = build_pair("gpt", SLIDING, source="torch", seed=2)
    prompt = np.random.default_rng(3).integers(0, SLIDING.vocab_size, (1, 40))
    with float32_matmuls():
        t = gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompt), 29, 4).numpy()
        f = np.asarray(gpt_flax.generate_text_simple_cached(fm, prompt, 29, 4))
    np.testing.assert_array_equal(t, f)
    assert t.shape == (1, 69) and tm.current_pos == 32


@pytest.mark.parametrize("kind", ["gpt", "dummy"])
def test_model_level_refusals_of_a_sliding_cache_are_alike(kind):
    """A chunk longer than the window, and positions past context_length (positions never slide);
    a refused call changes nothing."""
    tm, fm = build_pair(kind, SLIDING, source="torch")
    ids = np.ones((1, 32), np.int64)
    tm.reset_kv_cache()
    fm.reset_kv_cache(batch_size=1)
    with torch.no_grad():
        assert _same_refusal(
            lambda: tm(torch.from_numpy(ids[:, :6]), use_cache=True), lambda: fm(ids[:, :6], use_cache=True)
        ) == (
            "6 new tokens do not fit in the KV cache's window of 5 positions (kv_window_size): "
            "feed at most 5 tokens per cached call"
        )
        for lo in range(0, 30, 5):  # positions 0..29, sliding from the second call on
            tm(torch.from_numpy(ids[:, lo : lo + 5]), use_cache=True)
            _flax_cached_call(fm, ids[:, lo : lo + 5])
        assert _same_refusal(
            lambda: tm(torch.from_numpy(ids[:, :3]), use_cache=True), lambda: fm(ids[:, :3], use_cache=True)
        ) == (
            "sequence length 33 exceeds context_length 32 (30 cached + 3 new tokens; the KV cache's window "
            "slides, its positions do not: reset it)"
        )
        tm(torch.from_numpy(ids[:, :2]), use_cache=True)
        fm(ids[:, :2], use_cache=True)
    assert tm.current_pos == int(fm.current_pos[...]) == 32


def test_a_cache_that_cannot_slide_compiles_the_plain_program():
    """Where the window holds every position a cached sequence may reach (kv_window_size >= max_len)
    the Flax twin traces the same program as without a window: no shift."""
    import jax
    import jax.numpy as jnp

    def program(cfg: GPTConfig, max_len: int) -> str:
        _, fm = build_pair("gpt", cfg, source="torch")
        fm.reset_kv_cache(batch_size=1, max_len=max_len)
        graphdef, state = nnx.split(fm)

        def call(state, ids):
            return nnx.merge(graphdef, state)(ids, use_cache=True)

        return str(jax.make_jaxpr(call)(state, jnp.ones((1, 2), jnp.int32)))

    plain = program(SLIDING.replace(kv_window_size=None), 5)
    assert program(SLIDING, 5) == plain  # 5 slots, max_len 5: nothing can slide
    assert program(SLIDING, 6) != plain  # 5 slots, max_len 6: the shift is in the program
