"""`gpt-parity precision`: each precision setting against the torch twin in float32. The reference row
is exact, the Flax twin in float32 is rounding-close, and the emulated settings cost what their
operand bits say: one bfloat16 pass more than TF32, TF32 more than three passes, in the logits and
after ten training steps."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gpt_torch
from gpt_spec import ModelKind
from parity_cli.main import main
from parity_tests import precision, zoo_flax, zoo_torch
from parity_tests.configs import TINY
from parity_tests.tolerances import LOSS
from parity_tests.twins import build_torch
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def report():
    weights = gpt_torch.state_dict(build_torch(ModelKind.GPT, TINY, seed=0))
    return precision.run_precision(TINY, weights, batch=2, new_tokens=3)


def test_the_reference_row_is_exact_and_the_flax_twin_is_rounding_close(report):
    rows = {r.setting.name: r for r in report.rows}
    assert [r.setting.name for r in report.rows] == [s.name for s in precision.SETTINGS]
    ref = rows["torch highest"]
    assert ref.logits_max_abs == 0 and ref.distribution.kl_max == 0 and ref.greedy.never == precision.GREEDY_PROMPTS
    assert 0 < rows["JAX float32"].logits_ulps < 64  # FP32_FORWARD's 64 ulps of the largest value


def test_the_emulated_settings_cost_what_their_operand_bits_say(report):
    ulps = {r.setting.name: r.logits_ulps for r in report.rows}
    assert ulps["JAX bfloat16, TPU"] > ulps["JAX default, GPU"] > ulps["JAX bf16_3x"] > ulps["JAX float32"]
    assert ulps["torch high"] > 16 * ulps["JAX float32"]  # TF32 in torch: the same emulation, the other twin
    assert ulps["bfloat16 parameters"] > ulps["float16 parameters"] > ulps["JAX float32"]
    assert [r.setting.emulated for r in report.rows] == [False, True, False, True, True, True, False, False]


def test_each_setting_trains_through_its_rounding(report):
    """Ten steps in each setting: the reference's again is exact, the Flax twin in float32 within the
    loss bound, TF32 and one bfloat16 pass move the loss (the operand rounding has a derivative) by
    less than bfloat16 parameters do, and float16 has no training tier."""
    delta = {r.setting.name: r.delta_loss for r in report.rows}
    assert delta["torch highest"] == 0 and delta["float16 parameters"] is None
    assert abs(delta["JAX float32"]) <= LOSS.atol
    for emulated in ("torch high", "JAX default, GPU", "JAX bfloat16, TPU"):
        assert 0 < abs(delta[emulated]) < abs(delta["bfloat16 parameters"]) / 10, emulated


@pytest.mark.parametrize("bits", [7, 10, 16])
def test_the_zoos_operand_rounding_has_the_same_derivative_in_both_twins(bits):
    """jax.lax.reduce_precision rounds the incoming gradient alike; the torch zoo's rounding does too."""
    rng = np.random.default_rng(bits)
    x, c = rng.standard_normal((2, 512), dtype=np.float32)
    xt = torch.tensor(x, requires_grad=True)
    (zoo_torch.round_mantissa(xt, bits) * torch.from_numpy(c)).sum().backward()
    grad = jax.grad(lambda v: (zoo_flax.round_mantissa(v, bits) * c).sum())(jnp.asarray(x))
    assert xt.grad is not None and np.array_equal(xt.grad.numpy(), np.asarray(grad))
    assert not np.array_equal(np.asarray(grad), c)  # rounded: the gradient is not passed straight through


def test_cli_prints_the_matrix_and_writes_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    config = str(ROOT / "examples" / "tiny-odd.json")
    assert main(["precision", "--config", config, "--new-tokens", "2", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "emulated: 10-bit operands" in text and "float16 parameters" in text and "– (no training tier)" in text
    data = json.loads(out.read_text())
    assert data["reference"] == "torch, float32, matmul precision 'highest'" and len(data["rows"]) == 8
    assert data["train_steps"] == 10 and data["rows"][0]["delta_loss"] == 0
    with pytest.raises(SystemExit) as e:
        main(["precision", "--config", config, "--new-tokens", "4", "--quiet"])
    assert e.value.code == 2 and "8 prompt + 4 new tokens must fit context_length 11" in capsys.readouterr().err
