import pytest
import torch

import gpt_torch
from parity_tests.configs import GPT_CONFIG_124M


def _ids(cfg, batch=3, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)


def test_shapes_and_the_books_names(tiny_cfg):
    model = gpt_torch.DummyGPTModel(tiny_cfg)
    assert model(_ids(tiny_cfg)).shape == (3, 7, tiny_cfg.vocab_size)
    assert list(model.state_dict()) == ["tok_emb.weight", "pos_emb.weight", "out_head.weight"]
    assert [type(m).__name__ for m in model.trf_blocks] == ["DummyTransformerBlock"] * tiny_cfg.n_layers
    assert type(model.final_norm).__name__ == "DummyLayerNorm"


def test_accepts_the_books_dict_and_the_config():
    small = {**GPT_CONFIG_124M, "vocab_size": 97, "emb_dim": 24, "n_heads": 3, "context_length": 11}
    model = gpt_torch.DummyGPTModel(small)
    assert model.cfg.to_dict() == small
    with pytest.raises(ValueError, match="emb_dim \\(25\\) must be divisible by n_heads \\(3\\)"):
        gpt_torch.DummyGPTModel({**small, "emb_dim": 25})


def test_layernorm_variant_normalises_before_the_head(tiny_cfg):
    model = gpt_torch.DummyGPTModel(tiny_cfg, final_norm="layernorm").eval()
    assert list(model.state_dict())[-3:] == ["final_norm.scale", "final_norm.shift", "out_head.weight"]
    seen = {}
    model.out_head.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    model(_ids(tiny_cfg))
    x = seen["x"]
    assert torch.allclose(x.mean(-1), torch.zeros(()), atol=1e-6)
    assert torch.allclose(x.var(-1, unbiased=False), torch.ones(()), atol=1e-4)
    with pytest.raises(ValueError, match="final_norm must be one of dummy, layernorm, got 'rms'"):
        gpt_torch.DummyGPTModel(tiny_cfg, final_norm="rms")


def test_layernorm_is_the_books_form():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 24) * 3 + 1
    ln = gpt_torch.LayerNorm(24)
    with torch.no_grad():
        ln.scale.uniform_(0.5, 1.5)
        ln.shift.uniform_(-1, 1)
    ref = torch.nn.functional.layer_norm(x, (24,), ln.scale, ln.shift, eps=1e-5)
    torch.testing.assert_close(ln(x), ref, rtol=0, atol=2e-6)
    assert ln.eps == 1e-5
