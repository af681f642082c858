"""The Flax NNX twin of the chapter-4 GPT."""

from .model import DummyGPTModel, DummyLayerNorm, DummyTransformerBlock, LayerNorm, jit_forward
from .weights import load_state_dict, state_dict

__all__ = [
    "DummyGPTModel",
    "DummyLayerNorm",
    "DummyTransformerBlock",
    "LayerNorm",
    "jit_forward",
    "load_state_dict",
    "state_dict",
]
