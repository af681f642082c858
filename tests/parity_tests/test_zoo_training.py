"""The zoo's optimizer and loss mutants against the training evidence (`gpt-parity check
--train-steps N`): each, planted in either twin, fails the loss, gradient and AdamW-step checks,
and the first failure named is where it was planted (the loss; the weights after a step, of the
parameter the decay was masked off); the porter's code with every knob at its default passes, so
what is caught is the bug; a clean run after planted ones passes, with every function put back."""

import dataclasses
import functools
import json

import pytest

import gpt_flax
import gpt_flax.train
import gpt_torch
import gpt_torch.train
from parity_cli import reports
from parity_cli.main import main
from parity_tests import zoo, zoo_training
from parity_tests.configs import TINY
from parity_tests.training import run_training_parity

CFG = TINY
SEQ = 9  # short of the context, as check's training run is

pytestmark = pytest.mark.zoo

NAMES = [m.name for m in zoo.OPTIMIZER_MUTANTS]


def _functions() -> dict[str, object]:
    """The twins' functions a training mutant patches."""
    return {
        f"{mod.__name__}.{attr}": getattr(mod, attr)
        for mod in (gpt_torch, gpt_torch.train, gpt_flax, gpt_flax.train)
        for attr in ("adamw", "calc_loss_batch", "_loss_and_grads", "_train_step")
        if hasattr(mod, attr)
    }


@pytest.fixture(scope="class")
def training_zoo(request) -> tuple[list[zoo.ZooRow], dict[str, object]]:
    """The rows of the optimizer and loss mutants planted in the twin of the test's class, as
    `gpt-parity mutants` makes them (without its forward control: test_zoo.py has it), and the
    twins' functions as they were before."""
    before = _functions()
    rows = []
    for mutant in zoo.OPTIMIZER_MUTANTS:
        plant = functools.partial(zoo.planted, mutant, request.cls.twin)
        trained = run_training_parity(CFG, batch=2, seq=SEQ, steps=zoo_training.STEPS, plant=plant)
        rows.append(zoo._training_row(mutant, request.cls.twin, trained))
    return rows, before


class _TrainingZooHalf:
    """The mutants planted in one twin: a class per twin, so the halves run on two workers."""

    twin: str

    @pytest.mark.parametrize("name", NAMES)
    def test_each_mutant_is_caught_where_it_was_planted(self, training_zoo, name):
        row = next(r for r in training_zoo[0] if r.mutant == name and r.twin == self.twin)
        assert row.caught, f"{name} planted in {self.twin} escaped the training evidence"
        assert row.located, f"{name} planted in {self.twin} at {row.where}, first failure named: {row.describe}"
        assert row.margin > 1 and row.evidence == "bound" and row.first_stage == row.first
        where = zoo.get(name).where
        if where == zoo_training.LOSS:
            assert row.first == "loss"
        else:
            assert row.first.startswith("weights ")
        if where == zoo_training.DECAY_MASK:  # named at a parameter the decay was masked off
            assert row.first.split()[1].endswith((".bias", ".scale", ".shift")), row.first
        if where == zoo_training.LATER_STEPS:  # Adam's first step cannot see it
            assert row.first.endswith(f" after step {zoo_training.STEPS}"), row.first

    def test_a_clean_run_after_the_planted_ones_passes(self, training_zoo):
        rows, before = training_zoo
        assert _functions() == before
        assert all(r.ok for r in rows) and len(rows) == len(NAMES)
        clean = run_training_parity(CFG, batch=2, seq=SEQ, steps=zoo_training.STEPS)
        assert clean.passed and clean.first_failure() is None, reports.training_table(clean)


class TestPlantedInTorch(_TrainingZooHalf):
    twin = "torch"


class TestPlantedInFlax(_TrainingZooHalf):
    twin = "flax"


# Every knob a mutant can set, named at its default: the porter's hand-written Adam, param groups
# or mask, patched decay and clip, and loss, each in the path a mutant takes through them.
NULL = zoo.Mutant(
    "null",
    "the porter's optimizer and loss with every knob at its default",
    zoo_training.OPTIMIZER,
    shows_in=zoo_training.TRAINING,
    training=tuple((k, v) for k, v in zoo_training.DEFAULTS.items() if k != "coupled_decay"),
)


@pytest.mark.parametrize("twin", zoo.TWINS)
def test_the_porters_code_at_its_defaults_passes(twin):
    report = run_training_parity(
        CFG, batch=2, seq=SEQ, steps=zoo_training.STEPS, plant=lambda models: zoo.planted(NULL, twin, models)
    )
    assert report.passed, reports.training_table(report)
    assert report.loss.max_abs <= 1e-6


def test_check_names_where_a_training_mutant_was_planted_and_passes_it_with_its_knob_at_the_default(
    tmp_path, monkeypatch, capsys
):
    """`check --plant` with a training mutant: the forward passes (it is the book's), the training
    evidence fails at the parameter the decay was masked off. The same mutant with its knob back at
    the default passes: the evidence, not the porter's rewrite, catches it."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(CFG.to_dict()))
    out = tmp_path / "check.json"
    argv = ["check", "--config", str(config), "--quiet", "--no-layer-evidence", "--train-steps", "2"]
    plant = ["--plant", "decay-masked-off-biases-and-norms@torch"]
    assert main([*argv, *plant, "--json", str(out)]) == 1
    stdout = capsys.readouterr().out
    assert "with decay-masked-off-biases-and-norms planted in the torch twin" in stdout
    assert "training: first failure at weights trf_blocks.0.att.out_proj.bias after step 1" in stdout
    data = json.loads(out.read_text())
    assert data["forward"]["passed"] and not data["training"]["passed"]
    assert data["training"]["first_failure"]["name"].startswith("weights trf_blocks.0.att.out_proj.bias")
    blunt = dataclasses.replace(zoo.get(plant[1].split("@")[0]), training=(("decay_matrices_only", False),))
    monkeypatch.setitem(zoo.BY_NAME, blunt.name, blunt)
    assert main([*argv, *plant]) == 0
    assert "training: first failure" not in capsys.readouterr().out


def test_training_mutants_are_listed_and_refused_without_their_steps(capsys):
    assert main(["mutants", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES)
    for argv, message in [
        (["check", "--plant", "loss-summed@torch"], "shows in training only (its forward is the book's)"),
        (["check", "--plant", "adam-betas-swapped", "--train-steps", "1"], "shows from the second AdamW step on"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()[-1]) > 0


def test_a_row_is_located_only_where_its_mutant_was_planted():
    located = zoo_training.located
    assert located(zoo_training.LOSS, "loss") and not located(zoo_training.LOSS, "grad tok_emb.weight")
    assert located(zoo_training.OPTIMIZER, "weights tok_emb.weight after step 1")
    assert not located(zoo_training.OPTIMIZER, "loss")
    assert located(zoo_training.LATER_STEPS, "weights tok_emb.weight after step 10")
    assert not located(zoo_training.LATER_STEPS, "weights tok_emb.weight after step 1")
    assert located(zoo_training.DECAY_MASK, "weights trf_blocks.1.norm2.shift after step 1")
    assert located(zoo_training.DECAY_MASK, "weights trf_blocks.0.ff.layers.0.bias after step 10")
    assert not located(zoo_training.DECAY_MASK, "weights trf_blocks.0.ff.layers.0.weight after step 1")
