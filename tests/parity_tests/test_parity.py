"""The parity suite: weights copied both ways by the production converters, every forward stage compared.

Runs on every JAX platform present (cpu always; gpu and tpu when jax.devices() has them) and on
CUDA torch when present; cases for an absent backend are not generated. Matmuls pinned to float32.
"""

import jax
import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from gpt_spec.stages import stage_names
from parity_cli import reports
from parity_tests import twins
from parity_tests.configs import GPT_CONFIG_124M, TINY, TINY_BIAS
from parity_tests.forward import ParityOptions, compare_stages, run_parity
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import build_pair, build_torch, float32_matmuls, run_flax, run_torch, token_batch
from tests import helpers

CONFIGS = {"tiny": TINY, "tiny-bias": TINY_BIAS}


def jax_device(platform: str) -> jax.Device:
    try:
        return jax.devices(platform)[0]
    except RuntimeError:
        pytest.skip(f"JAX {jax.__version__} sees no {platform.upper()} device")


def torch_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA device")
    return name


def _check(cfg, tm, fm, batch, seq, *, platform="cpu", torch_dev="cpu", jit=True):
    """Compare every stage; fail naming the first stage past the bound."""
    ids = token_batch(cfg, batch, seq, seed=batch * 100 + seq)
    with float32_matmuls():
        ref = run_torch(tm, ids, torch_dev, activations=True)
        out = run_flax(fm, ids, jax_device(platform), jit=jit, activations=True)
    stages = compare_stages(ref, out, FP32_FORWARD)
    failed = [c.describe() for c in stages if not c.passed]
    assert not failed, "\n".join(failed)
    assert list(ref)[-1] == "out_head" and ref["out_head"].shape == (batch, seq, cfg.vocab_size)
    return stages


SHAPES = [(1, 1), (3, 7), (2, None)]  # None: the full context


@pytest.mark.parametrize("platform", helpers.platforms())
@pytest.mark.parametrize("source", ["torch", "flax"])
@pytest.mark.parametrize("batch, seq", SHAPES)
@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("model", ["gpt", "dummy"])
def test_tiny_configs_eval(model, cfg_name, batch, seq, source, platform):
    jax_device(platform)
    cfg = CONFIGS[cfg_name]
    seq = min(seq or cfg.context_length, cfg.context_length)
    options = {"final_norm": "layernorm"} if model == "dummy" else {}
    tm, fm = build_pair(model, cfg, source=source, **options)
    _check(cfg, tm, fm, batch, seq, platform=platform)


@pytest.mark.parametrize("torch_dev", helpers.torch_devices())
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("model", ["gpt", "dummy"])
def test_train_mode_at_drop_rate_zero(model, jit, torch_dev):
    torch_device(torch_dev)
    cfg = TINY_BIAS.replace(drop_rate=0.0)
    tm, fm = build_pair(model, cfg, source="flax", mode="train")
    assert tm.training and not fm.drop_emb.deterministic
    _check(cfg, tm, fm, 3, cfg.context_length, torch_dev=torch_dev, jit=jit)


def test_a_perturbed_weight_is_located_at_its_block():
    """One weight of block 2 off by 1e-3 in the Flax twin: the stages before it still agree, and
    the report names trf_blocks.2 as the first stage past the bound."""
    cfg = TINY.replace(n_layers=4)
    tm, fm = build_pair("gpt", cfg, source="torch")
    kernel = fm.trf_blocks[2].ff.layers.layers[0].kernel
    kernel[...] = kernel[...].at[5, 11].add(1e-3)
    ids = token_batch(cfg, 2, 9, seed=0)
    with float32_matmuls():
        stages = compare_stages(run_torch(tm, ids, activations=True), run_flax(fm, ids, activations=True), FP32_FORWARD)
    verdicts = {c.name: c.passed for c in stages}
    assert verdicts["drop_emb"] and verdicts["trf_blocks.0"] and verdicts["trf_blocks.1"]
    assert verdicts["trf_blocks.2.att"] and verdicts["trf_blocks.2.norm2"]
    assert next(c.name for c in stages if not c.passed) == "trf_blocks.2.ff"
    assert not verdicts["out_head"]


def test_report_on_a_tiny_config():
    report = run_parity(TINY, ParityOptions(batch=3, seq=7, seed=1))
    labels = {(r.direction, r.candidate) for r in report.rows}
    assert ("torch->flax", "flax/cpu:0") in labels and ("flax->torch", "torch/cpu") in labels
    assert report.passed, reports.parity_table(report)
    assert [c.name for c in report.rows[0].stages] == stage_names(2)
    assert stage_names(2)[:8] == [
        "drop_emb",
        "trf_blocks.0.norm1",
        "trf_blocks.0.att",
        "trf_blocks.0.residual",
        "trf_blocks.0.norm2",
        "trf_blocks.0.ff",
        "trf_blocks.0",
        "trf_blocks.1.norm1",
    ]
    assert "float32" in report.precision
    data = report.to_json()
    assert data["passed"] and all(r["first_failure"] is None for r in data["rows"])
    assert len(data["rows"][0]["stages"]) == 15 and data["rows"][0]["layers"]


