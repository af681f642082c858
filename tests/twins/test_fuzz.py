"""Fuzzing the public API of both twins: forward, calc_loss_batch, train_step with adamw,
generate_text_simple, generate_text_simple_cached and GPTConfig, on random integer dtypes, shapes
(empty, 1-D, 3-D), id values (negative, past the vocabulary, past 2**63), sizes and optimizer
arguments (NaN, inf, negative, None, bools, strings, huge).

What must hold on every input: both twins have the same outcome (the same ValueError message, or
both succeed with the same token ids, or losses and logits within float32 noise); ValueError is
the only refusal; no generated id wraps (every one in [0, vocab_size)); no NaN or inf comes out of
finite inputs and finite arguments.

Examples per test: the `fuzz-quick` profile below by default, so the file runs in well under a
minute; for a long hunt set `GPT_FUZZ_PROFILE=hunt` (or the suite-wide
`HYPOTHESIS_PROFILE=thorough`). Shapes, configs and valid optimizer settings come from small fixed
sets: each new one is a compilation in the Flax twin, and the point is the inputs, not the compiler.
"""

import functools
import math
import os
from unittest import mock

import numpy as np
import torch
from flax import nnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from parity_tests.twins import float32_matmuls

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("fuzz-quick", max_examples=25, deadline=None, suppress_health_check=_HEALTH)
settings.register_profile("fuzz-hunt", max_examples=1000, deadline=None, suppress_health_check=_HEALTH)
PROFILE = os.environ.get("GPT_FUZZ_PROFILE") or (
    "hunt" if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else "quick"
)
FUZZ = settings.get_profile(f"fuzz-{PROFILE}")

# Three models, each cheap to compile: a real GPTModel, and two DummyGPTModels whose vocabularies
# outgrow the small integer dtypes (300: int8/uint8; 70000: int16/uint16).
CONFIGS = {
    "gpt-97": (
        "GPTModel",
        GPTConfig(vocab_size=97, context_length=7, emb_dim=6, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=True),
        {},
    ),
    "dummy-300": (
        "DummyGPTModel",
        GPTConfig(vocab_size=300, context_length=6, emb_dim=4, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=False),
        {"final_norm": "layernorm"},
    ),
    "dummy-70000": (
        "DummyGPTModel",
        GPTConfig(vocab_size=70000, context_length=5, emb_dim=2, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=False),
        {},
    ),
}
_PAIRS: dict = {}


def _pair(name: str):
    """The twins of CONFIGS[name] with the same weights, as built once (each call resets them)."""
    model, cfg, options = CONFIGS[name]
    if name not in _PAIRS:
        torch.manual_seed(0)
        tm = getattr(gpt_torch, model)(cfg, **options)
        fm = getattr(gpt_flax, model)(cfg, **options, rngs=nnx.Rngs(0))
        _PAIRS[name] = (tm, fm, gpt_torch.state_dict(tm))
    tm, fm, sd = _PAIRS[name]
    gpt_torch.load_state_dict(tm, sd)
    gpt_flax.load_state_dict(fm, sd)
    return cfg, tm, fm


INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


def _mostly(draw, good, bad, p_bad: float = 0.25):
    """A draw from `good`, or with probability about `p_bad` from `bad` (hypothesis leans to small
    integers, so the small ones pick `good`)."""
    return draw(bad if draw(st.integers(0, 99)) >= 100 - round(100 * p_bad) else good)


@st.composite
def token_ids(draw, cfg: GPTConfig, shape=None):
    """Ids of any dtype (mostly integer), of a shape from a small set, mostly in range."""
    dtype = np.dtype(_mostly(draw, st.sampled_from(INT_DTYPES), st.sampled_from(["float32", "bool"]), 0.1))
    if shape is None:
        shape = _mostly(
            draw,
            st.sampled_from([(2, 3), (1, cfg.context_length), (1, 1)]),
            st.sampled_from([(0, 3), (2, 0), (3,), (1, 2, 2), (1, cfg.context_length + 1)]),
        )
    if dtype.kind not in "iu":
        return draw(arrays(dtype, shape))
    info = np.iinfo(dtype)
    valid = st.integers(0, min(cfg.vocab_size - 1, int(info.max)))
    bad = [st.integers(int(info.min), -1)] if info.min < 0 else []
    if cfg.vocab_size <= info.max:
        bad.append(st.integers(cfg.vocab_size, int(info.max)))
    elements = _mostly(draw, st.just(valid), st.just(st.one_of(valid, *bad)), 0.25 if bad else 0.0)
    return draw(arrays(dtype, shape, elements=elements))


