"""Both twins refuse the same bad token ids with the same ValueError (gpt_spec.checks.check_token_ids).

| input                          | message                                                   |
|--------------------------------|-----------------------------------------------------------|
| 1-D ids, shape (4,)            | token ids must have shape (batch, seq_len), got shape (4,) |
| 3-D ids, shape (1, 2, 3)       | token ids must have shape (batch, seq_len), got shape (1, 2, 3) |
| float ids                      | token ids must be integers, got dtype float32             |
| bool ids                       | token ids must be integers, got dtype bool                |
| empty batch, shape (0, 4)      | token ids must be non-empty, got shape (0, 4)             |
| zero-length, shape (2, 0)      | token ids must be non-empty, got shape (2, 0)             |
| 12 tokens, context_length 11   | sequence length 12 exceeds context_length 11              |
| id 97 with vocab_size 97       | token id 97 is out of range [0, 97) (vocab_size)          |
| id -1                          | token id -1 is out of range [0, 97) (vocab_size)          |
"""

import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch

BAD_IDS = [
    (np.zeros(4, np.int64), "token ids must have shape (batch, seq_len), got shape (4,)"),
    (np.zeros((1, 2, 3), np.int64), "token ids must have shape (batch, seq_len), got shape (1, 2, 3)"),
    (np.zeros((1, 3), np.float32), "token ids must be integers, got dtype float32"),
    (np.zeros((1, 3), np.bool_), "token ids must be integers, got dtype bool"),
    (np.zeros((0, 4), np.int64), "token ids must be non-empty, got shape (0, 4)"),
    (np.zeros((2, 0), np.int64), "token ids must be non-empty, got shape (2, 0)"),
    (np.zeros((1, 12), np.int64), "sequence length 12 exceeds context_length 11"),
    (np.array([[1, 97, 3]]), "token id 97 is out of range [0, 97) (vocab_size)"),
    (np.array([[1, -1, 3]]), "token id -1 is out of range [0, 97) (vocab_size)"),
]


def _torch_call(cfg):
    model = gpt_torch.DummyGPTModel(cfg)
    return lambda ids: model(torch.from_numpy(ids))


def _flax_call(cfg):
    return gpt_flax.DummyGPTModel(cfg, rngs=nnx.Rngs(0))


def _flax_jit_call(cfg):
    return gpt_flax.jit_forward(gpt_flax.DummyGPTModel(cfg, rngs=nnx.Rngs(0)))


TWINS = {"torch": _torch_call, "flax": _flax_call, "flax-jit": _flax_jit_call}


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("ids, message", BAD_IDS, ids=[m for _, m in BAD_IDS])
def test_each_twin_refuses_bad_ids_with_the_same_message(twin, ids, message, tiny_cfg):
    forward = TWINS[twin](tiny_cfg)
    with pytest.raises(ValueError) as e:
        forward(ids)
    assert str(e.value) == message


@pytest.mark.parametrize("twin", TWINS)
def test_edge_of_the_valid_range_is_accepted(twin, tiny_cfg):
    forward = TWINS[twin](tiny_cfg)
    ids = np.array([[0, tiny_cfg.vocab_size - 1] + [5] * (tiny_cfg.context_length - 2)], np.int32)
    out = forward(ids)
    assert tuple(out.shape) == (1, tiny_cfg.context_length, tiny_cfg.vocab_size)


def test_torch_twin_wants_a_tensor(tiny_cfg):
    with pytest.raises(ValueError, match="token ids must be a torch.Tensor, got list"):
        gpt_torch.DummyGPTModel(tiny_cfg)([[1, 2]])


def test_cached_generation_with_a_window_checks_the_prompt_and_the_positions_at_their_edges():
    from gpt_spec.checks import check_cache_room, check_cached_generation
    from parity_tests.configs import TINY

    cfg = TINY.replace(kv_window_size=4)  # context_length 11
    assert check_cached_generation(4, 8, None, cfg) == (8, 11)  # prompt = window, 11 positions
    assert check_cached_generation(20, 8, 4, cfg) == (8, 4)  # the cropped prompt is what must fit
    assert check_cached_generation(20, 0, None, cfg) == (0, 11)  # nothing generated: nothing to fit
    with pytest.raises(ValueError, match=r"^the prompt's 5 tokens do not fit in the KV cache's window of 4 "):
        check_cached_generation(5, 1, None, cfg)
    with pytest.raises(ValueError, match=r"^cached generation would need 12 positions, more than context_length 11"):
        check_cached_generation(4, 9, None, cfg)
    # Without a window, today's refusal: the cache does not slide.
    with pytest.raises(ValueError, match=r"^cached generation would hold 12 tokens, more than context_size 11"):
        check_cached_generation(4, 9, None, TINY)
    check_cache_room(7, 4, cfg, 11)  # a call of window size up to the last position
    with pytest.raises(ValueError, match=r"^5 new tokens do not fit in the KV cache's window of 4 positions"):
        check_cache_room(0, 5, cfg, 11)
    # Where max_len is within the window, max_len's refusal comes first (the cache never slides).
    with pytest.raises(ValueError, match=r"exceeds the KV cache's max_len 3"):
        check_cache_room(0, 5, cfg, 3)
