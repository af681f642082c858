"""`gpt-parity diverge`: a run saved with --snapshot-every is replayed bit for bit; a one-step
defect planted in either twin is named at its step and its tensor (an update, a moment), a
forward bug at its stage; steps without one are judged rounding carried in; and what is not a
two-twin run with its own snapshots is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from gpt_spec import GPTConfig
from gpt_spec.data import the_verdict
from gpt_spec.training import CHAPTER5
from parity_cli.main import main
from parity_tests import diverge, resume, step_evidence, zoo
from parity_tests.chapter5 import Chapter5Report, TwinRun
from parity_tests.defects import OneStepDefect
from parity_tests.tolerances import train_loss_bound
from parity_tests.twins import float32_matmuls
from tests.helpers import ROOT

CONFIG = str(ROOT / "examples" / "chapter5-tiny.json")
TINY5 = GPTConfig.from_dict(json.loads((ROOT / "examples" / "chapter5-tiny.json").read_text()))
STEPS, EVERY, AT = 10, 4, 6  # a run of 10 steps, snapshots at 0, 4 and 8, the defect at step 6
# Each defect, where it is planted, and what diverge must name: a matrix's update and a moment.
DEFECTS = {
    "flax": (f"flax:{AT}:trf_blocks.1.att.W_value.weight:8", "update of trf_blocks.1.att.W_value.weight"),
    "torch": (f"torch:{AT}:trf_blocks.0.ff.layers.2.weight:3:exp_avg", "exp_avg trf_blocks.0.ff.layers.2.weight"),
}


def _train(out, *extra: str) -> int:
    argv = ["train", "--config", CONFIG, "--epochs", "1", "--lr", "0.004", "--dropout", "off"]
    return main([*argv, "--steps", str(STEPS), "--snapshot-every", str(EVERY), "--quiet", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run with each twin's defect planted, saved with snapshots."""
    folders = {}
    for twin, (spec, _) in DEFECTS.items():
        folders[twin] = tmp_path_factory.mktemp(f"run-{twin}")
        assert _train(folders[twin], "--plant-defect", spec) in (0, 1)
    return folders