def test_the_report_names_the_first_failing_stage(monkeypatch):
    import parity_tests.forward as forward

    real = forward.run_backend

    def perturbed(backend, model, ids):
        out = real(backend, model, ids)
        if backend.framework == "flax":
            out["trf_blocks.1"] = out["trf_blocks.1"] + 1e-3
        return out

    monkeypatch.setattr(forward, "run_backend", perturbed)
    report = run_parity(TINY, ParityOptions(batch=2, seq=5, directions=["torch->flax"]))
    assert not report.passed
    assert report.rows[0].first_failure.name == "trf_blocks.1"
    assert "first failure at trf_blocks.1, bound evidence: trf_blocks.1: FAILED" in report.failures()[0]


@pytest.mark.parametrize("scale", [0.01, 100.0])
@pytest.mark.parametrize("cfg_name", CONFIGS)
def test_every_evidence_passes_whatever_the_scale_of_the_weights(cfg_name, scale):
    """Bounds that scale with the tensor and envelopes derived for each input: no false alarm when
    every weight is 100x smaller or larger (activations, scores and logits with them)."""
    cfg = CONFIGS[cfg_name]
    sd = {k: v * np.float32(scale) for k, v in gpt_torch.state_dict(build_torch("gpt", cfg, seed=2)).items()}
    report = run_parity(cfg, ParityOptions(batch=3, seq=cfg.context_length, seed=2), weights=sd)
    assert report.passed, report.failures()


def test_the_jitted_forward_is_finite_wherever_torch_is():
    """Weights x1e4: attention scores ~1e16. XLA's fusions once recomputed the scaled scores in
    each consumer and contracted one copy into an FMA, so a row's `scores - max` came out ~-1e8
    for its own maximum: every exp was 0 and the row 0/0 = NaN, where torch and eager JAX were finite."""
    cfg = TINY
    sd = {k: v * np.float32(1e4) for k, v in gpt_torch.state_dict(build_torch("gpt", cfg, seed=0)).items()}
    tm, fm = build_pair("gpt", cfg, source="torch")
    gpt_torch.load_state_dict(tm, sd)
    gpt_flax.load_state_dict(fm, sd)
    ids = token_batch(cfg, 2, cfg.context_length, seed=0)
    with float32_matmuls():
        ref = run_torch(tm, ids, activations=True)
        jitted = run_flax(fm, ids, activations=True)
    scores = np.abs(ref["trf_blocks.0.norm1"]).max() * np.abs(sd["trf_blocks.0.att.W_query.weight"]).max()
    assert scores > 1e6  # queries alone; scores are their products
    for name in ref:
        assert np.array_equal(np.isfinite(ref[name]), np.isfinite(jitted[name])), name


def test_train_mode_with_dropout_is_refused():
    with pytest.raises(ValueError, match="train-mode parity needs drop_rate 0, got 0.1"):
        run_parity(TINY, ParityOptions(mode="train"))


def test_each_twin_by_its_name_and_no_other():
    assert twins.package("torch") is gpt_torch and twins.package("flax") is gpt_flax
    for wrong in ("jax", "Torch", "both"):
        with pytest.raises(ValueError, match=f"a twin is torch or flax, got '{wrong}'"):
            twins.package(wrong)


@pytest.mark.slow
def test_gpt2_small_full_context():
    """GPTModel(GPT_CONFIG_124M), torch's init: batch 1 x 1024 tokens, then batch 2 x 4."""
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)
    tm, fm = build_pair("gpt", cfg, source="torch")
    stages = _check(cfg, tm, fm, 1, cfg.context_length)
    assert stages[-1].max_abs > 0  # the twins are not secretly the same code path
    _check(cfg, tm, fm, 2, 4)


@pytest.mark.slow
def test_gpt2_small_passes_every_evidence_with_weights_x100():
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)
    sd = {k: v * np.float32(100) for k, v in gpt_torch.state_dict(build_torch("gpt", cfg, seed=0)).items()}
    report = run_parity(cfg, ParityOptions(batch=1, seq=64, directions=["torch->flax"]), weights=sd)
    assert report.passed, report.failures()


@pytest.mark.slow
def test_gpt2_small_from_flax_init_in_train_mode():
    cfg = GPTConfig.from_dict({**GPT_CONFIG_124M, "drop_rate": 0.0})
    tm, fm = build_pair("gpt", cfg, source="flax", mode="train")
    _check(cfg, tm, fm, 2, 64)
