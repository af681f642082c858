"""Parity dropout and parity sampling: both twins draw exactly gpt_spec.randomness's masks and picks."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_flax.dropout import ParityDropout as FlaxParityDropout
from gpt_spec.randomness import gumbel_noise, keep_mask, pick_token
from gpt_torch.dropout import DropoutCounter
from gpt_torch.dropout import ParityDropout as TorchParityDropout
from parity_tests.configs import TINY

CASES = [  # (seed, counter, rate): 32-bit extremes, a counter past 2**32, rates 0 and 1
    (0, 0, 0.1),
    (123, 5, 0.5),
    (2**32 - 1, 2**32 + 3, 0.9),
    (7, 1, 0.0),
    (7, 1, 1.0),
]


@pytest.mark.parametrize("seed, counter, rate", CASES)
def test_both_twins_draw_the_reference_mask_bit_for_bit(seed, counter, rate):
    shape = (2, 3, 37, 41)  # not a power of 2 anywhere
    reference = keep_mask(shape, rate, seed, counter)
    t = TorchParityDropout(rate, DropoutCounter(counter), seed)(torch.ones(shape)).numpy()
    count = nnx.RngCount(jnp.asarray(counter % 2**32, jnp.uint32), tag="test")
    f = np.asarray(FlaxParityDropout(rate, count, seed)(jnp.ones(shape)))
    np.testing.assert_array_equal(t != 0, reference)
    np.testing.assert_array_equal(f != 0, reference)
    scale = np.float32(1 / (1 - rate)) if rate < 1 else 0
    np.testing.assert_array_equal(t[reference], scale)
    np.testing.assert_array_equal(f[reference], scale)


def test_masks_keep_one_minus_the_rate_and_differ_from_call_to_call():
    masks = [keep_mask((4096,), 0.1, 123, counter) for counter in range(50)]
    kept = np.mean(masks)
    assert abs(kept - 0.9) < 0.005, kept  # 204,800 draws: sd 0.0007
    assert len({m.tobytes() for m in masks}) == 50
    # Neighbouring elements and neighbouring calls are uncorrelated (the hash mixes both).
    flat = np.stack(masks).astype(float)
    assert abs(np.corrcoef(flat[:, :-1].ravel(), flat[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(flat[:-1].ravel(), flat[1:].ravel())[0, 1]) < 0.02


def _sites(model, kind):
    if isinstance(model, torch.nn.Module):
        return [m for m in model.modules() if isinstance(m, kind)]
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, kind)]


def test_use_parity_dropout_replaces_every_site_and_counts_calls_in_training_only():
    tm = gpt_torch.use_parity_dropout(gpt_torch.GPTModel(TINY), seed=3)
    fm = gpt_flax.use_parity_dropout(gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0)), seed=3)
    sites = 1 + 2 * TINY.n_layers  # drop_emb; per block att.dropout and drop_shortcut
    assert len(_sites(tm, TorchParityDropout)) == len(_sites(fm, FlaxParityDropout)) == sites
    assert not _sites(tm, torch.nn.Dropout) and not _sites(fm, nnx.Dropout)
    ids = np.arange(2 * 7).reshape(2, 7) % TINY.vocab_size
    calls = 1 + 3 * TINY.n_layers  # drop_shortcut runs twice per block
    tm.train(), fm.train()
    tm(torch.from_numpy(ids)), fm(ids)
    assert tm.dropout_counter.value == int(fm.dropout_counter[...]) == calls
    tm.eval(), fm.eval()
    tm(torch.from_numpy(ids)), fm(ids)
    assert tm.dropout_counter.value == int(fm.dropout_counter[...]) == calls
    # The jitted train step carries the count out, as nnx.Rngs' counts.
    tm.train(), fm.train()
    gpt_torch.train_step(tm, gpt_torch.adamw(tm), torch.from_numpy(ids), torch.from_numpy(ids))
    gpt_flax.train_step(fm, gpt_flax.adamw(fm), ids, ids)
    assert tm.dropout_counter.value == int(fm.dropout_counter[...]) == 2 * calls


def test_parity_dropout_refuses_a_bad_seed_alike():
    for twin, model in ((gpt_torch, gpt_torch.GPTModel(TINY)), (gpt_flax, gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0)))):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\), got -1"):
            twin.use_parity_dropout(model, seed=-1)


def test_pick_token_filters_top_k_and_samples_the_softmax():
    logits = np.array([[0.0, np.log(3.0), -1.0, -50.0]], np.float32)
    picks = np.array([pick_token(logits, 1.0, 2, seed=9, step=s)[0] for s in range(4000)])
    assert set(picks.tolist()) == {0, 1}  # top_k 2: ids 2 and 3 never
    assert abs(np.mean(picks == 1) - 0.75) < 0.03  # softmax of (0, log 3): 1/4, 3/4
    cold = np.array([pick_token(logits, 0.05, None, seed=9, step=s)[0] for s in range(200)])
    assert np.all(cold == 1)  # a low temperature is nearly greedy
    assert np.isfinite(gumbel_noise(1, 2, (3, 5))).all()


def test_generate_parity_sampling_gives_equal_tokens_in_both_twins():
    tm = gpt_torch.GPTModel(TINY).eval()
    fm = gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    fm.eval()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    args = dict(max_new_tokens=8, context_size=TINY.context_length, temperature=1.5, top_k=20)
    t = gpt_torch.generate(tm, torch.from_numpy(prompt), **args, parity_seed=11).numpy()
    f = np.asarray(gpt_flax.generate(fm, prompt, **args, parity_seed=11))
    np.testing.assert_array_equal(t, f)
    other = gpt_torch.generate(tm, torch.from_numpy(prompt), **args, parity_seed=12).numpy()
    assert not np.array_equal(t, other)  # the seed decides, not the logits alone


def test_generate_stops_at_eos_as_the_book_and_pads_finished_rows():
    tm = gpt_torch.GPTModel(TINY).eval()
    fm = gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    fm.eval()
    prompt = np.array([[5, 6]])
    greedy = gpt_torch.generate(tm, torch.from_numpy(prompt), 6, TINY.context_length)[0].tolist()
    eos = greedy[3]  # the second generated token
    first = greedy.index(eos, 2)
    for out in (
        gpt_torch.generate(tm, torch.from_numpy(prompt), 6, TINY.context_length, eos_id=eos).numpy(),
        np.asarray(gpt_flax.generate(fm, prompt, 6, TINY.context_length, eos_id=eos)),
    ):
        assert out[0].tolist() == greedy[:first]  # stopped before appending the eos
    # A batch: a row that picked eos is filled with it until every row has.
    rows = np.array([[5, 6], [7, 8]])
    t = gpt_torch.generate(tm, torch.from_numpy(rows), 6, TINY.context_length, eos_id=eos).numpy()
    f = np.asarray(gpt_flax.generate(fm, rows, 6, TINY.context_length, eos_id=eos))
    np.testing.assert_array_equal(t, f)
    assert t[0, 2:].tolist() == greedy[2:first] + [eos] * (t.shape[1] - first)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
        (dict(top_k=0), "top_k must be >= 1, got 0"),
        (dict(top_k=TINY.vocab_size + 1), f"top_k must be <= vocab_size {TINY.vocab_size}, got {TINY.vocab_size + 1}"),
        (dict(eos_id=TINY.vocab_size), f"eos_id must be < vocab_size {TINY.vocab_size}"),
        (dict(temperature=1.0, parity_seed=2**32), r"seed must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_generate_refuses_bad_sampling_arguments_alike(kwargs, match):
    tm = gpt_torch.GPTModel(TINY).eval()
    fm = gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    prompt = np.array([[1, 2]])
    with pytest.raises(ValueError, match=match):
        gpt_torch.generate(tm, torch.from_numpy(prompt), 3, 5, **kwargs)
    with pytest.raises(ValueError, match=match):
        gpt_flax.generate(fm, prompt, 3, 5, **kwargs)


def test_flax_sampling_needs_a_key_or_a_parity_seed():
    fm = gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sampling \\(temperature > 0\\) needs rngs="):
        gpt_flax.generate(fm, np.array([[1, 2]]), 3, 5, temperature=1.0)
    out = gpt_flax.generate(fm, np.array([[1, 2]]), 3, 5, temperature=1.0, top_k=5, rngs=nnx.Rngs(sample=1))
    assert out.shape == (1, 5)
