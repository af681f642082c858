"""Bounds derived from float32 rounding, op by op: how far two *correct* float32 evaluations of
one layer, fed the same float32 input and weights, may be apart.

Each function returns, element by element, twice the textbook forward-error bound of one float32
evaluation against the exact result (both twins lie within it, so within twice it of each other):

- a dot product of m non-zero terms plus a bias: gamma(m + 1) * (|x| @ |W|^T + |b|), whatever the
  summation order, blocking or use of FMA (Higham, *Accuracy and Stability of Numerical
  Algorithms*, 2nd ed., eq. 3.5); with gamma(n) = n*u / (1 - n*u), u = 2^-24 the unit roundoff;
- a sum of K terms is exact when every term is a multiple of one power of two q and the sum of
  their magnitudes stays below 2^24 * q (every partial sum is then a float32): `exactly_summable`;
- an elementary function (tanh, exp, sqrt, rsqrt, pow) within FN_ULPS ulps of its exact value;
- every other operation correctly rounded (within u, relative).

Errors are propagated to first order through each layer's formula (the softmax exactly, through
its exponentials). Nothing here was tuned to pass: the only measured figure is FN_ULPS.
All arithmetic is float64 numpy on the reference's float32 inputs and weights.
"""

from __future__ import annotations

import math

import numpy as np

U = 2.0**-24  # float32 unit roundoff: half an ulp at 1.0

# Elementary functions as the twins' libraries evaluate them on the CPU, measured against float64
# over dense sweeps (2M points): XLA's tanh 4.4 ulps, rsqrt 1.6, pow(x, 3) 1.3, exp 1.0;
# torch's rsqrt 1.5, pow 1.3, sqrt 0.75, exp 0.56, tanh 0.51. Held at 8 ulps.
FN_ULPS = 8.0
_FN = 2.0 * FN_ULPS * U  # FN_ULPS ulps, relative: one ulp of y is at most 2u|y|

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gamma(n: np.ndarray | float) -> np.ndarray | float:
    return n * U / (1.0 - n * U)


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def magnitude(a, b) -> np.ndarray:
    """|a| @ |b| for a bound: in float32 (BLAS speed), where a sum of K non-negative terms is
    within gamma(K) of exact, then rounded up by 2*gamma(K) so it never falls short."""
    k = np.shape(a)[-1]
    out = np.abs(np.asarray(a, np.float32)) @ np.abs(np.asarray(b, np.float32))
    return out.astype(np.float64) * (1.0 + 2.0 * gamma(k))


def exactly_summable(x: np.ndarray) -> np.ndarray:
    """Per row (last axis): True where float32 sums every order of these values exactly."""
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=-1)
    x = np.where(np.isfinite(x), x, np.float32(0.0))
    mant, exp = np.frexp(x.astype(np.float64))  # x = mant * 2^exp, 0.5 <= |mant| < 1
    ints = np.abs(mant * 2.0**24).astype(np.int64)  # the 24-bit significand as an integer
    trailing = np.zeros(ints.shape, dtype=np.int64)
    nz = ints != 0
    low = ints[nz] & -ints[nz]  # the lowest set bit
    trailing[nz] = np.log2(low).astype(np.int64)
    quantum = np.where(nz, exp.astype(np.int64) - 24 + trailing, np.iinfo(np.int64).max)
    q = quantum.min(axis=-1)  # the finest power of two any value of the row needs
    total = np.abs(x.astype(np.float64)).sum(axis=-1)
    return finite & ((total == 0) | (total < np.ldexp(1.0, np.minimum(q, 900) + 24)))


def linear(x, weight, bias=None) -> np.ndarray:
    """x @ weight^T + bias (torch's (out, in) layout), for rows of x."""
    m = np.count_nonzero(x, axis=-1)[..., None]  # zero terms add nothing and round nothing
    size = magnitude(x, np.asarray(weight).T)
    if bias is not None:
        size = size + np.abs(_f64(bias))
    return 2.0 * gamma(m + 1) * size


def _gelu_parts(h: np.ndarray):
    cube = GELU_A * (h * h * h)
    t = GELU_C * (h + cube)
    th = np.tanh(t)
    return cube, t, th, 0.5 * h * (1.0 + th)


def _gelu_error(h: np.ndarray, parts=None) -> np.ndarray:
    """One float32 evaluation of 0.5*h*(1 + tanh(c*(h + a*h^3))) against its exact value."""
    cube, t, th, g = _gelu_parts(h) if parts is None else parts
    inner = GELU_C * ((_FN + U) * np.abs(cube) + U * np.abs(h + cube)) + U * np.abs(t)
    sech2 = 1.0 - th * th
    return 0.5 * np.abs(h) * (sech2 * inner + _FN * np.abs(th) + 2.0 * U) + U * np.abs(g)


def gelu(x) -> np.ndarray:
    """The book's tanh GELU, elementwise."""
    return 2.0 * _gelu_error(_f64(x))


def gelu_exact(x) -> np.ndarray:
    return _gelu_parts(_f64(x))[3]


