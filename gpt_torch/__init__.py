"""The PyTorch twin of the chapter-4 GPT."""

from .model import DummyGPTModel, DummyLayerNorm, DummyTransformerBlock, LayerNorm
from .weights import load_state_dict, state_dict

__all__ = [
    "DummyGPTModel",
    "DummyLayerNorm",
    "DummyTransformerBlock",
    "LayerNorm",
    "load_state_dict",
    "state_dict",
]
