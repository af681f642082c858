"""Layer evidence: every building block of the two twins fed the same float32 input, held to the
envelope float32 rounding allows for that op alone (envelopes.py), and tested for systematic error.

A whole forward lets rounding differences grow from block to block, so its bound (FP32_FORWARD)
sits well above the noise of any one op, and a bug whose effect is small, systematic and
input-dependent hides under it: LayerNorm's eps 1e-6 for 1e-5 moves a unit-variance row by
~2e-6. Here each sub-layer is fed the reference twin's own input to it (the stream's recorded
activations), so nothing is carried in from earlier layers, and inputs built to expose its traps:

- LayerNorm (every one): rows of tiny variance, where eps decides the output; rows with a mean of
  up to 2^12 whose sums float32 computes exactly, where E[x^2] - E[x]^2 cancels to garbage;
  constant rows, where (x - mean) is 0 and only eps keeps 0/0 away.
- GELU (the first block's; it has no weights): a dense sweep over [-10, 10].
- Linear (every projection and the head): one-hot rows. Their products are rounded once and
  their sums are exact, so correct twins agree to an ulp or two, and a matmul whose operands were
  rounded (TF32's 10-bit mantissa, bfloat16's 7) is thousands of ulps off.
- MultiHeadAttention (the first block's): the whole context at once, and the same rows scaled
  16x so the softmax is peaked; every block's on its natural input.
- FeedForward (every one): its natural input.

Natural inputs also get the systematic-error test (compare.bias_check). A finding is named by the
module it called, the layer and the input: "trf_blocks.0.norm1 LayerNorm, rows of tiny variance".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gpt_spec import GPTConfig, ModelKind

from . import envelopes
from .compare import BiasCheck, Comparison, bias_check, compare
from .distribution import DistributionCheck
from .twins import Backend, call_module, submodule

BOOK_LN_EPS = 1e-5
ONE_HOT_ROWS = 32  # rows of a Linear probe: one-hot at evenly spread input features
SWEEP_POINTS = 2**16 + 1  # GELU over [-10, 10]
PEAKED_SCALE = 16.0  # the attention input scaled by this: scores ~256x larger, softmax one-hot

Finding = Comparison | BiasCheck | DistributionCheck  # the last: forward.ParityRow's, at the logits


@dataclasses.dataclass(frozen=True)
class Envelope:
    """Names a derived, element-by-element limit for compare(): what it is derived from."""

    what: str
    measured: str = "derived from float32 rounding; see envelopes.py"

    def describe(self) -> str:
        return f"the {self.what} rounding envelope"


@dataclasses.dataclass(frozen=True)
class Probe:
    """One input to one module of both twins, with what the two may differ by on it."""

    module: str  # the module's dotted path, the same in both twins: trf_blocks.0.att.W_query
    layer: str  # LayerNorm, GELU, Linear, MultiHeadAttention, FeedForward
    inputs: str  # "natural input" or the trap's name
    x: np.ndarray  # float32
    limit: np.ndarray  # per output element
    bias_row: int | None = 0  # None: no bias test; 0: rows along the last axis; n: rows of n values

    @property
    def name(self) -> str:
        return f"{self.module} {self.layer}, {self.inputs}"


# --- trap inputs --------------------------------------------------------------------------------


def tiny_variance_rows(k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of mean ~0 and standard deviation 1e-4 .. 0.3: variance 1e-8 .. 0.1, around eps."""
    stds = np.logspace(-4, -0.5, 12)
    return (rng.standard_normal((stds.size, k)) * stds[:, None]).astype(np.float32)


