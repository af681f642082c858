"""The derived envelopes (parity_tests/envelopes.py) and the bias test (compare.bias_check) on their
own: each twin's layer lies within half its envelope of the exact float64 result (so the twins
within all of it of each other), on natural inputs and on every trap; and each fails on the bug
it is there for."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from parity_tests import envelopes, layers, zoo, zoo_flax, zoo_torch
from parity_tests.compare import bias_check, compare
from parity_tests.tolerances import BIAS_FLOOR_ULPS
from parity_tests.twins import build_pair, float32_matmuls

EMB = 96
RNG = np.random.default_rng(0)


def _torch_call(module, x):
    with torch.no_grad(), float32_matmuls():
        return module(torch.from_numpy(np.array(x))).numpy().astype(np.float64)


def _flax_calls(module, x):
    """The Flax layer op by op and jitted."""
    with float32_matmuls():
        eager = np.asarray(module(jnp.asarray(x)), np.float64)
        jitted = np.asarray(nnx.jit(lambda m, v: m(v))(module, jnp.asarray(x)), np.float64)
    return eager, jitted


def _within_half(name, outputs, exact, limit):
    for who, out in outputs.items():
        diff = np.abs(out - exact)
        with np.errstate(invalid="ignore", divide="ignore"):
            excess = np.where(diff == 0, 0.0, diff / (limit / 2.0))
        assert np.nanmax(excess) <= 1.0, f"{name}, {who}: {np.nanmax(excess):.3g}x half the envelope"


def _layernorms():
    tm = gpt_torch.LayerNorm(EMB)
    with torch.no_grad():
        tm.scale.copy_(torch.from_numpy(RNG.uniform(0.5, 1.5, EMB).astype(np.float32)))
        tm.shift.copy_(torch.from_numpy(RNG.normal(0, 0.3, EMB).astype(np.float32)))
    fm = gpt_flax.LayerNorm(EMB)
    fm.scale[...], fm.shift[...] = tm.scale.detach().numpy(), tm.shift.detach().numpy()
    return tm, fm, tm.scale.detach().numpy(), tm.shift.detach().numpy()


LN_INPUTS = {
    "natural": (RNG.standard_normal((64, EMB)) * 1.4 + 0.1).astype(np.float32),
    "tiny variance": layers.tiny_variance_rows(EMB, RNG),
    "large mean": layers.large_mean_rows(EMB, RNG),
    "constant": layers.constant_rows(EMB),
}


@pytest.mark.parametrize("inputs", LN_INPUTS)
def test_each_twins_layernorm_is_within_half_its_envelope_of_exact(inputs):
    x = LN_INPUTS[inputs]
    tm, fm, scale, shift = _layernorms()
    eager, jitted = _flax_calls(fm, x)
    _within_half(
        f"LayerNorm, {inputs}",
        {"torch": _torch_call(tm, x), "flax": eager, "flax jit": jitted},
        envelopes.layernorm_exact(x, scale, shift),
        envelopes.layernorm(x, scale, shift),
    )


def test_large_mean_rows_are_summed_exactly_and_random_rows_are_not():
    assert envelopes.exactly_summable(layers.large_mean_rows(768, RNG)).all()
    assert envelopes.exactly_summable(layers.constant_rows(768)).all()
    assert not envelopes.exactly_summable(RNG.standard_normal((4, 768)).astype(np.float32)).any()
    # Multiples of q = 1/2: exact while the sum of magnitudes stays below 2^24 * q = 2^23.
    assert envelopes.exactly_summable(np.full((1, 4), 2.0**20 + 0.5, np.float32))[0]
    assert not envelopes.exactly_summable(np.full((1, 4), 2.0**22 + 0.5, np.float32))[0]  # 3 of them round
    assert not envelopes.exactly_summable(np.array([[1.0, np.nan]], np.float32))[0]


@pytest.mark.parametrize(
    "variant, inputs", [("moments", "large mean"), ("unbiased", "natural"), ("eps", "tiny variance")]
)
def test_a_wrong_layernorm_leaves_the_envelope(variant, inputs):
    x = LN_INPUTS[inputs]
    tm, fm, scale, shift = _layernorms()
    knobs = {
        "moments": (("bug_variance", "moments"),),
        "unbiased": (("bug_variance", "unbiased"),),
        "eps": (("bug_eps", 1e-6),),
    }[variant]
    object.__setattr__(fm, "__class__", zoo._mutant_class(zoo_flax.LayerNorm, gpt_flax.LayerNorm, knobs))
    c = compare(
        "ln",
        _torch_call(tm, x),
        _flax_calls(fm, x)[0],
        layers.Envelope("LayerNorm"),
        limit=envelopes.layernorm(x, scale, shift),
    )
    assert not c.passed and c.margin > 5, c.describe()


def test_each_twins_gelu_is_within_half_its_envelope_over_a_dense_sweep():
    x = np.linspace(-12, 12, 200_001, dtype=np.float32)
    eager, jitted = _flax_calls(gpt_flax.GELU(), x)
    _within_half(
        "GELU",
        {"torch": _torch_call(gpt_torch.GELU(), x), "flax": eager, "flax jit": jitted},
        envelopes.gelu_exact(x),
        envelopes.gelu(x),
    )


def test_the_envelope_of_a_one_hot_matmul_is_an_ulp_or_two_and_tf32_is_thousands():
    w = (RNG.standard_normal((40, EMB)) * 0.05).astype(np.float32)
    b = (RNG.standard_normal(40) * 0.05).astype(np.float32)
    x = layers.one_hot_rows(EMB, RNG)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    limit = envelopes.linear(x, w, b)
    size = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64) + np.abs(b)
    assert np.allclose(limit, 2 * envelopes.gamma(2) * size, rtol=1e-5)  # one product, one add, two twins
    lin = torch.nn.Linear(EMB, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w)), lin.bias.copy_(torch.from_numpy(b))
    _within_half("Linear one-hot", {"torch": _torch_call(lin, x)}, exact, limit)
    object.__setattr__(
        lin, "__class__", zoo._mutant_class(zoo_torch.Linear, torch.nn.Linear, (("bug_operand_bits", zoo.TF32),))
    )
    assert compare("tf32", exact, _torch_call(lin, x), layers.Envelope("Linear"), limit=limit).margin > 500


def test_tf32_and_bfloat16_rounding_is_bit_identical_in_both_twins():
    x = np.concatenate(
        [
            RNG.standard_normal(10_000) * 10.0 ** RNG.integers(-6, 6, 10_000),
            [1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-8), 0.0, -0.0],
        ]
    ).astype(np.float32)
    for bits in (zoo.TF32, zoo.BF16):
        t = zoo_torch.round_mantissa(torch.from_numpy(x), bits).numpy()
        f = np.asarray(zoo_flax.round_mantissa(jnp.asarray(x), bits))
        assert np.array_equal(t.view(np.int32), f.view(np.int32)), bits
        kept = t.view(np.int32) & ((1 << (23 - bits)) - 1)
        assert not kept.any()  # nothing left below the kept mantissa bits
    assert zoo_torch.round_mantissa(torch.tensor([1 + 2.0**-11]), zoo.TF32).item() == 1.0  # a tie: to even


def _exact_feedforward(x, w1, b1, w2, b2):
    h = x.astype(np.float64) @ w1.T.astype(np.float64) + b1
    return envelopes.gelu_exact(h) @ w2.T.astype(np.float64) + b2


def _exact_attention(x, sd, n_heads):
    x = x.astype(np.float64)
    b, t, e = x.shape
    hd = e // n_heads

    def proj(name):
        y = x @ sd[f"{name}.weight"].T.astype(np.float64) + sd.get(f"{name}.bias", 0.0)
        return y.reshape(b, t, n_heads, hd).transpose(0, 2, 1, 3)

    q, k, v = proj("W_query"), proj("W_key"), proj("W_value")
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    s = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ctx = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, e)
    return ctx @ sd["out_proj.weight"].T.astype(np.float64) + sd["out_proj.bias"]


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_each_twins_attention_and_feedforward_are_within_half_their_envelopes(qkv_bias):
    cfg = GPTConfig(
        vocab_size=7, context_length=33, emb_dim=EMB, n_heads=4, n_layers=1, drop_rate=0.0, qkv_bias=qkv_bias
    )
    t_model, f_model = build_pair("gpt", cfg, source="torch", seed=1)
    tm, fm = t_model.trf_blocks[0], f_model.trf_blocks[0]
    sd = {k.removeprefix("trf_blocks.0."): v for k, v in gpt_torch.state_dict(t_model).items()}
    att_sd = {k.removeprefix("att."): v for k, v in sd.items() if k.startswith("att.")}
    x = RNG.standard_normal((2, 33, EMB)).astype(np.float32)
    for scale in (1.0, 16.0):  # natural scores, and peaked ones
        xs = x * np.float32(scale)
        eager, jitted = _flax_calls(fm.att, xs)
        limit = envelopes.attention(
            xs,
            *[
                att_sd.get(f"{n}.{leaf}")
                for n in ("W_query", "W_key", "W_value", "out_proj")
                for leaf in ("weight", "bias")
            ],
            n_heads=4,
        )
        _within_half(
            f"attention x{scale}",
            {"torch": _torch_call(tm.att, xs), "flax": eager, "flax jit": jitted},
            _exact_attention(xs, att_sd, 4),
            limit,
        )
    ff = [sd[f"ff.layers.{j}.{leaf}"] for j in (0, 2) for leaf in ("weight", "bias")]
    eager, jitted = _flax_calls(fm.ff, x)
    _within_half(
        "feedforward",
        {"torch": _torch_call(tm.ff, x), "flax": eager, "flax jit": jitted},
        _exact_feedforward(x, *ff),
        envelopes.feedforward(x, *ff),
    )


def test_the_bias_check_passes_noise_and_fails_a_bias_of_a_few_ulps():
    ref = RNG.standard_normal((256, 768)).astype(np.float64)
    noise = RNG.standard_normal(ref.shape) * 2e-7 * np.abs(ref)  # ~2 ulps, no sign preferred
    assert bias_check("noise", ref, ref + noise).passed
    scaled = bias_check("scaled", ref, ref * (1 + 3 * 2.0**-23) + noise)
    assert not scaled.passed and 2.5 < scaled.scale_ulps < 3.5 and scaled.scale_z > 8, scaled.describe()
    shifted = bias_check("shifted", ref, ref + 3 * 2.0**-23 * np.abs(ref).mean() + noise)
    assert not shifted.passed and 2.5 < shifted.offset_ulps < 3.5
    # A bias far below an ulp, measured very precisely (what a rounded 1/K leaves), is no failure.
    tiny = bias_check("tiny", ref, ref * (1 + 0.1 * 2.0**-23))
    assert tiny.scale_z > 1e6 and abs(tiny.scale_ulps) < BIAS_FLOOR_ULPS and tiny.passed
    assert bias_check("one row", ref[:1], ref[:1] * 2).passed  # no standard error from one row
    few = bias_check("few", ref[:15], ref[:15] * (1 + 3 * 2.0**-23))
    assert few.passed and not few.tested and "fewer than 16" in few.describe()
    twice = np.concatenate([ref[:8]] * 4)  # 32 rows, 8 distinct: still too few
    assert bias_check("repeated", twice, twice * (1 + 3 * 2.0**-23)).rows == 8


def test_the_bias_check_finds_layernorm_eps_where_every_element_is_within_the_envelope():
    """The trap's other side: on natural input eps 1e-6 moves each output by ~20 ulps, far
    inside the envelope, but always the same way."""
    x = (RNG.standard_normal((256, 768)) * 1.4).astype(np.float32)
    scale, shift = np.ones(768, np.float32), np.zeros(768, np.float32)
    tm = gpt_torch.LayerNorm(768)
    fm = gpt_flax.LayerNorm(768)
    object.__setattr__(fm, "__class__", zoo._mutant_class(zoo_flax.LayerNorm, gpt_flax.LayerNorm, (("bug_eps", 1e-6),)))
    ref, out = _torch_call(tm, x), _flax_calls(fm, x)[0]
    assert compare("ln", ref, out, layers.Envelope("LayerNorm"), limit=envelopes.layernorm(x, scale, shift)).passed
    found = bias_check("ln", ref, out)
    assert not found.passed and found.scale_ulps > 5, found.describe()
