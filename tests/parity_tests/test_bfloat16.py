"""The bfloat16 tier: both twins cast to bfloat16 (LayerNorm statistics, GELU, softmax and logits
in float32), held to their own documented bounds: BF16_FORWARD for the forward, the BF16_* training
bounds for the loss, gradients and weights after AdamW steps."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from parity_cli import reports
from parity_cli.main import main
from parity_tests import zoo
from parity_tests.configs import TINY, TINY_BIAS
from parity_tests.forward import ParityOptions, compare_stages, run_parity
from parity_tests.tolerances import BF16_FORWARD, FP32_FORWARD, GRADS
from parity_tests.training import TRAINING_BOUNDS, run_training_parity
from parity_tests.twins import build_pair, float32_matmuls, run_flax, run_torch, token_batch


def _bf16_pair(cfg, source="torch", seed=0):
    tm, fm = build_pair("gpt", cfg, source=source, seed=seed)
    return gpt_torch.cast(tm, "bfloat16"), gpt_flax.cast(fm, "bfloat16")


def test_the_cast_rounds_both_twins_to_the_same_weights_and_dtypes():
    tm, fm = _bf16_pair(TINY_BIAS)
    assert {p.dtype for p in tm.parameters()} == {torch.bfloat16}
    assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(fm, nnx.Param))} == {np.dtype("bfloat16")}
    t, f = gpt_torch.state_dict(tm), gpt_flax.state_dict(fm)
    assert all(t[k].dtype == np.float32 and np.array_equal(t[k], f[k]) for k in t)
    ids = token_batch(TINY_BIAS, 2, 5, seed=0)
    with torch.no_grad():
        acts_t = tm(torch.from_numpy(ids), return_activations=True)
    acts_f = fm(ids, return_activations=True)
    for name in ("drop_emb", "trf_blocks.0", "final_norm"):  # the residual stream is bfloat16 ...
        assert acts_t[name].dtype == torch.bfloat16 and acts_f[name].dtype == np.dtype("bfloat16"), name
    assert acts_t["out_head"].dtype == torch.float32 and acts_f["out_head"].dtype == np.float32  # ... logits not


def test_a_tiny_config_agrees_within_the_bf16_bound_both_directions():
    """gpt2-small's bfloat16 parity is run by docs/method.md's `gpt-parity check --dtype bfloat16`."""
    cfg = TINY_BIAS
    report = run_parity(cfg, ParityOptions(batch=3, seq=cfg.context_length, seed=4, dtype="bfloat16"))
    assert report.dtype == "bfloat16" and report.to_json()["dtype"] == "bfloat16"
    assert {r.logits.bound for r in report.rows} == {BF16_FORWARD}
    assert report.passed, reports.parity_table(report)
    # bfloat16 is what the bound is for: the same twins are far outside the float32 bound.
    assert max(r.logits.max_abs / (FP32_FORWARD.stol * r.logits.ref_max) for r in report.rows) > 10


def test_a_perturbed_weight_fails_the_bf16_bound():
    """A bug the size of a wrong transpose or a missing bias is far above bfloat16 rounding."""
    tm, fm = _bf16_pair(TINY, seed=1)
    bias = fm.trf_blocks[1].att.out_proj.bias
    bias[...] = bias[...].at[3].add(0.5)
    ids = token_batch(TINY, 2, 9, seed=0)
    with float32_matmuls():
        stages = compare_stages(run_torch(tm, ids, activations=True), run_flax(fm, ids, activations=True), BF16_FORWARD)
    assert [c.name for c in stages if not c.passed][0] == "trf_blocks.1.att"


def test_both_twins_refuse_an_unknown_dtype_alike():
    tm, fm = build_pair("gpt", TINY, source="torch")
    with pytest.raises(ValueError) as t_err:
        gpt_torch.cast(tm, "float64")
    with pytest.raises(ValueError) as f_err:
        gpt_flax.cast(fm, "float64")
    assert str(t_err.value) == str(f_err.value) == "dtype must be one of float32, bfloat16, float16, got 'float64'"
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        run_parity(TINY, ParityOptions(dtype="int8"))


def test_a_bf16_model_casts_back_to_float32_and_matches_again():
    tm, fm = _bf16_pair(TINY)
    gpt_torch.cast(tm, "float32")
    gpt_flax.cast(fm, "float32")
    ids = token_batch(TINY, 2, 6, seed=3)
    with float32_matmuls():
        stages = compare_stages(run_torch(tm, ids, activations=True), run_flax(fm, ids, activations=True), FP32_FORWARD)
    assert all(c.passed for c in stages), [c.describe() for c in stages]


def test_gelu_in_bfloat16_is_the_float32_gelu_rounded_once_in_both_twins():
    """Both twins evaluate GELU in float32 for bfloat16 input and round once (as LayerNorm's
    statistics): bit for bit each twin's own float32 GELU of the same values, rounded. Op by op in
    bfloat16, many of these values come out different (docs/design-notes.md)."""
    import jax.numpy as jnp
    import ml_dtypes

    x = (np.linspace(-8, 8, 20_001, dtype=np.float32) + np.float32(1 / 3)).astype(ml_dtypes.bfloat16)
    x32 = x.astype(np.float32)
    f16 = np.asarray(gpt_flax.GELU()(jnp.asarray(x)))
    f32 = np.asarray(gpt_flax.GELU()(jnp.asarray(x32)))
    with torch.no_grad():
        t16 = gpt_torch.GELU()(torch.from_numpy(x32).to(torch.bfloat16)).float().numpy()
        t32 = gpt_torch.GELU()(torch.from_numpy(x32)).numpy()
    assert f16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(f16.astype(np.float32), f32.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(t16, t32.astype(ml_dtypes.bfloat16).astype(np.float32))


# --- the bfloat16 training tier ------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, TINY_BIAS.replace(n_layers=2)], ids=["tiny", "tiny-qkv-bias"])
def test_both_twins_train_in_bfloat16_and_agree_within_the_bf16_training_bounds(cfg):
    """The loss, every gradient and the weights after 10 AdamW steps, both twins in bfloat16. Every
    Flax gradient used to be exactly 0 (the head's bit-level rounding had no derivative), and the
    check trained in float32, so nothing saw it."""
    report = run_training_parity(cfg, batch=2, seq=cfg.context_length - 1, steps=10, seed=1, dtype="bfloat16")
    assert report.passed, reports.training_table(report)
    assert report.to_json()["dtype"] == "bfloat16" and report.bounds is TRAINING_BOUNDS["bfloat16"]
    assert all(c.ref_max > 0 for c in report.grads if not c.name.endswith("W_key.bias"))
    # bfloat16 is what the bounds are for: the same run is far outside float32's gradient bound.
    assert max(c.max_abs / (GRADS.stol * c.ref_max) for c in report.grads) > 10
    assert [w.step for w in report.weights] == [1, 10] and all(w.allowed_outliers > 0 for w in report.weights)


def test_the_flax_twin_has_bfloat16_gradients_and_learns():
    """A bfloat16 model trains in both twins: gradients as float32 arrays, the loss going down."""
    tm, fm = _bf16_pair(TINY.replace(drop_rate=0.0), seed=2)
    ids = token_batch(TINY, 2, TINY.context_length, seed=5)
    x, y = ids[:, :-1], ids[:, 1:]
    t_loss, t_grads = gpt_torch.loss_and_grads(tm, torch.from_numpy(x), torch.from_numpy(y))
    f_loss, f_grads = gpt_flax.loss_and_grads(fm, x, y)
    assert all(g.dtype == np.float32 for g in (*t_grads.values(), *f_grads.values()))
    assert all(np.abs(f_grads[k]).max() > 0 for k in f_grads)
    optimizer = gpt_flax.adamw(fm, lr=1e-2)
    losses = [gpt_flax.train_step(fm, optimizer, x, y) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_a_rounding_without_derivative_is_caught_by_bfloat16_training_alone(twin):
    """The zoo's rounding-without-derivative (the head's bfloat16 rounding through ops whose
    derivative is 0) computes the right forward: the float32 and the bfloat16 forward checks and
    float32 training pass it. bfloat16 training fails it, at the first gradient."""
    plant = zoo.plant("rounding-without-derivative", twin)
    assert run_parity(TINY, ParityOptions(batch=2, seq=9, dtype="bfloat16"), plant=plant).passed
    assert run_training_parity(TINY, batch=2, seq=9, steps=1, plant=plant).passed
    report = run_training_parity(TINY, batch=2, seq=9, steps=1, dtype="bfloat16", plant=plant)
    assert not report.passed
    failed = [c for c in report.grads if not c.passed]
    assert failed and failed[0].name == "grad tok_emb.weight" and failed[0].margin > 10


def test_check_trains_in_the_dtype_it_is_given(tmp_path):
    """`gpt-parity check --dtype bfloat16 --train-steps N` trains in bfloat16 (it trained in
    float32 whatever --dtype said); a training mutant needs that flag pair to show."""
    out = tmp_path / "c.json"
    argv = ["check", "--config", "examples/tiny-odd.json", "--seq", "6", "--dtype", "bfloat16", "--quiet"]
    assert main([*argv, "--train-steps", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["training"]["dtype"] == "bfloat16" and data["training"]["passed"]
    assert main([*argv, "--train-steps", "1", "--plant", "rounding-without-derivative@flax"]) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--config", "examples/tiny-odd.json", "--plant", "rounding-without-derivative@flax"])
    assert exit_.value.code == 2
