"""Behaviour both twins must show on their own: causality, dropout, init statistics, sizes, GELU form."""

import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from parity_tests.configs import GPT_CONFIG_124M, TINY, TINY_BIAS


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def _flax_logits(model, ids):
    return np.asarray(model(ids))


TWINS = {
    "torch": (lambda cfg, seed=0: (torch.manual_seed(seed), gpt_torch.GPTModel(cfg))[1], _torch_logits),
    "flax": (lambda cfg, seed=0: gpt_flax.GPTModel(cfg, rngs=nnx.Rngs(seed)), _flax_logits),
}


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("cfg", [TINY, TINY_BIAS], ids=["tiny", "tiny-bias"])
def test_causality(twin, cfg):
    """Changing the token at position t leaves every logit before t bit-identical."""
    build, logits = TWINS[twin]
    model = build(cfg)
    model.eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context_length))
    before = logits(model, ids)
    for t in (cfg.context_length - 1, cfg.context_length // 2, 1):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        after = logits(model, changed)
        np.testing.assert_array_equal(after[:, :t], before[:, :t])
        assert not np.allclose(after[:, t], before[:, t])


def _dropouts(twin, model):
    if isinstance(model, (gpt_torch.DummyGPTModel, gpt_flax.DummyGPTModel)):  # identity blocks
        return {"drop_emb": model.drop_emb}
    if twin == "torch":
        return {
            "drop_emb": model.drop_emb,
            "att.dropout": model.trf_blocks[0].att.dropout,
            "drop_shortcut": model.trf_blocks[0].drop_shortcut,
        }
    block = model.trf_blocks[0]
    return {"drop_emb": model.drop_emb, "att.dropout": block.att.dropout, "drop_shortcut": block.drop_shortcut}


def _apply(twin, module, x):
    return module(torch.from_numpy(x)).numpy() if twin == "torch" else np.asarray(module(x))


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("cls", ["GPTModel", "DummyGPTModel"])
def test_dropout_off_in_eval_and_on_in_train(twin, cls):
    """A new model is in train mode, as torch modules are; every dropout drops at the configured rate
    and scales by 1/(1-p); eval() turns all of them off and train() back on."""
    p = 0.3
    cfg = TINY.replace(drop_rate=p)
    torch.manual_seed(0)
    model = getattr(gpt_torch, cls)(cfg) if twin == "torch" else getattr(gpt_flax, cls)(cfg, rngs=nnx.Rngs(0))
    logits = TWINS[twin][1]
    ids = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 9))
    assert not np.array_equal(logits(model, ids), logits(model, ids))  # no train() called
    if twin == "flax" and cls == "DummyGPTModel":  # the model cheapest to compile shows it:
        forward = gpt_flax.jit_forward(model)
        assert not np.array_equal(forward(ids), forward(ids))  # the jitted path advances its keys too
    ones = np.ones((64, 128), np.float32)
    n = ones.size
    for name, module in _dropouts(twin, model).items():
        out = _apply(twin, module, ones)
        zeroed = float(np.mean(out == 0))
        assert abs(zeroed - p) < 5 * math.sqrt(p * (1 - p) / n), f"{name}: {zeroed:.4f} zeroed"
        np.testing.assert_allclose(out[out != 0], 1 / (1 - p), rtol=1e-6, err_msg=name)
    model.eval()
    np.testing.assert_array_equal(logits(model, ids), logits(model, ids))
    for name, module in _dropouts(twin, model).items():
        np.testing.assert_array_equal(_apply(twin, module, ones), ones, err_msg=name)
    model.train()
    assert not np.array_equal(logits(model, ids), logits(model, ids))


def _expected_init(name: str, sd: dict) -> tuple[str, float, float]:
    """(kind, mean, std) of the book's torch init for a parameter."""
    if name.endswith("scale"):
        return "constant", 1.0, 0.0
    if name.endswith("shift"):
        return "constant", 0.0, 0.0
    if name.endswith("emb.weight"):
        return "normal", 0.0, 1.0
    # nn.Linear: weight and bias both U(+-1/sqrt(in_features)); std = bound / sqrt(3).
    fan_in = sd[name.rsplit(".", 1)[0] + ".weight"].shape[1]
    return "uniform", 0.0, 1 / math.sqrt(3 * fan_in)