def layernorm(x, scale, shift, eps: float = 1e-5) -> np.ndarray:
    """The book's LayerNorm over the last axis: mean, biased variance, (x - mean)/sqrt(var + eps)."""
    x = _f64(x)
    k = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    d = x - mean
    var = (d**2).mean(axis=-1, keepdims=True)
    # The mean: its sum (exact for exactly summable rows), then the division by K (2u: XLA
    # multiplies by a rounded 1/K).
    sum_error = np.where(
        exactly_summable(np.asarray(x, np.float32))[..., None],
        0.0,
        gamma(k - 1) * np.abs(x).mean(axis=-1, keepdims=True),
    )
    d_mean = sum_error + 2.0 * U * np.abs(mean)
    # The variance: sum(d^2) is blind to the mean's error to first order (sum(d) = 0), so it
    # carries the rounding of d, of each square, of the sum and of the division, plus d_mean^2.
    d_var = (5.0 * U + gamma(k - 1)) * var + d_mean**2
    w = var + eps
    r = 1.0 / np.sqrt(w)
    n = d * r
    d_n = r * d_mean + np.abs(n) * (0.5 * (d_var + U * w) / w + _FN + 2.0 * U)
    s, b = _f64(scale), _f64(shift)
    y = s * n + b
    return 2.0 * (np.abs(s) * d_n + U * np.abs(s * n) + U * np.abs(y))


def layernorm_exact(x, scale, shift, eps: float = 1e-5) -> np.ndarray:
    x = _f64(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return _f64(scale) * (x - mean) / np.sqrt(var + eps) + _f64(shift)


def feedforward(x, w1, b1, w2, b2) -> np.ndarray:
    """Linear -> GELU -> Linear, the first Linear's error carried through GELU's slope."""
    # The hidden layer in float32: its values only set the size of GELU's slope and rounding.
    h = np.asarray(x, np.float32) @ np.asarray(w1, np.float32).T + np.asarray(b1, np.float32)
    e_h = linear(x, w1, b1) / 2.0
    parts = cube, t, th, g = _gelu_parts(h)
    slope = 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * GELU_A * h * h)
    e_g = np.abs(slope) * e_h + _gelu_error(h, parts)
    w2t = np.asarray(w2).T
    m = w2t.shape[0]
    e_out = magnitude(e_g, w2t) + gamma(m + 1) * (magnitude(g, w2t) + np.abs(_f64(b2)))
    return 2.0 * e_out


def _heads(a: np.ndarray, n_heads: int) -> np.ndarray:
    b, t, d = a.shape
    return a.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def attention(x, wq, bq, wk, bk, wv, bv, wo, bo, n_heads: int) -> np.ndarray:
    """Causal multi-head attention on (batch, tokens, emb) x, as the book's MultiHeadAttention."""
    x = _f64(x)
    b, t, emb = x.shape
    hd = emb // n_heads

    def project(w, bias):
        value = x @ _f64(w).T + (0.0 if bias is None else _f64(bias))
        return _heads(value, n_heads), _heads(linear(x, w, bias) / 2.0, n_heads)

    (q, e_q), (k, e_k), (v, e_v) = project(wq, bq), project(wk, bk), project(wv, bv)
    c = 1.0 / math.sqrt(hd)
    swap = (0, 1, 3, 2)
    kt = k.transpose(swap)
    e_s = c * (magnitude(e_q, kt) + magnitude(q, e_k.transpose(swap)) + (gamma(hd) + 3.0 * U) * magnitude(q, kt))
    mask = np.triu(np.ones((t, t), dtype=bool), k=1)
    s = np.where(mask, -np.inf, c * (q @ kt))
    # The T x T work below in float32: these values set the size of a bound, not a difference.
    z = (s - s.max(axis=-1, keepdims=True)).astype(np.float32)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    # Softmax is blind to the shift by the row's max, so each exponent carries its own score's
    # error and the subtraction's rounding, and each weight's ratio to its exact value lies in
    # [e^-d_i / sum_j p_j e^d_j, e^d_i / sum_j p_j e^-d_j]; written with expm1 so that small
    # d keep their digits.
    delta = np.where(mask, 0.0, e_s.astype(np.float32) + np.float32(U) * np.abs(np.where(mask, 0.0, z)))
    rounding = np.float32(2.0 * _FN + 2.0 * U + gamma(t))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # huge d: no bound but 1
        up = (p * np.expm1(delta)).sum(axis=-1, keepdims=True)  # sum_j p_j e^d_j - 1
        down = (p * np.expm1(-delta)).sum(axis=-1, keepdims=True)  # sum_j p_j e^-d_j - 1
        ratio = np.maximum((np.expm1(delta) - down) / (1.0 + down), (up - np.expm1(-delta)) / (1.0 + up))
        e_p = np.minimum(np.nan_to_num(p * (ratio + rounding), nan=1.0, posinf=1.0), 1.0)
    e_p = np.where(mask, 0.0, e_p)
    p_v = magnitude(p, v)
    e_ctx = magnitude(e_p, v) + magnitude(p, e_v) + gamma(t) * p_v
    flat = lambda a: a.transpose(0, 2, 1, 3).reshape(b, t, emb)  # noqa: E731
    wot = np.asarray(wo).T
    e_out = magnitude(flat(e_ctx), wot) + gamma(emb + 1) * (magnitude(flat(p_v), wot) + np.abs(_f64(bo)))
    return 2.0 * e_out
