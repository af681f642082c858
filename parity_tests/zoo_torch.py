"""The zoo's layers for the torch twin: each written as a porter might have written it, with the
mutant's bug behind a knob (a `bug_*` class attribute). With every knob at its default, each
computes what gpt_torch.model computes (tests/parity_tests/test_zoo.py holds them to that).

zoo.py makes a subclass of the layer's own class with the knobs set and swaps it in as the
`__class__` of the model's modules for the duration of a check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpt_spec.checks import check_last_only
from gpt_spec.randomness import gumbel_noise, keep_mask, keep_scale
from gpt_torch import model as book


def round_mantissa(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """float32 rounded to nearest (ties to even) with `bits` explicit mantissa bits, as TF32 (10)
    or bfloat16 (7) hold it; None leaves x alone. Its gradient is the incoming one rounded alike
    (jax.lax.reduce_precision's, the Flax twin's), so a model can train through it."""
    if bits is None:
        return x
    return _RoundMantissa.apply(x, bits)


def _round_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 7:
        return x.to(torch.bfloat16).float()
    i = x.float().contiguous().view(torch.int32)
    drop = 23 - bits
    lsb = (i >> drop) & 1
    i = (i + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)
    return i.view(torch.float32)


class _RoundMantissa(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.bits = bits
        return _round_bits(x, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _round_bits(grad, ctx.bits), None


class LayerNorm(book.LayerNorm):
    bug_eps = 1e-5
    bug_variance = "biased"  # or "unbiased" (Bessel's correction), "moments" (E[x^2] - E[x]^2)
    bug_swap = False  # scale and shift each in the other's place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        if self.bug_variance == "moments":
            var = (x * x).mean(dim=-1, keepdim=True) - mean * mean
        else:
            var = x.var(dim=-1, keepdim=True, unbiased=self.bug_variance == "unbiased")
        norm_x = (x - mean) / torch.sqrt(var + self.bug_eps)
        scale, shift = (self.shift, self.scale) if self.bug_swap else (self.scale, self.shift)
        return scale * norm_x + shift


class GELU(book.GELU):
    bug_form = "tanh"  # or "erf", the exact form
    bug_constant = 0.044715

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bug_form == "erf":
            return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + self.bug_constant * torch.pow(x, 3))))


def round_without_derivative(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 8 significant bits with torch.round, whose derivative is 0: bfloat16's values
    (x's own, where x is bfloat16), and a gradient of 0 for everything behind it."""
    x32 = x.float()
    spacing = torch.exp2(torch.floor(torch.log2(torch.where(x32 == 0, 1.0, x32.abs()))) - 7)
    return (torch.round(x32 / spacing) * spacing).to(x.dtype)


class Linear(torch.nn.Linear):
    bug_operand_bits: int | None = None  # matmul operands rounded to this many mantissa bits
    bug_output_bits: int | None = None  # and the product too
    bug_round_without_derivative = False  # a bfloat16 product rounded with torch.round, derivative 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bug_round_without_derivative:
            y = F.linear(x, self.weight, self.bias)
            return round_without_derivative(y) if y.dtype == torch.bfloat16 else y
        bits = self.bug_operand_bits
        y = F.linear(round_mantissa(x, bits), round_mantissa(self.weight, bits))
        y = round_mantissa(y, self.bug_output_bits)
        return y if self.bias is None else y + self.bias


