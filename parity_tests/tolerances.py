"""Every bound the parity suite holds the twins to, with the figure measured when it was set.

A comparison passes where every element satisfies
    |candidate - reference| <= atol + rtol * |reference| + stol * max|reference|
(numpy.allclose's rule, plus an optional term scaled to the whole tensor) and neither side has a
NaN or an infinity. All figures: torch 2.13.0+cpu vs JAX 0.10.2 on the 2-core x86_64 CPU, float32,
matmuls pinned to float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class Bound:
    atol: float
    rtol: float
    measured: str  # what was seen when the bound was set, and where
    stol: float = 0.0  # times max |reference| of the tensor, for tensors whose scale varies

    def limit(self, reference_abs: np.ndarray) -> np.ndarray:
        scale = self.stol * float(reference_abs.max()) if self.stol and reference_abs.size else 0.0
        return self.atol + scale + self.rtol * reference_abs

    def describe(self) -> str:
        terms = [
            f"{self.atol:g}" if self.atol else "",
            f"{self.rtol:g}|ref|" if self.rtol else "",
            f"{self.stol:.3g}max|ref|" if self.stol else "",
        ]
        return "+".join(t for t in terms if t) or "0 (exact)"


# Bit-for-bit: weight round trips and anything that only moves numbers.
EXACT = Bound(atol=0.0, rtol=0.0, measured="round trips copy float32 values unchanged")

# Every stage of either model's whole forward (embeddings; each block's norm1, att, residual,
# norm2, ff and output; final norm; logits), float32. The twins run the same operations in
# different orders (oneDNN vs XLA's kernels), each K-term dot product may differ by a few ulps of
# its terms, and the residual stream carries the differences from block to block; so the bound is
# a number of ulps of the tensor's largest value, whatever the scale of the weights:
# 2^-17 * max|ref| = 64 ulps of it (an ulp of x being 2^-23 |x|). Measured, max |Δ| / max|ref|:
# gpt2-small at 1x1024, 4x256 and 2x128, weights from either twin's init: 9.3 ulps (block 0's
# attention); the same with every weight x100: 12.6 ulps, x0.01: 6.4 ulps; the tiny configs at
# x0.01, x1, x100: 3.6 ulps. (The earlier atol 2e-5 + rtol 1e-5 failed at x100, on elements
# produced by cancellation: 2.8e-7 relative to the largest.) In a check each stage is also
# allowed the difference its inputs carried in, measured through the reference's own layer
# (forward.carried): a 2-wide LayerNorm row of near-zero variance turned its input's rounding
# into 2.4x this bound at final_norm, and the logits followed (found by hypothesis).
FP32_FORWARD = Bound(
    atol=0.0,
    rtol=0.0,
    stol=2.0**-17,
    measured="max |Δ|/max|ref| 12.6 ulps (gpt2-small, weights x100), 9.3 (x1), 3.6 (tiny configs, x0.01-x100)",
)

# The bfloat16 tier's next-token distributions (parity_tests/distribution.py): per-token
# KL(reference || candidate), in nats, of the two twins' logits. Measured (AMD EPYC, AVX-512 with
# avx512_bf16): random init, gpt2-small 2 x 128 and 1 x 1024: mean <= 1.1e-5, max <= 1.9e-5; the
# tiny configs mean <= 3.8e-6, max <= 8.7e-6; gpt2-small after 40 steps of the book's chapter 5,
# on its text: mean 3.1e-5, max 5.6e-4; the trained chapter5-tiny of tests/data (logits up to 22):
# mean 1.7e-4, max 6.5e-4, the largest seen. The bounds are 5.8x and 7.7x those. KL grows with the
# square of a logit error: that trained model's logits 5% too large (a temperature or a scale off)
# give mean 4.6e-3; 1% too large on the trained gpt2-small, 5.2e-4, is under the bound (and under
# the stage bound, 0.16 against 0.40). Top-1 and top-10 agreement are reported without a bound:
# with a random init's flat distributions they count near-ties (gpt2-small top-1 0.96-0.98; trained:
# 0.998, the trained chapter5-tiny 0.984).
BF16_KL_MEAN = 1e-3
BF16_KL_MAX = 5e-3

# The Flax twin under jax.jit against itself run op by op. XLA's simplifier rewrites
# (x - mean) / sqrt(var + eps) as (x - mean) * rsqrt(var + eps) and mean's division by n as a
# multiplication by 1/n, a few ulps apart.
JIT_VS_EAGER = Bound(
    atol=2e-6,
    rtol=1e-6,
    measured="max |Δ| 4.8e-7 (dummy + LayerNorm) and 6.0e-7 (GPTModel) on the tiny configs",
)

# The book's printed logits are rounded to 4 decimals; a match may differ by 1 in the last digit.
BOOK_PRINTED = Bound(
    atol=1e-4 + 0.5e-4,
    rtol=0.0,
    measured="torch twin: largest printed-digit difference 1e-4 (1.6755 vs printed 1.6754)",
)

# Mean cross-entropy (the book's calc_loss_batch) of the same model on the same batch.
LOSS = Bound(
    atol=1e-5,
    rtol=1e-6,
    measured="max |Δ| 1.9e-6 on gpt2-small (loss ~11), 9.5e-7 on the tiny configs (loss ~4.8)",
)

# Gradients of the loss w.r.t. every parameter, compared in the canonical layout. Their scale
# varies by orders of magnitude from tensor to tensor, so the bound has a term relative to each
# tensor's largest gradient, and an absolute floor for the rounding noise of gradients that are
# zero in exact arithmetic (the key bias: see ADAMW_NOISE_ONLY).
# Measured: max |Δ| 4.1e-8 (out_head.weight, max |g| 0.068); max |Δ| / max |g| per tensor 2.6e-6
# (gpt2-small, B=2 x T=32); key-bias gradients |g| <= 3e-8 on both sides.
GRADS = Bound(
    atol=1e-7,
    rtol=1e-5,
    stol=2e-5,
    measured="gpt2-small: max |Δ| 4.1e-8; max |Δ|/max|g| per tensor 2.6e-6",
)

# Weights after AdamW steps (torch.optim.AdamW vs optax.adamw, lr 4e-4, weight decay 0.1).
# Adam divides each gradient by its own running RMS: where a gradient element is at the rounding
# floor (|g| ~ eps = 1e-8) at some step, the twins' rounding noise, not the gradient, sets the sign
# and size of that element's update, so the two can differ by up to 2 * lr in that step. Such
# elements are rare; every other element stays within ADAMW_WEIGHTS.
# Measured after 1 and 10 steps: tiny configs (key bias aside) max |Δ| 4.6e-7 and 1.7e-6, no
# element past ADAMW_WEIGHTS. gpt2-small (B=2 x T=32), two data orders: 1,053 and 5,390 of
# 163,009,536 elements (6.5e-6, 3.3e-5) past it after 10 steps, the largest 8.1e-5 = 0.20 lr.
ADAMW_WEIGHTS = Bound(
    atol=5e-6,
    rtol=1e-6,
    measured="tiny configs: max |Δ| 1.7e-6 after 10 steps; gpt2-small: 99.997% of elements",
)
ADAMW_OUTLIER_FRACTION = 1e-4  # of all elements may pass ADAMW_WEIGHTS (measured 3.3e-5)...
ADAMW_FLIP_ENVELOPE = 2.0  # ... but none may differ by more than this times lr per step (0.20 seen)
# Parameters whose gradient is zero in exact arithmetic: a key bias adds q.b_k to every score of a
# softmax row, which softmax ignores. Their gradients are pure rounding noise (checked against
# GRADS.atol), so only the envelope applies to them.
ADAMW_NOISE_ONLY = ("att.W_key.bias",)

# The bfloat16 tier: both twins with bfloat16 parameters and compute (LayerNorm statistics,
# GELU, softmax and logits in float32), against each other. bfloat16 keeps 8 significant bits
# (eps = 2^-7): every rounded matmul output may round the other way in the other twin, and the
# residual stream carries that on from block to block, so the bound scales with each tensor's
# largest value: 4 eps * max|ref| = 2^-5 * max|ref|, 4 to 8 bfloat16 ulps of that value.
# Measured (weights from either twin, cast to bfloat16, bit-identical in both after the cast):
# tiny configs max |Δ| 0.031 (block 1, |x| 4.3), logits 0.0098; gpt2-small B=2 x T=128: block 9
# 0.125 (|x| 7.6), logits 0.028; B=1 x T=1024: block 11 0.141 (|x| 7.9, 4.5 ulps of its largest
# value; bound there 0.257), logits 0.027 (|x| 3.2). For scale: the bfloat16 torch twin against its own float32
# logits differs by 0.032. With GELU evaluated in float32 (0ed5590), gpt2-small B=2 x T=128: stages
# max 0.10 / 0.125 (torch->flax / flax->torch; 0.53 / 0.49 of the bound), logits 0.027 / 0.031.
BF16_FORWARD = Bound(
    atol=1e-2,
    rtol=0.0,
    stol=2.0**-5,
    measured="gpt2-small: max |Δ| 0.141 (block 11, 4.5 bf16 ulps of max |x| 7.9), logits 0.028",
)

# The float16 tier: as the bfloat16 tier, with float16's 11 significant bits (eps = 2^-10) for
# bfloat16's 8: the same 4 eps * max|ref|, 2^-8 * max|ref|, and an atol 8x smaller. Measured
# (AMD EPYC, AVX-512 with avx512_bf16; weights of either twin, cast, bit-identical in both):
# gpt2-small B=2 x T=128: block 11's norm2 0.0117 (|x| 4.48, 3 float16 ulps; 0.63 of the bound),
# logits 0.0034, both directions; the tiny config: 0.0039, 0.21 of it; the trained chapter5-tiny of
# tests/data: 0.29 of it, logits 0.016 (|x| 22). The float16 torch twin against its own float32
# logits: 0.0037.
FP16_FORWARD = Bound(
    atol=1.25e-3,
    rtol=0.0,
    stol=2.0**-8,
    measured="gpt2-small: max |Δ| 0.0117 (block 11, 3 float16 ulps of max |x| 4.48), logits 0.0034",
)
# Its next-token distributions: KL grows with the square of the logits' error, 8x smaller than
# bfloat16's, so the bounds are bfloat16's / 64. Measured: gpt2-small's random init mean 1.6e-7, max
# 3.0e-7 (top-1 0.996); the trained chapter5-tiny mean 2.8e-6, max 9.9e-6, the largest seen (the
# bounds 5.5x and 7.9x those); its logits 1% too large fail them (tests/parity_tests/test_float16.py).
FP16_KL_MEAN = BF16_KL_MEAN / 64
FP16_KL_MAX = BF16_KL_MAX / 64

# The bfloat16 training tier: both twins trained from the same weights cast to bfloat16, with
# bfloat16 parameters, gradients and AdamW moments (as `cast` leaves them: torch.optim.AdamW and
# optax keep the moments in the parameters' dtype), LayerNorm, GELU, softmax and logits in
# float32. Measured (AMD EPYC, AVX-512 with avx512_bf16; torch 2.13.0+cpu, JAX 0.10.2), lr 4e-4,
# 10 steps, seeds 0 and 1: the tiny configs (with and without a qkv bias, B=2 x T=10) and
# gpt2-small (B=2 x T=32):
# - the loss on the first batch: |Δ| 1.4e-5..9.3e-4 (tiny, loss 4.7), 3.0e-4 and 6.0e-4
#   (gpt2-small, loss 10.9); the training losses of steps 1-10: 1.9e-3 at most. The logits are
#   rounded to bfloat16 (8 significant bits) and each may round the other way in the other twin.
# - gradients: max |Δ| / max|g| per tensor 0.012..0.022 (tiny), 0.023 and 0.028 (gpt2-small):
#   every product of the backward pass is rounded to bfloat16 and the roundings compound. The
#   key bias's gradient, zero in exact arithmetic, is noise: |g| 2.5e-5, |Δ| 2.9e-5 (BF16_GRADS.atol).
# - weights: a bfloat16 weight moves by whole ulps (an update of lr 4e-4 is below half an ulp of
#   |w| > 0.1, so most steps leave it where it is), and the twins' AdamW arithmetic rounds in
#   different places (torch per operation, XLA fusing several before one rounding): an element
#   that crosses a rounding boundary in one twin and not the other is one ulp apart, and gradients
#   near 0 (|g| ~ 5e-6) come out with opposite signs, their updates 2 lr apart. Elements past
#   BF16_ADAMW_WEIGHTS per step taken: 0.23% at most (tiny), 0.50% after 1 step and 0.74% after 10
#   (gpt2-small); (|Δ| - 2^-7 |w| step) / (lr step) at most 2.02 (step 1), 1.14 (step 10).
# The D1 port bug (a rounding with derivative 0 in the Flax head: every gradient exactly 0) fails
# the first gradient by 14x BF16_GRADS (the zoo's rounding-without-derivative).
BF16_LOSS = Bound(
    atol=5e-3,
    rtol=0.0,
    measured="|Δ loss| 9.3e-4 (tiny), 6.0e-4 (gpt2-small); steps 1-10: 1.9e-3 at most",
)
BF16_GRADS = Bound(
    atol=1e-4,
    rtol=0.0,
    stol=2.0**-4,
    measured="max |Δ|/max|g| per tensor 0.022 (tiny), 0.028 (gpt2-small)",
)
# Weights past one bfloat16 spacing of |w| (2^-7 |w| holds one ulp anywhere in the binade).
BF16_ADAMW_WEIGHTS = Bound(
    atol=1e-6,
    rtol=2.0**-7,
    measured="elements past it per step: 0.23% (tiny), 0.74% (gpt2-small) at most, 10 steps",
)
BF16_ADAMW_OUTLIERS_PER_STEP = 0.02  # of all elements may pass BF16_ADAMW_WEIGHTS, times the steps
# No element may differ by more than BF16_ADAMW_FLIP_ENVELOPE * lr (an update's sign flipped, its
# size off by the rounding of the moments) plus one bfloat16 spacing of |w| (a rounding the other
# way) per step: measured 2.02 lr at step 1, 1.14 lr a step over 10.
BF16_ADAMW_FLIP_ENVELOPE = 2.5
BF16_ADAMW_ENVELOPE_RTOL = 2.0**-7


# The systematic-error test (compare.bias_check) on the layer evidence's natural inputs: a mean
# scale or offset bias fails where it is both BIAS_Z standard errors from zero and more than
# BIAS_FLOOR_ULPS float32 ulps (relative). Unmutated twins do have real biases, measured very
# precisely but far below an ulp: gpt2-small at 1x1024, 4x256 and 2x128 (weights x0.01 to x100),
# at most 0.24 ulp (LayerNorm scale, 18 standard errors) and 0.13 ulp (attention offset, 19 s.e.);
# the tiny configs at most 0.28 ulp and 3.4 s.e. A bug's: LayerNorm eps 1e-6 on rows of variance
# 2, 19 ulps at 280 s.e.; GELU's 0.0447 on gpt2-small's first feed-forward, 22x the threshold.
# Fewer than BIAS_MIN_ROWS distinct rows are not tested: the legitimate roundings of a couple of
# rows, a few ulps each, can all lean one way (hypothesis found two identical rows of one element
# 2.6 ulps apart, "significant" with a standard error of 0).
BIAS_Z = 8.0
BIAS_FLOOR_ULPS = 1.0
BIAS_MIN_ROWS = 16


# Chapter 5's training run in both twins (parity_tests/chapter5.py): |Δ loss| of the two float32 runs
# at step s (each step's training loss, and both losses at each evaluation) must be within
#     min(TRAIN_LOSS_CAP, TRAIN_LOSS_START * TRAIN_LOSS_GROWTH ** s).
# Measured with `gpt-parity train` (AMD EPYC, 2 cores, AVX-512 with avx512_bf16; torch 2.13.0+cpu,
# JAX 0.10.2), the divergence does not grow steadily: it stays at rounding level, then jumps where
# the training is unstable, then holds at a plateau where AdamW's normalised steps keep it.
# - GPT_CONFIG_124M at context 256, the book's 10 epochs (90 steps), dropout off: <= 1.3e-5 over
#   steps 0-19; a loss spike at steps 20-26 (validation 6.44 -> 7.68) lifts it 2.5 decades in 6
#   steps (2.3e-5 at step 20, 2.7e-3 at step 26); then a plateau of 2e-4 to 4.3e-3 (step 32) to
#   the end. Weights differ by at most 1.1e-3 after training.
# - The same with parity dropout: <= 1.3e-5 over steps 0-21; 3.7e-4 at step 22 (a batch whose loss
#   jumped to 13.7); then a slow rise to 1e-4..1.6e-4 from step 50 on. Weights: 1.4e-4.
# - A GPT of 50257 x 16, context 64, 2 layers, parity dropout, 30 epochs (1080 steps, lr 4e-3):
#   <= 2.3e-5 throughout.
# The bound starts 8x above the first steps' rounding level, grows 1.2x a step (a decade in 13
# steps, so the 124M run's jump stays inside it: its closest call is 0.43 of the bound, at step
# 32) and stops at 1e-2, 2.3x the plateau measured. What breaks parity is far larger: on the small
# run of tests/parity_tests/test_chapter5.py, which plants both, the Flax twin with another dropout seed
# is 0.050 off at step 0 (0.077 at most), with its own batch order 0.059 (0.16 at most). A longer or less stable run than these may need
# more: measure it (`gpt-parity train` writes every step's |Δ| to train.json).
# One AdamW step in both twins from the same training state (`gpt-parity diverge`,
# parity_tests/step_evidence.py): each moment may differ by what the gradients' bound (GRADS) becomes
# through Adam's running averages, (1 - b1)·δg for exp_avg and (1 - b2)·|2g|·δg for exp_avg_sq,
# plus MOMENT_ROUNDING·|new value| for the float32 roundings of b·m + (1 - b)·g. Measured from the
# same state (AMD EPYC, AVX-512 with avx512_bf16): the tiny chapter-5 run's steps 1-6, closest 0.26
# of it (exp_avg_sq of a feed-forward weight); gpt2-small's steps 20-26 of the book's run (the loss
# spike), closest 0.35 (exp_avg_sq of block 10's second feed-forward weight, step 24). A torch
# exp_avg defect x3 on one 16 x 64 weight is past it (tests/parity_tests/test_diverge.py).
MOMENT_ROUNDING = 2.0**-22

# `gpt-parity diagnose` (parity_tests/diagnose.py): a mutant that makes the twins compute alike may
# still leave findings past their float32 bounds where the bug itself is ill-conditioned (eps 1e-12
# on a row of tiny variance, E[x²] − E[x]² on a row of large mean) or rounds (TF32 and bfloat16
# operands, a bfloat16 softmax): float32-sized differences flip its roundings. What it leaves is
# judged against what the same mutant leaves between two twins that both carry it, finding by
# finding: within OWN_ROUNDING_SLACK times that, it is the mutant's own rounding. Measured on the
# tiny config (AMD EPYC, AVX-512 with avx512_bf16): every zoo bug against itself 1.0x (the same
# computation); the nearest wrong mutant of each rounding bug, 8x or more (bfloat16 operands for a
# TF32 candidate's, eps 1e-6 for 1e-12).
OWN_ROUNDING_SLACK = 2.0

TRAIN_LOSS_START = 1e-4
TRAIN_LOSS_GROWTH = 1.2
TRAIN_LOSS_CAP = 1e-2


def train_loss_bound(step: int) -> float:
    """The bound on |Δ loss| between the twins' training runs at `step` (see above)."""
    return min(TRAIN_LOSS_CAP, TRAIN_LOSS_START * TRAIN_LOSS_GROWTH ** min(step, 100))
