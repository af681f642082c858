"""Generation for any model with the book's interface: chapter 4's greedy generate_text_simple (and
its KV-cache variant), chapter 5's generate with temperature, top-k and eos, and the chapter's
text_to_token_ids / token_ids_to_text."""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt_spec import GPTConfig
from gpt_spec.checks import (
    ModelLimits,
    check_cache_dropout,
    check_cached_generation,
    check_generation,
    check_id_dtype,
    check_logits,
    check_output_fits,
    check_sampling,
    default_context_size,
    unpickable_logits,
)
from gpt_spec.data import check_text
from gpt_spec.randomness import pick_token

from .model import _GPT, as_index, check_ids, dropout_rate_on


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


def check_pickable(logits: torch.Tensor, step: int) -> torch.Tensor:
    """Refuse (batch, vocab_size) logits that give some row no token to pick, as the Flax twin does."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | (logits.amax(-1) == -torch.inf)
    if bool(bad.any()):
        raise unpickable_logits(step, int(bad.nonzero()[0, 0]))
    return logits


def _last_logits(
    model: nn.Module, idx_cond: torch.Tensor, dtype: torch.dtype, limits: GPTConfig | ModelLimits, step: int
) -> torch.Tensor:
    """The logits at the last position of each row, (batch, vocab_size), after checking the model's
    output (and, where only the logits tell the vocabulary, that `dtype`, the prompt's, holds it)
    and that each row has a token to pick."""
    batch, seq_len = idx_cond.shape
    with torch.no_grad():
        logits = model(as_index(idx_cond))
    check_logits(tuple(logits.shape), batch, seq_len, limits.vocab_size)
    if limits.vocab_size is None:  # a model that tells its vocabulary only by its logits
        check_id_dtype(str(dtype).removeprefix("torch."), logits.shape[-1])
    return check_pickable(logits[:, -1, :], step)


def _next_ids(
    model: nn.Module, idx_cond: torch.Tensor, dtype: torch.dtype, limits: GPTConfig | ModelLimits, step: int
) -> torch.Tensor:
    """The greedy next id of each row, (batch, 1) in `dtype` (the prompt's)."""
    logits = _last_logits(model, idx_cond, dtype, limits, step)
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
    for step in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        idx_next = _next_ids(model, idx_cond, idx.dtype, limits, step)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    *,
    parity_seed: int | None = None,
) -> torch.Tensor:
    """The book's chapter-5 generate: at each step the logits at the last of the (at most
    `context_size`) last tokens, the `top_k` largest kept (the others -inf); then with `temperature`
    0 the argmax, else a sample of softmax(logits / temperature) by torch.multinomial (torch's
    global generator, as the book's), or, with `parity_seed`, gpt_spec.randomness.pick_token's
    Gumbel-max over noise of (parity_seed, step): what the Flax twin picks from equal logits.

    `eos_id` ends a row: the book's loop stops at its first eos without appending it, and so does
    a batch, at the first step where every row has picked eos_id; until then a row that has is
    filled with eos_id. Returns (batch, n_tokens + tokens generated), in the prompt's dtype.
    """
    limits = _check_prompt(model, idx)
    max_new_tokens, context_size = check_generation(idx.shape[1], max_new_tokens, context_size, limits)
    temperature, top_k, eos_id = check_sampling(temperature, top_k, eos_id, parity_seed, limits.vocab_size)
    check_output_fits(idx.shape[0], idx.shape[1], max_new_tokens, _dtype_name(idx))
    done = torch.zeros((idx.shape[0], 1), dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        logits = _last_logits(model, idx[:, -context_size:], idx.dtype, limits, step)
        if temperature > 0.0 and parity_seed is not None:
            picked = pick_token(logits.float().cpu().numpy(), temperature, top_k, parity_seed, step)
            idx_next = torch.from_numpy(picked).to(idx.device)[:, None]
        else:
            if top_k is not None:
                top_logits, _ = torch.topk(logits, top_k)
                min_val = top_logits[:, -1:]  # (batch, 1): the book's [:, -1] broadcasts for batch 1 only
                logits = torch.where(logits < min_val, torch.tensor(float("-inf"), device=logits.device), logits)
            if temperature > 0.0:
                # The largest logit taken off first (a tiny temperature would overflow the logits),
                # and kept at 0 where the temperature rounds to 0 in float32.
                shifted = logits - logits.amax(dim=-1, keepdim=True)
                logits = torch.where(shifted == 0, shifted, shifted / temperature)
                probs = torch.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)
            else:
                idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None:
            idx_next = torch.where(done, eos_id, idx_next)
            done = done | (idx_next == eos_id)
            if bool(done.all()):
                break
        idx = torch.cat((idx, idx_next.to(idx.dtype)), dim=1)
    return idx


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """The book's text_to_token_ids: (1, n_tokens) int64, `<|endoftext|>` allowed."""
    encoded = tokenizer.encode(check_text("text", text), allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded, dtype=torch.int64).unsqueeze(0)  # add the batch dimension (int64 when empty too)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """The book's token_ids_to_text: the one row of (1, n_tokens) ids, decoded."""
    flat = token_ids.squeeze(0)  # remove the batch dimension
    return tokenizer.decode(flat.tolist())


def generate_text_simple_cached(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None, use_cache: bool = True
) -> torch.Tensor:
    """generate_text_simple with the KV cache (the book's chapter-4 variant): the prompt, cropped to
    its last `context_size` tokens, is fed once, then one new token per step.

    Same tokens as generate_text_simple only while nothing slides. Without cfg.kv_window_size
    nothing may: a generation that would need it is refused. With it (the book's optimized
    variant) the cache keeps the last kv_window_size positions and slides past them, each token
    attending to those, while positions go on counting: the cropped prompt must fit in the
    window, and prompt + max_new_tokens - 1 positions within context_length.

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
    prompt = idx[:, -context_size:]
    with torch.no_grad():
        if isinstance(model, _GPT):
            check_cache_dropout(dropout_rate_on(model))  # before the reset: a refusal changes nothing
            # The cache sized for this generation's positions, as the Flax twin's (a cached call
            # after it is refused alike in both); the head on the last position only.
            reset_kv_cache(batch_size=prompt.shape[0], max_len=prompt.shape[1] + max_new_tokens - 1)
            last = {"last_only": True}
        else:  # the book's own model: its reset takes no sizes, its forward no last_only
            reset_kv_cache()
            last = {}
        logits = model(as_index(prompt), use_cache=True, **last)
        for step in range(max_new_tokens):
            probas = torch.softmax(check_pickable(logits[:, -1, :], step), dim=-1)
            idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (batch, 1)
            idx = torch.cat((idx, idx_next.to(idx.dtype)), dim=1)
            if step < max_new_tokens - 1:  # the last token needs no logits
                logits = model(idx_next, use_cache=True, **last)
    return idx