class MultiHeadAttention(book.MultiHeadAttention):
    bug_scale = "sqrt"  # scores / sqrt(head_dim); or "none", "head_dim"
    bug_scale_power: float | None = None  # scores / head_dim ** this, overriding bug_scale
    bug_mask_diagonal = 1  # torch.triu's diagonal: 1 hides the future; 2 shows the next token; 0 hides self
    bug_split = "heads"  # (n_heads, head_dim); or "dims": (head_dim, n_heads)
    bug_swap_qk = False
    bug_softmax_axis = -1
    bug_softmax_bf16 = False
    bug_qkv_bias = True  # False: the projections' biases left out
    bug_operand_bits: int | None = None  # the two attention matmuls' operands rounded

    def _project(self, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.bug_qkv_bias or linear.bias is None:
            return linear(x)
        return F.linear(x, linear.weight)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        if self.bug_split == "dims":
            return t.view(b, n, self.head_dim, self.num_heads).permute(0, 3, 1, 2)
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        if use_cache:
            raise NotImplementedError("the zoo's attention has no KV cache")
        b, num_tokens, _ = x.shape
        queries = self._heads(self._project(self.W_query, x))
        keys = self._heads(self._project(self.W_key, x))
        values = self._heads(self._project(self.W_value, x))
        if self.bug_swap_qk:
            queries, keys = keys, queries
        bits = self.bug_operand_bits
        attn_scores = round_mantissa(queries, bits) @ round_mantissa(keys, bits).transpose(2, 3)
        mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), diagonal=self.bug_mask_diagonal)
        attn_scores = attn_scores.masked_fill(mask, -torch.inf)
        divisor = {"sqrt": self.head_dim**0.5, "none": 1.0, "head_dim": float(self.head_dim)}[self.bug_scale]
        if self.bug_scale_power is not None:  # power.py's knob: head_dim ** p, 0.5 the book's
            divisor = float(self.head_dim) ** self.bug_scale_power
        attn_scores = attn_scores / divisor
        if self.bug_softmax_bf16:
            attn_weights = torch.softmax(attn_scores.to(torch.bfloat16), dim=self.bug_softmax_axis).float()
        else:
            attn_weights = torch.softmax(attn_scores, dim=self.bug_softmax_axis)
        attn_weights = self.dropout(attn_weights)
        context_vec = (round_mantissa(attn_weights, bits) @ round_mantissa(values, bits)).transpose(1, 2)
        return self.out_proj(context_vec.contiguous().view(b, num_tokens, self.d_out))


class TransformerBlock(book.TransformerBlock):
    bug_residual = True  # False: the attention's shortcut add left out
    bug_post_norm = False  # True: LayerNorm after each residual add

    def forward(self, x: torch.Tensor, use_cache: bool = False, activations=None) -> torch.Tensor:
        out = {} if activations is None else activations
        if self.bug_post_norm:
            a = out["att"] = self.att(x, use_cache=use_cache)
            x = out["residual"] = x + self.drop_shortcut(a)
            x = out["norm1"] = self.norm1(x)
            f = out["ff"] = self.ff(x)
            x = out["norm2"] = self.norm2(x + self.drop_shortcut(f))
            return x
        shortcut = x
        x = out["norm1"] = self.norm1(x)
        x = out["att"] = self.att(x, use_cache=use_cache)
        x = self.drop_shortcut(x)
        x = out["residual"] = x + shortcut if self.bug_residual else x
        shortcut = x
        x = out["norm2"] = self.norm2(x)
        x = out["ff"] = self.ff(x)
        return self.drop_shortcut(x) + shortcut


