"""Greedy generation, the book's generate_text_simple."""

from __future__ import annotations

import torch

from gpt_spec import check_cached_generation, check_generation

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


def generate_text_simple_cached(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int,
                                context_size: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """generate_text_simple with the KV cache (the book's chapter-4 variant): the prompt is fed once,
    then one new token per step. Same tokens as generate_text_simple (the window must not slide)."""
    check_ids(idx, model.cfg, check_length=False)
    if not use_cache:
        size = model.cfg.context_length if context_size is None else context_size
        return generate_text_simple(model, idx, max_new_tokens, size)
    max_new_tokens, context_size = check_cached_generation(idx.shape[1], max_new_tokens, context_size, model.cfg)
    if max_new_tokens == 0:
        return idx
    with torch.no_grad():
        model.reset_kv_cache()
        logits = model(idx[:, -context_size:], use_cache=True)
        for step in range(max_new_tokens):
            probas = torch.softmax(logits[:, -1, :], dim=-1)
            idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (batch, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if step < max_new_tokens - 1:  # the last token needs no logits
                logits = model(idx_next, use_cache=True)
    return idx
