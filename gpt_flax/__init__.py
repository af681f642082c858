"""The Flax NNX twin of the chapter-4 GPT."""

from .model import (
    DummyGPTModel,
    DummyLayerNorm,
    DummyTransformerBlock,
    FeedForward,
    GELU,
    GPTModel,
    LayerNorm,
    MultiHeadAttention,
    TransformerBlock,
    jit_forward,
)
from .generate import generate_text_simple
from .train import adamw, calc_loss_batch, loss_and_grads, train_step
from .weights import load, load_state_dict, save, state_dict

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
    "generate_text_simple",
    "jit_forward",
    "load",
    "load_state_dict",
    "loss_and_grads",
    "save",
    "state_dict",
    "train_step",
]
