"""The parity checks on trained weights: a small GPT trained on the book's text by `gpt-parity train`.

Random weights give diffuse attention, logits near 0 and no outliers; trained ones give peaked
attention, larger logits and outlier activations, where rounding behaves differently. tests/data
holds `chapter5-tiny-trained.safetensors`, the torch twin's model after

    gpt-parity train --config examples/chapter5-tiny.json --epochs 30 --lr 0.004 --out <dir>

(vocab 50257, context 64, emb 16, 2 heads, 2 layers, drop_rate 0.1 with parity dropout, seed 123;
the run passed). It is test data: regenerate it only with that command, and say so in the commit.
"""

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from gpt_spec import get_tokenizer
from gpt_spec.data import split_text, the_verdict
from parity_tests.forward import ParityOptions, run_parity
from parity_tests.twins import build_pair, float32_matmuls
from tests.helpers import DATA  # noqa: E402

FIXTURE = DATA / "chapter5-tiny-trained.safetensors"
PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def trained():
    tm = gpt_torch.load(FIXTURE).eval()
    fm = gpt_flax.load(FIXTURE)
    fm.eval()
    return tm, fm


def test_the_fixture_is_trained_not_random(trained):
    """Against a fresh model of the same config, on a window of the text it was trained on: a loss
    far below ln(50257) = 10.8 and logits of a larger spread."""
    tm, _ = trained
    cfg = tm.cfg
    fresh, _ = build_pair("gpt", cfg, source="torch", seed=123)
    fresh.eval()
    train, _ = split_text(the_verdict())
    ids = torch.tensor([get_tokenizer().encode(train)[: cfg.context_length + 1]])
    with torch.no_grad():
        loss = gpt_torch.calc_loss_batch(ids[:, :-1], ids[:, 1:], tm).item()
        fresh_loss = gpt_torch.calc_loss_batch(ids[:, :-1], ids[:, 1:], fresh).item()
        logits, fresh_logits = tm(ids[:, :-1]), fresh(ids[:, :-1])
    assert loss < 4.0 < 10.5 < fresh_loss, (loss, fresh_loss)
    assert logits.std() > 3 * fresh_logits.std()  # measured 6.0x


def test_forward_and_every_layers_evidence_pass_on_the_trained_weights(trained):
    tm, _ = trained
    report = run_parity(
        tm.cfg, ParityOptions(batch=2, seq=tm.cfg.context_length, seed=5), weights=gpt_torch.state_dict(tm)
    )
    assert report.passed, report.failures()
    assert report.rows[0].stages[-1].max_abs > 0


def test_greedy_cached_and_parity_sampled_generation_agree_on_the_trained_weights(trained):
    tm, fm = trained
    prompt = np.array([get_tokenizer().encode(PROMPT)])
    n, ctx = 40, tm.cfg.context_length
    with float32_matmuls():
        greedy = gpt_torch.generate(tm, torch.from_numpy(prompt), n, ctx).numpy()
        np.testing.assert_array_equal(np.asarray(gpt_flax.generate(fm, prompt, n, ctx)), greedy)
        np.testing.assert_array_equal(np.asarray(gpt_flax.generate_text_simple_cached(fm, prompt, 30)), greedy[:, :-10])
        sampled = gpt_torch.generate(tm, torch.from_numpy(prompt), n, ctx, 1.4, 25, parity_seed=123).numpy()
        f_sampled = np.asarray(gpt_flax.generate(fm, prompt, n, ctx, 1.4, 25, parity_seed=123))
    np.testing.assert_array_equal(f_sampled, sampled)
    assert len(set(greedy[0, prompt.shape[1] :].tolist())) > 3  # words, not one token repeated
