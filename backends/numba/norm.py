"""LayerNorm's kernels (base.Backend.layer_norm_forward / layer_norm_backward): a row's
statistics in float64, the activation and its derivative by the dense layer's own row passes
(``layers.py``), so that a normalized layer activates exactly as a plain one. Row by row: each
row is read from memory once per pass direction and every later loop over it hits the cache
(the epoch kernel also folds the bias in, forward, and db, backward)."""
from __future__ import annotations

import math

from .jit import inline, jit, summing
from .layers import _bias_act_rows, grad_rows, zero


@jit
def layer_norm_forward(H, gamma, beta, act, A, rstd, eps, nothing, kinds):
    """``nothing``: o zeros of the dtype (the bias, which the product already holds)."""
    norm_forward(H, nothing, gamma, beta, act, A, rstd, eps, nothing, kinds)


@summing
def _row_sum(x, r, o):
    """sum_j x[r, j] in float64, in vector lanes (jit.summing)."""
    s = 0.0
    for j in range(o):
        s += float(x[r, j])
    return s


@summing
def _centered_squares(H, r, o, mean):
    """sum_j (H[r, j] - mean)^2 in float64, in vector lanes."""
    s = 0.0
    for j in range(o):
        d = H[r, j] - mean
        s += d * d
    return s


@summing
def _gradient_moments(dA, gamma, H, r):
    """(sum_j d_j, sum_j d_j H[r, j]) with d = dA[r] * gamma, in float64, in vector lanes."""
    s1 = s2 = 0.0
    for j in range(dA.shape[1]):
        d = float(dA[r, j]) * float(gamma[j])
        s1 += d
        s2 += d * H[r, j]
    return s1, s2


@inline
def norm_rows(H, b, gamma, beta, A, rstd, eps, r0, r1):
    """Rows r0..r1: H += b (rounded as the dense layer's bias pass rounds it), its mean and
    (biased) variance in float64, H = xhat, A = xhat * gamma + beta. Each loop writes one
    array: with two, LLVM's overlap tests cost the loop ~40%. Each row on its own: any split
    of the rows (the BLAS pool's workers share them: _native/passes.py) computes the same."""
    o = H.shape[1]
    for r in range(r0, r1):
        for j in range(o):
            H[r, j] = H[r, j] + b[j]
        mean = _row_sum(H, r, o) / o
        inv = 1.0 / math.sqrt(_centered_squares(H, r, o, mean) / o + eps)
        rstd[r] = inv
        for j in range(o):
            H[r, j] = (H[r, j] - mean) * inv
        for j in range(o):
            A[r, j] = H[r, j] * gamma[j] + beta[j]


@inline
def norm_forward(H, b, gamma, beta, act, A, rstd, eps, nothing, kinds):
    """``norm_rows`` of every row, then A = act(A) over the block (called row by row, the
    activation's pass cost more than the row's work). ``nothing``: zeros at least o long, the
    bias of the activation's pass (N + 0 is N)."""
    norm_rows(H, b, gamma, beta, A, rstd, eps, 0, H.shape[0])
    _bias_act_rows(A, nothing, act, False, A, 0, H.shape[0], kinds)


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
    if keeps_n:
        for r in range(n):
            for j in range(o):
                N[r, j] = H[r, j] * gamma[j] + beta[j]
    grad_rows(dA, act, A, N, dbeta, None, 0, n, kinds)  # g = dA act'(.); dbeta += g
    for r in range(n):
        for j in range(o):
            dgamma[j] += dA[r, j] * H[r, j]
        s1, s2 = _gradient_moments(dA, gamma, H, r)
        m1, m2, inv = s1 / o, s2 / o, float(rstd[r])
        for j in range(o):
            x = float(H[r, j])
            dA[r, j] = ((float(dA[r, j]) * float(gamma[j]) - m1) - x * m2) * inv
        if db is not None:
            for j in range(o):
                db[j] += dA[r, j]
