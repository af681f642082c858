"""The zoo's layers for the Flax twin: each written as a porter might have written it, with the
mutant's bug behind a knob (a `bug_*` class attribute). With every knob at its default, each
computes what gpt_flax.model computes (tests/parity_tests/test_zoo.py holds them to that).

zoo.py makes a subclass of the layer's own class with the knobs set and swaps it in as the
`__class__` of the model's modules for the duration of a check; the class is part of NNX's graph
definition, so a jitted forward traces the mutant anew.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_flax import model as book
from gpt_spec.checks import check_last_only
from gpt_spec.randomness import gumbel_noise, keep_mask, keep_scale


def round_mantissa(x: jax.Array, bits: int | None) -> jax.Array:
    """float32 rounded to nearest (ties to even) with `bits` explicit mantissa bits, as TF32 (10)
    or bfloat16 (7) hold it; None leaves x alone."""
    if bits is None:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=bits)


class LayerNorm(book.LayerNorm):
    bug_eps = 1e-5
    bug_variance = "biased"  # or "unbiased" (Bessel's correction), "moments" (E[x^2] - E[x]^2)
    bug_swap = False  # scale and shift each in the other's place

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(axis=-1, keepdims=True)
        if self.bug_variance == "moments":
            var = (x * x).mean(axis=-1, keepdims=True) - mean * mean
        else:
            var = x.var(axis=-1, keepdims=True, ddof=1 if self.bug_variance == "unbiased" else 0)
        norm_x = (x - mean) / jnp.sqrt(var + self.bug_eps)
        scale, shift = (self.shift, self.scale) if self.bug_swap else (self.scale, self.shift)
        return scale[...] * norm_x + shift[...]


class GELU(book.GELU):
    bug_form = "tanh"  # or "erf", the exact form
    bug_constant = 0.044715

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.bug_form == "erf":
            return 0.5 * x * (1 + jax.scipy.special.erf(x / math.sqrt(2.0)))
        return 0.5 * x * (1 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + self.bug_constant * jnp.power(x, 3))))


class Linear(nnx.Linear):
    bug_operand_bits: int | None = None  # matmul operands rounded to this many mantissa bits
    bug_output_bits: int | None = None  # and the product too
    bug_round_without_derivative = False  # a bfloat16 product rounded on the bits, derivative 0

    # The book's one-argument call, as a port writes it: no out_sharding (the twins never pass one).
    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        if self.bug_round_without_derivative:
            kernel = self.kernel[...]
            dims = (((x.ndim - 1,), (0,)), ((), ()))
            y = book.dot_general_f32(x, kernel, dims, preferred_element_type=jnp.float32)
            if jnp.result_type(x, kernel) == jnp.bfloat16:
                y = book.round_bits_to_bfloat16(y)  # the bits' integer ops: no derivative stated
            return y if self.bias is None else y + self.bias[...]
        bits = self.bug_operand_bits
        y = round_mantissa(round_mantissa(x, bits) @ round_mantissa(self.kernel[...], bits), self.bug_output_bits)
        return y if self.bias is None else y + self.bias[...]


class MultiHeadAttention(book.MultiHeadAttention):
    bug_scale = "sqrt"  # scores / sqrt(head_dim); or "none", "head_dim"
    bug_scale_power: float | None = None  # scores / head_dim ** this, overriding bug_scale
    bug_mask_diagonal = 1  # jnp.triu's k: 1 hides the future; 2 shows the next token; 0 hides self
    bug_split = "heads"  # (n_heads, head_dim); or "dims": (head_dim, n_heads)
    bug_swap_qk = False
    bug_softmax_axis = -1
    bug_softmax_bf16 = False
    bug_qkv_bias = True  # False: the projections' biases left out
    bug_operand_bits: int | None = None  # the two attention matmuls' operands rounded

    def _project(self, linear: nnx.Linear, x: jax.Array) -> jax.Array:
        if self.bug_qkv_bias or linear.bias is None:
            return linear(x)
        return x @ linear.kernel[...]

    def _heads(self, t: jax.Array) -> jax.Array:
        b, n, _ = t.shape
        if self.bug_split == "dims":
            return t.reshape(b, n, self.head_dim, self.num_heads).transpose(0, 3, 1, 2)
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, x: jax.Array, use_cache: bool = False) -> jax.Array:
        if use_cache:
            raise NotImplementedError("the zoo's attention has no KV cache")
        b, num_tokens, _ = x.shape
        queries = self._heads(self._project(self.W_query, x))
        keys = self._heads(self._project(self.W_key, x))
        values = self._heads(self._project(self.W_value, x))
        if self.bug_swap_qk:
            queries, keys = keys, queries
        bits = self.bug_operand_bits
        divisor = {"sqrt": self.head_dim**0.5, "none": 1.0, "head_dim": float(self.head_dim)}[self.bug_scale]
        if self.bug_scale_power is not None:  # power.py's knob: head_dim ** p, 0.5 the book's
            divisor = float(self.head_dim) ** self.bug_scale_power
        queries = queries * (1.0 / divisor)  # before the product, as gpt_flax.model does
        attn_scores = round_mantissa(queries, bits) @ round_mantissa(keys, bits).transpose(0, 1, 3, 2)
        mask = jnp.triu(jnp.ones((num_tokens, num_tokens), dtype=bool), k=self.bug_mask_diagonal)
        attn_scores = jnp.where(mask, -jnp.inf, attn_scores)
        if self.bug_softmax_bf16:
            attn_weights = jax.nn.softmax(attn_scores.astype(jnp.bfloat16), axis=self.bug_softmax_axis)
            attn_weights = attn_weights.astype(jnp.float32)
        else:
            attn_weights = jax.nn.softmax(attn_scores, axis=self.bug_softmax_axis)
        attn_weights = self.dropout(attn_weights)
        context_vec = (round_mantissa(attn_weights, bits) @ round_mantissa(values, bits)).transpose(0, 2, 1, 3)
        return self.out_proj(context_vec.reshape(b, num_tokens, self.d_out))


class TransformerBlock(book.TransformerBlock):
    bug_residual = True  # False: the attention's shortcut add left out
    bug_post_norm = False  # True: LayerNorm after each residual add

    def __call__(self, x: jax.Array, use_cache: bool = False, activations=None) -> jax.Array:
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


class Dropout(nnx.Dropout):
    """Dropout that ignores eval(): always drops, with the torch zoo's mask (gpt_spec.randomness's
    hash, counter 0), so two twins that both carry the bug compute alike (diagnose.py)."""

    def __call__(self, inputs: jax.Array, **kwargs) -> jax.Array:
        keep = keep_mask(tuple(inputs.shape), self.rate, 0, 0)
        return inputs * jnp.asarray(keep, inputs.dtype) * jnp.asarray(keep_scale(self.rate), inputs.dtype)


class GPT(book._GPT):
    bug_position_offset = 0  # position ids counted from this
    bug_tied_head = False  # logits from the token embedding's table

    def __call__(self, in_idx, return_activations: bool = False, use_cache: bool = False, *, last_only: bool = False):
        check_last_only(last_only, return_activations)
        if use_cache:
            raise NotImplementedError("the zoo's model has no KV cache")
        in_idx = book.check_ids(in_idx, self.cfg)
        seq_len = in_idx.shape[1]
        # Clamped, as the torch zoo's: the bug is the offset (nnx.Embed would fill past the end with NaN).
        pos_ids = jnp.minimum(jnp.arange(seq_len) + self.bug_position_offset, self.cfg.context_length - 1)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos_ids))
        activations = {"drop_emb": x}
        for i, block in enumerate(self.trf_blocks):
            inner: dict = {}
            x = block(x, activations=inner)
            activations.update({f"trf_blocks.{i}.{k}": v for k, v in inner.items()})
            activations[f"trf_blocks.{i}"] = x
        if last_only:
            x = x[:, -1:, :]
        x = self.final_norm(x)
        head = self.tok_emb.embedding[...].T if self.bug_tied_head else self.out_head.kernel[...]
        logits = (x @ head).astype(jnp.float32)
        if return_activations:
            return {**activations, "final_norm": x, "out_head": logits}
        return logits


# --- decoding: the KV cache and parity sampling (zoo.DECODING_MUTANTS, shown by parity_tests/decoding.py) ---


class KVCacheGPT(book._GPT):
    """The model's cached forward and cache reset; the book's forward otherwise."""

    bug_decode_position_offset = 0  # a decoding step's position ids counted this many past the tokens so far
    bug_reset_blocks = True  # False: an allocated cache is kept at reset, only the position counter zeroed

    def __call__(self, in_idx, return_activations: bool = False, use_cache: bool = False, *, last_only: bool = False):
        if not (use_cache and self.bug_decode_position_offset):
            return super().__call__(in_idx, return_activations, use_cache, last_only=last_only)
        # Traced under jit: the bump is an array, 0 for the prompt (nothing cached yet).
        bump = jnp.where(self.current_pos[...] > 0, self.bug_decode_position_offset, 0).astype(jnp.int32)
        self.current_pos[...] = self.current_pos[...] + bump
        out = super().__call__(in_idx, return_activations, use_cache, last_only=last_only)
        self.current_pos[...] = self.current_pos[...] - bump  # the counter itself stays right
        return out

    def reset_kv_cache(self, batch_size: int | None = None, max_len: int | None = None) -> None:
        attention = self._attention()
        if self.bug_reset_blocks or not attention or attention[0].cache_k is None:
            super().reset_kv_cache(batch_size, max_len)
            return
        # The port reuses the allocated buffers and forgets their pointers: each block keeps its keys.
        self.current_pos = nnx.Cache(jnp.zeros((), jnp.int32))


class KVCacheAttention(book.MultiHeadAttention):
    """The attention's cache size; the book's attention otherwise."""

    bug_window_extra = 0  # slots kept past kv_window_size: 1 keeps one position too many, -1 one too few

    def cache_slots(self, max_len: int) -> int:
        return max_len if self.window_size is None else min(self.window_size + self.bug_window_extra, max_len)


class Sampler:
    """Parity sampling written in JAX as a porter might: the probabilities after top-k and
    temperature, then a Gumbel-max draw over their logarithms with gpt_spec.randomness's noise
    (the same draw as pick_token's over the scaled logits: log-softmax differs by a row constant)."""

    bug_top_k_ties = "keep"  # the book keeps every logit >= the k-th largest; "exact": jax.lax.top_k's k only
    bug_temperature = "logits"  # "probabilities": divided after the softmax, which renormalising undoes
    bug_softmax_bf16 = False

    def probabilities(self, logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
        x = jnp.asarray(np.asarray(logits, dtype=np.float32))
        if top_k is not None:
            values, indices = jax.lax.top_k(x, top_k)
            if self.bug_top_k_ties == "exact":
                keep = jnp.zeros(x.shape, bool).at[jnp.arange(x.shape[0])[:, None], indices].set(True)
                x = jnp.where(keep, x, -jnp.inf)
            else:
                x = jnp.where(x < values[:, -1:], -jnp.inf, x)
        shifted = x - x.max(axis=-1, keepdims=True)
        on_logits = self.bug_temperature == "logits"
        scaled = jnp.where(shifted == 0, shifted, shifted / temperature) if on_logits else shifted
        if self.bug_softmax_bf16:
            probs = jax.nn.softmax(scaled.astype(jnp.bfloat16), axis=-1).astype(jnp.float32)
        else:
            probs = jax.nn.softmax(scaled, axis=-1)
        if not on_logits:
            probs = probs / temperature
            probs = probs / probs.sum(axis=-1, keepdims=True)
        return np.asarray(probs)

    def pick_token(self, logits, temperature: float, top_k: int | None, seed: int, step: int) -> np.ndarray:
        probs = self.probabilities(logits, temperature, top_k).astype(np.float64)
        with np.errstate(divide="ignore"):  # a filtered token's log(0) = -inf: never picked
            return np.argmax(np.log(probs) + gumbel_noise(seed, step, probs.shape), axis=-1).astype(np.int64)
