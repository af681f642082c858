"""The parity suite: weights copied both ways by the production converters, logits compared per backend.

Runs on every JAX platform present (cpu always; gpu and tpu when jax.devices() has them) and on
CUDA torch when present; an absent backend is skipped with the reason. Matmuls pinned to float32.
"""

import jax
import pytest
import torch

import gpt_flax
import gpt_torch
from conftest import GPT_CONFIG_124M, TINY, TINY_BIAS
from gpt_spec import GPTConfig

from .compare import compare
from .harness import build_flax, build_torch, float32_matmuls, run_flax, run_parity, run_torch, set_mode, token_batch
from .tolerances import FP32_DUMMY_LOGITS

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


def _pair(cfg, source, mode, final_norm="dummy", seed=0):
    """(torch model, flax model) holding the same weights, the source twin's own init."""
    tm = build_torch("dummy", cfg, seed=seed, final_norm=final_norm)
    fm = build_flax("dummy", cfg, seed=seed, final_norm=final_norm)
    if source == "torch":
        gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    else:
        gpt_torch.load_state_dict(tm, gpt_flax.state_dict(fm))
    set_mode(tm, mode)
    set_mode(fm, mode)
    return tm, fm


def _check(cfg, tm, fm, batch, seq, *, platform="cpu", torch_dev="cpu", jit=True):
    ids = token_batch(cfg, batch, seq, seed=batch * 100 + seq)
    with float32_matmuls():
        ref = run_torch(tm, ids, torch_dev)
        out = run_flax(fm, ids, jax_device(platform), jit=jit)
    result = compare("logits", ref, out, FP32_DUMMY_LOGITS)
    assert result.passed, result.describe()
    return result


SHAPES = [(1, 1), (3, 7), (2, None)]  # None: the full context


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("source", ["torch", "flax"])
@pytest.mark.parametrize("batch, seq", SHAPES)
@pytest.mark.parametrize("cfg_name", CONFIGS)
def test_tiny_configs_eval(cfg_name, batch, seq, source, platform):
    cfg = CONFIGS[cfg_name]
    seq = min(seq or cfg.context_length, cfg.context_length)
    tm, fm = _pair(cfg, source, "eval", final_norm="layernorm")
    _check(cfg, tm, fm, batch, seq, platform=platform)


@pytest.mark.parametrize("torch_dev", ["cpu", "cuda"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("final_norm", ["dummy", "layernorm"])
def test_train_mode_at_drop_rate_zero(final_norm, jit, torch_dev):
    cfg = TINY.replace(drop_rate=0.0)
    tm, fm = _pair(cfg, "flax", "train", final_norm=final_norm)
    assert tm.training and not fm.drop_emb.deterministic
    _check(cfg, tm, fm, 3, cfg.context_length, torch_dev=torch_device(torch_dev), jit=jit)


def test_a_perturbed_weight_is_caught(tiny_cfg):
    """The suite can fail: one head weight off by 1e-3 in the Flax twin breaks the bound."""
    tm, fm = _pair(tiny_cfg, "torch", "eval")
    fm.out_head.kernel[...] = fm.out_head.kernel[...].at[5, 11].add(1e-3)
    ids = token_batch(tiny_cfg, 2, 7, seed=0)
    with float32_matmuls():
        result = compare("logits", run_torch(tm, ids), run_flax(fm, ids), FP32_DUMMY_LOGITS)
    assert not result.passed and result.worst_index[-1] == 11


def test_harness_report_on_a_tiny_config():
    report = run_parity(TINY, batch=3, seq=7, seed=1)
    labels = {(r.direction, r.candidate) for r in report.rows}
    assert ("torch->flax", "flax/cpu:0") in labels and ("flax->torch", "torch/cpu") in labels
    assert report.passed, report.format_table()
    assert "float32" in report.precision
    data = report.to_json()
    assert data["passed"] and {r["candidate"] for r in data["rows"]} >= {"flax/cpu:0", "torch/cpu"}


def test_harness_refuses_train_mode_with_dropout():
    with pytest.raises(ValueError, match="train-mode parity needs drop_rate 0, got 0.1"):
        run_parity(TINY, mode="train")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["torch", "flax"])
def test_gpt2_small_full_context(source):
    """GPT_CONFIG_124M at batch 1 x 1024 tokens and batch 2 x 4, both directions."""
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)
    tm, fm = _pair(cfg, source, "eval")
    result = _check(cfg, tm, fm, 1, cfg.context_length)
    assert result.max_abs > 0  # the twins are not secretly the same code path
    _check(cfg, tm, fm, 2, 4)


@pytest.mark.slow
def test_gpt2_small_train_mode_at_drop_rate_zero():
    cfg = GPTConfig.from_dict({**GPT_CONFIG_124M, "drop_rate": 0.0})
    tm, fm = _pair(cfg, "torch", "train", final_norm="layernorm")
    _check(cfg, tm, fm, 2, 64)
