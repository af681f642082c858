"""The other seed's §4.1 skeleton (a bare `pos_emb` Parameter, `norm` an nn.LayerNorm, `head`) loads
into both twins' DummyGPTModel(final_norm="layernorm"), which then compute its logits; a skeleton
dict that does not fit is refused with the same ValueError by every loader."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import get_tokenizer
from parity_tests.compare import assert_close
from parity_tests.configs import GPT_CONFIG_124M
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import float32_matmuls

# The seed's skeleton, as the seed prints it.


class DummyGPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg["context_length"], cfg["emb_dim"]))
        self.drop = nn.Dropout(cfg["drop_rate"])

        # Placeholder stack: real attention/MLP will come in later sections
        self.blocks = nn.Sequential(*[IdentityBlock() for _ in range(cfg["n_layers"])])

        self.norm = nn.LayerNorm(cfg["emb_dim"])
        self.head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

        # Nice init for positions (optional)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)

    def forward(self, x):
        B, T = x.shape
        tok = self.tok_emb(x)  # (B, T, C)
        pos = self.pos_emb[:, :T, :]  # (1, T, C)
        x = self.drop(tok + pos)  # (B, T, C)
        x = self.blocks(x)  # (B, T, C) — identity for now
        x = self.norm(x)  # (B, T, C)
        logits = self.head(x)  # (B, T, V)
        return logits


class IdentityBlock(nn.Module):
    def forward(self, x):  # placeholder “transformer block”
        return x


# GPT-2's vocabulary (the book's batch needs it), everything else small.
SMALL = dict(GPT_CONFIG_124M, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
LAYOUT = "the skeleton layout (pos_emb, norm.weight, norm.bias, head.weight)"
# Where each of the skeleton's tensors belongs in the twins (pos_emb without its batch axis).
CANONICAL = {
    "tok_emb.weight": "tok_emb.weight",
    "pos_emb": "pos_emb.weight",
    "norm.weight": "final_norm.scale",
    "norm.bias": "final_norm.shift",
    "head.weight": "out_head.weight",
}


def _seed_model(cfg):
    torch.manual_seed(123)
    model = DummyGPTModel(cfg)
    # Non-trivial norm parameters, so that a scale and shift swapped or left out cannot pass.
    with torch.no_grad():
        model.norm.weight.normal_(1.0, 0.5)
        model.norm.bias.normal_(0.0, 0.5)
    return model.eval()


def _batch():
    tokenizer = get_tokenizer()
    txt1 = "Every effort moves you"
    txt2 = "Every day holds a"
    return torch.stack([torch.tensor(tokenizer.encode(txt1)), torch.tensor(tokenizer.encode(txt2))], dim=0)


def _twins(cfg):
    tm = gpt_torch.DummyGPTModel(cfg, final_norm="layernorm")
    own = gpt_torch.DummyGPTModel(cfg, final_norm="layernorm")  # filled by torch's own load_state_dict
    fm = gpt_flax.DummyGPTModel(cfg, final_norm="layernorm", rngs=nnx.Rngs(0))
    return tm, own, fm


def _loaders(tm, own, fm):
    """Each loader of a state dict into a twin's model: the twins' load_state_dict, and torch's own."""
    return {
        "gpt_torch.load_state_dict": lambda sd: gpt_torch.load_state_dict(tm, sd),
        "model.load_state_dict": lambda sd: own.load_state_dict(sd),
        "gpt_flax.load_state_dict": lambda sd: gpt_flax.load_state_dict(fm, sd),
    }


@pytest.mark.parametrize("cfg", [SMALL, pytest.param(GPT_CONFIG_124M, marks=pytest.mark.slow)], ids=["small", "124M"])
def test_the_seeds_skeleton_loads_into_both_twins_and_gives_its_logits(cfg):
    skeleton = _seed_model(cfg)
    batch = _batch()
    assert batch.tolist() == [[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]]
    with torch.no_grad():
        reference = skeleton(batch).numpy()
    assert reference.shape == (2, 4, 50257)
    tm, own, fm = _twins(cfg)
    for load in _loaders(tm, own, fm).values():
        load(skeleton.state_dict())
    tm.eval(), own.eval(), fm.eval()
    with float32_matmuls(), torch.no_grad():
        assert_close(reference, tm(batch).numpy(), FP32_FORWARD, "torch twin's logits")
        assert_close(reference, own(batch).numpy(), FP32_FORWARD, "torch twin's logits (model.load_state_dict)")
        assert_close(reference, np.asarray(fm(batch.numpy())), FP32_FORWARD, "Flax twin's logits")
    # Loaded, not approximated: the canonical dict is the skeleton's, renamed.
    seed = skeleton.state_dict()
    for twin_sd in (gpt_torch.state_dict(tm), gpt_torch.state_dict(own), gpt_flax.state_dict(fm)):
        assert sorted(twin_sd) == sorted(CANONICAL.values())
        for name, canonical in CANONICAL.items():
            value = seed[name].numpy()
            assert np.array_equal(twin_sd[canonical], value[0] if name == "pos_emb" else value)


