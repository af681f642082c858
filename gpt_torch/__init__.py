"""The PyTorch twin of the chapter-4 GPT."""

from .checkpoint import (
    checkpoint_steps,
    checkpoint_to_train_state,
    restore_checkpoint,
    save_checkpoint,
    train_state_to_checkpoint,
)
from .data import GPTDatasetV1, create_dataloader_v1
from .dropout import ParityDropout, use_parity_dropout
from .generate import generate, generate_text_simple, generate_text_simple_cached, text_to_token_ids, token_ids_to_text
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
)
from .train import (
    adamw,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    generate_and_print_sample,
    load_train_state,
    loss_and_grads,
    train_model_simple,
    train_state,
    train_step,
)
from .weights import cast, load, load_state_dict, read_torch_file, save, state_dict

__all__ = [
    "DummyGPTModel",
    "DummyLayerNorm",
    "DummyTransformerBlock",
    "FeedForward",
    "GELU",
    "GPTDatasetV1",
    "GPTModel",
    "LayerNorm",
    "MultiHeadAttention",
    "ParityDropout",
    "TransformerBlock",
    "adamw",
    "calc_loss_batch",
    "calc_loss_loader",
    "cast",
    "checkpoint_steps",
    "checkpoint_to_train_state",
    "create_dataloader_v1",
    "evaluate_model",
    "generate",
    "generate_and_print_sample",
    "generate_text_simple",
    "generate_text_simple_cached",
    "load",
    "load_state_dict",
    "load_train_state",
    "loss_and_grads",
    "read_torch_file",
    "restore_checkpoint",
    "save",
    "save_checkpoint",
    "state_dict",
    "text_to_token_ids",
    "token_ids_to_text",
    "train_model_simple",
    "train_state",
    "train_state_to_checkpoint",
    "train_step",
    "use_parity_dropout",
]