def test_init_statistics_match_the_torch_defaults_in_both_twins():
    """Per parameter, both twins against the book's torch init and against each other: mean within
    5 standard errors, std within 5 standard errors of the std (a few percent for these sizes), and
    the largest |value| within 15% of torch's (a distribution of the right std but another shape,
    such as a truncated normal, fails there)."""
    cfg = GPTConfig(
        vocab_size=1031, context_length=64, emb_dim=192, n_heads=3, n_layers=2, drop_rate=0.0, qkv_bias=True
    )
    t_sd = gpt_torch.state_dict(TWINS["torch"][0](cfg))
    f_sd = gpt_flax.state_dict(TWINS["flax"][0](cfg))
    assert t_sd.keys() == f_sd.keys()
    for name, t in t_sd.items():
        f = f_sd[name]
        assert f.shape == t.shape and f.dtype == t.dtype == np.float32, name
        kind, mean, std = _expected_init(name, t_sd)
        if kind == "constant":
            np.testing.assert_array_equal(f, np.full(f.shape, mean, np.float32), err_msg=name)
            np.testing.assert_array_equal(t, f, err_msg=name)
            continue
        if kind == "uniform":
            bound = std * math.sqrt(3)
            assert np.abs(f).max() <= bound and np.abs(t).max() <= bound, name
        n = t.size
        for label, x in (("torch", t), ("flax", f)):
            assert abs(x.mean() - mean) < 5 * std / math.sqrt(n), f"{label} {name} mean {x.mean()}"
            # std of the sample std: std * sqrt(1/(2n)) (normal); uniform's is smaller.
            assert abs(x.std() / std - 1) < 5 / math.sqrt(2 * n), f"{label} {name} std {x.std()}"
        assert abs(np.abs(f).max() / np.abs(t).max() - 1) < 0.15, f"{name} max |x|"


def test_124m_has_163_009_536_parameters_in_both_twins():
    """The book's count for GPTModel(GPT_CONFIG_124M), counted without allocating the weights."""
    with torch.device("meta"):
        tm = gpt_torch.GPTModel(GPT_CONFIG_124M)
    abstract = nnx.eval_shape(lambda: gpt_flax.GPTModel(GPT_CONFIG_124M, rngs=nnx.Rngs(0)))
    t_count = sum(p.numel() for p in tm.parameters())
    f_count = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert t_count == f_count == 163_009_536
    assert sum(p.numel() for n, p in tm.named_parameters() if not n.startswith("out_head")) == 124_412_160
    assert not any(name.endswith("mask") for name in tm.state_dict())  # a buffer, not a parameter


def test_gelu_is_the_tanh_approximation_in_both_twins():
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    t = gpt_torch.GELU()(torch.from_numpy(x)).numpy()
    f = np.asarray(gpt_flax.GELU()(x))
    np.testing.assert_allclose(t, torch.nn.GELU(approximate="tanh")(torch.from_numpy(x)).numpy(), atol=2e-6)
    np.testing.assert_allclose(f, np.asarray(jax.nn.gelu(x, approximate=True)), atol=2e-6)
    exact = torch.nn.GELU()(torch.from_numpy(x)).numpy()  # torch's default: the erf form
    assert np.abs(t - exact).max() > 1e-4 and np.abs(f - exact).max() > 1e-4


@pytest.mark.parametrize("twin", TWINS)
def test_qkv_bias_follows_the_config(twin):
    for cfg, has_bias in ((TINY, False), (TINY_BIAS, True)):
        model = TWINS[twin][0](cfg)
        sd = gpt_torch.state_dict(model) if twin == "torch" else gpt_flax.state_dict(model)
        for proj in ("W_query", "W_key", "W_value"):
            assert (f"trf_blocks.0.att.{proj}.bias" in sd) == has_bias
        assert "trf_blocks.0.att.out_proj.bias" in sd


def test_attention_heads_must_divide_the_width():
    with pytest.raises(ValueError, match=r"d_out \(10\) must be divisible by num_heads \(3\)"):
        gpt_torch.MultiHeadAttention(10, 10, 4, 0.0, 3)
    with pytest.raises(ValueError, match=r"d_out \(10\) must be divisible by num_heads \(3\)"):
        gpt_flax.MultiHeadAttention(10, 10, 4, 0.0, 3, rngs=nnx.Rngs(0))
