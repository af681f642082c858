"""Greedy generation: both twins produce the same token ids, the book's among them."""

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from gpt_flax.generate import _generate
from gpt_spec import GPTConfig, get_tokenizer

from . import book
from .configs import GPT_CONFIG_124M, TINY
from .twins import build_pair, float32_matmuls


def _both(tm, fm, prompt, max_new_tokens, context_size):
    with float32_matmuls():
        t = gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), max_new_tokens, context_size).numpy()
        f = np.asarray(gpt_flax.generate_text_simple(fm, prompt, max_new_tokens, context_size))
    return t, f


@pytest.mark.parametrize(
    "batch, n_prompt, max_new_tokens, context_size",
    [(1, 3, 8, 11), (4, 2, 20, 11), (2, 11, 5, 11), (3, 15, 6, 5), (2, 4, 9, 1), (1, 1, 1, 11)],
    ids=["short", "batch-past-context", "prompt-at-context", "prompt-past-crop", "window-1", "one-token"],
)
def test_twins_generate_the_same_ids(batch, n_prompt, max_new_tokens, context_size):
    tm, fm = build_pair("gpt", TINY, source="torch", seed=3)
    prompt = np.random.default_rng(n_prompt).integers(0, TINY.vocab_size, (batch, n_prompt))
    t, f = _both(tm, fm, prompt, max_new_tokens, context_size)
    assert t.shape == (batch, n_prompt + max_new_tokens)
    np.testing.assert_array_equal(t[:, :n_prompt], prompt)
    np.testing.assert_array_equal(f, t)


def test_zero_new_tokens_returns_the_prompt():
    tm, fm = build_pair("gpt", TINY, source="torch")
    prompt = np.array([[1, 2, 3]])
    t, f = _both(tm, fm, prompt, 0, TINY.context_length)
    np.testing.assert_array_equal(t, prompt)
    np.testing.assert_array_equal(f, prompt)


def test_the_loop_compiles_once_per_shape():
    """The Flax decoder is one program over a preallocated buffer: more tokens, more calls, same
    shapes -> no new compilation."""
    _, fm = build_pair("gpt", TINY, source="torch")
    prompt = np.array([[5, 6, 7]])
    gpt_flax.generate_text_simple(fm, prompt, 6, TINY.context_length)
    compiled = _generate._cache_size()
    for _ in range(3):
        gpt_flax.generate_text_simple(fm, prompt + 1, 6, TINY.context_length)
    assert _generate._cache_size() == compiled


@pytest.mark.parametrize(
    "args, message",
    [
        ((-1, 11), "max_new_tokens must be >= 0, got -1"),
        ((2.0, 11), "max_new_tokens must be an int, got 2.0 (float)"),
        ((3, 0), "context_size must be >= 1, got 0"),
        ((5, 20), "sequence length 12 exceeds context_length 11"),
    ],
)
def test_both_twins_refuse_bad_generation_arguments_alike(args, message):
    tm, fm = build_pair("gpt", TINY, source="torch")
    prompt = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with pytest.raises(ValueError) as t_err:
        gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), *args)
    with pytest.raises(ValueError) as f_err:
        gpt_flax.generate_text_simple(fm, prompt, *args)
    assert str(t_err.value) == str(f_err.value) == message


def test_a_long_context_size_is_fine_while_the_sequence_fits():
    """The book's loop only fails once a window outgrows context_length; so do the twins."""
    tm, fm = build_pair("gpt", TINY, source="torch")
    prompt = np.array([[1, 2, 3]])
    t, f = _both(tm, fm, prompt, TINY.context_length - 2, 10 * TINY.context_length)
    np.testing.assert_array_equal(f, t)


@pytest.mark.slow
def test_gpt2_small_prints_the_books_generation_and_the_twins_agree_for_24_tokens_with_and_without_cache():
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)
    tm, fm = build_pair("gpt", cfg, source="torch", seed=book.SEED)  # the book's torch.manual_seed(123)
    prompt = np.array([get_tokenizer().encode(book.GENERATE_PROMPT)])
    t, f = _both(tm, fm, prompt, 24, cfg.context_length)
    assert t[0, : len(book.GENERATE_IDS)].tolist() == book.GENERATE_IDS
    np.testing.assert_array_equal(f, t)
    with float32_matmuls():  # and with the KV cache
        tc = gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompt), 24).numpy()
        fc = np.asarray(gpt_flax.generate_text_simple_cached(fm, prompt, 24))
    np.testing.assert_array_equal(tc, t)
    np.testing.assert_array_equal(fc, t)