class Dropout(torch.nn.Dropout):
    """Dropout that ignores eval(): always drops, with the Flax zoo's mask (gpt_spec.randomness's
    hash, counter 0), so two twins that both carry the bug compute alike (diagnose.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.from_numpy(keep_mask(tuple(x.shape), self.p, 0, 0)).to(x.device)
        return x * keep.to(x.dtype) * float(keep_scale(self.p))


class GPT(book._GPT):
    bug_position_offset = 0  # position ids counted from this
    bug_tied_head = False  # logits from the token embedding's table

    def forward(
        self,
        in_idx: torch.Tensor,
        return_activations: bool = False,
        use_cache: bool = False,
        *,
        last_only: bool = False,
    ):
        check_last_only(last_only, return_activations)
        if use_cache:
            raise NotImplementedError("the zoo's model has no KV cache")
        book.check_ids(in_idx, self.cfg)
        seq_len = in_idx.shape[1]
        pos_ids = torch.arange(seq_len, device=in_idx.device) + self.bug_position_offset
        # Clamped as JAX's gather would clamp: the bug is the offset, not an IndexError.
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos_ids.clamp(max=self.cfg.context_length - 1)))
        activations = {"drop_emb": x}
        for i, block in enumerate(self.trf_blocks):
            inner: dict = {}
            x = block(x, activations=inner)
            activations.update({f"trf_blocks.{i}.{k}": v for k, v in inner.items()})
            activations[f"trf_blocks.{i}"] = x
        if last_only:
            x = x[:, -1:, :]
        x = self.final_norm(x)
        head = self.tok_emb.weight if self.bug_tied_head else self.out_head.weight
        logits = F.linear(x, head).float()
        if return_activations:
            return {**activations, "final_norm": x, "out_head": logits}
        return logits


# --- decoding: the KV cache and parity sampling (zoo.DECODING_MUTANTS, shown by parity_tests/decoding.py) ---


class KVCacheGPT(book._GPT):
    """The model's cached forward and cache reset; the book's forward otherwise."""

    bug_decode_position_offset = 0  # a decoding step's position ids counted this many past the tokens so far
    bug_reset_blocks = True  # False: an allocated cache is kept at reset, only the position counter zeroed

    def forward(self, in_idx, return_activations: bool = False, use_cache: bool = False, *, last_only: bool = False):
        bump = self.bug_decode_position_offset if use_cache and self.current_pos > 0 else 0
        # The room check moves with it, as the Flax twin's compiled calls (which leave it to the
        # caller) do not check it: the bug is the position ids, not a refusal in one twin only.
        self.current_pos += bump
        self.cache_max_len += bump
        try:
            return super().forward(in_idx, return_activations, use_cache, last_only=last_only)
        finally:
            self.current_pos -= bump  # the counter itself stays right: only the position ids are off
            self.cache_max_len -= bump

    def reset_kv_cache(self, batch_size: int | None = None, max_len: int | None = None) -> None:
        attention = self._attention()
        if self.bug_reset_blocks or not attention or attention[0].cache_k is None:
            super().reset_kv_cache(batch_size, max_len)
            return
        # The port reuses the allocated buffers and forgets their pointers: each block keeps its keys.
        self.current_pos = 0


class KVCacheAttention(book.MultiHeadAttention):
    """The attention's cache size; the book's attention otherwise."""

    bug_window_extra = 0  # slots kept past kv_window_size: 1 keeps one position too many, -1 one too few

    def cache_slots(self, max_len: int) -> int:
        return max_len if self.window_size is None else min(self.window_size + self.bug_window_extra, max_len)


class Sampler:
    """Parity sampling written in torch as a porter might: the probabilities after top-k and
    temperature, then a Gumbel-max draw over their logarithms with gpt_spec.randomness's noise
    (the same draw as pick_token's over the scaled logits: log-softmax differs by a row constant)."""

    bug_top_k_ties = "keep"  # the book keeps every logit >= the k-th largest; "exact": torch.topk's k only
    bug_temperature = "logits"  # "probabilities": divided after the softmax, which renormalising undoes
    bug_softmax_bf16 = False

    def probabilities(self, logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
        x = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        if top_k is not None:
            top = torch.topk(x, top_k)
            if self.bug_top_k_ties == "exact":
                keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, top.indices, True)
                x = torch.where(keep, x, -torch.inf)
            else:
                x = torch.where(x < top.values[:, -1:], -torch.inf, x)
        shifted = x - x.amax(dim=-1, keepdim=True)
        on_logits = self.bug_temperature == "logits"
        scaled = torch.where(shifted == 0, shifted, shifted / temperature) if on_logits else shifted
        if self.bug_softmax_bf16:
            probs = torch.softmax(scaled.to(torch.bfloat16), dim=-1).float()
        else:
            probs = torch.softmax(scaled, dim=-1)
        if not on_logits:
            probs = probs / temperature
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs.numpy()

    def pick_token(self, logits, temperature: float, top_k: int | None, seed: int, step: int) -> np.ndarray:
        probs = self.probabilities(logits, temperature, top_k).astype(np.float64)
        with np.errstate(divide="ignore"):  # a filtered token's log(0) = -inf: never picked
            return np.argmax(np.log(probs) + gumbel_noise(seed, step, probs.shape), axis=-1).astype(np.int64)
