"""diagnose beyond the forward: an optimizer or loss bug is named from the training check, top-1
and in the twin that carries it; `diagnose_all` runs the forward check, then the training check,
and diagnoses the first that fails.

Every optimizer and loss mutant is tried: the candidate's planted optimizer compiles once per
mutant, and each trial trains only the torch twin (the candidate's run is reused)."""

from __future__ import annotations

import pytest

from parity_cli.main import main
from parity_tests import diagnose_runs, zoo, zoo_training
from parity_tests.configs import TINY
from parity_tests.forward import ParityOptions

ONE_WAY = ParityOptions(batch=2, seq=11, directions=("torch->flax",))
TRAINING = [m.name for m in zoo.OPTIMIZER_MUTANTS]


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
    assert "the forward check passed; then the float32 training check:" in out
    assert "consistent with adam-eps-1e-6 in torch at weights " in out


def test_nothing_planted_passes_every_check():
    d = diagnose_runs.diagnose_all(TINY, ONE_WAY)
    assert d.baseline.passed and not d.trials
    assert d.verdict == "nothing to diagnose: the forward and float32 training checks pass"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--evidence", "backward"], "unknown evidence 'backward'"),
        (["--dtype", "bfloat16", "--evidence", "training"], "runs only the forward check in it"),
        (["--plant", "rounding-without-derivative"], "shows only in bfloat16 training"),
        (["--plant", "kv-cache-stale"], "shows only in generation"),
    ],
)
def test_cli_refuses_evidence_it_cannot_run(tiny_json, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--config", tiny_json, *flags, "--quiet"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_diagnose_all_refuses_unknown_evidence_and_mutants_it_cannot_read():
    with pytest.raises(ValueError, match="evidence is one or more of forward, training, got sideways"):
        diagnose_runs.diagnose_all(TINY, ONE_WAY, evidence=("sideways",))
    message = r"mutant top-k-exactly-k shows only in generation \(sampling ties position 0 probabilities\), which"
    with pytest.raises(ValueError, match=message):
        diagnose_runs.plant_of(zoo.get("top-k-exactly-k"), "flax")
