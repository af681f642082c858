"""Greedy generation, the book's generate_text_simple, for any model with the book's interface."""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt_spec import (
    GPTConfig,
    ModelLimits,
    check_cached_generation,
    check_generation,
    check_id_dtype,
    check_logits,
    check_output_fits,
    default_context_size,
)

from .model import as_index, check_ids


def model_limits(model: nn.Module) -> GPTConfig | ModelLimits:
    """The twins' GPTConfig, or for any other model with the book's interface (the book's own
    GPTModel has no `cfg`) the sizes its tok_emb and pos_emb tell, each None where it has none."""
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, GPTConfig):
        return cfg
    tok_emb, pos_emb = getattr(model, "tok_emb", None), getattr(model, "pos_emb", None)
    return ModelLimits(
        vocab_size=tok_emb.num_embeddings if isinstance(tok_emb, nn.Embedding) else None,
        context_length=pos_emb.num_embeddings if isinstance(pos_emb, nn.Embedding) else None,
    )


def _dtype_name(ids: torch.Tensor) -> str:
    return str(ids.dtype).removeprefix("torch.")


def _check_prompt(model: nn.Module, idx: torch.Tensor) -> GPTConfig | ModelLimits:
    """The model's limits, after checking the prompt against them; refuses a prompt whose dtype
    cannot hold every id the model may generate, when the vocabulary is known before a step."""
    limits = model_limits(model)
    check_ids(idx, limits, check_length=False)
    if limits.vocab_size is not None:
        check_id_dtype(_dtype_name(idx), limits.vocab_size)
    return limits


def _next_ids(
    model: nn.Module, idx_cond: torch.Tensor, dtype: torch.dtype, limits: GPTConfig | ModelLimits
) -> torch.Tensor:
    """The greedy next id of each row, (batch, 1) in `dtype` (the prompt's)."""
    batch, seq_len = idx_cond.shape
    with torch.no_grad():
        logits = model(as_index(idx_cond))
    check_logits(tuple(logits.shape), batch, seq_len, limits.vocab_size)
    if limits.vocab_size is None:  # a model that tells its vocabulary only by its logits
        check_id_dtype(str(dtype).removeprefix("torch."), logits.shape[-1])
    logits = logits[:, -1, :]  # (batch, vocab_size): the last position only
    probas = torch.softmax(logits, dim=-1)
    return torch.argmax(probas, dim=-1, keepdim=True).to(dtype)  # (batch, 1), never wrapped


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """Append `max_new_tokens` greedy tokens to `idx` (batch, n_tokens), feeding the model at most
    the last `context_size` tokens at each step. Returns (batch, n_tokens + max_new_tokens), in
    the prompt's dtype (one that cannot hold every id of the vocabulary is refused).

    `model` is any module with the book's interface, ids (batch, seq) -> logits (batch, seq,
    vocab): the twins' models, whose config is checked against, or the book's own GPTModel,
    whose embeddings tell its vocabulary and context.
    """
    limits = _check_prompt(model, idx)
    max_new_tokens, context_size = check_generation(idx.shape[1], max_new_tokens, context_size, limits)
    check_output_fits(idx.shape[0], idx.shape[1], max_new_tokens, _dtype_name(idx))
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        idx_next = _next_ids(model, idx_cond, idx.dtype, limits)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate_text_simple_cached(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None, use_cache: bool = True
) -> torch.Tensor:
    """generate_text_simple with the KV cache (the book's chapter-4 variant): the prompt is fed once,
    then one new token per step. Same tokens as generate_text_simple (the window must not slide).

    A model without a KV cache (no `reset_kv_cache`, as the book's chapter-4 GPTModel) is run
    without one, after the same checks: the same tokens.
    """
    limits = _check_prompt(model, idx)
    if not use_cache:
        size = default_context_size(idx.shape[1], max_new_tokens, context_size, limits)
        return generate_text_simple(model, idx, max_new_tokens, size)
    max_new_tokens, context_size = check_cached_generation(idx.shape[1], max_new_tokens, context_size, limits)
    reset_kv_cache = getattr(model, "reset_kv_cache", None)
    if reset_kv_cache is None:
        return generate_text_simple(model, idx, max_new_tokens, context_size)
    check_output_fits(idx.shape[0], idx.shape[1], max_new_tokens, _dtype_name(idx))
    if max_new_tokens == 0:
        return idx
    with torch.no_grad():
        reset_kv_cache()
        logits = model(as_index(idx[:, -context_size:]), use_cache=True)
        for step in range(max_new_tokens):
            probas = torch.softmax(logits[:, -1, :], dim=-1)
            idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (batch, 1)
            idx = torch.cat((idx, idx_next.to(idx.dtype)), dim=1)
            if step < max_new_tokens - 1:  # the last token needs no logits
                logits = model(idx_next, use_cache=True)
    return idx
