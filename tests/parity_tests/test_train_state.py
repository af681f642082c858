"""The canonical training state: mapped exactly onto torch.optim.AdamW's state_dict and optax's
ScaleByAdamState, read from the book's model_and_optimizer.pth, refused in one line where it does
not fit, never read half-written; and a chapter-5 run stopped in one twin and resumed in either
equals the uninterrupted run (bit for bit in the same twin, within the training bounds across)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from gpt_spec.data import the_verdict
from gpt_spec.formats import train_state as ts
from gpt_spec.training import CHAPTER5
from parity_cli.main import main
from parity_tests import resume, twins
from parity_tests.chapter5 import Chapter5Report, TwinRun
from parity_tests.configs import TINY
from parity_tests.training import weights_check
from parity_tests.twins import build_pair, float32_matmuls
from tests.helpers import ROOT

CFG = TINY.replace(drop_rate=0.0)


def _batches(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = [rng.integers(0, CFG.vocab_size, (2, CFG.context_length + 1)) for _ in range(n)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _step(twin: str, model, optimizer, x, y) -> float:
    if twin == "torch":
        return gpt_torch.train_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y))
    return gpt_flax.train_step(model, optimizer, x, y)


@pytest.fixture(scope="module")
def stepped():
    """Both twins from the same weights after 2 AdamW steps on the same batches."""
    with float32_matmuls():
        tm, fm = build_pair("gpt", CFG, source="torch", seed=0, mode="train")
        to, fo = gpt_torch.adamw(tm, lr=1e-3), gpt_flax.adamw(fm, lr=1e-3)
        for x, y in _batches(2):
            _step("torch", tm, to, x, y)
            _step("flax", fm, fo, x, y)
    return tm, to, fm, fo


def test_the_torch_state_is_adamws_state_dict_under_canonical_names(stepped):
    tm, to, _, _ = stepped
    state = gpt_torch.train_state(tm, to)
    assert state.step == 2 and state.adamw == ts.AdamWSettings(lr=1e-3)
    for name, p in tm.named_parameters():
        assert np.array_equal(state.exp_avg[name], to.state[p]["exp_avg"].numpy()), name
        assert np.array_equal(state.exp_avg_sq[name], to.state[p]["exp_avg_sq"].numpy()), name
    # and back: a fresh optimizer holds the same state_dict, tensor for tensor
    model, _ = build_pair("gpt", CFG, source="torch", seed=5, mode="train")
    fresh = gpt_torch.adamw(model, lr=1e-3)
    gpt_torch.load_train_state(model, fresh, state)
    a, b = to.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)


def test_the_flax_state_is_optaxs_scale_by_adam_state_transposed_as_the_weights(stepped):
    _, _, fm, fo = stepped
    state = gpt_flax.train_state(fm, fo)
    adam = fo.opt_state[0]
    assert state.step == int(adam.count[...]) == 2
    assert np.array_equal(state.exp_avg["out_head.weight"], np.asarray(adam.mu["out_head"]["kernel"][...]).T)
    assert np.array_equal(state.exp_avg_sq["tok_emb.weight"], np.asarray(adam.nu["tok_emb"]["embedding"][...]))
    _, model = build_pair("gpt", CFG, source="flax", seed=5, mode="train")
    fresh = gpt_flax.adamw(model, lr=1e-3)
    gpt_flax.load_train_state(model, fresh, state)
    back = gpt_flax.train_state(model, fresh)
    assert back.step == 2 and int(fresh.step[...]) == 2
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        for name, value in getattr(state, part).items():
            assert np.array_equal(getattr(back, part)[name], value), (part, name)


def test_the_twins_states_agree_after_the_same_steps(stepped):
    tm, to, fm, fo = stepped
    t, f = gpt_torch.train_state(tm, to), gpt_flax.train_state(fm, fo)
    assert t.step == f.step and t.adamw == f.adamw and list(t.exp_avg) == list(f.exp_avg)
    check = weights_check(2, t.weights, f.weights, 1e-3)
    assert check.passed, check.to_json()


@pytest.mark.parametrize("source, target", [("torch", "flax"), ("flax", "torch"), ("torch", "torch"), ("flax", "flax")])
def test_k_steps_then_m_steps_resumed_equal_k_plus_m_steps(tmp_path, source, target):
    """Random batches, weight decay on: 3 steps in `source`, saved to a file and read back, 3 more
    in `target`, against 6 steps in `source`; bit for bit in the same twin."""
    batches = _batches(6, seed=1)
    with float32_matmuls():
        pair = build_pair("gpt", CFG, source="torch", seed=0, mode="train")
        ref_model = pair[0] if source == "torch" else pair[1]
        ref_opt = twins.package(source).adamw(ref_model, lr=1e-3)
        ref_losses = [_step(source, ref_model, ref_opt, x, y) for x, y in batches]
        ref = twins.package(source).train_state(ref_model, ref_opt)

        pair = build_pair("gpt", CFG, source="torch", seed=0, mode="train")
        first = pair[0] if source == "torch" else pair[1]
        first_opt = twins.package(source).adamw(first, lr=1e-3)
        losses = [_step(source, first, first_opt, x, y) for x, y in batches[:3]]
        ts.save_train_state(tmp_path / "s.safetensors", twins.package(source).train_state(first, first_opt))

        pair = build_pair("gpt", CFG, source="torch", seed=9, mode="train")  # other weights: all overwritten
        second = pair[0] if target == "torch" else pair[1]
        package = twins.package(target)
        second_opt = package.adamw(second, lr=1e-3)
        package.load_train_state(second, second_opt, ts.load_train_state(tmp_path / "s.safetensors"))
        losses += [_step(target, second, second_opt, x, y) for x, y in batches[3:]]
        got = package.train_state(second, second_opt)
    assert got.step == ref.step == 6
    if source == target:
        assert losses == ref_losses
        for part in ("weights", "exp_avg", "exp_avg_sq"):
            for name, value in getattr(ref, part).items():
                assert np.array_equal(getattr(got, part)[name], value), (part, name)
    else:
        from parity_tests.tolerances import LOSS

        assert np.allclose(losses, ref_losses, rtol=LOSS.rtol, atol=LOSS.atol), (losses, ref_losses)
        check = weights_check(6, ref.weights, got.weights, 1e-3)
        assert check.passed, check.to_json()


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_a_state_is_a_copy_that_later_steps_leave_alone(twin):
    pair = build_pair("gpt", CFG, source="torch", seed=0, mode="train")
    model, package = (pair[0], gpt_torch) if twin == "torch" else (pair[1], gpt_flax)
    optimizer = package.adamw(model)
    (x, y), later = _batches(2)
    _step(twin, model, optimizer, x, y)
    state = package.train_state(model, optimizer)
    saved = {
        part: {k: v.copy() for k, v in getattr(state, part).items()} for part in ("weights", "exp_avg", "exp_avg_sq")
    }
    _step(twin, model, optimizer, *later)
    for part, tensors in saved.items():
        assert all(np.array_equal(getattr(state, part)[k], v) for k, v in tensors.items()), part
    # and a state loaded is copied in: the steps after it leave it alone
    package.load_train_state(model, optimizer, state)
    _step(twin, model, optimizer, *later)
    for part, tensors in saved.items():
        assert all(np.array_equal(getattr(state, part)[k], v) for k, v in tensors.items()), f"{part} after a load"


def _state(**changes) -> ts.TrainState:
    tm, _ = build_pair("gpt", CFG, source="torch", seed=0, mode="train")
    state = gpt_torch.train_state(tm, gpt_torch.adamw(tm))
    return dataclasses.replace(state, **changes)


@pytest.mark.parametrize("twin", ["torch", "flax"])
@pytest.mark.parametrize(
    "change, words",
    [
        ({"cfg": CFG.replace(n_layers=3)}, "its config has n_layers=3, the model n_layers=2"),
        ({"adamw": ts.AdamWSettings(lr=1e-3)}, "its optimizer has lr=0.001, the run asks for lr=0.0004"),
        ({"adamw": ts.AdamWSettings(betas=(0.9, 0.99))}, "its optimizer has betas=[0.9, 0.99]"),
        ({"dropout_counter": 4}, "its dropout_counter is 4 (its run drew parity dropout), the model draws none"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_naming_the_field_and_changes_nothing(twin, change, words):
    state = _state(**change)
    pair = build_pair("gpt", CFG, source="torch", seed=3, mode="train")
    model = pair[0] if twin == "torch" else pair[1]
    package = twins.package(twin)
    optimizer = package.adamw(model)
    before = package.state_dict(model)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        package.load_train_state(model, optimizer, state)
    after = package.state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_model_with_parity_dropout_refuses_a_state_without_a_counter():
    state = _state()
    tm, fm = build_pair("gpt", TINY, source="torch", seed=0, mode="train")
    for package, model in ((gpt_torch, tm), (gpt_flax, fm)):
        package.use_parity_dropout(model, 1)
        with pytest.raises(ValueError, match="it has no dropout_counter"):
            package.load_train_state(model, package.adamw(model), dataclasses.replace(state, cfg=TINY))


def test_a_damaged_state_is_refused_in_one_line(tmp_path):
    state = _state()
    bad = dict(state.exp_avg, **{"out_head.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="its exp_avg: .*out_head.weight"):
        ts.save_train_state(tmp_path / "a.safetensors", dataclasses.replace(state, exp_avg=bad))
    negative = dict(state.exp_avg_sq, **{"tok_emb.weight": -np.ones(state.weights["tok_emb.weight"].shape, np.float32)})
    with pytest.raises(ValueError, match="exp_avg_sq holds a negative value"):
        ts.save_train_state(tmp_path / "a.safetensors", dataclasses.replace(state, exp_avg_sq=negative))
    assert not list(tmp_path.iterdir())  # refused before anything was written
    ts.save_train_state(tmp_path / "s.safetensors", state)
    whole = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="half.safetensors"):
        ts.load_train_state(tmp_path / "half.safetensors")
    gpt_torch.save(build_pair("gpt", CFG, source="torch", seed=0)[0], tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="is not a training state"):
        ts.load_train_state(tmp_path / "w.safetensors")


def test_a_write_that_fails_leaves_the_old_state_and_no_temporary(tmp_path, monkeypatch):
    state = _state()
    path = tmp_path / "s.safetensors"
    ts.save_train_state(path, state)
    before = path.read_bytes()

    def fail(tmp, tensors, metadata):
        tmp.write_bytes(b"half a state")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ts.safetensors_io, "write_verified", fail)
    with pytest.raises(ValueError, match="No space left"):
        ts.save_train_state(path, dataclasses.replace(state, step=0))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_the_books_model_and_optimizer_pth_loads_with_its_optimizer_into_either_twin(tmp_path):
    """Chapter 5's torch.save({"model_state_dict", "optimizer_state_dict"}) after 2 steps of the
    book's AdamW (plain torch.optim.AdamW, the book's settings)."""
    tm, _ = build_pair("gpt", CFG, source="torch", seed=0, mode="train")
    optimizer = torch.optim.AdamW(tm.parameters(), lr=0.0004, weight_decay=0.1)
    for x, y in _batches(2):
        optimizer.zero_grad()
        gpt_torch.calc_loss_batch(torch.from_numpy(x), torch.from_numpy(y), tm).backward()
        optimizer.step()
    torch.save(
        {"model_state_dict": tm.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
        tmp_path / "model_and_optimizer.pth",
    )
    state = ts.load_train_state(tmp_path / "model_and_optimizer.pth", config=CFG)
    assert state.step == 2 and state.adamw == ts.AdamWSettings()
    for name, p in tm.named_parameters():
        assert np.array_equal(state.exp_avg_sq[name], optimizer.state[p]["exp_avg_sq"].numpy()), name
    tm2, fm2 = build_pair("gpt", CFG, source="torch", seed=4, mode="train")
    for package, model in ((gpt_torch, tm2), (gpt_flax, fm2)):
        opt = package.adamw(model)
        package.load_train_state(model, opt, state)
        back = package.train_state(model, opt)
        assert all(np.array_equal(back.exp_avg[k], state.exp_avg[k]) for k in state.exp_avg)
    torch.save({"model_state_dict": tm.state_dict()}, tmp_path / "weights_only.pth")
    with pytest.raises(ValueError, match="holds no optimizer_state_dict"):
        ts.load_train_state(tmp_path / "weights_only.pth", config=CFG)


# --- the chapter-5 run, stopped and resumed -------------------------------------------------------

TINY5 = GPTConfig.from_dict(json.loads((ROOT / "examples" / "chapter5-tiny.json").read_text()))
SETTINGS = dataclasses.replace(CHAPTER5, num_epochs=1, lr=0.004, eval_freq=4, eval_iter=2)
K, M = 6, 5  # stop mid-epoch, past an evaluation; resume past another


@pytest.fixture(scope="module")
def chapter5_runs(tmp_path_factory):
    """Both twins with parity dropout: K + M steps uninterrupted, and K steps with states saved."""
    folder = tmp_path_factory.mktemp("states")
    text = the_verdict()
    whole = resume.run_segment(TINY5, text, steps=K + M, settings=SETTINGS)
    part = resume.run_segment(TINY5, text, steps=K, settings=SETTINGS, save_dir=folder)
    return text, whole, part


@pytest.mark.parametrize("source, target", [("torch", "flax"), ("flax", "torch"), ("torch", "torch"), ("flax", "flax")])
def test_a_chapter5_run_resumed_in_either_twin_is_the_uninterrupted_run(chapter5_runs, source, target):
    """Same batches (torch's generator state and the epoch's order in the state) and the same
    dropout masks (the counter): equal bit for bit in the same twin, within the chapter-5 bound
    across twins."""
    text, whole, part = chapter5_runs
    assert not part.report.failures()
    resumed = resume.run_segment(None, text, twins=(target,), steps=M, resume=part.states[source])
    got, ref = resumed.report.runs[target], whole.report.runs[source]
    assert len(got.step_losses) == K + M and got.step_losses[:K] == ref.step_losses[:K]
    if source == target:
        assert got.step_losses == ref.step_losses and got.evals == ref.evals
    else:
        judged = Chapter5Report(
            whole.report.cfg, SETTINGS, "parity", CHAPTER5.seed, 0, 0, "", {source: ref, target: got}
        )
        assert not judged.failures(), judged.failures()
        assert got.step_losses[K:] != ref.step_losses[K:]  # the other twin really ran them


def test_train_saves_and_resumes_from_the_command_line(chapter5_runs, tmp_path, capsys):
    text, _, part = chapter5_runs
    folder = os.path.dirname(part.states["torch"])
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", folder, "--out", str(tmp_path)])
    assert e.value.code == 2 and "holds torch-state.safetensors and flax-state.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", part.states["torch"], "--lr", "0.001", "--out", str(tmp_path)])
    assert "--lr 0.001 differs from the state's lr 0.004" in capsys.readouterr().err
    code = main(
        ["train", "--resume", part.states["torch"], "--twin", "both", "--steps", "2", "--quiet", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0 and f"steps {K + 1}-{K + 2} of" in out and "PASS" in out
    data = json.loads((tmp_path / "train.json").read_text())
    assert data["segment"] == {
        "start": K,
        "stop": K + 2,
        "twins": ["torch", "flax"],
        "resumed_from": part.states["torch"],
    }


@pytest.mark.parametrize("source, target", [("torch", "flax"), ("flax", "torch")])
def test_the_recorded_124m_run_resumed_in_the_other_twin_is_the_uninterrupted_run(source, target):
    """docs/training.md's runs: 45 steps of the book's run in `source`, then 45 in `target` from the
    state, against the recorded uninterrupted `source` run, judged by today's chapter-5 bound."""
    docs = ROOT / "docs"
    resumed = json.loads((docs / f"train-gpt2-small-resumed-in-{target}.json").read_text())
    book = json.loads((docs / "train-gpt2-small-parity-dropout.json").read_text())
    got, ref = resumed["runs"][target], book["runs"][source]
    assert resumed["segment"]["start"] == 45 and resumed["config"] == book["config"]
    assert got["step_losses"][:45] == ref["step_losses"][:45] and len(got["step_losses"]) == 90
    judged = Chapter5Report(
        GPTConfig.from_dict(book["config"]),
        CHAPTER5,
        "parity",
        CHAPTER5.seed,
        0,
        0,
        "",
        {source: TwinRun(**{**ref, "greedy_ids": [], "sampled_ids": []}), target: TwinRun(**got)},
    )
    assert not judged.failures(), judged.failures()