@pytest.mark.parametrize("twin", DEFECTS)
def test_a_planted_one_step_defect_is_named_at_its_step_and_tensor(runs, twin, tmp_path, capsys):
    out = tmp_path / "diverge.json"
    code = main(["diverge", str(runs[twin]), "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert code == 1 and data["kind"] == "defect" and data["defect_step"] == AT, printed
    assert data["reproduces_the_recorded_losses"]
    step = data["steps"][-1]
    assert step["same_state"]["first_failure"]["what"] == DEFECTS[twin][1], printed
    assert step["same_state"]["inputs_max_abs_diff"] == {"weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    assert f"defect at step {AT}: " in printed and DEFECTS[twin][1] in printed
    # every step judged before it agreed from the same state
    assert all(s["same_state"]["first_failure"] is None for s in data["steps"][:-1])


def test_the_steps_before_a_defect_are_rounding_carried_in(runs, capsys):
    code = main(["diverge", str(runs["flax"]), "--steps", "1-3", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "from the same state every step 1-3 agrees within the one-step bounds" in printed
    assert "replayed from the snapshot at step 0; judged steps 1-3" in printed


def test_a_forward_bug_is_named_at_its_stage_from_the_same_state(runs):
    """The same-state evidence on a zoo mutant of the forward: the first stage it changes. (Subtler
    forward bugs, the GELU constant, pass the stages' bound: `check`'s layer evidence finds those.)"""
    text = the_verdict()
    resumed = resume.read_state(resume.snapshot_path(runs["flax"], 0, "torch"), text)
    with float32_matmuls():
        probe = step_evidence.Probe({"torch": resumed, "flax": resumed}, text)
        x, y = next(resume.restore_feed(resumed, text).epoch(0))
        models = {twin: t.model for twin, t in probe.trainers.items()}
        clean = probe.evidence({"torch": resumed.state, "flax": resumed.state}, x, y, "same state")
        with zoo.planted(zoo.get("mask-sees-next-token"), "flax", models):
            bug = probe.evidence({"torch": resumed.state, "flax": resumed.state}, x, y, "same state")
    assert clean.first_failure() is None
    assert bug.first_failure() is not None and bug.first_failure()[0] == "stage trf_blocks.0.att"


def test_snapshots_leave_the_run_as_it_was(tmp_path):
    settings = dataclasses.replace(CHAPTER5, num_epochs=1, lr=0.004, eval_freq=3, eval_iter=2)
    text = the_verdict()
    whole = resume.run_segment(TINY5, text, steps=7, settings=settings)
    saved = resume.run_segment(TINY5, text, steps=7, settings=settings, snapshot_every=3, snapshot_dir=tmp_path)
    for twin in resume.TWINS:
        a, b = whole.report.runs[twin], saved.report.runs[twin]
        assert a.step_losses == b.step_losses and a.evals == b.evals, twin
    assert diverge.snapshots(tmp_path) == [0, 3, 6]
    state = resume.read_state(resume.snapshot_path(tmp_path, 6, "flax"), text)
    assert state.position.step == 6 and state.history.step_losses == whole.report.flax.step_losses[:6]


def _report(losses: dict[str, list[float]], evals: dict[str, list[dict]] | None = None, samples=None) -> Chapter5Report:
    runs = {
        twin: TwinRun(
            step_losses=losses[twin], evals=(evals or {}).get(twin, []), samples=(samples or {}).get(twin, [])
        )
        for twin in losses
    }
    return Chapter5Report(TINY5, CHAPTER5, "off", 123, 9, 1, "highest", runs)


def test_the_steps_judged_end_where_the_run_first_fails():
    t = [5.0] * 20
    past = list(t)
    past[12] += 2 * train_loss_bound(12)  # step 12's loss is taken before update 12: updates 0-11 behind it
    assert diverge.examined(_report({"torch": t, "flax": past}), None)[1:] == (None, 11)
    ev = [{"step": 5, "train_loss": 5.0, "val_loss": 5.0, "tokens_seen": 0}]
    off = [{**ev[0], "val_loss": 5.5}]  # an evaluation at step 5 is taken after update 5
    assert diverge.examined(_report({"torch": t, "flax": t}, {"torch": ev, "flax": off}), None)[1:] == (None, 5)
    samples = {"torch": ["a"], "flax": ["b"]}  # epoch 1's sample follows its 9 updates
    assert diverge.examined(_report({"torch": t, "flax": t}, samples=samples), None)[1:] == (None, 8)
    jumped = list(t)
    jumped[15] += train_loss_bound(15) / 2  # within the bound: the largest jump is judged
    line, first, last = diverge.examined(_report({"torch": t, "flax": jumped}), None)
    assert (first, last) == (None, 14) and "largest jump in |Δ training loss| is at step 15" in line
    assert diverge.examined(_report({"torch": t, "flax": jumped}), (3, 4))[1:] == (3, 4)
    with pytest.raises(ValueError, match="the run took steps 0-19"):
        diverge.examined(_report({"torch": t, "flax": t}), (3, 20))


def test_what_is_not_a_run_with_its_snapshots_is_refused_in_one_line(runs, tmp_path, capsys):
    def refused(argv: list[str], words: str) -> None:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "Traceback" not in err, err

    refused(["diverge", str(tmp_path / "nowhere")], "is not a folder")
    refused(["diverge", str(tmp_path)], "holds no train.json")
    copy = tmp_path / "copy"
    shutil.copytree(runs["flax"], copy, ignore=shutil.ignore_patterns("snapshots"))
    refused(["diverge", str(copy)], "holds no snapshots: train with --snapshot-every K")
    shutil.copytree(runs["flax"] / "snapshots", copy / "snapshots")
    data = json.loads((copy / "train.json").read_text())
    data["runs"]["flax"]["step_losses"][2] += 1e-3
    (copy / "train.json").write_text(json.dumps(data))
    refused(["diverge", str(copy), "--steps", "5-5"], "is not of this run: its steps differ from train.json's")
    del data["runs"]["flax"]
    (copy / "train.json").write_text(json.dumps(data))
    refused(["diverge", str(copy)], "records one twin")
    refused(["diverge", str(runs["flax"]), "--steps", "4-2"], "expected A-B with 0 <= A <= B")
    refused([*_argv(runs["flax"]), "--snapshot-every", "2"], "already holds another run's snapshots/")
    refused([*_argv(tmp_path / "new"), "--plant-defect", "flax:3:nope.weight:2"], "parameter 'nope.weight' is not")
    refused([*_argv(tmp_path / "new"), "--plant-defect", "flax:3:out_head.weight:1"], "other than 1")
    refused([*_argv(tmp_path / "new"), "--plant-defect", "jax:3:out_head.weight:2"], "twin is torch or flax")


def _argv(out) -> list[str]:
    return ["train", "--config", CONFIG, "--epochs", "1", "--steps", "2", "--quiet", "--out", str(out)]


def test_a_defect_spec_reads_back_as_written():
    d = OneStepDefect.parse("torch:30:trf_blocks.0.norm1.scale:0.5:exp_avg_sq")
    assert (d.twin, d.step, d.param, d.factor, d.part) == ("torch", 30, "trf_blocks.0.norm1.scale", 0.5, "exp_avg_sq")
    assert OneStepDefect(**d.to_json()) == d
    assert np.isclose(OneStepDefect.parse("flax:1:out_head.weight:-2").factor, -2.0)


def test_the_recorded_124m_verdicts():
    """docs/training.md's runs: the book's run with dropout off, a defect planted at step 30."""
    docs = ROOT / "docs"
    run = json.loads((docs / "train-gpt2-small-defect-at-step-30.json").read_text())
    clean = json.loads((docs / "train-gpt2-small-dropout-off.json").read_text())
    for twin in resume.TWINS:  # the defect acts on the weights after step 30: the losses to 30 are the run's
        assert run["runs"][twin]["step_losses"][:31] == clean["runs"][twin]["step_losses"][:31], twin
    assert OneStepDefect(**run["planted"]) == OneStepDefect("flax", 30, "trf_blocks.5.att.W_value.weight", 8.0)
    spike = json.loads((docs / "diverge-gpt2-small-spike.json").read_text())
    assert spike["kind"] == "rounding carried in" and spike["reproduces_the_recorded_losses"]
    assert [s["step"] for s in spike["steps"]] == list(range(20, 27))
    for s in spike["steps"]:
        same = s["same_state"]
        assert same["inputs_max_abs_diff"] == {"weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
        assert all(same[kind]["n_failed"] == 0 and same[kind]["margin"] <= 1 for kind in step_evidence.EVIDENCE_KINDS)
        assert s["recorded_losses"] == {t: clean["runs"][t]["step_losses"][s["step"]] for t in resume.TWINS}
    defect = json.loads((docs / "diverge-gpt2-small-defect.json").read_text())
    assert defect["kind"] == "defect" and defect["defect_step"] == 30 and defect["reproduces_the_recorded_losses"]
    found = defect["steps"][-1]["same_state"]
    assert found["first_failure"]["what"] == "update of trf_blocks.5.att.W_value.weight"
    assert all(found[kind]["n_failed"] == 0 for kind in ("stages", "loss", "grads", "moments"))
