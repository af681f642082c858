"""Greedy generation: both twins produce the same token ids, the book's among them."""

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, get_tokenizer
from parity_tests import book
from parity_tests.configs import GPT_CONFIG_124M, TINY
from parity_tests.twins import build_pair, float32_matmuls
from tests import helpers


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
    prompt = np.array([[5, 6, 7, 8]])  # a shape no other test uses, so the first call compiles
    with helpers.compilations() as first:
        gpt_flax.generate_text_simple(fm, prompt, 5, TINY.context_length)
    with helpers.compilations() as again:
        for _ in range(3):
            gpt_flax.generate_text_simple(fm, prompt + 1, 5, TINY.context_length)
    assert first["_generate"] == 1 and again["_generate"] == 0, (first, again)


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


# --- sampling at the edges, logits that give nothing to pick, train-mode generation --------------


def _prompt(batch=2, n=3, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, n))


@pytest.mark.parametrize("temperature", [1e-39, 1e-300, 5e-324])
@pytest.mark.parametrize("top_k", [None, 5])
def test_a_tiny_temperature_samples_the_greedy_token_in_both_twins(temperature, top_k):
    """Divided by a tiny temperature the logits overflow: torch's multinomial raised on the NaN
    probabilities, the Flax twin sampled wrong tokens silently ([1, 2, 3, 0, 0, ...]; with top_k 5
    the 5th best), and parity sampling at <= 1e-308 picked token 0 in both. The largest logit is
    taken off first: the limit of sampling at temperature -> 0 is the greedy pick."""
    from flax import nnx

    tm, fm = build_pair("gpt", TINY, source="torch", seed=3)
    prompt = _prompt()
    greedy = np.asarray(gpt_flax.generate(fm, prompt, 6, 11))
    with float32_matmuls():
        for parity_seed in (None, 7):
            torch.manual_seed(0)
            t = gpt_torch.generate(tm, torch.from_numpy(prompt), 6, 11, temperature, top_k, parity_seed=parity_seed)
            f = gpt_flax.generate(fm, prompt, 6, 11, temperature, top_k, parity_seed=parity_seed, rngs=nnx.Rngs(0))
            np.testing.assert_array_equal(t.numpy(), greedy)
            np.testing.assert_array_equal(np.asarray(f), greedy)


def _nan_row(tm, fm, row=5):
    with torch.no_grad():
        tm.out_head.weight[row] = float("nan")
    gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))


GENERATORS = {
    "simple": lambda pkg, m, p: pkg.generate_text_simple(m, p, 4, 11),
    "greedy": lambda pkg, m, p: pkg.generate(m, p, 4, 11),
    "parity-sampled": lambda pkg, m, p: pkg.generate(m, p, 4, 11, temperature=1.0, parity_seed=1),
    "cached": lambda pkg, m, p: pkg.generate_text_simple_cached(m, p, 4),
}


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_logits_with_a_nan_are_refused_by_every_generator_of_both_twins(generator):
    """One NaN row in out_head: torch's sampling raised, the Flax twin's returned tokens; greedy
    generate_text_simple returned token 0 (argmax of an all-NaN softmax) where generate returned 5
    (argmax of the NaN logit). Every generator refuses, with the same words."""
    tm, fm = build_pair("gpt", TINY, source="torch", seed=3)
    _nan_row(tm, fm)
    prompt = _prompt()
    messages = []
    for pkg, model, p in ((gpt_torch, tm, torch.from_numpy(prompt)), (gpt_flax, fm, prompt)):
        with pytest.raises(ValueError) as err:
            GENERATORS[generator](pkg, model, p)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("the logits of generation step 0 (batch row 0) hold NaN or +inf")


def test_an_empty_start_context_is_refused_alike():
    """torch's text_to_token_ids made float32 ids of an empty text ("must be integers, got
    float32"), the Flax twin's int32 ones ("must be non-empty")."""
    tm, fm = build_pair("gpt", TINY, source="torch")
    tokenizer = get_tokenizer()
    with pytest.raises(ValueError) as t_err:
        gpt_torch.generate_and_print_sample(tm, tokenizer, None, "", log=lambda s: None)
    with pytest.raises(ValueError) as f_err:
        gpt_flax.generate_and_print_sample(fm, tokenizer, None, "", log=lambda s: None)
    assert str(t_err.value) == str(f_err.value) == "token ids must be non-empty, got shape (1, 0)"
    assert gpt_torch.text_to_token_ids("", tokenizer).dtype == torch.int64


def test_train_mode_generation_with_parity_dropout_draws_the_same_masks():
    """The Flax twin's fixed generation window changed the dropout masks' element indices: its
    forward and train steps agreed with torch's, its generated tokens did not. With a dropout on,
    both feed the book's shapes."""
    cfg = TINY.replace(drop_rate=0.3)
    tm, fm = build_pair("gpt", cfg, source="torch", seed=4, mode="train")
    gpt_torch.use_parity_dropout(tm, seed=9)
    gpt_flax.use_parity_dropout(fm, seed=9)
    prompt = _prompt(batch=2, n=2, seed=1)
    with float32_matmuls():
        t = gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), 7, 6).numpy()  # past the window
        f = np.asarray(gpt_flax.generate_text_simple(fm, prompt, 7, 6))
        np.testing.assert_array_equal(f, t)
        t = gpt_torch.generate(tm, torch.from_numpy(prompt), 4, 6, temperature=1.5, parity_seed=3).numpy()
        f = np.asarray(gpt_flax.generate(fm, prompt, 4, 6, temperature=1.5, parity_seed=3))
        np.testing.assert_array_equal(f, t)
    assert int(tm.dropout_counter.value) == int(fm.dropout_counter[...]) > 0
