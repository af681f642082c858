"""The Flax NNX twin of the chapter-4 GPT."""

from .generate import generate_text_simple, generate_text_simple_cached
from .model import (
    GELU,
    DummyGPTModel,
    DummyLayerNorm,
    DummyTransformerBlock,
    FeedForward,
    GPTModel,
    LayerNorm,
    MultiHeadAttention,
    TransformerBlock,
    jit_forward,
)
from .train import adamw, calc_loss_batch, loss_and_grads, train_step
from .weights import cast, load, load_state_dict, read_torch_file, save, state_dict

__all__ = [
    "DummyGPTModel",
    "DummyLayerNorm",
    "DummyTransformerBlock",
    "FeedForward",
    "GELU",
    "GPTModel",
    "LayerNorm",
    "MultiHeadAttention",
    "TransformerBlock",
    "adamw",
    "calc_loss_batch",
    "cast",
    "generate_text_simple",
    "generate_text_simple_cached",
    "jit_forward",
    "load",
    "load_state_dict",
    "read_torch_file",
    "loss_and_grads",
    "save",
    "state_dict",
    "train_step",
]
