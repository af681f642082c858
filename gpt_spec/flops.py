"""Work of a forward pass, counted analytically: what the benchmark divides its timings by.

Matmul FLOPs only (2 per multiply-add), attention counted in full as computed (the causal mask
does not halve the two T x T matmuls here), LayerNorm, GELU, softmax and adds left out (under 1%
for GPT-2 sizes).
"""

from __future__ import annotations

from .config import GPTConfig
from .models import ModelClass, check_model


def forward_flops(cfg: GPTConfig, batch: int, seq: int, model: str = ModelClass.GPT_MODEL) -> int:
    """FLOPs of one forward of (batch, seq) tokens: per token and layer 24*E^2 for the q/k/v,
    output and MLP projections plus 4*T*E for the scores and the weighted values; 2*E*V for the head."""
    e, v = cfg.emb_dim, cfg.vocab_size
    per_token = 2 * e * v
    if check_model(model) == ModelClass.GPT_MODEL:  # DummyGPTModel's blocks compute nothing
        per_token += cfg.n_layers * (24 * e * e + 4 * seq * e)
    return batch * seq * per_token


def weight_bytes_per_token(cfg: GPTConfig, bytes_per_param: int = 4, model: str = ModelClass.GPT_MODEL) -> int:
    """Bytes of parameters one decoding step reads: all but the embedding tables, of which it reads
    one row each."""
    e, v = cfg.emb_dim, cfg.vocab_size
    params = v * e + 2 * e  # head and final norm
    if check_model(model) == ModelClass.GPT_MODEL:
        qkv = 3 * (e * e + (e if cfg.qkv_bias else 0))
        block = qkv + e * e + e + 8 * e * e + 5 * e + 4 * e
        params += cfg.n_layers * block
    return (params + 2 * e) * bytes_per_param  # + the two embedding rows


def kv_cache_bytes_read(cfg: GPTConfig, positions: int, bytes_per_value: int = 4) -> int:
    """Bytes of cached keys and values one decoding step reads over `positions` cached positions."""
    return 2 * cfg.n_layers * positions * cfg.emb_dim * bytes_per_value