def large_mean_rows(k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows +-2^e + d with d on a grid of 1/4 summing to zero, so every order of float32 sums
    them exactly and the mean is 2^e: only E[x^2] - E[x]^2 loses the variance (to cancellation)."""
    # Exactly summable while K * (2^e + |d|) < 2^24 * 1/4; GPT-2's 768 allows e = 12.
    top = int(min(12, np.floor(np.log2(2.0**22 / (1.05 * k)))))
    rows = []
    for e in (top - 4, top - 2, top):
        for sign in (1.0, -1.0):
            d = np.round(rng.standard_normal(k // 2) * 4) / 4
            row = np.concatenate([d, -d, np.zeros(k % 2)])
            rng.shuffle(row)
            rows.append(sign * 2.0**e + row)
    return np.asarray(rows, dtype=np.float32)


def constant_rows(k: int) -> np.ndarray:
    return np.repeat(np.array([[0.0], [1.5], [-3.0], [2.0**10]], np.float32), k, axis=1)


def one_hot_rows(k: int, rng: np.random.Generator) -> np.ndarray:
    """One non-zero element per row, at evenly spread features, with a full 24-bit significand."""
    idx = np.unique(np.linspace(0, k - 1, min(k, ONE_HOT_ROWS)).round().astype(int))
    x = np.zeros((idx.size, k), np.float32)
    x[np.arange(idx.size), idx] = rng.uniform(0.5, 2.0, idx.size) * rng.choice([-1.0, 1.0], idx.size)
    return x


# --- probes of each building block ----------------------------------------------------------------


def _layernorm_probes(path: str, x: np.ndarray, sd: Mapping[str, np.ndarray], rng: np.random.Generator) -> list[Probe]:
    scale, shift = sd[f"{path}.scale"], sd[f"{path}.shift"]
    k = scale.shape[0]

    def probe(inputs: str, rows: np.ndarray, bias_row: int | None) -> Probe:
        return Probe(path, "LayerNorm", inputs, rows, envelopes.layernorm(rows, scale, shift, BOOK_LN_EPS), bias_row)

    return [
        probe("natural input", x, 0),
        probe("rows of tiny variance", tiny_variance_rows(k, rng), None),
        probe("rows of large mean", large_mean_rows(k, rng), None),
        probe("constant rows", constant_rows(k), None),
    ]


def _linear_probe(path: str, sd: Mapping[str, np.ndarray], rng: np.random.Generator) -> Probe:
    weight, bias = sd[f"{path}.weight"], sd.get(f"{path}.bias")
    x = one_hot_rows(weight.shape[1], rng)
    return Probe(path, "Linear", "one-hot rows", x, envelopes.linear(x, weight, bias), None)


def _attention_weights(path: str, sd: Mapping[str, np.ndarray]) -> list[np.ndarray | None]:
    return [
        sd.get(f"{path}.{name}.{leaf}")
        for name in ("W_query", "W_key", "W_value", "out_proj")
        for leaf in ("weight", "bias")
    ]


def _attention_probe(path: str, inputs: str, x: np.ndarray, sd, cfg: GPTConfig, bias_row: int | None) -> Probe:
    wq, bq, wk, bk, wv, bv, wo, bo = _attention_weights(path, sd)
    limit = envelopes.attention(x, wq, bq, wk, bk, wv, bv, wo, bo, n_heads=cfg.n_heads)
    return Probe(path, "MultiHeadAttention", inputs, x, limit, bias_row)


def build_probes(
    cfg: GPTConfig,
    kind: str,
    stream: Mapping[str, np.ndarray],
    sd: Mapping[str, np.ndarray],
    *,
    seed: int = 0,
    traps: bool = True,
) -> list[Probe]:
    """Every probe of a model, in the model's order, from the reference's stream and weights."""
    rng = np.random.default_rng(seed)
    probes: list[Probe] = []
    x = stream["drop_emb"]
    for i in range(cfg.n_layers if kind == ModelKind.GPT else 0):
        p = f"trf_blocks.{i}"
        probes += _layernorm_probes(f"{p}.norm1", x, sd, rng)
        probes.append(_attention_probe(f"{p}.att", "natural input", stream[f"{p}.norm1"], sd, cfg, 0))
        if traps and i == 0:
            whole = rng.standard_normal((1, cfg.context_length, cfg.emb_dim)).astype(np.float32)
            probes.append(_attention_probe(f"{p}.att", "the whole context", whole, sd, cfg, None))
            probes.append(
                _attention_probe(
                    f"{p}.att",
                    f"the whole context x{PEAKED_SCALE:g} (peaked scores)",
                    whole * np.float32(PEAKED_SCALE),
                    sd,
                    cfg,
                    None,
                )
            )
        probes += [_linear_probe(f"{p}.att.{name}", sd, rng) for name in ("W_query", "W_key", "W_value", "out_proj")]
        probes += _layernorm_probes(f"{p}.norm2", stream[f"{p}.residual"], sd, rng)
        h = stream[f"{p}.norm2"]
        ff = [sd[f"{p}.ff.layers.{j}.{leaf}"] for j in (0, 2) for leaf in ("weight", "bias")]
        probes.append(Probe(f"{p}.ff", "FeedForward", "natural input", h, envelopes.feedforward(h, *ff), 0))
        if traps and i == 0:
            sweep = np.linspace(-10.0, 10.0, SWEEP_POINTS, dtype=np.float32)
            probes.append(
                Probe(f"{p}.ff.layers.1", "GELU", "a sweep over [-10, 10]", sweep, envelopes.gelu(sweep), 256)
            )
        probes += [_linear_probe(f"{p}.ff.layers.{j}", sd, rng) for j in (0, 2)]
        x = stream[p]
    if "final_norm.scale" in sd:
        probes += _layernorm_probes("final_norm", x, sd, rng)
    probes.append(_linear_probe("out_head", sd, rng))
    return probes


# --- running them ---------------------------------------------------------------------------------


def reference_outputs(probes: list[Probe], backend: Backend, model: Any) -> list[np.ndarray]:
    return [call_module(backend, submodule(model, p.module), p.x) for p in probes]


def run_probes(probes: list[Probe], reference: list[np.ndarray], backend: Backend, model: Any) -> list[Finding]:
    """The candidate twin's module on each probe, against the reference's outputs: one envelope
    comparison per probe and, on natural inputs, one bias check."""
    findings: list[Finding] = []
    for probe, ref in zip(probes, reference, strict=True):
        out = call_module(backend, submodule(model, probe.module), probe.x)
        findings.append(compare(probe.name, ref, out, Envelope(probe.layer), limit=probe.limit))
        if probe.bias_row is not None and findings[-1].passed:
            findings.append(bias_check(probe.name, ref, out, row=probe.bias_row or None))
    return findings
