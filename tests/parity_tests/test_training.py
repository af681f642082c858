"""Training parity: the book's loss, every gradient, and AdamW steps (torch.optim vs optax).

Tiny configs here; the 124M case (loss, 161 gradients, 10 AdamW steps on gpt2-small) is the main
job's `gpt-parity check --train-steps 10`, which CI runs through `make run` and which exits 1 if
any of it fails (the docs tests check that the Makefile runs it).
"""

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from parity_cli import reports
from parity_tests import zoo
from parity_tests.compare import compare
from parity_tests.configs import TINY, TINY_BIAS
from parity_tests.tolerances import GRADS
from parity_tests.training import run_training_parity, weights_check
from parity_tests.twins import build_pair, float32_matmuls, token_batch


@pytest.mark.parametrize("cfg", [TINY, TINY_BIAS.replace(n_layers=2)], ids=["tiny", "tiny-qkv-bias"])
def test_loss_gradients_and_ten_adamw_steps_agree(cfg):
    report = run_training_parity(cfg, batch=3, seq=cfg.context_length - 1, steps=10, outlier_fraction=0)
    assert report.passed, reports.training_table(report)
    assert report.loss.max_abs <= 1e-5 and len(report.grads) == len(gpt_torch.state_dict(gpt_torch.GPTModel(cfg)))
    assert [w.step for w in report.weights] == [1, 10]
    assert all(w.n_outliers == 0 for w in report.weights)
    assert all(abs(a - b) < 1e-5 for a, b in report.step_losses)
    if cfg.qkv_bias:  # the key bias's gradient is zero in exact arithmetic: noise on both sides
        noise = [c for c in report.grads if c.name.endswith("W_key.bias")]
        assert noise and all(c.ref_max <= GRADS.atol for c in noise)


def test_gradients_are_compared_in_the_canonical_layout():
    cfg = TINY.replace(drop_rate=0.0)
    tm, fm = build_pair("gpt", cfg, source="torch", mode="train")
    ids = token_batch(cfg, 2, 8, seed=0)
    x, y = ids[:, :-1], ids[:, 1:]
    with float32_matmuls():
        _, t = gpt_torch.loss_and_grads(tm, torch.from_numpy(x), torch.from_numpy(y))
        _, f = gpt_flax.loss_and_grads(fm, x, y)
    name = "trf_blocks.0.ff.layers.0.weight"  # (4*emb, emb) in torch; the Flax kernel is (emb, 4*emb)
    assert t[name].shape == f[name].shape == (4 * TINY.emb_dim, TINY.emb_dim)
    np.testing.assert_allclose(f[name], t[name], atol=1e-7)


def test_a_parameter_the_loss_does_not_reach_has_a_zero_gradient_in_both_twins():
    """With the query/key/value biases left out of the forward (the zoo's qkv-bias-dropped, planted
    in both twins), torch's autograd gives them no .grad and JAX a zero gradient: loss_and_grads
    gives zeros in both, and every other gradient as usual."""
    cfg = TINY_BIAS.replace(drop_rate=0.0)
    tm, fm = build_pair("gpt", cfg, source="torch", mode="train")
    models = {"torch": tm, "flax": fm}
    mutant = zoo.get("qkv-bias-dropped")
    ids = token_batch(cfg, 2, cfg.context_length + 1, seed=3)
    x, y = ids[:, :-1], ids[:, 1:]
    with zoo.planted(mutant, "torch", models), zoo.planted(mutant, "flax", models), float32_matmuls():
        _, t = gpt_torch.loss_and_grads(tm, torch.from_numpy(x), torch.from_numpy(y))
        _, f = gpt_flax.loss_and_grads(fm, x, y)
    assert set(t) == set(f) == set(gpt_torch.state_dict(tm))
    dropped = [name for name in t if name.endswith(("W_query.bias", "W_key.bias", "W_value.bias"))]
    assert len(dropped) == 3 * cfg.n_layers
    for name in t:
        if name in dropped:
            assert not t[name].any() and not f[name].any(), name
        else:
            check = compare(name, t[name], f[name], GRADS)
            assert check.passed, check.describe()


def test_a_different_weight_decay_is_caught():
    """The weight check can fail: optax without weight decay drifts from torch's AdamW."""
    cfg = TINY.replace(drop_rate=0.0)
    tm, fm = build_pair("gpt", cfg, source="torch", mode="train")
    t_opt, f_opt = gpt_torch.adamw(tm), gpt_flax.adamw(fm, weight_decay=0.0)
    ids = token_batch(cfg, 2, 9, seed=1)
    with float32_matmuls():
        gpt_torch.train_step(tm, t_opt, torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:]))
        gpt_flax.train_step(fm, f_opt, ids[:, :-1], ids[:, 1:])
    check = weights_check(1, gpt_torch.state_dict(tm), gpt_flax.state_dict(fm), 4e-4, 0.0)
    assert not check.passed and check.n_outliers > 100


def test_a_failed_weight_check_blames_the_tensor_past_its_share_not_a_stray_outlier():
    """gpt2-small's weights after a step may have 1e-4 of their elements past the bound (rounding-floor
    flips), so a large matrix with 3 of them is not where a check fails; a norm scale with all of its
    elements past is, though it comes later in model order."""
    rng = np.random.default_rng(0)
    ref = {"W_key.weight": rng.normal(size=(400, 400)).astype(np.float32), "norm1.scale": np.ones(80, np.float32)}
    cand = {k: v.copy() for k, v in ref.items()}
    cand["W_key.weight"].flat[:3] += 1e-3
    cand["norm1.scale"] += 1e-3
    check = weights_check(1, ref, cand, lr=1.0, outlier_fraction=3e-4)  # 48 outliers allowed, 83 past
    assert not check.passed and check.allowed_outliers == 48 and check.n_outliers == 83
    assert check.first_tensor().name == "norm1.scale"
    cand["norm1.scale"] = ref["norm1.scale"].copy()
    cand["W_key.weight"].flat[:60] += 1e-3  # now the matrix holds the excess
    assert weights_check(1, ref, cand, lr=1.0, outlier_fraction=3e-4).first_tensor().name == "W_key.weight"


def test_targets_must_pair_with_inputs():
    tm, fm = build_pair("gpt", TINY, source="torch")
    x, y = np.zeros((2, 4), np.int64), np.zeros((2, 5), np.int64)
    message = "targets have shape (2, 5), expected the inputs' shape (2, 4)"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpt_torch.calc_loss_batch(torch.from_numpy(x), torch.from_numpy(y), tm)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpt_flax.calc_loss_batch(x, y, fm)


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_an_exported_state_dict_survives_a_training_step(twin):
    """The Flax step donates its buffers; what state_dict returned before must not change."""
    cfg = TINY.replace(drop_rate=0.0)
    tm, fm = build_pair("gpt", cfg, source="torch", mode="train")
    ids = token_batch(cfg, 2, 9, seed=2)
    if twin == "torch":
        before = gpt_torch.state_dict(tm)
        snapshot = {k: v.copy() for k, v in before.items()}
        gpt_torch.train_step(tm, gpt_torch.adamw(tm), torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:]))
        after = gpt_torch.state_dict(tm)
    else:
        before = gpt_flax.state_dict(fm)
        snapshot = {k: v.copy() for k, v in before.items()}
        gpt_flax.train_step(fm, gpt_flax.adamw(fm), ids[:, :-1], ids[:, 1:])
        after = gpt_flax.state_dict(fm)
    for name in before:
        np.testing.assert_array_equal(before[name], snapshot[name], err_msg=name)
    assert any(not np.array_equal(after[k], snapshot[k]) for k in after)  # the step did train
