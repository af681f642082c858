"""The distribution metrics `check` reports beside max |Δ| (per-token KL, top-1 and top-10
agreement), exact on cases with known answers, and the bfloat16 tier's KL bounds: met by the twins,
failed by logits a few per cent too large."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from parity_cli.main import main
from parity_tests.distribution import DistributionCheck, distribution, greedy_divergence
from parity_tests.forward import ParityOptions, run_parity
from parity_tests.tolerances import BF16_KL_MAX, BF16_KL_MEAN, FP16_KL_MAX, FP16_KL_MEAN
from parity_tests.twins import float32_matmuls, token_batch
from tests.helpers import DATA, ROOT


def test_kl_and_agreement_on_known_cases():
    same = np.random.default_rng(0).normal(size=(3, 5, 40))
    d = distribution(same, same.copy())
    assert (d.kl_mean, d.kl_max, d.top1, d.topk_mean, d.topk_min, d.tokens) == (0.0, 0.0, 1.0, 1.0, 1.0, 15)
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln(4/3), and the argmax moves
    d = distribution(np.array([[0.0, 0.0]]), np.array([[0.0, np.log(3.0)]]), k=1)
    assert d.kl_max == pytest.approx(0.5 * np.log(4 / 3), rel=1e-12) and d.top1 == 0.0 and d.topk_mean == 0.0
    # three of the top ten swapped for three from below
    ref = np.arange(20.0)[None, :]
    cand = ref.copy()
    cand[0, [10, 11, 12]], cand[0, [7, 8, 9]] = cand[0, [7, 8, 9]], cand[0, [10, 11, 12]]
    d = distribution(ref, cand)
    assert d.topk_mean == pytest.approx(0.7) and d.top1 == 1.0
    # a constant shift is the same distribution
    assert distribution(ref, ref + 3.0).kl_max < 1e-15
    with pytest.raises(ValueError, match="cannot be compared"):
        distribution(ref, ref[:, :10])


@pytest.mark.parametrize(
    ("dtype", "scale", "bounds"),
    [("bfloat16", 1.05, (BF16_KL_MEAN, BF16_KL_MAX)), ("float16", 1.01, (FP16_KL_MEAN, FP16_KL_MAX))],
)
def test_each_tiers_kl_bounds_hold_the_trained_twins_and_fail_logits_a_little_too_large(dtype, scale, bounds):
    """On trained weights (the largest KL measured): the twins in the tier are within its bounds;
    the same logits x1.05 in bfloat16 (x1.01 in float16, whose bounds are 64x tighter), as a
    temperature or a scale off by that much makes them, are not."""
    tm, fm = (
        gpt_torch.load(DATA / "chapter5-tiny-trained.safetensors").eval(),
        gpt_flax.load(DATA / "chapter5-tiny-trained.safetensors"),
    )
    fm.eval()
    gpt_torch.cast(tm, dtype)
    gpt_flax.cast(fm, dtype)
    ids = token_batch(tm.cfg, 2, 64, 0)
    with float32_matmuls(), torch.no_grad():
        t = tm(torch.from_numpy(ids)).float().numpy()
        f = np.asarray(gpt_flax.jit_forward(fm)(ids)).astype(np.float32)
    clean = DistributionCheck(distribution(t, f), *bounds)
    off = DistributionCheck(distribution(t, f * scale), *bounds)
    assert clean.passed and clean.distribution.kl_mean > 0, clean.describe()
    assert not off.passed and off.distribution.kl_mean > bounds[0], off.describe()


def test_check_reports_the_distributions_in_every_tier_and_bounds_bfloat16(tmp_path, tiny_cfg):
    f32 = run_parity(tiny_cfg, ParityOptions(batch=2, seq=8, layer_evidence=False))
    bf16 = run_parity(tiny_cfg, ParityOptions(batch=2, seq=8, dtype="bfloat16"))
    for row in f32.rows:
        assert row.distribution is not None and row.distribution.kl_max < 1e-10 and row.distribution.top1 == 1.0
        assert row.distribution_check is None
    for row in bf16.rows:
        assert row.distribution_check is not None and row.distribution_check.passed
        assert 0 < row.distribution.kl_mean < BF16_KL_MEAN
    out = tmp_path / "check.json"
    config = str(ROOT / "examples" / "tiny-odd.json")
    assert main(["check", "--config", config, "--dtype", "bfloat16", "--json", str(out), "--quiet"]) == 0
    row = json.loads(out.read_text())["forward"]["rows"][0]
    assert set(row["distribution"]) >= {"kl_mean", "kl_max", "top1", "topk_mean", "topk_min", "check"}
    assert row["distribution"]["check"]["passed"] and row["distribution"]["check"]["kl_mean_bound"] == BF16_KL_MEAN


def test_greedy_divergence_finds_where_the_twins_tokens_part():
    """On trained weights: the float32 twins never part over 24 tokens; a Flax twin whose head
    favours one token (its row of out_head.weight x2) parts where greedy first picks differently."""
    tm = gpt_torch.load(DATA / "chapter5-tiny-trained.safetensors").eval()
    fm = gpt_flax.load(DATA / "chapter5-tiny-trained.safetensors")
    fm.eval()
    prompts = token_batch(tm.cfg, 6, 8, 3)
    with float32_matmuls():
        same = greedy_divergence(tm, fm, prompts, 24)
        assert same.first == (24,) * 6 and same.never == 6 and same.median == 24
        with torch.no_grad():
            picks = gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompts), 24).numpy()[:, 8:]
        token = int(np.bincount(picks.ravel()).argmax())  # the token greedy picks most: make Flax like it more
        sd = gpt_flax.state_dict(fm)
        sd["out_head.weight"][token] *= 2
        gpt_flax.load_state_dict(fm, sd)
        off = greedy_divergence(tm, fm, prompts, 24)
    flax_picks = np.asarray(gpt_flax.generate_text_simple_cached(fm, prompts, 24))[:, 8:]
    expected = tuple(int(np.argmax(a != b)) if (a != b).any() else 24 for a, b in zip(picks, flax_picks, strict=True))
    assert off.first == expected and min(off.first) < 24
    assert off.p10 <= off.median <= 24
    with pytest.raises(ValueError, match="pass context_length 64"):
        greedy_divergence(tm, fm, prompts, 60)


def test_check_greedy_reports_the_divergence_point(tmp_path, capsys):
    out = tmp_path / "check.json"
    config = str(ROOT / "examples" / "tiny-odd.json")
    argv = ["check", "--config", config, "--greedy", "5:3", "--no-layer-evidence", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    assert "greedy decoding, float32: 5 prompts of 8 tokens, 3 new tokens each" in capsys.readouterr().out
    greedy = json.loads(out.read_text())["greedy"]
    assert greedy["new_tokens"] == 3 and len(greedy["first"]) == 5 and {"median", "p10", "never"} <= set(greedy)
    with pytest.raises(SystemExit):
        main(["check", "--config", config, "--greedy", "5:4"])  # 8 + 4 > context 11
    assert "--greedy needs --model gpt and 8 prompt + T new tokens within context_length 11" in capsys.readouterr().err