def _without(sd, *names):
    return {k: v for k, v in sd.items() if k not in names}


BAD = {
    "partial": (
        lambda sd: _without(sd, "head.weight"),
        f"state dict in {LAYOUT} does not match DummyGPTModel: missing key(s) 'head.weight'",
    ),
    "an extra key": (
        lambda sd: {**sd, "blocks.0.weight": sd["norm.weight"]},
        f"state dict in {LAYOUT} does not match DummyGPTModel: unexpected key(s) 'blocks.0.weight'",
    ),
    "mixed": (
        lambda sd: {**_without(sd, "norm.weight"), "final_norm.scale": sd["norm.weight"]},
        f"state dict mixes two layouts: 'pos_emb' of {LAYOUT}, 'final_norm.scale' of the canonical layout; use one",
    ),
    "pos_emb without its batch axis": (
        lambda sd: {**sd, "pos_emb": sd["pos_emb"][0]},
        "state dict key 'pos_emb' has shape (8, 16), expected (1, 8, 16)",
    ),
    "pos_emb of another context": (
        lambda sd: {**sd, "pos_emb": torch.zeros(1, 9, 16)},
        "state dict key 'pos_emb' has shape (1, 9, 16), expected (1, 8, 16)",
    ),
    "a transposed head": (
        lambda sd: {**sd, "head.weight": sd["head.weight"].T},
        "state dict key 'head.weight' has shape (16, 50257), expected (50257, 16)",
    ),
    "integer values": (
        lambda sd: {**sd, "norm.bias": torch.zeros(16, dtype=torch.int64)},
        "state dict key 'norm.bias' has dtype int64, expected one of float16, bfloat16, float32, float64",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_skeleton_dict_that_does_not_fit_is_refused_alike(case):
    """Every loader refuses with the same one-line ValueError, and leaves its model as it was."""
    make_bad, message = BAD[case]
    sd = make_bad(_seed_model(SMALL).state_dict())
    tm, own, fm = _twins(SMALL)
    before = [gpt_torch.state_dict(tm), gpt_torch.state_dict(own), gpt_flax.state_dict(fm)]
    for name, load in _loaders(tm, own, fm).items():
        with pytest.raises(ValueError) as err:
            load(sd)
        assert str(err.value) == message, name
    after = [gpt_torch.state_dict(tm), gpt_torch.state_dict(own), gpt_flax.state_dict(fm)]
    for old, new in zip(before, after, strict=True):
        assert all(np.array_equal(old[k], new[k]) for k in old)


def _refusals(sd, tm, fm) -> set[str]:
    """The messages of the twins' load_state_dict and torch's own, each of which must refuse `sd`."""
    messages = set()
    for load in (
        lambda: gpt_torch.load_state_dict(tm, sd),
        lambda: tm.load_state_dict(sd),
        lambda: gpt_flax.load_state_dict(fm, sd),
    ):
        with pytest.raises(ValueError) as err:
            load()
        messages.add(str(err.value))
    return messages


def test_the_skeleton_fits_only_a_model_with_a_real_final_norm():
    """The book's DummyGPTModel has a placeholder norm, without parameters: the skeleton's norm has
    nowhere to go; and GPTModel's blocks come from nowhere."""
    sd = _seed_model(SMALL).state_dict()
    dummy = _refusals(sd, gpt_torch.DummyGPTModel(SMALL), gpt_flax.DummyGPTModel(SMALL, rngs=nnx.Rngs(0)))
    assert dummy == {
        f"state dict in {LAYOUT} does not match DummyGPTModel: unexpected key(s) 'norm.bias', 'norm.weight'"
    }
    (gpt,) = _refusals(sd, gpt_torch.GPTModel(SMALL), gpt_flax.GPTModel(SMALL, rngs=nnx.Rngs(0)))
    assert gpt.startswith(f"state dict in {LAYOUT} does not match GPTModel: missing key(s) 'trf_blocks.0.att.W_key")


def test_a_canonical_dict_is_untouched_by_the_skeleton_table():
    """The canonical layout loads as before through every loader: tok_emb.weight, the one name both
    layouts share, does not make a dict the skeleton's."""
    torch.manual_seed(0)
    source = gpt_torch.DummyGPTModel(SMALL, final_norm="layernorm")
    tm, own, fm = _twins(SMALL)
    for load in _loaders(tm, own, fm).values():
        load(source.state_dict())
    want = gpt_torch.state_dict(source)
    for got in (gpt_torch.state_dict(tm), gpt_torch.state_dict(own), gpt_flax.state_dict(fm)):
        assert all(np.array_equal(want[k], got[k]) for k in want)
