"""State that a call leaves behind, alike in both twins: a refused cached call changes nothing, a
cast goes on with the cache, a cache memory cannot hold is refused, a cached generation sizes its
cache, and an optimizer trains only the model (and the dtype) it was made for."""

import numpy as np
import pytest
import torch

import gpt_flax
import gpt_spec.limits
import gpt_torch
from parity_tests import twins
from parity_tests.configs import TINY
from parity_tests.tolerances import BF16_FORWARD, FP32_FORWARD
from parity_tests.twins import build_pair

CFG = TINY.replace(drop_rate=0.0)
TWINS = ("torch", "flax")


def _pair():
    tm, fm = build_pair("gpt", CFG, source="torch")
    tm.eval()
    fm.eval()
    return {"torch": tm, "flax": fm}


def _run(twin: str, model, ids: np.ndarray, **kwargs) -> np.ndarray:
    if twin == "torch":
        with torch.no_grad():
            return model(torch.from_numpy(ids), **kwargs).float().numpy()
    return np.asarray(model(ids, **kwargs))


def _position(twin: str, model) -> int:
    return int(model.current_pos) if twin == "torch" else int(model.current_pos[...])


def _caches(twin: str, model) -> list[np.ndarray]:
    out = []
    for block in model.trf_blocks:
        for cache in (block.att.cache_k, block.att.cache_v):
            out.append(cache.float().numpy().copy() if twin == "torch" else np.asarray(cache[...]).copy())
    return out


IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 6))


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    "refused, message",
    [
        (IDS[:1, :3], "the KV cache holds batch size 2, got 1: reset it"),
        (np.zeros((2, 6), np.int64), "sequence length 9 exceeds the KV cache's max_len 8"),
    ],
    ids=["another-batch", "past-max-len"],
)
def test_a_refused_cached_call_changes_no_state(twin, refused, message):
    """The refusal came from a block's attention after the model had advanced its position: the next
    call then ran at the wrong positions (logits 1.81 off, position 6 instead of 3)."""
    model = _pair()[twin]
    model.reset_kv_cache(batch_size=2, max_len=8)
    _run(twin, model, IDS[:, :3], use_cache=True)
    before = _caches(twin, model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _run(twin, model, refused, use_cache=True)
    assert _position(twin, model) == 3
    for a, b in zip(before, _caches(twin, model), strict=True):
        np.testing.assert_array_equal(a, b)
    after = _run(twin, model, IDS[:, 3:5], use_cache=True)
    model.reset_kv_cache()
    fresh = _run(twin, model, IDS[:, :5], use_cache=True)[:, 3:5]
    np.testing.assert_allclose(after, fresh, rtol=0, atol=FP32_FORWARD.stol * np.abs(fresh).max())


def test_cast_between_cached_calls_casts_the_cache_and_goes_on_in_both():
    """torch's module.to() cast the cache buffers and went on; the Flax twin's cache stayed float32
    and its next call raised TypeError. Now both cast it."""
    models = _pair()
    out = {}
    for twin, model in models.items():
        model.reset_kv_cache()
        _run(twin, model, IDS[:, :4], use_cache=True)
        twins.package(twin).cast(model, "bfloat16")
        out[twin] = _run(twin, model, IDS[:, 4:], use_cache=True)
        for block in model.trf_blocks:
            assert str(block.att.cache_k.dtype).removeprefix("torch.") == "bfloat16"
    bound = BF16_FORWARD.atol + BF16_FORWARD.stol * np.abs(out["torch"]).max()
    np.testing.assert_allclose(out["flax"], out["torch"], rtol=0, atol=bound)


@pytest.mark.parametrize("twin", TWINS)
def test_a_kv_cache_memory_cannot_hold_is_refused_before_it_is_allocated(twin, monkeypatch):
    """reset_kv_cache(batch_size=10**12) raised the allocator's RuntimeError (torch) or XLA's
    RESOURCE_EXHAUSTED; the first cached call of a batch the memory cannot hold, alike."""
    model = _pair()[twin]
    message = "a KV cache of batch 1000000000000 x 11 positions needs 4.22 PB"
    with pytest.raises(ValueError, match=message):
        model.reset_kv_cache(batch_size=10**12)
    monkeypatch.setattr(gpt_spec.limits, "available_memory", lambda: 1000)
    model.reset_kv_cache()
    with pytest.raises(
        ValueError,
        match=r"a KV cache of batch 2 x 11 positions needs 8.45 kB \(keys and values of 2 blocks, 24 wide, 4 bytes each\); 1 kB of memory is available",
    ):
        _run(twin, model, IDS[:, :3], use_cache=True)
    assert _position(twin, model) == 0 and model.trf_blocks[0].att.cache_k is None


def test_a_cached_call_after_a_cached_generation_is_refused_alike():
    """The Flax twin sized its cache for the generation, torch's for the whole context: after
    generate_text_simple_cached a cached call went on in torch and was refused in Flax. Both size it
    for the generation now and refuse the same call."""
    models = _pair()
    messages = []
    for twin, model in models.items():
        package = twins.package(twin)
        prompt = torch.from_numpy(IDS[:, :2]) if twin == "torch" else IDS[:, :2]
        package.generate_text_simple_cached(model, prompt, 3)
        assert _position(twin, model) == 4
        with pytest.raises(ValueError) as err:
            _run(twin, model, IDS[:, :1], use_cache=True)
        messages.append(str(err.value))
    assert (
        messages[0]
        == messages[1]
        == (
            "sequence length 5 exceeds the KV cache's max_len 4 (4 cached + 1 new tokens; reset it with a larger max_len)"
        )
    )


def _batch():
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 7))
    return ids[:, :-1], ids[:, 1:]


