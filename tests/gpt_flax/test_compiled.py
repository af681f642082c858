"""The speed decisions of the bfloat16 forward, read from the program XLA is given (the figures
behind them are in docs/design-notes.md): every matmul takes bfloat16 operands and returns float32
(XLA's CPU backend uses its bfloat16 GEMM kernel only so), and GELU's tanh runs in float32 (XLA's
bfloat16 element-wise ops convert around every operation)."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

import gpt_flax
from gpt_spec import GPTConfig
from parity_tests.configs import TINY
from tests import helpers


@pytest.fixture(scope="module")
def bfloat16_program() -> str:
    model = gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    model.eval()
    gpt_flax.cast(model, "bfloat16")
    graphdef, state = nnx.split(model)
    ids = np.zeros((2, TINY.context_length), np.int64)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, ids).as_text()


def test_every_bfloat16_matmul_accumulates_and_returns_float32(bfloat16_program):
    dots = re.findall(
        r"stablehlo\.dot_general .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", bfloat16_program
    )
    assert len(dots) >= 4 * TINY.n_layers + 1  # q, k, v, out and two MLP layers a block, the head
    for a, b, out in dots:
        assert a.endswith("xbf16>") and b.endswith("xbf16>") and out.endswith("xf32>"), (a, b, out)


def test_gelu_runs_in_float32_in_the_bfloat16_forward(bfloat16_program):
    tanhs = re.findall(r"stablehlo\.tanh %\w+ : (tensor<[^>]*>)", bfloat16_program)
    assert len(tanhs) == TINY.n_layers and all(t.endswith("xf32>") for t in tanhs), tanhs


def test_a_training_run_and_a_forward_compile_once_each():
    """The first call's program is every later call's: the model's and the optimizer's arrays are
    committed before it, as every call's outputs are (else the second step compiles again)."""
    # Shapes no other test uses, so each first call compiles; dropout on, so its keys are outputs too.
    cfg = GPTConfig(vocab_size=61, context_length=7, emb_dim=12, n_heads=2, n_layers=1, drop_rate=0.1, qkv_bias=True)
    model = gpt_flax.GPTModel(cfg, rngs=nnx.Rngs(0))
    optimizer = gpt_flax.adamw(model)
    # On a device, as the book's loop puts each batch (`device` in train_model_simple).
    ids = jax.device_put(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context_length)), jax.devices()[0]
    )
    with helpers.compilations() as compiled:
        for _ in range(3):
            gpt_flax.train_step(model, optimizer, ids[:, :-1], ids[:, 1:])
        gpt_flax.load_state_dict(model, gpt_flax.state_dict(model))  # fresh arrays, from numpy
        gpt_flax.train_step(model, optimizer, ids[:, :-1], ids[:, 1:])
        forward = gpt_flax.jit_forward(model)  # in training mode: its dropout keys advance
        for _ in range(3):
            forward(ids)
    assert (compiled["_train_step"], compiled["_forward"]) == (1, 1), compiled
