"""What a GPT is, framework-free: the config schema, the GPT-2 tokenizer, the canonical state dict."""

from .checkpoint import (
    FINAL_NORMS,
    MODEL_CLASSES,
    MODELS,
    Checkpoint,
    load_checkpoint,
    read_torch_file,
    save_checkpoint,
    save_hf,
)
from .hf import from_hf, to_hf
from .tensors import FLOAT_DTYPES, LazyStateDict, StateDict, check_state_dict
from .config import PRESETS, GPTConfig, resolve_config
from .inputs import (
    DTYPES,
    ModelLimits,
    check_adamw,
    check_cache_room,
    check_cached_generation,
    check_dtype,
    check_generation,
    check_id_dtype,
    check_logits,
    check_targets,
    check_token_ids,
    default_context_size,
    in_model_order,
)
from .limits import MAX_SIZE, check_model_fits, check_output_fits, model_bytes
from .stages import SUB_LAYERS, in_stage, stage_key, stage_names, stage_of
from .tokenizer import get_tokenizer

__all__ = [
    "DTYPES",
    "FINAL_NORMS",
    "FLOAT_DTYPES",
    "LazyStateDict",
    "MODELS",
    "MODEL_CLASSES",
    "Checkpoint",
    "PRESETS",
    "SUB_LAYERS",
    "GPTConfig",
    "MAX_SIZE",
    "ModelLimits",
    "StateDict",
    "check_adamw",
    "check_cache_room",
    "check_cached_generation",
    "check_dtype",
    "check_generation",
    "check_id_dtype",
    "check_logits",
    "check_model_fits",
    "check_output_fits",
    "check_state_dict",
    "check_targets",
    "check_token_ids",
    "default_context_size",
    "from_hf",
    "get_tokenizer",
    "in_model_order",
    "in_stage",
    "load_checkpoint",
    "model_bytes",
    "read_torch_file",
    "resolve_config",
    "save_checkpoint",
    "save_hf",
    "stage_key",
    "stage_names",
    "stage_of",
    "to_hf",
]
