"""What a GPT is, framework-free: the config schema, the GPT-2 tokenizer, the canonical state dict."""

from .checkpoint import StateDict, check_state_dict
from .config import PRESETS, GPTConfig, resolve_config
from .inputs import check_generation, check_targets, check_token_ids
from .tokenizer import get_tokenizer

__all__ = [
    "PRESETS",
    "GPTConfig",
    "StateDict",
    "check_generation",
    "check_state_dict",
    "check_targets",
    "check_token_ids",
    "get_tokenizer",
    "resolve_config",
]
