import jax
import numpy as np
import pytest
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from parity_tests.compare import assert_close
from parity_tests.tolerances import JIT_VS_EAGER


def _ids(cfg, batch=3, seq=7, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq))


def test_shapes_and_the_books_names(tiny_cfg):
    model = gpt_flax.DummyGPTModel(tiny_cfg, rngs=nnx.Rngs(0))
    assert model(_ids(tiny_cfg)).shape == (3, 7, tiny_cfg.vocab_size)
    assert sorted(gpt_flax.state_dict(model)) == ["out_head.weight", "pos_emb.weight", "tok_emb.weight"]
    assert model.out_head.kernel.shape == (tiny_cfg.emb_dim, tiny_cfg.vocab_size)  # (in, out)
    assert [type(m).__name__ for m in model.trf_blocks.layers] == ["DummyTransformerBlock"] * tiny_cfg.n_layers
    with pytest.raises(ValueError, match="final_norm must be one of dummy, layernorm, got 'rms'"):
        gpt_flax.DummyGPTModel(tiny_cfg, final_norm="rms", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("final_norm", ["dummy", "layernorm"])
def test_same_numbers_with_and_without_jit(tiny_cfg, final_norm):
    model = gpt_flax.DummyGPTModel(tiny_cfg, final_norm=final_norm, rngs=nnx.Rngs(1))
    model.eval()
    ids = _ids(tiny_cfg)
    eager = model(ids)
    assert_close(eager, nnx.jit(lambda m, x: m(x))(model, ids), JIT_VS_EAGER, "nnx.jit")
    assert_close(eager, gpt_flax.jit_forward(model)(ids), JIT_VS_EAGER, "jit_forward")
    if final_norm == "dummy":  # nothing for XLA to rewrite: gather, add, one matmul
        np.testing.assert_array_equal(np.asarray(gpt_flax.jit_forward(model)(ids)), np.asarray(eager))


def test_dropout_follows_train_and_eval(tiny_cfg):
    model = gpt_flax.DummyGPTModel(tiny_cfg, rngs=nnx.Rngs(0))
    ids = _ids(tiny_cfg)
    assert not np.array_equal(model(ids), model(ids))  # like torch, a new model is in train mode
    forward = gpt_flax.jit_forward(model)
    assert not np.array_equal(forward(ids), forward(ids))  # the jitted path advances its keys too
    model.eval()
    assert np.array_equal(model(ids), model(ids))


def test_layernorm_is_the_books_form():
    x = jax.random.normal(jax.random.key(0), (4, 5, 24)) * 3 + 1
    ln = gpt_flax.LayerNorm(24)
    ln.scale[...] = jax.random.uniform(jax.random.key(1), (24,), minval=0.5, maxval=1.5)
    mean = x.mean(-1, keepdims=True)
    ref = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * ln.scale[...]
    np.testing.assert_allclose(ln(x), ref, rtol=0, atol=2e-6)
    # nnx.LayerNorm's defaults (eps 1e-6) are not the book's: the difference is visible.
    flax_ln = nnx.LayerNorm(24, rngs=nnx.Rngs(0))
    flax_ln.scale[...] = ln.scale[...]
    x_small = x * 1e-3
    assert np.abs(np.asarray(flax_ln(x_small)) - np.asarray(ln(x_small))).max() > 1e-3


def test_init_statistics_match_torch_per_parameter():
    """A fresh Flax model is statistically the torch model: N(0,1) embeddings, U(+-1/sqrt(in)) head."""
    cfg = GPTConfig(vocab_size=4001, context_length=256, emb_dim=192, n_heads=3, n_layers=1,
                    drop_rate=0.0, qkv_bias=False)
    flax_sd = gpt_flax.state_dict(gpt_flax.DummyGPTModel(cfg, rngs=nnx.Rngs(0)))
    torch_sd = gpt_torch.state_dict(gpt_torch.DummyGPTModel(cfg))
    assert flax_sd.keys() == torch_sd.keys()
    for name in torch_sd:
        f, t = flax_sd[name], torch_sd[name]
        assert f.shape == t.shape and f.dtype == t.dtype, name
        assert abs(f.std() / t.std() - 1) < 0.03, name
        assert abs(f.mean() - t.mean()) < 0.03 * t.std(), name
        assert abs(np.abs(f).max() / np.abs(t).max() - 1) < 0.15, name
    bound = 1 / np.sqrt(cfg.emb_dim)
    assert np.abs(flax_sd["out_head.weight"]).max() <= bound
    assert abs(flax_sd["out_head.weight"].std() - bound / np.sqrt(3)) < 0.01 * bound
