"""diagnose beyond the forward: an optimizer or loss bug is named from the training check, a
KV-cache or sampling bug from the generation check, top-1 and in the twin that carries it;
`diagnose_all` runs the forward, training and generation checks and diagnoses the first that fails.

Every optimizer, loss and decoding mutant is tried: the candidate's planted optimizer compiles
once per mutant, and each trial trains only the torch twin (the candidate's run is reused)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from parity_cli.main import main
from parity_tests import decoding, diagnose_runs, zoo, zoo_decoding, zoo_training
from parity_tests.configs import TINY
from parity_tests.forward import ParityOptions
from parity_tests.zoo_catalog import GENERATION, Mutant, _swap

ONE_WAY = ParityOptions(batch=2, seq=11, directions=("torch->flax",))
TRAINING = [m.name for m in zoo.OPTIMIZER_MUTANTS]
DECODING = [m.name for m in zoo.DECODING_MUTANTS]


def _named(d, name: str, twin: str = "flax") -> None:
    assert not d.baseline.passed and d.trials, d.verdict
    assert [(t.mutant, t.carrier) for t in d.explained] == [(name, twin)], "\n".join(
        [d.verdict, *(f"{t.mutant}: {len(t.unexplained)} past, {t.first}" for t in d.trials[:4])]
    )
    assert d.verdict.startswith(f"consistent with {name} in {twin} at {d.stage}")


def test_the_tests_cover_each_place_a_training_mutant_first_shows():
    wheres = {zoo.get(name).where for name in TRAINING}
    assert wheres == set(zoo_training.WHERES)


@pytest.mark.parametrize("name", TRAINING)
def test_a_training_mutant_planted_in_the_candidate_is_named_from_the_training_check(name):
    mutant = zoo.get(name)
    d = diagnose_runs.diagnose_training(
        mutant.adapt(TINY), ONE_WAY, plant=diagnose_runs.plant_of(mutant, "flax"), twins=("torch",)
    )
    _named(d, name)
    assert zoo_training.located(mutant.where, d.stage)


def test_diagnose_all_passes_the_forward_then_names_an_optimizer_bug_in_torch(tiny_json, capsys):
    argv = ["diagnose", "--config", tiny_json, "--plant", "adam-eps-1e-6@torch", "--reference", "flax"]
    assert main([*argv, "--evidence", "forward,training", "--seq", "11", "--quiet"]) == 1
    out = capsys.readouterr().out
    # the training check's own setup
    assert "the forward check passed; then the float32 training check (batch 2 x 11 tokens, 10 AdamW steps):" in out
    assert "consistent with adam-eps-1e-6 in torch at weights " in out


def test_nothing_planted_passes_every_check():
    d = diagnose_runs.diagnose_all(TINY, ONE_WAY)
    assert d.baseline.passed and not d.trials
    assert (
        d.verdict == "nothing to diagnose: the forward, float32 training, bfloat16 training and generation checks pass"
    )


@pytest.mark.parametrize("twin", zoo.TWINS)
def test_the_bfloat16_training_mutant_is_named_from_one_bfloat16_step(twin):
    mutant = zoo.get("rounding-without-derivative")
    d = diagnose_runs.diagnose_training(TINY, ONE_WAY, plant=diagnose_runs.plant_of(mutant, twin), dtype="bfloat16")
    _named(d, mutant.name, twin)
    assert d.stage.startswith("grad ") and d.kind.name == "bfloat16 training"


@pytest.fixture(scope="module")
def decoding_zoo():
    """Each decoding mutant planted in flax, diagnosed with the zoo's planted in either twin."""
    rows = diagnose_runs.diagnose_zoo(TINY, ONE_WAY, candidate="flax", evidence=("generation",))
    return {r.mutant: r for r in rows}


@pytest.mark.parametrize("name", DECODING)
def test_a_decoding_mutant_planted_in_the_candidate_is_named_from_the_generation_check(decoding_zoo, name):
    row = decoding_zoo[name]
    assert row.top1 and row.alone, f"{name}: {row.verdict}"
    assert row.verdict.startswith(f"consistent with {name} in flax at {zoo.get(name).where.split()[0]} ")


