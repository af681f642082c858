"""The Flax twin's own checkpoint (gpt_flax/checkpoint.py, Orbax): round trips bit for bit, a resumed
run equal to the uninterrupted one, retention, refusals in one line, a save cut short never read,
and the conversions through the canonical training state, to and from the torch twin's checkpoint.
Restoring onto another mesh needs 8 devices: tests/parity_tests/sharded_cases.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from parity_tests.configs import TINY
from tests.gpt_torch.test_torch_checkpoint import assert_same_state

CFG = TINY.replace(drop_rate=0.0)
LR = 1e-3


def _batches(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = [rng.integers(0, CFG.vocab_size, (2, CFG.context_length + 1)) for _ in range(n)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _model(seed: int = 0, parity_dropout: bool = True):
    model = gpt_flax.GPTModel(CFG, rngs=nnx.Rngs(seed))
    if parity_dropout:
        gpt_flax.use_parity_dropout(model, 3)
    return model, gpt_flax.adamw(model, lr=LR)


@pytest.fixture(scope="module")
def stepped():
    model, optimizer = _model()
    for x, y in _batches(2):
        gpt_flax.train_step(model, optimizer, x, y)
    model.dropout_counter[...] = 7  # a counter other than the default
    return model, optimizer


def test_a_round_trip_is_bit_identical(tmp_path, stepped):
    model, optimizer = stepped
    arrays = {"orders": np.arange(6).reshape(2, 3)}
    folder = gpt_flax.save_checkpoint(tmp_path, model, optimizer, step=2, run={"epoch": 1}, arrays=arrays)
    assert folder == tmp_path / "2" and {"params", "optimizer", "meta", "arrays"} <= {p.name for p in folder.iterdir()}
    fresh, fresh_opt = _model(seed=5)
    assert gpt_flax.restore_checkpoint(tmp_path, fresh, fresh_opt) == (2, {"epoch": 1})
    saved = gpt_flax.train_state(model, optimizer, run={"epoch": 1}, arrays=arrays)
    assert_same_state(saved, gpt_flax.train_state(fresh, fresh_opt, run={"epoch": 1}, arrays=arrays))
    assert int(fresh_opt.step[...]) == 2
    assert_same_state(saved, gpt_flax.checkpoint_to_train_state(tmp_path))


def test_a_resumed_run_equals_the_uninterrupted_run(tmp_path):
    batches = _batches(6, seed=1)
    ref, ref_opt = _model(parity_dropout=False)
    ref_losses = [gpt_flax.train_step(ref, ref_opt, x, y) for x, y in batches]
    first, first_opt = _model(parity_dropout=False)
    losses = [gpt_flax.train_step(first, first_opt, x, y) for x, y in batches[:3]]
    gpt_flax.save_checkpoint(tmp_path, first, first_opt, step=3)
    resumed, resumed_opt = _model(seed=9, parity_dropout=False)  # other weights: all overwritten
    gpt_flax.restore_checkpoint(tmp_path, resumed, resumed_opt)
    losses += [gpt_flax.train_step(resumed, resumed_opt, x, y) for x, y in batches[3:]]
    assert losses == ref_losses
    assert_same_state(gpt_flax.train_state(ref, ref_opt), gpt_flax.train_state(resumed, resumed_opt))


def test_only_the_newest_max_to_keep_steps_are_kept(tmp_path, stepped):
    model, optimizer = stepped
    for step in range(1, 5):
        gpt_flax.save_checkpoint(tmp_path, model, optimizer, step=step, max_to_keep=2)
    assert gpt_flax.checkpoint_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["3", "4"]


def test_refusals_are_one_line(tmp_path, stepped):
    model, optimizer = stepped
    refusals = []

    def refused(call, match):
        with pytest.raises(ValueError, match=match) as e:
            call()
        refusals.append(str(e.value))

    refused(lambda: gpt_flax.restore_checkpoint(tmp_path / "none", model, optimizer), "holds no Orbax checkpoint")
    (tmp_path / "empty").mkdir()
    refused(lambda: gpt_flax.checkpoint_to_train_state(tmp_path / "empty"), "holds no Orbax checkpoint")
    gpt_flax.save_checkpoint(tmp_path, model, optimizer, step=2)
    refused(
        lambda: gpt_flax.restore_checkpoint(tmp_path, model, optimizer, step=3),
        r"no checkpoint of step 3; it holds steps \[2\]",
    )
    refused(
        lambda: gpt_flax.save_checkpoint(tmp_path, model, optimizer, step=2), "already holds a checkpoint of step 2"
    )
    other = gpt_flax.use_parity_dropout(gpt_flax.GPTModel(CFG.replace(emb_dim=12), rngs=nnx.Rngs(0)))
    refused(
        lambda: gpt_flax.restore_checkpoint(tmp_path, other, gpt_flax.adamw(other, lr=LR)),
        "emb_dim=24, the model emb_dim=12",
    )
    fresh, _ = _model()
    refused(
        lambda: gpt_flax.restore_checkpoint(tmp_path, fresh, gpt_flax.adamw(fresh)),
        "lr=0.001, the run asks for lr=0.0004",
    )
    plain, plain_opt = _model(parity_dropout=False)
    refused(lambda: gpt_flax.restore_checkpoint(tmp_path, plain, plain_opt), "dropout")
    assert all("\n" not in r for r in refusals)


def test_a_save_cut_short_is_never_read(tmp_path, stepped):
    """Orbax writes a step into `STEP.orbax-checkpoint-tmp` and renames it once whole: a process
    killed mid-save leaves that folder (here: a copy of a step with its items half there), which is
    never listed, and the previous step stays the latest, restorable."""
    model, optimizer = stepped
    gpt_flax.save_checkpoint(tmp_path, model, optimizer, step=2)
    before = gpt_flax.train_state(model, optimizer)
    half = tmp_path / "3.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "2", half)
    shutil.rmtree(half / "meta")
    (half / "_CHECKPOINT_METADATA").unlink()
    assert gpt_flax.checkpoint_steps(tmp_path) == [2]
    assert_same_state(before, gpt_flax.checkpoint_to_train_state(tmp_path))
    gpt_flax.save_checkpoint(tmp_path, model, optimizer, step=3)  # the next save of that step succeeds
    assert gpt_flax.checkpoint_steps(tmp_path) == [2, 3]


def test_orbax_to_canonical_to_torch_and_back_is_bit_identical(tmp_path, stepped):
    """Orbax -> TrainState -> torch.save -> TrainState -> Orbax -> TrainState, nothing changed."""
    model, optimizer = stepped
    gpt_flax.save_checkpoint(tmp_path / "orbax", model, optimizer, step=2, run={"epoch": 1})
    state = gpt_flax.checkpoint_to_train_state(tmp_path / "orbax")
    gpt_torch.train_state_to_checkpoint(state, tmp_path / "torch")
    through_torch = gpt_torch.checkpoint_to_train_state(tmp_path / "torch")
    assert_same_state(state, through_torch)
    gpt_flax.train_state_to_checkpoint(through_torch, tmp_path / "back", step=5)
    assert_same_state(state, gpt_flax.checkpoint_to_train_state(tmp_path / "back", step=5))
    # and the kernels, transposed once each way, are the live ones
    adam = optimizer.opt_state[0]
    assert np.array_equal(state.exp_avg["out_head.weight"], np.asarray(adam.mu["out_head"]["kernel"][...]).T)


def test_a_torch_checkpoint_restores_in_flax_through_the_canonical_state(tmp_path):
    torch.manual_seed(0)
    tm = gpt_torch.use_parity_dropout(gpt_torch.GPTModel(CFG), 3)
    topt = gpt_torch.adamw(tm, lr=LR)
    for x, y in _batches(2):
        gpt_torch.train_step(tm, topt, torch.from_numpy(x), torch.from_numpy(y))
    gpt_torch.save_checkpoint(tmp_path / "torch", tm, topt, step=2, run={"from": "torch"})
    gpt_flax.train_state_to_checkpoint(gpt_torch.checkpoint_to_train_state(tmp_path / "torch"), tmp_path / "orbax")
    fm, fopt = _model(seed=4)
    assert gpt_flax.restore_checkpoint(tmp_path / "orbax", fm, fopt) == (2, {"from": "torch"})
    assert_same_state(
        gpt_torch.train_state(tm, topt, run={"from": "torch"}), gpt_flax.train_state(fm, fopt, run={"from": "torch"})
    )
    expected = gpt_torch.train_state(tm, topt, run={"from": "torch"})
    assert_same_state(expected, gpt_flax.checkpoint_to_train_state(tmp_path / "orbax"))
