"""What a reduced-precision comparison is judged by across the field, beside max |Δ|: how far the
candidate's next-token distribution is from the reference's (per-token KL divergence) and whether
they rank the same tokens first (top-1 agreement, overlap of the top 10).

Computed from the two twins' logits in float64: log-softmax over the vocabulary, then per token
KL(reference || candidate) = sum p_ref (log p_ref - log p_cand), in nats.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

TOP_K = 10  # the overlap of the top TOP_K tokens (MaxText's logit checker reports top-k overlap too)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """The two twins' next-token distributions over `tokens` positions."""

    tokens: int
    kl_mean: float  # nats, KL(reference || candidate) averaged over tokens
    kl_max: float
    top1: float  # fraction of tokens whose most likely next token is the same
    topk_mean: float  # mean |top-k(reference) ∩ top-k(candidate)| / k
    topk_min: float
    k: int = TOP_K

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (
            f"KL mean {self.kl_mean:.3g}, max {self.kl_max:.3g} nats; top-1 agreement {self.top1:.4g}; "
            f"top-{self.k} overlap mean {self.topk_mean:.4g}, min {self.topk_min:.4g} ({self.tokens} tokens)"
        )


@dataclasses.dataclass(frozen=True)
class DistributionCheck:
    """The distribution metrics held to a tier's bounds on KL (the bfloat16 tier's: tolerances.py),
    as a finding at the logits."""

    distribution: Distribution
    kl_mean_bound: float
    kl_max_bound: float
    name: str = "out_head"
    evidence: str = "distribution"

    @property
    def margin(self) -> float:
        """The larger of KL mean / its bound and KL max / its bound: above 1 fails."""
        return max(self.distribution.kl_mean / self.kl_mean_bound, self.distribution.kl_max / self.kl_max_bound)

    @property
    def passed(self) -> bool:
        return bool(self.margin <= 1.0)  # False for NaN

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"{self.name} distribution: {verdict}: {self.distribution.describe()}; bounds: KL mean "
            f"{self.kl_mean_bound:g}, max {self.kl_max_bound:g} ({self.margin:.3g}x at the closer)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "evidence": self.evidence,
            "passed": self.passed,
            "margin": self.margin,
            "kl_mean_bound": self.kl_mean_bound,
            "kl_max_bound": self.kl_max_bound,
            "describe": self.describe(),
        }


@dataclasses.dataclass(frozen=True)
class GreedyDivergence:
    """Where the twins' greedy generations part: per prompt, the index of the first new token they
    pick differently (`new_tokens` where they never do)."""

    prompt_tokens: int
    new_tokens: int
    first: tuple[int, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.first))

    @property
    def p10(self) -> float:
        """The 10th percentile: nine prompts in ten go at least this far alike."""
        return float(np.percentile(self.first, 10))

    @property
    def never(self) -> int:
        return sum(f == self.new_tokens for f in self.first)

    def describe(self) -> str:
        return (
            f"{len(self.first)} prompts of {self.prompt_tokens} tokens, {self.new_tokens} new tokens each: the twins' "
            f"greedy tokens first differ at median {self.median:g}, 10th percentile {self.p10:g}; "
            f"{self.never} of {len(self.first)} never differ"
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "median": self.median, "p10": self.p10, "never": self.never}


def greedy_divergence(torch_model: Any, flax_model: Any, prompts: np.ndarray, new_tokens: int) -> GreedyDivergence:
    """Both twins (same weights, eval mode) continue each prompt row greedily with the KV cache."""
    import torch

    import gpt_flax
    import gpt_torch

    n, size = prompts.shape
    if size + new_tokens > torch_model.cfg.context_length:
        raise ValueError(
            f"greedy divergence: {size} prompt + {new_tokens} new tokens pass context_length "
            f"{torch_model.cfg.context_length}"
        )
    with torch.no_grad():
        t = gpt_torch.generate_text_simple_cached(torch_model, torch.from_numpy(prompts), new_tokens).numpy()[:, size:]
    f = np.asarray(gpt_flax.generate_text_simple_cached(flax_model, prompts, new_tokens))[:, size:]
    differ = t != f
    first = tuple(int(np.argmax(row)) if row.any() else new_tokens for row in differ)
    return GreedyDivergence(size, new_tokens, first)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def distribution(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K) -> Distribution:
    """The metrics of two logits arrays of one shape (..., vocab)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logits of shapes {reference.shape} and {candidate.shape} cannot be compared")
    vocab = reference.shape[-1]
    ref = np.asarray(reference, np.float64).reshape(-1, vocab)
    cand = np.asarray(candidate, np.float64).reshape(-1, vocab)
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)  # >= 0 in exact arithmetic
    k = min(k, vocab)
    top_ref = np.argpartition(-ref, k - 1, axis=-1)[:, :k]
    top_cand = np.argpartition(-cand, k - 1, axis=-1)[:, :k]
    overlap = np.array([len(np.intersect1d(a, b)) / k for a, b in zip(top_ref, top_cand, strict=True)])
    top1 = float(np.mean(ref.argmax(axis=-1) == cand.argmax(axis=-1)))
    return Distribution(
        len(ref), float(kl.mean()), float(kl.max()), top1, float(overlap.mean()), float(overlap.min()), k
    )


__all__ = ["TOP_K", "Distribution", "DistributionCheck", "GreedyDivergence", "distribution", "greedy_divergence"]
