"""GPT-2 as the HF layout stores it, computed in float64 numpy straight from those tensors.

An independent reference for checkpoint loading: it reads the fused, (in, out) Conv1D tensors as
they are, so a wrong split or a missing transpose in the converter cannot also hide here.
Also makes random GPT-2 state dicts in that layout (what `model.safetensors` on the hub holds).
"""

from __future__ import annotations

import math

import numpy as np


def random_hf_gpt2(
    vocab_size: int,
    n_positions: int,
    n_embd: int,
    n_layer: int,
    *,
    seed: int = 0,
    prefix: str = "transformer.",
    buffers: bool = True,
    lm_head: bool = False,
    dtype=np.float32,
) -> dict[str, np.ndarray]:
    """A GPT-2 with GPT-2's init (N(0, 0.02) weights, LayerNorm near 1/0), in HF's names and shapes."""
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(dtype)

    e = n_embd
    sd = {
        "wte.weight": normal(vocab_size, e),
        "wpe.weight": normal(n_positions, e, std=0.01),
        "ln_f.weight": 1 + normal(e, std=0.1),
        "ln_f.bias": normal(e, std=0.1),
    }
    for i in range(n_layer):
        h = f"h.{i}."
        sd |= {
            h + "ln_1.weight": 1 + normal(e, std=0.1),
            h + "ln_1.bias": normal(e, std=0.1),
            h + "attn.c_attn.weight": normal(e, 3 * e),
            h + "attn.c_attn.bias": normal(3 * e),
            h + "attn.c_proj.weight": normal(e, e),
            h + "attn.c_proj.bias": normal(e),
            h + "ln_2.weight": 1 + normal(e, std=0.1),
            h + "ln_2.bias": normal(e, std=0.1),
            h + "mlp.c_fc.weight": normal(e, 4 * e),
            h + "mlp.c_fc.bias": normal(4 * e),
            h + "mlp.c_proj.weight": normal(4 * e, e),
            h + "mlp.c_proj.bias": normal(e),
        }
        if buffers:  # what older HF files carry: the causal mask and the masked-score constant
            sd[h + "attn.bias"] = np.tril(np.ones((n_positions, n_positions), dtype))[None, None]
            sd[h + "attn.masked_bias"] = np.array(-1e4, dtype)
    out = {prefix + k: v for k, v in sd.items()}
    if lm_head:
        out["lm_head.weight"] = sd["wte.weight"].copy()
    return out


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu_new(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def hf_gpt2_logits(hf: dict[str, np.ndarray], ids: np.ndarray, n_head: int) -> np.ndarray:
    """Logits of GPT-2 (HF layout, tied or untied head) for (batch, seq) ids, in float64."""
    sd = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in hf.items()}
    b, t = ids.shape
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:t]
    e = x.shape[-1]
    d = e // n_head
    causal = np.triu(np.ones((t, t), bool), k=1)
    i = 0
    while f"h.{i}.ln_1.weight" in sd:
        p = f"h.{i}."
        h = _layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        qkv = h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]  # Conv1D: x @ W + b
        q, k, v = (a.reshape(b, t, n_head, d).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
        scores = np.where(causal, -np.inf, q @ k.transpose(0, 1, 3, 2) / math.sqrt(d))
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, e)
        x = x + a @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = _layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        m = _gelu_new(h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        x = x + m @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
        i += 1
    x = _layer_norm(x, sd["ln_f.weight"], sd["ln_f.bias"])
    return x @ sd.get("lm_head.weight", sd["wte.weight"]).T


def gpt2_config_json(vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int, **changes) -> dict:
    """What transformers' `GPT2Config(...).save_pretrained` writes to config.json (5.x), with changes."""
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 50256,
        "dtype": "float32",
        "embd_pdrop": 0.1,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_embd": n_embd,
        "n_head": n_head,
        "n_inner": None,
        "n_layer": n_layer,
        "n_positions": n_positions,
        "pad_token_id": None,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "transformers_version": "5.23.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    } | changes