def _step(twin, model, optimizer):
    x, y = _batch()
    if twin == "torch":
        return gpt_torch.train_step(model, optimizer, torch.from_numpy(x), torch.from_numpy(y))
    return gpt_flax.train_step(model, optimizer, x, y)


@pytest.mark.parametrize("twin", TWINS)
def test_an_optimizer_made_for_another_model_is_refused_and_nothing_changes(twin):
    """torch's step cleared and stepped the other model's parameters and left this one's gradients
    to pile up (nothing trained, silently); the Flax step trained this model with the other's state."""
    package = twins.package(twin)
    model, other = _pair()[twin], _pair()[twin]
    model.train()
    optimizer = package.adamw(other)
    before = package.state_dict(model)
    with pytest.raises(
        ValueError, match=r"the optimizer does not hold this model's parameters: make one with adamw\(model\)"
    ):
        _step(twin, model, optimizer)
    after = package.state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    if twin == "torch":
        assert all(p.grad is None for p in model.parameters())
    _step(twin, model, package.adamw(model))  # its own trains
    assert any(not np.array_equal(before[k], v) for k, v in package.state_dict(model).items())


@pytest.mark.parametrize("twin", TWINS)
def test_an_optimizer_made_before_a_cast_is_refused(twin):
    """torch creates its moments at the first step, optax at adamw(): a cast between adamw() and the
    first step went on in one twin and not the other."""
    package = twins.package(twin)
    model = _pair()[twin]
    model.train()
    optimizer = package.adamw(model)
    package.cast(model, "bfloat16")
    message = "the optimizer was made for this model's float32 parameters, which are bfloat16 now"
    with pytest.raises(ValueError, match=message):
        _step(twin, model, optimizer)
    assert np.isfinite(_step(twin, model, package.adamw(model)))


def test_a_cached_call_with_dropout_on_is_refused_alike_and_changes_nothing():
    """In train mode the attention's dropout masks depend on how many keys a cached call attends
    over: torch's cache gives the filled slots, the Flax twin's all of them (masked), so the twins'
    parity-dropout masks fell on different weights and their cached logits and generations parted
    (found by tests/twins/test_twin_machine.py). A KV cache serves inference: both refuse, first thing."""
    tm, fm = build_pair("gpt", TINY, source="torch", mode="train")  # drop_rate 0.1
    gpt_torch.use_parity_dropout(tm, seed=1)
    gpt_flax.use_parity_dropout(fm, seed=1)
    message = r"a cached call with dropout on \(train mode, drop rate 0.1\): the KV cache is for inference"
    for twin, model, package in (("torch", tm, gpt_torch), ("flax", fm, gpt_flax)):
        prompt = torch.from_numpy(IDS[:, :2]) if twin == "torch" else IDS[:, :2]
        model.reset_kv_cache(batch_size=2, max_len=6)
        with pytest.raises(ValueError, match=message):
            _run(twin, model, IDS[:, :2], use_cache=True)
        with pytest.raises(ValueError, match=message):
            package.generate_text_simple_cached(model, prompt, 3)
        assert _position(twin, model) == 0 and model.cache_max_len == 6  # the generation's reset never ran
    assert int(tm.dropout_counter.value) == int(fm.dropout_counter[...]) == 0
    tm.eval()
    fm.eval()
    np.testing.assert_array_equal(
        gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(IDS[:, :2]), 3).numpy(),
        np.asarray(gpt_flax.generate_text_simple_cached(fm, IDS[:, :2], 3)),
    )
