"""Both twins reproduce the logits the book's chapter-4 seed prints.

The seed prints its logits in training mode, so dropout is active and its mask comes from torch's
generator. The torch twin reproduces them from torch.manual_seed(123) alone, which pins its init
and RNG order. The Flax twin draws masks from JAX's generator; given the torch twin's weights and
the mask torch drew, its own forward gives the same numbers, and in eval mode it matches the
torch twin's eval logits with no help at all.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import get_tokenizer
from parity_tests import book
from parity_tests.compare import assert_close
from parity_tests.configs import GPT_CONFIG_124M
from parity_tests.tolerances import BOOK_PRINTED, FP32_FORWARD
from parity_tests.twins import float32_matmuls, run_flax, run_torch


def _book_model():
    torch.manual_seed(book.SEED)
    return gpt_torch.DummyGPTModel(GPT_CONFIG_124M)


def _printed(logits) -> np.ndarray:
    return np.round(np.asarray(logits)[..., book.CORNER_COLUMNS], 4)


def test_the_tokenizer_gives_the_books_batch():
    tok = get_tokenizer()
    assert np.array_equal(np.array([tok.encode(t) for t in book.TEXTS]), book.TOKEN_IDS)


@pytest.mark.slow
def test_torch_twin_prints_the_books_logits():
    model = _book_model()  # left in training mode, as in the book
    logits = model(torch.from_numpy(book.TOKEN_IDS))
    assert logits.shape == (2, 4, 50257)
    assert_close(book.DUMMY_LOGITS_CORNERS, _printed(logits.detach()), BOOK_PRINTED, "printed logits")


class TorchMaskDropout(nnx.Module):
    """Dropout that applies a given keep-mask (torch's), scaled by 1/(1-p) as nnx.Dropout does."""

    def __init__(self, keep: np.ndarray, rate: float):
        self.keep = nnx.Variable(jnp.asarray(keep))
        self.rate = rate

    def __call__(self, x):
        return jnp.where(self.keep[...], x / (1.0 - self.rate), 0.0)


@pytest.mark.slow
def test_flax_twin_prints_the_books_logits_given_torchs_dropout_mask():
    tm = _book_model()
    masks = []
    tm.drop_emb.register_forward_hook(lambda m, args, out: masks.append((out != 0).numpy()))
    torch_logits = tm(torch.from_numpy(book.TOKEN_IDS)).detach().numpy()
    fm = gpt_flax.DummyGPTModel(GPT_CONFIG_124M, rngs=nnx.Rngs(0))
    gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    fm.drop_emb = TorchMaskDropout(masks[0], GPT_CONFIG_124M["drop_rate"])
    with float32_matmuls():
        flax_logits = np.asarray(fm(book.TOKEN_IDS))
    assert_close(book.DUMMY_LOGITS_CORNERS, _printed(flax_logits), BOOK_PRINTED, "printed logits")
    assert_close(torch_logits, flax_logits, FP32_FORWARD, "train-mode logits")


@pytest.mark.slow
def test_eval_mode_twins_agree_on_the_books_weights():
    tm = _book_model().eval()
    fm = gpt_flax.DummyGPTModel(GPT_CONFIG_124M, rngs=nnx.Rngs(0))
    gpt_flax.load_state_dict(fm, gpt_torch.state_dict(tm))
    fm.eval()
    with float32_matmuls():
        assert_close(run_torch(tm, book.TOKEN_IDS), run_flax(fm, book.TOKEN_IDS), FP32_FORWARD, "logits")


@pytest.mark.slow
def test_the_layernorm_variant_of_the_other_seed():
    """Seed 000's skeleton has a real final LayerNorm; its RNG order and shapes are unchanged."""
    torch.manual_seed(book.SEED)
    model = gpt_torch.DummyGPTModel(GPT_CONFIG_124M, final_norm="layernorm")
    plain = _book_model()
    for name, value in gpt_torch.state_dict(plain).items():
        np.testing.assert_array_equal(model.state_dict()[name].numpy(), value, err_msg=name)
    assert model(torch.from_numpy(book.TOKEN_IDS)).shape == (2, 4, 50257)
