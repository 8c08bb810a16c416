"""LayerNorm's kernels (base.Backend.layer_norm_forward / layer_norm_backward): a row's
statistics in float64, the activation and its derivative by the dense layer's own row passes
(``layers.py``), so that a normalized layer activates exactly as a plain one."""
from __future__ import annotations

import math

from .jit import inline, jit
from .layers import _bias_act_rows, grad_rows, zero


@inline
def _normalize_row(H, rstd, eps, r):
    """H[r] = (H[r] - mean) / sqrt(var + eps), mean and (biased) var in float64, two passes."""
    o = H.shape[1]
    total = 0.0
    for j in range(o):
        total += H[r, j]
    mean = total / o
    squares = 0.0
    for j in range(o):
        d = H[r, j] - mean
        squares += d * d
    inv = 1.0 / math.sqrt(squares / o + eps)
    rstd[r] = inv
    for j in range(o):
        H[r, j] = (H[r, j] - mean) * inv


@jit
def layer_norm_forward(H, gamma, beta, act, A, rstd, eps, nothing, kinds):
    norm_forward(H, gamma, beta, act, A, rstd, eps, nothing, kinds)


@inline
def norm_forward(H, gamma, beta, act, A, rstd, eps, nothing, kinds):
    """``nothing``: o zeros of the dtype, the bias of the activation's row pass (N + 0 is N)."""
    for r in range(H.shape[0]):
        _normalize_row(H, rstd, eps, r)
        for j in range(H.shape[1]):
            A[r, j] = H[r, j] * gamma[j] + beta[j]
        _bias_act_rows(A, nothing, act, False, A, r, r + 1, kinds)


@inline
def _affine(H, gamma, beta, N):
    for r in range(H.shape[0]):
        for j in range(H.shape[1]):
            N[r, j] = H[r, j] * gamma[j] + beta[j]


@jit
def layer_norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, N, keeps_n, kinds):
    norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, N, keeps_n, kinds)


@inline
def norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, N, keeps_n, kinds):
    """``N``: scratch (n, o) for the activation's input where its derivative needs it
    (``keeps_n``), else ``A``."""
    n, o = dA.shape
    if keeps_n:
        _affine(H, gamma, beta, N)
    zero(dbeta)
    grad_rows(dA, act, A, N, dbeta, None, 0, n, kinds)  # g = dA act'(.), dbeta = sum_r g
    zero(dgamma)
    for r in range(n):
        for j in range(o):
            dgamma[j] += dA[r, j] * H[r, j]
    for r in range(n):
        s1 = 0.0
        s2 = 0.0
        for j in range(o):
            d = float(dA[r, j]) * float(gamma[j])
            s1 += d
            s2 += d * H[r, j]
        m1, m2, inv = s1 / o, s2 / o, float(rstd[r])
        for j in range(o):
            x = float(H[r, j])
            dA[r, j] = ((float(dA[r, j]) * float(gamma[j]) - m1) - x * m2) * inv
