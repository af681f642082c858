"""Every bound the parity suite holds the twins to, with the figure measured when it was set.

A comparison passes where every element satisfies |candidate - reference| <= atol + rtol * |reference|
(numpy.allclose's rule) and neither side has a NaN or an infinity where the other has not.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Bound:
    atol: float
    rtol: float
    measured: str  # what was seen when the bound was set, and where

    def limit(self, reference_abs):
        return self.atol + self.rtol * reference_abs


# Bit-for-bit: weight round trips and anything that only moves numbers.
EXACT = Bound(atol=0.0, rtol=0.0, measured="round trips copy float32 values unchanged")

# Logits of the §4.1 skeleton in float32 (matmul precision pinned to float32), CPU.
# Measured: max |Δ| 3.6e-6 (max |logit| 4.6) on gpt2-small, batch 2 x 256 tokens, torch 2.13 CPU
# vs JAX 0.10.2 CPU; 1.9e-6 on the tiny configs. The only differing operation is the 768-term
# dot product of the head, summed in a different order by oneDNN and XLA (K * eps * |x||w| ~ 1e-5).
FP32_DUMMY_LOGITS = Bound(
    atol=2e-5,
    rtol=1e-5,
    measured="max |Δ| 3.6e-6 on gpt2-small (B=2, T=256), torch 2.13 CPU vs JAX 0.10.2 CPU",
)

# The book's printed logits are rounded to 4 decimals; the issue allows the last digit +-1.
BOOK_PRINTED = Bound(
    atol=1e-4 + 0.5e-4,
    rtol=0.0,
    measured="torch twin: largest printed-digit difference 1e-4 (1.6755 vs printed 1.6754)",
)

# The Flax twin under jax.jit against itself run op by op. XLA's simplifier rewrites
# (x - mean) / sqrt(var + eps) as (x - mean) * rsqrt(var + eps) and mean's division by n as a
# multiplication by 1/n, a few ulps apart. Measured: max |Δ| 4.8e-7 (values up to ~3) on the tiny
# LayerNorm config; 0 where the model has no LayerNorm.
JIT_VS_EAGER = Bound(
    atol=2e-6,
    rtol=1e-6,
    measured="max |Δ| 4.8e-7 on the tiny config with the final LayerNorm, JAX 0.10.2 CPU",
)
