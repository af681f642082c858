"""The torch twin's own checkpoint (gpt_torch/checkpoint.py): the book's torch.save file in one
process, DCP in a process group; round trips bit for bit, a resumed run equal to the uninterrupted
one, retention, refusals in one line, a save cut short never read, and both conversions to the
canonical training state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist

import gpt_torch
from gpt_spec.formats.train_state import load_train_state
from parity_tests.configs import TINY

CFG = TINY.replace(drop_rate=0.0)
LR = 1e-3


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    data = [torch.from_numpy(rng.integers(0, CFG.vocab_size, (2, CFG.context_length + 1))) for _ in range(n)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _model(seed: int = 0, parity_dropout: bool = True):
    torch.manual_seed(seed)
    model = gpt_torch.GPTModel(CFG)
    if parity_dropout:
        gpt_torch.use_parity_dropout(model, 3)
    return model, gpt_torch.adamw(model, lr=LR)


def _stepped(steps: int = 2, seed: int = 0):
    model, optimizer = _model(seed)
    for x, y in _batches(steps):
        gpt_torch.train_step(model, optimizer, x, y)
    model.dropout_counter.value = 7  # a counter other than the default
    return model, optimizer


def assert_same_state(a, b) -> None:
    """Two TrainStates equal bit for bit: weights, both moments, step, settings, counter, run."""
    assert (a.cfg, a.step, a.adamw, a.dropout_counter, a.run) == (b.cfg, b.step, b.adamw, b.dropout_counter, b.run)
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        x, y = getattr(a, part), getattr(b, part)
        assert list(x) == list(y), part
        for name in x:
            assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), (part, name)
    assert a.arrays.keys() == b.arrays.keys() and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def test_a_round_trip_is_bit_identical_and_the_file_is_the_books(tmp_path):
    model, optimizer = _stepped()
    folder = gpt_torch.save_checkpoint(tmp_path, model, optimizer, step=2, run={"epoch": 1}, arrays={"o": np.arange(4)})
    assert folder == tmp_path / "2" and sorted(p.name for p in folder.iterdir()) == ["model_and_optimizer.pth"]
    fresh, fresh_opt = _model(seed=5)
    assert gpt_torch.restore_checkpoint(tmp_path, fresh, fresh_opt) == (2, {"epoch": 1})
    saved = gpt_torch.train_state(model, optimizer, run={"epoch": 1}, arrays={"o": np.arange(4)})
    assert_same_state(saved, gpt_torch.train_state(fresh, fresh_opt, run={"epoch": 1}, arrays={"o": np.arange(4)}))
    assert_same_state(saved, gpt_torch.checkpoint_to_train_state(tmp_path))
    # the book's own reader takes the file too (its extra keys aside)
    book = load_train_state(folder / "model_and_optimizer.pth", config=CFG)
    assert np.array_equal(book.exp_avg_sq["out_head.weight"], saved.exp_avg_sq["out_head.weight"])


def test_a_resumed_run_equals_the_uninterrupted_run(tmp_path):
    batches = _batches(6, seed=1)
    ref, ref_opt = _model(parity_dropout=False)
    ref_losses = [gpt_torch.train_step(ref, ref_opt, x, y) for x, y in batches]
    first, first_opt = _model(parity_dropout=False)
    losses = [gpt_torch.train_step(first, first_opt, x, y) for x, y in batches[:3]]
    gpt_torch.save_checkpoint(tmp_path, first, first_opt, step=3)
    resumed, resumed_opt = _model(seed=9, parity_dropout=False)  # other weights: all overwritten
    gpt_torch.restore_checkpoint(tmp_path, resumed, resumed_opt)
    losses += [gpt_torch.train_step(resumed, resumed_opt, x, y) for x, y in batches[3:]]
    assert losses == ref_losses
    assert_same_state(gpt_torch.train_state(ref, ref_opt), gpt_torch.train_state(resumed, resumed_opt))


def test_only_the_newest_max_to_keep_steps_are_kept(tmp_path):
    model, optimizer = _model()
    for step in range(1, 5):
        gpt_torch.save_checkpoint(tmp_path, model, optimizer, step=step, max_to_keep=2)
    assert gpt_torch.checkpoint_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_dcp_in_a_process_group_full_names_restored_without_one(tmp_path):
    """Inside a (one-rank gloo) process group the step is DCP, under the full names; it restores
    into a plain model with no process group, and converts to the canonical state."""
    model, optimizer = _stepped()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        folder = gpt_torch.save_checkpoint(tmp_path / "ck", model, optimizer, step=2, arrays={"o": np.arange(3)})
    finally:
        dist.destroy_process_group()
    assert {".metadata", "checkpoint.json", "arrays.pth"} <= {p.name for p in folder.iterdir()}
    import torch.distributed.checkpoint as dcp

    names = set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
    assert "model.trf_blocks.0.att.W_query.weight" in names
    assert "optimizer.state.out_head.weight.exp_avg_sq" in names  # FQNs, not parameter indices
    fresh, fresh_opt = _model(seed=5)
    assert gpt_torch.restore_checkpoint(tmp_path / "ck", fresh, fresh_opt) == (2, {})
    saved = gpt_torch.train_state(model, optimizer, arrays={"o": np.arange(3)})
    assert_same_state(saved, gpt_torch.train_state(fresh, fresh_opt, arrays={"o": np.arange(3)}))
    assert_same_state(saved, gpt_torch.checkpoint_to_train_state(tmp_path / "ck"))


def test_the_canonical_state_converts_both_ways(tmp_path):
    model, optimizer = _stepped()
    state = gpt_torch.train_state(model, optimizer, run={"at": "x"}, arrays={"orders": np.arange(6).reshape(2, 3)})
    assert gpt_torch.train_state_to_checkpoint(state, tmp_path) == tmp_path / "2"
    assert_same_state(state, gpt_torch.checkpoint_to_train_state(tmp_path, step=2))
    gpt_torch.train_state_to_checkpoint(dataclasses.replace(state, dropout_counter=None), tmp_path, step=9)
    assert gpt_torch.checkpoint_to_train_state(tmp_path).dropout_counter is None


def test_refusals_are_one_line(tmp_path):
    model, optimizer = _stepped()
    refusals = []

    def refused(call, match):
        with pytest.raises(ValueError, match=match) as e:
            call()
        refusals.append(str(e.value))

    refused(lambda: gpt_torch.restore_checkpoint(tmp_path, model, optimizer), "holds no torch checkpoint")
    refused(lambda: gpt_torch.checkpoint_to_train_state(tmp_path / "none"), "holds no torch checkpoint")
    gpt_torch.save_checkpoint(tmp_path, model, optimizer, step=2)
    refused(
        lambda: gpt_torch.restore_checkpoint(tmp_path, model, optimizer, step=3),
        r"no checkpoint of step 3; it holds steps \[2\]",
    )
    refused(
        lambda: gpt_torch.save_checkpoint(tmp_path, model, optimizer, step=2), "already holds a checkpoint of step 2"
    )
    other = gpt_torch.GPTModel(CFG.replace(emb_dim=12))
    gpt_torch.use_parity_dropout(other)
    refused(
        lambda: gpt_torch.restore_checkpoint(tmp_path, other, gpt_torch.adamw(other, lr=LR)),
        "emb_dim=24, the model emb_dim=12",
    )
    refused(
        lambda: gpt_torch.restore_checkpoint(tmp_path, model, gpt_torch.adamw(model)),
        "lr=0.001, the run asks for lr=0.0004",
    )
    plain, plain_opt = _model(parity_dropout=False)
    refused(lambda: gpt_torch.restore_checkpoint(tmp_path, plain, plain_opt), "dropout")
    (tmp_path / "5").mkdir()  # a weights-only file where a step's should be
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "5" / "model_and_optimizer.pth")
    refused(lambda: gpt_torch.checkpoint_to_train_state(tmp_path), "holds no optimizer_state_dict: it is weights only")
    assert all("\n" not in r for r in refusals)


def test_a_save_cut_short_is_never_read(tmp_path, monkeypatch):
    model, optimizer = _stepped()
    gpt_torch.save_checkpoint(tmp_path, model, optimizer, step=2)
    before = gpt_torch.train_state(model, optimizer)
    gpt_torch.train_step(model, optimizer, *_batches(1, seed=4)[0])

    def cut_short(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="disk full"):
        gpt_torch.save_checkpoint(tmp_path, model, optimizer, step=3)
    monkeypatch.undo()
    assert (tmp_path / ".3.tmp" / "model_and_optimizer.pth").exists()  # the half-written step, hidden
    assert gpt_torch.checkpoint_steps(tmp_path) == [2]
    assert_same_state(dataclasses.replace(before, dropout_counter=7), gpt_torch.checkpoint_to_train_state(tmp_path))
    gpt_torch.save_checkpoint(tmp_path, model, optimizer, step=3)  # the next save replaces it
    assert gpt_torch.checkpoint_steps(tmp_path) == [2, 3] and not (tmp_path / ".3.tmp").exists()