def _outcome(call):
    """("ok", value) or ("refused", message); anything but ValueError fails the test."""
    try:
        return "ok", call()
    except ValueError as e:
        return "refused", str(e)


def _same_outcome(call_torch, call_flax):
    t, f = _outcome(call_torch), _outcome(call_flax)
    assert t[0] == f[0], f"torch: {t}\nflax: {f}"
    if t[0] == "refused":
        assert t[1] == f[1]
    return t, f


def _finite(x) -> bool:
    return bool(np.all(np.isfinite(np.asarray(x))))


# Optimizer settings: a few valid ones (each a compilation of the Flax train step), and any of
# them with one argument made bad.
VALID_ADAMW = [
    {},
    {"lr": 0.0, "weight_decay": 0.0},
    {"lr": 1.0, "betas": (0.0, 0.5), "eps": 1.0},
    {"lr": np.float32(1e-3), "weight_decay": np.float64(0.5), "betas": [0.9, np.float32(0.99)]},
    {"lr": 1e30, "weight_decay": 1e-30},
]
ANY_VALUE = st.one_of(
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            -1.0,
            -0.0,
            0.0,
            1.0,
            1e300,
            5e-324,
            None,
            True,
            False,
            "0.1",
            np.float32(math.nan),
            np.int64(3),
            2**70,
            10**400,
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
)
ANY_BETAS = st.one_of(st.tuples(ANY_VALUE, ANY_VALUE), st.sampled_from([0.9, (0.9,), (0.9, 0.99, 0.999), "ab", None]))


@st.composite
def adamw_args(draw) -> dict:
    args = dict(draw(st.sampled_from(VALID_ADAMW)))
    if draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(["lr", "weight_decay", "betas", "eps"]))
        args[key] = draw(ANY_BETAS if key == "betas" else ANY_VALUE)
    return args


def _torch(ids):
    return torch.from_numpy(np.ascontiguousarray(ids))


@FUZZ
@given(st.data())
def test_forward_loss_and_train_step_agree_or_refuse_alike(data):
    name = data.draw(st.sampled_from(list(CONFIGS)), label="config")
    cfg, tm, fm = _pair(name)
    x = data.draw(token_ids(cfg), label="inputs")
    same_shape = data.draw(st.integers(0, 4), label="targets of another shape") > 0
    y = data.draw(token_ids(cfg, shape=x.shape if same_shape else None), label="targets")
    entry = data.draw(st.sampled_from(["forward", "calc_loss_batch", "train_step"]), label="entry")
    with float32_matmuls():
        if entry == "forward":
            t, f = _same_outcome(lambda: tm(_torch(x)).detach().numpy(), lambda: np.asarray(fm(x)))
        elif entry == "calc_loss_batch":
            t, f = _same_outcome(
                lambda: gpt_torch.calc_loss_batch(_torch(x), _torch(y), tm).item(),
                lambda: float(gpt_flax.calc_loss_batch(x, y, fm)),
            )
        else:
            args = data.draw(adamw_args(), label="adamw")
            t, f = _same_outcome(
                lambda: gpt_torch.train_step(tm, gpt_torch.adamw(tm, **args), _torch(x), _torch(y)),
                lambda: gpt_flax.train_step(fm, gpt_flax.adamw(fm, **args), x, y),
            )
    event(f"{entry}: {t[0]} {t[1] if t[0] == 'refused' else ''}")
    if t[0] == "ok":
        assert _finite(t[1]) and _finite(f[1]), (t[1], f[1])  # finite weights and ids in: finite out
        np.testing.assert_allclose(f[1], t[1], rtol=1e-4, atol=1e-4)


GOOD_SIZES = st.sampled_from([0, 1, 3, 9, 40, np.int64(2)])
BAD_SIZES = st.sampled_from([-1, 2.0, None, True, "3", 10**12, 2**31])


