"""The float16 tier: both twins with float16 parameters and compute (LayerNorm statistics, GELU,
softmax and logits in float32, as in bfloat16), held to FP16_FORWARD and the float16 KL bounds
(test_distribution.py holds those to a trained model); forward only, and refusing what float16
cannot hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from parity_cli.main import main
from parity_tests import twins, zoo
from parity_tests.forward import ParityOptions, run_parity
from parity_tests.tolerances import FP16_FORWARD, FP16_KL_MEAN
from parity_tests.training import run_training_parity
from parity_tests.twins import build_flax, build_torch
from tests.helpers import ROOT


def test_check_in_float16_passes_the_twins_and_catches_a_planted_bug(tiny_cfg):
    opts = ParityOptions(batch=2, seq=8, dtype="float16")
    report = run_parity(tiny_cfg, opts)
    assert report.passed and report.notes == ["layer evidence left out: its envelopes are float32's"]
    for row in report.rows:
        assert all(c.bound is FP16_FORWARD for c in row.stages)
        assert row.distribution_check is not None and row.distribution_check.kl_mean_bound == FP16_KL_MEAN
        assert 0 < row.distribution.kl_mean < FP16_KL_MEAN
    planted = run_parity(tiny_cfg, opts, plant=zoo.plant("attention-scaled-by-head-dim", "flax"))
    first = planted.first_failure
    assert first is not None and first[1].name == "trf_blocks.0.att"


def test_float16_is_a_forward_tier_only(tiny_cfg, capsys):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, got 'float16'"):
        run_training_parity(tiny_cfg, steps=1, dtype="float16")
    config = str(ROOT / "examples" / "tiny-odd.json")
    with pytest.raises(SystemExit) as e:
        main(["check", "--config", config, "--dtype", "float16", "--train-steps", "1", "--quiet"])
    assert e.value.code == 2 and "float16 is a forward tier only" in capsys.readouterr().err
    for package, build in ((gpt_torch, build_torch), (gpt_flax, build_flax)):
        model = build("gpt", tiny_cfg, seed=0)
        made_before = package.adamw(model)
        package.cast(model, "float16")
        with pytest.raises(ValueError, match="a float16 model does not train here .* cast it to float32 or bfloat16"):
            package.adamw(model)
        ids = np.zeros((1, 4), np.int64)
        x = torch.from_numpy(ids) if package is gpt_torch else ids
        with pytest.raises(ValueError, match="made for this model's float32 parameters, which are float16 now"):
            package.train_step(model, made_before, x, x)


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_a_cast_to_float16_refuses_a_weight_it_would_make_inf(tiny_cfg, twin):
    package = twins.package(twin)
    model = (build_torch if twin == "torch" else build_flax)("gpt", tiny_cfg, seed=0)
    sd = package.state_dict(model)
    sd["trf_blocks.0.norm1.scale"][3] = 70000.0  # float16's largest is 65504
    package.load_state_dict(model, sd)
    with pytest.raises(ValueError, match="round to inf in float16"):
        package.cast(model, "float16")
    assert package.state_dict(model)["trf_blocks.0.norm1.scale"].dtype == np.float32  # left as it was