def test_a_kv_cache_bug_in_torch_is_named_though_torch_raises_where_flax_goes_on(tiny_json, capsys):
    """kv-cache-stale leaves each block's pointer running past its slots: torch's slicing raises,
    JAX's clamped update goes on. The refusal ends the comparison of its part."""
    argv = ["diagnose", "--config", tiny_json, "--plant", "kv-cache-stale@torch", "--reference", "flax"]
    assert main([*argv, "--evidence", "generation", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert (
        "The generation check (3 prompts of 2 x 3 tokens + 4 new, full cache and window 4, "
        "sampling at temperature 0.7, top-k 5):" in out
    )
    assert "check failed first at cached prompt 1 position 0 trf_blocks.0.att" in out
    assert "consistent with kv-cache-stale in torch at cached prompt 1 position 0 trf_blocks.0.att" in out
    assert "planted in flax, it brings all " in out  # without the cut, only within its own rounding


def test_a_decoding_bug_outside_the_zoo_is_no_known_bug():
    """A window one position short: kv-window-one-too-many departs at the same place, and is not it."""
    too_few = Mutant(
        "kv-window-one-too-few",
        "the sliding cache keeps kv_window_size - 1 positions",
        f"sliding prompt 0 position {decoding.WINDOW - 1} trf_blocks.0.att",
        (_swap("KVCacheAttention", bug_window_extra=-1),),
        shows_in=GENERATION,
    )
    d = diagnose_runs.diagnose_generation(TINY, ONE_WAY, plant=functools.partial(zoo_decoding.planted, too_few, "flax"))
    assert d.stage.startswith("sliding ") and d.trials and not d.explained
    assert d.verdict.startswith(
        f"no known bug explains it (first failure at {d.stage}); closest: kv-window-one-too-many"
    )


def _finding(twin: str, rows: str, position: int, passed: bool = True, refused: bool = False) -> decoding.Finding:
    what = "raised" if refused else "trf_blocks.0.att"
    return decoding.Finding("cached", rows, position, what, twin, passed, 0.5 if passed else np.inf, "", refused)


@pytest.mark.parametrize("flax_departed", [True, False])
def test_a_refusal_ends_its_part_and_is_alike_only_where_the_other_twin_departed(flax_departed):
    found = [
        _finding("flax", "prompt 1", 2, passed=not flax_departed),
        _finding("torch", "prompt 1", 2, passed=not flax_departed),
        _finding("torch", "prompt 1", 4, passed=False, refused=True),
        _finding("flax", "prompt 1", 5, passed=False),  # after the refusal: not compared
        _finding("flax", "prompt 2", 0, passed=False),
    ]
    judged = diagnose_runs.GENERATION_KIND.findings(decoding.DecodingReport(TINY, found))
    assert [j.name for j in judged] == [
        "cached prompt 1 position 2 trf_blocks.0.att in each twin",
        "cached prompt 1 position 4 raised",
    ]
    assert [j.passed for j in judged] == [True, flax_departed]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--evidence", "backward"], "unknown evidence 'backward'"),
        (["--dtype", "bfloat16", "--evidence", "training"], "runs only the forward check in it"),
    ],
)
def test_cli_refuses_evidence_it_cannot_run(tiny_json, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--config", tiny_json, *flags, "--quiet"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_diagnose_all_refuses_unknown_evidence_and_mutants_it_cannot_read():
    with pytest.raises(
        ValueError, match="evidence is one or more of forward, training, bfloat16-training, generation, got sideways"
    ):
        diagnose_runs.diagnose_all(TINY, ONE_WAY, evidence=("sideways",))
    int8 = Mutant("int8-weights", "weights rounded to int8", "trf_blocks.0.att", shows_in="int8 inference")
    with pytest.raises(
        ValueError, match=r"mutant int8-weights shows only in int8 inference \(trf_blocks.0.att\), which"
    ):
        diagnose_runs.plant_of(int8, "flax")
