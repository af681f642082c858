"""What a GPT is, framework-free: the config schema, the GPT-2 tokenizer, the canonical state dict."""

from .checkpoint import (
    Checkpoint,
    StateDict,
    check_state_dict,
    from_hf,
    load_checkpoint,
    save_checkpoint,
    to_hf,
)
from .config import PRESETS, GPTConfig, resolve_config
from .inputs import (
    DTYPES,
    check_cache_room,
    check_cached_generation,
    check_dtype,
    check_generation,
    check_targets,
    check_token_ids,
)
from .stages import SUB_LAYERS, in_stage, stage_key, stage_names, stage_of
from .tokenizer import get_tokenizer

__all__ = [
    "DTYPES",
    "Checkpoint",
    "PRESETS",
    "SUB_LAYERS",
    "GPTConfig",
    "StateDict",
    "check_cache_room",
    "check_cached_generation",
    "check_dtype",
    "check_generation",
    "check_state_dict",
    "check_targets",
    "check_token_ids",
    "from_hf",
    "get_tokenizer",
    "in_stage",
    "load_checkpoint",
    "resolve_config",
    "save_checkpoint",
    "stage_key",
    "stage_names",
    "stage_of",
    "to_hf",
]
