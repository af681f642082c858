"""`gpt-parity diagnose`, the zoo in reverse: every forward mutant planted in the candidate is named
top-1 (and the twin that carries it), a perturbation no bug of the zoo makes is "no known bug",
and a check that passes has nothing to diagnose."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity_cli.main import main
from parity_tests import diagnose, zoo
from parity_tests.compare import compare
from parity_tests.configs import TINY
from parity_tests.forward import ParityOptions
from parity_tests.tolerances import EXACT, Bound

# One direction, candidate flax: the trials plant each suspect in torch, which compiles nothing.
ONE_WAY = ParityOptions(batch=2, seq=11, directions=("torch->flax",))
ONE = Bound(atol=1.0, rtol=0.0, measured="a test's")


@pytest.mark.parametrize("name", [m.name for m in zoo.FORWARD_MUTANTS])
def test_every_forward_mutant_planted_in_the_candidate_is_diagnosed_top1(name):
    mutant = zoo.get(name)
    d = diagnose.diagnose(mutant.adapt(TINY), ONE_WAY, plant=zoo.plant(name, "flax"), twins=("torch",))
    assert not d.baseline.passed and d.stage and d.trials
    best = d.explained[0] if d.explained else None
    assert best is not None and (best.mutant, best.carrier) == (name, "flax"), "\n".join(
        f"{t.mutant}: {len(t.unexplained)} past, {t.own_rounding} own rounding, {t.first}" for t in d.trials[:4]
    )
    assert d.verdict.startswith(f"consistent with {name} in flax at {d.stage}")
    assert [t.mutant for t in d.explained] == [name], "another mutant explains it equally"


@pytest.mark.parametrize("name", ["gelu-constant", "matmul-tf32"])
def test_with_both_twins_tried_the_verdict_names_the_twin_that_carries_the_bug(name):
    d = diagnose.diagnose(TINY, ONE_WAY, plant=zoo.plant(name, "torch"))
    assert {t.planted_in for t in d.trials} == {"torch", "flax"}
    assert [(t.mutant, t.carrier) for t in d.explained] == [(name, "torch")], d.verdict
    assert d.verdict.startswith(f"consistent with {name} in torch")


def test_a_bug_that_is_its_own_inverse_is_named_without_a_twin():
    """Untransposed squares planted in the twin that has them transpose them back: either twin could
    carry it, and the verdict says so rather than guess."""
    d = diagnose.diagnose(TINY, ONE_WAY, plant=zoo.plant("square-kernel-untransposed", "torch"))
    assert {(t.mutant, t.carrier) for t in d.explained} == {
        ("square-kernel-untransposed", "torch"),
        ("square-kernel-untransposed", "flax"),
    }
    assert d.verdict.startswith("consistent with square-kernel-untransposed at trf_blocks.0.att, in torch or in flax")


@pytest.mark.parametrize("param", ["trf_blocks.0.att.W_value.weight", "trf_blocks.0.norm1.scale"])
def test_a_perturbation_no_bug_of_the_zoo_makes_is_no_known_bug(param):
    d = diagnose.diagnose(TINY, ONE_WAY, plant=zoo.perturb(param, 1e-2, "flax"), twins=("torch",))
    assert not d.baseline.passed and d.trials and not d.explained
    assert d.verdict.startswith(f"no known bug explains it (first failure at {d.stage})")
    assert d.to_json()["diagnosis"] is None


def test_a_check_that_passes_has_nothing_to_diagnose():
    d = diagnose.diagnose(TINY, ONE_WAY)
    assert d.baseline.passed and not d.trials and d.verdict == "nothing to diagnose: the check passes"


def test_a_rounding_bug_is_explained_by_its_own_rounding_and_only_by_it(monkeypatch):
    """TF32 operands in both twins still differ past float32's bounds (float32-sized differences flip
    its roundings): without the allowance for the mutant's own rounding nothing explains it."""
    d = diagnose.diagnose(TINY, ONE_WAY, plant=zoo.plant("matmul-tf32", "flax"), twins=("torch",))
    assert d.explained[0].mutant == "matmul-tf32" and d.explained[0].own_rounding > 0
    monkeypatch.setattr(diagnose, "OWN_ROUNDING_SLACK", 0.0)
    d = diagnose.diagnose(TINY, ONE_WAY, plant=zoo.plant("matmul-tf32", "flax"), twins=("torch",))
    assert not d.explained


def test_two_sides_broken_alike_are_compared_on_their_finite_elements():
    ref = np.array([1.0, np.nan, 2.0, -np.inf], np.float32)
    same = compare("x", ref, ref.copy(), EXACT)
    assert not same.passed and same.same_non_finite == 2 and same.margin == 0.0
    assert "both sides have 2 non-finite value(s), the same ones, first at (1,)" in same.problem
    off = ref.copy()
    off[2] = 3.0
    assert compare("x", ref, off, EXACT).margin == np.inf  # a finite element differs
    moved = np.array([1.0, 2.0, np.nan, -np.inf], np.float32)
    other = compare("x", ref, moved, ONE)
    assert not other.same_non_finite and "reference has 2 non-finite" in other.problem
    signs = compare("x", ref, np.array([1.0, np.nan, 2.0, np.inf], np.float32), ONE)
    assert not signs.same_non_finite


def test_perturb_refuses_a_tensor_the_model_lacks():
    with pytest.raises(ValueError, match="no tensor 'trf_blocks.9.att.W_value.weight' to perturb"):
        diagnose.diagnose(TINY, ONE_WAY, plant=zoo.perturb("trf_blocks.9.att.W_value.weight", 0.1, "flax"))
    with pytest.raises(ValueError, match="eps > 0"):
        zoo.perturb("out_head.weight", 0.0, "flax")


def test_cli_names_the_bug_and_the_twin_and_writes_json(tiny_json, tmp_path, capsys):
    out = tmp_path / "d.json"
    argv = ["diagnose", "--config", tiny_json, "--seq", "11", "--plant", "gelu-erf@torch", "--reference", "flax"]
    assert main([*argv, "--json", str(out), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "check failed first at trf_blocks.0.ff" in text
    assert "consistent with gelu-erf in torch at trf_blocks.0.ff: planted in flax" in text
    data = json.loads(out.read_text())
    assert data["diagnosis"] == {"mutant": "gelu-erf", "bug_in": "torch"}
    assert data["trials"][0]["explains"] and not data["check_passed"]
    assert {u["mutant"] for u in data["untried"]} >= {"layernorm-eps-1e-6", "positions-off-by-one"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--perturb", "out_head.weight:-1"], "expected PARAM:EPS[@TWIN] with EPS > 0"),
        (["--perturb", "out_head.weight:x@flax"], "expected PARAM:EPS[@TWIN]"),
        (["--plant", "qkv-bias-dropped"], "needs a config with {'qkv_bias': True}"),
        (["--plant", "gelu-erf", "--perturb", "out_head.weight:0.1"], "one difference at a time"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(tiny_json, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--config", tiny_json, *flags, "--quiet"])
    assert e.value.code == 2 and message in capsys.readouterr().err
