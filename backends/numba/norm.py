"""LayerNorm's kernels (base.Backend.layer_norm_forward / layer_norm_backward): a row's
statistics in float64, the activation and its derivative by the dense layer's own row passes
(``layers.py``), so that a normalized layer activates exactly as a plain one. Row by row: each
row is read from memory once per pass direction and every later loop over it hits the cache
(the epoch kernel also folds the bias in, forward, and db, backward)."""
from __future__ import annotations

import math

from .jit import inline, jit
from .layers import _bias_act_rows, grad_rows, zero


@jit
def layer_norm_forward(H, gamma, beta, act, A, rstd, eps, nothing, kinds):
    """``nothing``: o zeros of the dtype (the bias, which the product already holds)."""
    norm_forward(H, nothing, gamma, beta, act, A, rstd, eps, nothing, kinds)


@inline
def _sums(x, r, o):
    """sum_j x[r, j] in float64, in four running sums, j mod 4, added last as (s0 + s1) +
    (s2 + s3): one sum's chain of additions held the row passes to one addition per ~4 cycles
    (without fastmath LLVM keeps a float sum's order). A fixed order, so the same for any
    number of threads."""
    s0 = s1 = s2 = s3 = 0.0
    full = o - o % 4
    for j in range(0, full, 4):
        s0 += float(x[r, j])
        s1 += float(x[r, j + 1])
        s2 += float(x[r, j + 2])
        s3 += float(x[r, j + 3])
    for j in range(full, o):
        s0 += float(x[r, j])
    return (s0 + s1) + (s2 + s3)


@inline
def _centered_squares(H, r, o, mean):
    """sum_j (H[r, j] - mean)^2 in float64, in _sums' four running sums."""
    s0 = s1 = s2 = s3 = 0.0
    full = o - o % 4
    for j in range(0, full, 4):
        d0, d1 = H[r, j] - mean, H[r, j + 1] - mean
        d2, d3 = H[r, j + 2] - mean, H[r, j + 3] - mean
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
    for j in range(full, o):
        d = H[r, j] - mean
        s0 += d * d
    return (s0 + s1) + (s2 + s3)


@inline
def norm_forward(H, b, gamma, beta, act, A, rstd, eps, nothing, kinds):
    """Per row: H += b (rounded as the dense layer's bias pass rounds it), its mean and
    (biased) variance in float64, H = xhat, A = act(xhat * gamma + beta). ``nothing``: zeros
    at least o long, the bias of the activation's row pass (N + 0 is N)."""
    o = H.shape[1]
    for r in range(H.shape[0]):
        for j in range(o):
            H[r, j] = H[r, j] + b[j]
        mean = _sums(H, r, o) / o
        inv = 1.0 / math.sqrt(_centered_squares(H, r, o, mean) / o + eps)
        rstd[r] = inv
        for j in range(o):
            H[r, j] = (H[r, j] - mean) * inv
            A[r, j] = H[r, j] * gamma[j] + beta[j]
        _bias_act_rows(A, nothing, act, False, A, r, r + 1, kinds)


@jit
def layer_norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, N, keeps_n, kinds):
    norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, N, keeps_n, kinds, None)


@inline
def norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, N, keeps_n, kinds, db):
    """``N``: scratch (n, o) for the activation's input where its derivative needs it
    (``keeps_n``), else ``A``. ``db``: None, or the bias's gradient (the column sums of the
    result), summed in the same pass. Column sums row after row, as NumPy's add.reduce."""
    n, o = dA.shape
    zero(dbeta)
    zero(dgamma)
    if db is not None:
        zero(db)
    for r in range(n):
        if keeps_n:
            for j in range(o):
                N[r, j] = H[r, j] * gamma[j] + beta[j]
        grad_rows(dA, act, A, N, dbeta, None, r, r + 1, kinds)  # g = dA act'(.); dbeta += g
        for j in range(o):
            dgamma[j] += dA[r, j] * H[r, j]
        s1 = s2 = 0.0  # (the sums of d and d H, with d = dA gamma, as _sums adds them)
        t1 = t2 = u1 = u2 = v1 = v2 = 0.0
        full = o - o % 4
        for j in range(0, full, 4):
            d0 = float(dA[r, j]) * float(gamma[j])
            d1 = float(dA[r, j + 1]) * float(gamma[j + 1])
            d2 = float(dA[r, j + 2]) * float(gamma[j + 2])
            d3 = float(dA[r, j + 3]) * float(gamma[j + 3])
            s1 += d0
            t1 += d1
            u1 += d2
            v1 += d3
            s2 += d0 * H[r, j]
            t2 += d1 * H[r, j + 1]
            u2 += d2 * H[r, j + 2]
            v2 += d3 * H[r, j + 3]
        for j in range(full, o):
            d = float(dA[r, j]) * float(gamma[j])
            s1 += d
            s2 += d * H[r, j]
        s1, s2 = (s1 + t1) + (u1 + v1), (s2 + t2) + (u2 + v2)
        m1, m2, inv = s1 / o, s2 / o, float(rstd[r])
        for j in range(o):
            x = float(H[r, j])
            dA[r, j] = ((float(dA[r, j]) * float(gamma[j]) - m1) - x * m2) * inv
        if db is not None:
            for j in range(o):
                db[j] += dA[r, j]
