"""gpt_torch.weights and gpt_flax.weights: the canonical state dict, moved strictly and exactly."""

import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch


def _torch(cfg, **kw):
    torch.manual_seed(0)
    return gpt_torch.DummyGPTModel(cfg, **kw)


def _flax(cfg, **kw):
    return gpt_flax.DummyGPTModel(cfg, **kw, rngs=nnx.Rngs(1))


TWINS = {
    "torch": (_torch, gpt_torch.state_dict, gpt_torch.load_state_dict),
    "flax": (_flax, gpt_flax.state_dict, gpt_flax.load_state_dict),
}


@pytest.mark.parametrize("final_norm", ["dummy", "layernorm"])
def test_torch_flax_torch_round_trip_is_bit_exact(tiny_cfg, final_norm):
    tm = _torch(tiny_cfg, final_norm=final_norm)
    if final_norm == "layernorm":  # make scale/shift non-trivial so a mix-up would show
        with torch.no_grad():
            tm.final_norm.scale.uniform_(0.5, 1.5)
            tm.final_norm.shift.uniform_(-1, 1)
    original = gpt_torch.state_dict(tm)
    fm = _flax(tiny_cfg, final_norm=final_norm)
    gpt_flax.load_state_dict(fm, original)
    exported = gpt_flax.state_dict(fm)
    back = _torch(tiny_cfg, final_norm=final_norm)
    with torch.no_grad():
        for p in back.parameters():
            p.zero_()
    gpt_torch.load_state_dict(back, exported)
    final = gpt_torch.state_dict(back)
    assert exported.keys() == original.keys() == final.keys()
    for name in original:
        assert exported[name].dtype == np.float32
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
        np.testing.assert_array_equal(final[name], original[name], err_msg=name)


def test_flax_kernels_hold_the_transposed_weight(tiny_cfg):
    tm = _torch(tiny_cfg)
    fm = _flax(tiny_cfg)
    gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    np.testing.assert_array_equal(np.asarray(fm.out_head.kernel[...]), tm.out_head.weight.detach().numpy().T)
    np.testing.assert_array_equal(np.asarray(fm.tok_emb.embedding[...]), tm.tok_emb.weight.detach().numpy())


def test_both_twins_name_the_same_parameters(tiny_cfg):
    for final_norm in ("dummy", "layernorm"):
        t = gpt_torch.state_dict(_torch(tiny_cfg, final_norm=final_norm))
        f = gpt_flax.state_dict(_flax(tiny_cfg, final_norm=final_norm))
        assert {k: v.shape for k, v in t.items()} == {k: v.shape for k, v in f.items()}


def _bad_dicts(sd):
    wrong_shape = dict(sd, **{"out_head.weight": sd["out_head.weight"].T})
    missing = {k: v for k, v in sd.items() if k != "pos_emb.weight"}
    extra = dict(sd, **{"trf_blocks.0.att.mask": np.zeros((2, 2), np.float32)})
    ints = dict(sd, **{"tok_emb.weight": sd["tok_emb.weight"].astype(np.int32)})
    return [
        (wrong_shape, "state dict key 'out_head.weight' has shape (24, 97), expected (97, 24)"),
        (missing, "state dict does not match DummyGPTModel: missing key(s) 'pos_emb.weight'"),
        (extra, "state dict does not match DummyGPTModel: unexpected key(s) 'trf_blocks.0.att.mask'"),
        (
            {k: v for k, v in extra.items() if k != "tok_emb.weight"},
            "state dict does not match DummyGPTModel: missing key(s) 'tok_emb.weight'; "
            "unexpected key(s) 'trf_blocks.0.att.mask'",
        ),
        (ints, "state dict key 'tok_emb.weight' has dtype int32, expected one of float16, bfloat16, float32, float64"),
        ([("tok_emb.weight", 1)], "state dict must be a mapping of name -> array, got list"),
    ]


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("case", range(6))
def test_a_bad_state_dict_is_refused_whole(twin, case, tiny_cfg):
    build, state_dict, load_state_dict = TWINS[twin]
    # Every good key comes first in the dict, so a loader that copies as it goes would copy them.
    source = gpt_torch.state_dict(_torch(tiny_cfg))
    bad, message = _bad_dicts(source)[case]
    model = build(tiny_cfg)
    before = state_dict(model)
    with pytest.raises(ValueError) as e:
        load_state_dict(model, bad)
    assert str(e.value) == message
    after = state_dict(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=f"{name} was changed")


@pytest.mark.parametrize("twin", TWINS)
def test_values_are_cast_to_the_parameter_dtype(twin, tiny_cfg):
    build, state_dict, load_state_dict = TWINS[twin]
    source = {k: v.astype(np.float64) for k, v in gpt_torch.state_dict(_torch(tiny_cfg)).items()}
    model = build(tiny_cfg)
    load_state_dict(model, source)
    for name, value in state_dict(model).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, source[name].astype(np.float32))


def test_torch_loads_a_checkpoint_without_building_random_weights_first(tmp_path, tiny_cfg, monkeypatch):
    """gpt_torch.load builds the model on the meta device and assigns the file's tensors: no
    parameter is drawn at random (nn.init would be called), none is left on the meta device, and
    the causal masks are real."""
    model = gpt_torch.GPTModel(tiny_cfg)
    gpt_torch.save(model, tmp_path / "m.safetensors")
    drawn = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: drawn.append(t.device.type) or t)
    loaded = gpt_torch.load(tmp_path / "m.safetensors")
    assert "cpu" not in drawn
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    for name, value in gpt_torch.state_dict(loaded).items():
        assert np.array_equal(value, gpt_torch.state_dict(model)[name]), name
    masks = [m.mask for m in loaded.modules() if isinstance(m, gpt_torch.MultiHeadAttention)]
    assert masks and all(torch.equal(m, torch.triu(torch.ones_like(m), diagonal=1)) for m in masks)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    assert torch.equal(loaded.eval()(ids), model.eval()(ids))