@FUZZ
@given(st.data())
def test_generation_agrees_or_refuses_alike_and_never_wraps(data):
    name = data.draw(st.sampled_from(list(CONFIGS)), label="config")
    cfg, tm, fm = _pair(name)
    prompt = data.draw(token_ids(cfg), label="prompt")
    max_new_tokens = _mostly(data.draw, GOOD_SIZES, BAD_SIZES, 0.2)
    cached = data.draw(st.booleans(), label="cached")
    if cached:
        context_size = _mostly(
            data.draw,
            st.sampled_from([None, 3, cfg.context_length, 2**40]),
            st.sampled_from([1, 0, 1.5, -1, False]),
            0.2,
        )
        use_cache = data.draw(st.booleans(), label="use_cache")
        call_t = functools.partial(
            gpt_torch.generate_text_simple_cached, tm, _torch(prompt), max_new_tokens, context_size, use_cache=use_cache
        )
        call_f = functools.partial(
            gpt_flax.generate_text_simple_cached, fm, prompt, max_new_tokens, context_size, use_cache=use_cache
        )
    else:
        context_size = _mostly(
            data.draw,
            st.sampled_from([1, 3, cfg.context_length]),
            st.sampled_from([cfg.context_length + 2, 2**40, 0, -2, None, False, 2.0]),
            0.2,
        )
        call_t = functools.partial(gpt_torch.generate_text_simple, tm, _torch(prompt), max_new_tokens, context_size)
        call_f = functools.partial(gpt_flax.generate_text_simple, fm, prompt, max_new_tokens, context_size)
    tm.eval()
    fm.eval()
    with float32_matmuls(), mock.patch("gpt_spec.limits.available_memory", lambda: 10**9):
        t, f = _same_outcome(lambda: call_t(), lambda: np.asarray(call_f()))
    event(f"{'cached' if cached else 'simple'}: {t[0]} {t[1] if t[0] == 'refused' else ''}")
    if t[0] == "ok":
        out_t, out_f = t[1], f[1]
        assert out_t.dtype == _torch(prompt).dtype
        ids = out_t.to(torch.int64).numpy()
        assert ids.shape == (prompt.shape[0], prompt.shape[1] + int(max_new_tokens))
        np.testing.assert_array_equal(ids[:, : prompt.shape[1]], prompt.astype(np.int64))
        assert ids.min() >= 0 and ids.max() < cfg.vocab_size  # never a wrapped id
        np.testing.assert_array_equal(out_f.astype(np.int64), ids)


GOOD_FIELDS = st.one_of(st.integers(1, 12), st.sampled_from([np.int32(4), np.int64(2), 2**31 - 1, 2**20]))
BAD_FIELDS = st.one_of(
    st.integers(-3, 0),
    st.integers(2**31, 2**31 + 3),
    st.integers(-(2**70), 2**70),
    st.sampled_from([None, True, False, 1.0, math.nan, "8", np.int64(2**40), np.bool_(True)]),
)


@st.composite
def config_dicts(draw) -> dict:
    d = {
        "vocab_size": 11,
        "context_length": 5,
        "emb_dim": 4,
        "n_heads": 2,
        "n_layers": 1,
        "drop_rate": 0.0,
        "qkv_bias": False,
    }
    for key in draw(st.permutations(list(d)))[: draw(st.integers(1, 3))]:
        if key == "drop_rate":
            d[key] = _mostly(draw, st.floats(0, 0.99), st.floats(allow_nan=True, allow_infinity=True), 0.3)
        elif key == "qkv_bias":
            d[key] = _mostly(draw, st.booleans(), st.sampled_from([0, 1, "True", None, np.bool_(False)]), 0.3)
        else:
            d[key] = _mostly(draw, GOOD_FIELDS, BAD_FIELDS, 0.3)
    return d


@FUZZ
@given(config_dicts(), st.sampled_from(["GPTModel", "DummyGPTModel"]))
def test_any_config_is_built_or_refused_alike(d, model):
    """A config is valid or refused with ValueError; a valid one is built by both twins or refused
    by both alike, before anything is allocated (here as on a machine with 4 MB to spare)."""
    outcome = _outcome(lambda: GPTConfig.from_dict(d))
    event(f"config: {outcome[0]}")
    if outcome[0] == "refused":
        return
    cfg = outcome[1]
    assert max(cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) <= 2**31 - 1
    with mock.patch("gpt_spec.limits.available_memory", lambda: 4_000_000):
        t, f = _same_outcome(
            lambda: getattr(gpt_torch, model)(cfg), lambda: getattr(gpt_flax, model)(cfg, rngs=nnx.Rngs(0))
        )
    event(f"model: {t[0]}")
    if t[0] == "ok":
        assert gpt_torch.state_dict(t[1]).keys() == gpt_flax.state_dict(f[1]).keys()
