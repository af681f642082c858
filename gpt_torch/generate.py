"""Greedy generation, the book's generate_text_simple."""

from __future__ import annotations

import torch

from gpt_spec import check_generation

from .model import check_ids


def generate_text_simple(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int) -> torch.Tensor:
    """Append `max_new_tokens` greedy tokens to `idx` (batch, n_tokens), feeding the model at most
    the last `context_size` tokens at each step. Returns (batch, n_tokens + max_new_tokens)."""
    check_ids(idx, model.cfg, check_length=False)
    max_new_tokens, context_size = check_generation(idx.shape[1], max_new_tokens, context_size, model.cfg)
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (batch, vocab_size): the last position only
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (batch, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
