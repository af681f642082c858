"""Stated detection power (`gpt-parity power`): the thresholds measured on the tiny config are held
here, so a change that blunts the suite fails: each knob is caught just above its measured threshold,
by the evidence that caught it, and the knob at the book's setting passes."""

from __future__ import annotations

import json

import pytest

from gpt_spec import ModelKind
from parity_cli.main import main
from parity_tests import power
from parity_tests.configs import TINY
from parity_tests.forward import ParityOptions
from parity_tests.twins import build_flax, build_torch

OPTS = ParityOptions(batch=2, seq=11, directions=("torch->flax",))

# (knob, setting just past the threshold measured on TINY, the evidence that must catch it there).
# Measured with `gpt-parity power --config examples/tiny-odd.json` (AMD EPYC, AVX-512 with
# avx512_bf16): LayerNorm eps caught at x 7.5e-6 (envelope), GELU's constant at 1.98e-5 (bias),
# the attention scale's exponent at 2.3e-5 (bound), operands of 22 mantissa bits (envelope), one
# weight tensor x (1 ± 1.8e-7) (envelope), the learning rate x (1 + 1.29e-3) (training).
HELD = [
    ("layernorm-eps", 1.5e-5, "envelope"),
    ("gelu-constant", 4e-5, "bias"),
    ("attention-scale", 5e-5, "bound"),
    ("operand-bits", 22, "envelope"),
    ("weight", 4e-7, "envelope"),
    ("learning-rate", 2.6e-3, "training"),
]


@pytest.fixture(scope="module")
def models():
    return {"torch": build_torch(ModelKind.GPT, TINY, seed=0), "flax": build_flax(ModelKind.GPT, TINY, seed=0)}


@pytest.mark.parametrize("candidate", ["flax", "torch"])
@pytest.mark.parametrize(("name", "x", "kind"), HELD)
def test_each_knob_is_caught_just_past_its_measured_threshold(models, name, x, kind, candidate):
    """Planted in either twin (`--candidate`): the thresholds are the check's, not one twin's."""
    run = power._Evaluator(TINY, OPTS, power.BY_NAME[name], models, candidate)
    assert kind in run(x), f"{name} at {x:g} caught only by {sorted(run(x))}"


@pytest.mark.parametrize("name", ["layernorm-eps", "gelu-constant", "attention-scale", "learning-rate"])
def test_each_knob_at_the_books_setting_passes(models, name):
    assert power._Evaluator(TINY, OPTS, power.BY_NAME[name], models, "flax")(0.0) == frozenset()


def test_operands_of_full_float32_precision_pass(models):
    assert power._Evaluator(TINY, OPTS, power.BY_NAME["operand-bits"], models, "flax")(23) == frozenset()


def test_bisection_finds_a_known_edge_to_its_resolution():
    knob = power.Knob("k", "x", 1e-9, 1.0)
    t = power._bisect(lambda x: x >= 3e-4, knob)
    assert t.caught is not None and t.passes is not None
    assert t.passes < 3e-4 <= t.caught and t.caught / t.passes <= power.RESOLUTION
    bits = power.Knob("b", "n", 7, 22, bits=True)
    assert power._bisect(lambda n: n <= 12, bits) == power.Threshold("", 12, 13)
    assert power._bisect(lambda x: False, knob) == power.Threshold("", None, 1.0)
    assert power._bisect(lambda x: True, knob) == power.Threshold("", 1e-9, None)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "p.json"
    argv = [
        "power",
        "--config",
        str(cfg),
        "--knob",
        "operand-bits",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "p.png"),
    ]
    assert main([*argv, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "operand-bits: catches operands of 22 mantissa bits or fewer" in text
    [knob] = json.loads(out.read_text())["knobs"]
    assert {t["kind"]: t["caught_at"] for t in knob["thresholds"]}["check"] == 22
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cli_refuses_an_unknown_knob(capsys):
    with pytest.raises(SystemExit) as e:
        main(["power", "--knob", "layernorm-eps,nope"])
    assert e.value.code == 2 and "unknown knob 'nope'; known knobs: layernorm-eps" in capsys.readouterr().err
