"""Property-based parity: on any valid config and any valid batch the twins agree; on any invalid
config both refuse with ValueError and nothing else.

The example count is set by the hypothesis profiles in conftest.py: a few in the default run, so
the suite keeps its time budget; `HYPOTHESIS_PROFILE=thorough` for a long hunt. Inputs hypothesis
found that once broke an assumption stay here as explicit @example regression cases.
"""

import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from parity_tests.forward import carried, compare_stages
from parity_tests.layers import build_probes, reference_outputs, run_probes
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import Backend, build_pair, float32_matmuls, run_flax, run_torch


@st.composite
def configs(draw) -> GPTConfig:
    n_heads = draw(st.integers(1, 4))
    return GPTConfig(
        vocab_size=draw(st.integers(1, 67)),
        context_length=draw(st.integers(1, 13)),
        emb_dim=n_heads * draw(st.integers(1, 7)),
        n_heads=n_heads,
        n_layers=draw(st.integers(1, 3)),
        drop_rate=draw(st.floats(0.0, 0.999, exclude_max=False).filter(lambda p: p < 1.0)),
        qkv_bias=draw(st.booleans()),
    )


@st.composite
def config_and_batch(draw):
    cfg = draw(configs())
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, cfg.context_length))
    ids = draw(arrays(np.int64, (batch, seq), elements=st.integers(0, cfg.vocab_size - 1)))
    return cfg, ids


EDGE = GPTConfig(vocab_size=1, context_length=1, emb_dim=1, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=True)


@given(config_and_batch(), st.sampled_from(["torch", "flax"]), st.booleans())
@example((EDGE, np.zeros((1, 1), np.int64)), "torch", True)  # one token, one channel: var = 0
@example((EDGE.replace(vocab_size=2, context_length=3, emb_dim=2, n_heads=2), np.array([[1, 0, 1]])), "flax", False)
@example((EDGE.replace(vocab_size=4, context_length=13), np.array([[0, 0]])), "torch", False)  # two identical rows
@example(
    (
        GPTConfig(vocab_size=37, context_length=10, emb_dim=2, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=False),
        np.array([[0, 1, 1, 1, 1]]),
    ),
    "torch",
    False,
)  # two-wide LayerNorm rows of tiny variance
def test_twins_agree_on_any_valid_config_and_batch(case, source, jit):
    """Every stage of the whole forward, and every layer's own evidence (envelopes, bias)."""
    cfg, ids = case
    tm, fm = build_pair("gpt", cfg, source=source, seed=int(ids.sum()) % 1000)
    with float32_matmuls():
        ref = run_torch(tm, ids, activations=True)
        out = run_flax(fm, ids, jit=jit, activations=True)
        probes = build_probes(cfg, "gpt", ref, gpt_torch.state_dict(tm), seed=int(ids.sum()))
        torch_cpu, flax_cpu = Backend("torch", "cpu"), Backend("flax", jax.devices("cpu")[0])
        found = run_probes(probes, reference_outputs(probes, torch_cpu, tm), flax_cpu, fm)
        stages = compare_stages(ref, out, FP32_FORWARD, carried(torch_cpu, tm, ref, out))
    failed = [c.describe() for c in [*stages, *found] if not c.passed]
    assert not failed, f"{cfg}\n" + "\n".join(failed)


KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
ANY_VALUE = st.one_of(
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def config_dicts(draw) -> dict:
    base = {
        "vocab_size": 11,
        "context_length": 5,
        "emb_dim": 6,
        "n_heads": 3,
        "n_layers": 1,
        "drop_rate": 0.1,
        "qkv_bias": False,
    }
    for key in draw(st.sets(st.sampled_from(KEYS), min_size=1)):
        base[key] = draw(ANY_VALUE)
    if draw(st.booleans()):
        base.pop(draw(st.sampled_from(KEYS)), None)
    if draw(st.booleans()):
        base[draw(st.text(min_size=1, max_size=5))] = 1
    return base


def _valid(d: dict) -> bool:
    if set(d) != set(KEYS):
        return False
    ints = [d[k] for k in KEYS[:5]]
    if not all(type(v) is int and v > 0 for v in ints):
        return False
    rate = d["drop_rate"]
    return (
        d["emb_dim"] % d["n_heads"] == 0
        and type(d["qkv_bias"]) is bool
        and type(rate) in (int, float)
        and not math.isnan(rate)
        and 0 <= rate < 1
    )


@given(config_dicts())
@example(
    {
        "vocab_size": 11,
        "context_length": 5,
        "emb_dim": 6,
        "n_heads": 3,
        "n_layers": 1,
        "drop_rate": float("nan"),
        "qkv_bias": False,
    }
)
@example(
    {
        "vocab_size": 11,
        "context_length": 5,
        "emb_dim": 6,
        "n_heads": 0,
        "n_layers": 1,
        "drop_rate": 0.1,
        "qkv_bias": False,
    }
)  # emb_dim % 0 must not raise ZeroDivisionError
def test_invalid_configs_raise_value_error_and_nothing_else(d):
    if _valid(d):
        assert GPTConfig.from_dict(d).to_dict() == {k: d[k] for k in KEYS}
        return
    for build in (GPTConfig.from_dict, gpt_torch.GPTModel, lambda cfg: gpt_flax.GPTModel(cfg, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError):
            build(d)


@given(
    st.one_of(
        arrays(np.float32, (1, 2)),
        arrays(np.bool_, (2, 2)),
        arrays(np.int64, st.sampled_from([(3,), (1, 1, 2), (0, 2), (2, 0)])),
        arrays(np.int64, (1, 3), elements=st.one_of(st.integers(-(2**40), -1), st.integers(11, 2**40))),
    )
)
def test_bad_ids_get_the_same_message_from_both_twins(ids):
    cfg = GPTConfig(vocab_size=11, context_length=5, emb_dim=6, n_heads=3, n_layers=1, drop_rate=0.0, qkv_bias=False)
    tm, fm = build_pair("gpt", cfg, source="torch")
    with pytest.raises(ValueError) as t_err:
        tm(torch.from_numpy(ids))
    with pytest.raises(ValueError) as f_err:
        fm(ids)
    assert str(t_err.value) == str(f_err.value)
