"""Checkpoint files written before a refactor still load, to the same numbers, in both twins.

tests/data/ holds files written by `gpt_torch.save` (commit 93276e9) from a GPTModel and a
DummyGPTModel(final_norm="layernorm") built after `torch.manual_seed(123)` (vocab 97, context 11,
emb 24, 3 heads, 2 layers, drop_rate 0.1, qkv_bias on; then every LayerNorm scale and shift and
every bias set to N(0, 0.5^2) draws, around 1 for the scales, so none is at its init), before the
Flax twin's internals moved (nnx.List blocks, nnx.Cache, canonical names for sharding), and the
logits the torch twin gave then, in eval mode, on fixed ids (`*.logits.npz`: `ids`, `logits`).
They are test data: never regenerate them, or the test proves nothing. A change to a canonical
name, a layout (a transpose) or the metadata fails here.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import gpt_flax
import gpt_torch
from parity_tests.compare import assert_close
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import float32_matmuls
from tests.helpers import DATA

FILES = ["tiny-gpt-v0", "tiny-dummy-layernorm-v0"]


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _assert_identical(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for k, v in expected.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, (k, got[k].shape, got[k].dtype)
        assert got[k].tobytes() == v.tobytes(), f"{k} differs"


def _logits(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DATA / f"{name}.logits.npz")
    return data["ids"], data["logits"]


@pytest.mark.parametrize("name", FILES)
def test_the_torch_twin_loads_an_old_file_to_its_old_logits(name, tmp_path):
    path = DATA / f"{name}.safetensors"
    tensors, metadata = _read(path)
    ids, expected = _logits(name)
    model = gpt_torch.load(path).eval()
    with float32_matmuls(), torch.no_grad():
        logits = model(torch.from_numpy(ids)).numpy()
    assert_close(expected, logits, FP32_FORWARD, f"{name} torch logits")
    _assert_identical(tensors, gpt_torch.state_dict(model))
    gpt_torch.save(model, tmp_path / "again.safetensors")
    again, again_metadata = _read(tmp_path / "again.safetensors")
    _assert_identical(tensors, again)
    assert again_metadata == metadata


@pytest.mark.parametrize("name", FILES)
def test_the_flax_twin_loads_an_old_file_to_its_old_logits(name, tmp_path):
    path = DATA / f"{name}.safetensors"
    tensors, metadata = _read(path)
    ids, expected = _logits(name)
    model = gpt_flax.load(path)
    model.eval()
    with float32_matmuls():
        logits = np.asarray(model(ids))
    assert_close(expected, logits, FP32_FORWARD, f"{name} flax logits")
    _assert_identical(tensors, gpt_flax.state_dict(model))
    gpt_flax.save(model, tmp_path / "again.safetensors")
    again, again_metadata = _read(tmp_path / "again.safetensors")
    _assert_identical(tensors, again)
    assert again_metadata == metadata


@pytest.mark.parametrize("name", FILES)
def test_an_old_state_dict_loads_into_a_fresh_flax_model(name):
    """The other way in: gpt_flax.load_state_dict into a model built from the file's config."""
    from flax import nnx

    tensors, metadata = _read(DATA / f"{name}.safetensors")
    cls = getattr(gpt_flax, metadata["model"])
    model = cls(json.loads(metadata["config"]), **json.loads(metadata["options"]), rngs=nnx.Rngs(7))
    gpt_flax.load_state_dict(model, tensors)
    _assert_identical(tensors, gpt_flax.state_dict(model))
    model.eval()
    ids, expected = _logits(name)
    with float32_matmuls():
        logits = np.asarray(model(ids))
    assert_close(expected, logits, FP32_FORWARD, f"{name} flax logits")
