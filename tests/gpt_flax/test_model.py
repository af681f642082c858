import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gpt_flax
from parity_tests.compare import assert_close
from parity_tests.configs import TINY, TINY_BIAS
from parity_tests.tolerances import JIT_VS_EAGER


def _ids(cfg, batch=3, seq=7, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq))


def test_shapes_and_the_books_names(tiny_cfg):
    model = gpt_flax.DummyGPTModel(tiny_cfg, rngs=nnx.Rngs(0))
    assert model(_ids(tiny_cfg)).shape == (3, 7, tiny_cfg.vocab_size)
    assert sorted(gpt_flax.state_dict(model)) == ["out_head.weight", "pos_emb.weight", "tok_emb.weight"]
    assert model.out_head.kernel.shape == (tiny_cfg.emb_dim, tiny_cfg.vocab_size)  # (in, out)
    assert [type(m).__name__ for m in model.trf_blocks] == ["DummyTransformerBlock"] * tiny_cfg.n_layers
    with pytest.raises(ValueError, match="final_norm must be one of dummy, layernorm, got 'rms'"):
        gpt_flax.DummyGPTModel(tiny_cfg, final_norm="rms", rngs=nnx.Rngs(0))


JIT_CASES = {
    "dummy": lambda rngs: gpt_flax.DummyGPTModel(TINY, rngs=rngs),
    "dummy-layernorm": lambda rngs: gpt_flax.DummyGPTModel(TINY, final_norm="layernorm", rngs=rngs),
    "gpt-tiny": lambda rngs: gpt_flax.GPTModel(TINY, rngs=rngs),
    "gpt-tiny-bias": lambda rngs: gpt_flax.GPTModel(TINY_BIAS, rngs=rngs),
}


@pytest.mark.parametrize("case", JIT_CASES)
def test_same_numbers_with_and_without_jit(case):
    """The eager forward against jit_forward (every stage, and the logits alone) and a plain nnx.jit."""
    model = JIT_CASES[case](nnx.Rngs(1))
    model.eval()
    ids = _ids(model.cfg, seq=model.cfg.context_length)
    eager = model(ids, return_activations=True)
    assert_close(eager, gpt_flax.jit_forward(model, return_activations=True)(ids), JIT_VS_EAGER, "jit_forward")
    logits = gpt_flax.jit_forward(model)(ids)
    assert_close(eager["out_head"], logits, JIT_VS_EAGER, "jit_forward")
    assert_close(eager["out_head"], nnx.jit(lambda m, x: m(x))(model, ids), JIT_VS_EAGER, "nnx.jit")
    if case == "dummy":  # nothing for XLA to rewrite: gather, add, one matmul
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(eager["out_head"]))


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


def test_round_to_bfloat16_is_the_conversion_pair():
    """The head's bit-level rounding equals float32 -> bfloat16 -> float32 (ties to even) on every
    kind of value: normals over the whole exponent range, ties, subnormals, the overflow edge, signed
    zeros, infinities and NaN. Truncating instead (dropping the 0x7FFF carry) fails on ~half of them."""
    from gpt_flax.model import round_to_bfloat16

    rng = np.random.default_rng(0)
    normals = rng.standard_normal(50_000).astype(np.float32) * np.float32(2.0) ** rng.integers(-126, 127, 50_000)
    bits = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
    ties = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly half-way: rounds to even
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, -1e-40, 1.0, 1.00390625],
        dtype=np.float32,
    )
    x = np.concatenate([normals, bits.view(np.float32), ties.view(np.float32), special])
    want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    got = np.asarray(jax.jit(round_to_bfloat16)(jnp.asarray(x)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


def test_round_to_bfloat16_has_the_derivative_of_the_conversion_pair():
    """Its vector-Jacobian product is the conversion pair's: the cotangent rounded to bfloat16 (what
    torch's bfloat16 `.float()` passes back). Written on the bits alone, its derivative was 0, and
    every gradient behind the bfloat16 head with it."""
    from gpt_flax.model import round_bits_to_bfloat16, round_to_bfloat16

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(4096).astype(np.float32))
    g = jnp.asarray(rng.standard_normal(4096).astype(np.float32))
    _, vjp = jax.vjp(round_to_bfloat16, x)
    _, pair_vjp = jax.vjp(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), x)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(pair_vjp(g)[0]))
    assert np.asarray(jax.grad(lambda v: round_to_bfloat16(v).sum())(x)).min() == 1.0
    assert not np.asarray(jax.grad(lambda v: round_bits_to_bfloat16(v).sum())(x)).any()  # the bits alone: 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_causal_attention_in_blocks_equals_the_whole_product(dtype, monkeypatch):
    """In inference, attention over >= MIN_BLOCKED_TOKENS tokens runs in query blocks that skip the
    keys the mask hides; the logits equal those of the whole masked product (257 tokens, the
    threshold lowered to 128: blocks of 65, the last shorter)."""
    from gpt_flax import model as flax_model

    monkeypatch.setattr(flax_model, "MIN_BLOCKED_TOKENS", 128)
    cfg = TINY.replace(context_length=300, emb_dim=32, n_heads=4)
    model = gpt_flax.GPTModel(cfg, rngs=nnx.Rngs(3))
    gpt_flax.cast(model, dtype)
    model.eval()
    ids = _ids(cfg, seq=257)
    blocked = np.asarray(model(ids))
    monkeypatch.setattr(flax_model, "MIN_BLOCKED_TOKENS", 10**9)
    whole = np.asarray(model(ids))
    tol = 2e-6 if dtype == "float32" else 2.0**-8  # measured: 4.8e-7 of max|logit| ~1 (float32), 0 (bf16)
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=tol * np.abs(whole).max())
    if dtype != "float32":
        return
    # the blocks are taken: with each block's keys cut one short, the logits move
    monkeypatch.setattr(flax_model, "MIN_BLOCKED_TOKENS", 128)
    att = flax_model.MultiHeadAttention
    original = att._attend

    def short(self, queries, keys, values, mask_bool):
        if keys.shape[2] > queries.shape[2]:  # a block after the first
            keys, values, mask_bool = keys[:, :, 1:], values[:, :, 1:], mask_bool[:, 1:]
        return original(self, queries, keys, values, mask_bool)

    monkeypatch.setattr(att, "_attend", short)
    assert np.abs(np.asarray(model(ids)) - whole).max() > 100 * tol * np.abs(whole).max()
