"""The losses (value and gradient of the mean loss in one pass) and the hit counts.

Each writes dY = d(mean loss)/dY and out[0] = the mean loss. Row and element losses are formed
before they are summed (in float64): a difference of two large sums would cancel.
"""
from __future__ import annotations

import math

from ..base import LOSS_CODES
from .jit import helper, inline, jit
from .layers import logistic

MSE, CROSS_ENTROPY, BINARY_CROSS_ENTROPY = (LOSS_CODES[name] for name in (
    "mse", "cross_entropy", "binary_cross_entropy"))

# ------------------------------------------------------------------------- losses
# Each writes dY = d(mean loss)/dY and out[0] = the mean loss. Row and element losses are formed
# before they are summed (in float64): a difference of two large sums would cancel.

@inline
def _row_max(Y, r):
    m = Y[r, 0]
    for j in range(1, Y.shape[1]):
        if Y[r, j] > m:
            m = Y[r, j]
    return m


@inline
def _exp_shifted(Y, r, m, dY):
    """dY[r] = exp(Y[r] - m) (max-subtraction keeps exp finite); returns their float64 sum."""
    s = 0.0
    for j in range(Y.shape[1]):
        e = math.exp(float(Y[r, j]) - m)
        dY[r, j] = e
        s += e
    return s


@helper
def softmax_xent_labels_of(Y, labels, dY, out):
    n, o = Y.shape
    scale = 1.0 / n
    total = 0.0
    for r in range(n):
        m = float(_row_max(Y, r))
        s = _exp_shifted(Y, r, m, dY)
        k = labels[r]
        total += (m - Y[r, k]) + math.log(s)  # -log softmax of the true class
        for j in range(o):
            dY[r, j] = (dY[r, j] / s - (1.0 if j == k else 0.0)) * scale
    out[0] = total / n


@jit
def softmax_xent_labels(Y, labels, dY, out):
    softmax_xent_labels_of(Y, labels, dY, out)


@helper
def softmax_xent_rows_of(Y, T, dY, out):
    n, o = Y.shape
    scale = 1.0 / n
    total = 0.0
    for r in range(n):
        m = float(_row_max(Y, r))
        s = _exp_shifted(Y, r, m, dY)
        log_norm = math.log(s)
        t_sum = 0.0
        for j in range(o):
            t = float(T[r, j])
            t_sum += t
            total -= t * ((Y[r, j] - m) - log_norm)
        for j in range(o):
            dY[r, j] = (dY[r, j] / s * t_sum - T[r, j]) * scale
    out[0] = total / n


@jit
def softmax_xent_rows(Y, T, dY, out):
    softmax_xent_rows_of(Y, T, dY, out)


@helper
def binary_xent_of(Y, T, dY, out):
    # max(y, 0) - y t + log(1 + exp(-|y|)) is finite for any logit
    n, o = Y.shape
    scale = 1.0 / (n * o)
    total = 0.0
    for r in range(n):
        for j in range(o):
            y, t = float(Y[r, j]), float(T[r, j])
            total += (math.log1p(math.exp(-abs(y))) + max(y, 0.0)) - y * t
            dY[r, j] = (logistic(y) - t) * scale
    out[0] = total / (n * o)


@jit
def binary_xent(Y, T, dY, out):
    binary_xent_of(Y, T, dY, out)


@helper
def mse_of(Y, T, dY, out):
    n, o = Y.shape
    scale = 2.0 / (n * o)
    total = 0.0
    for r in range(n):
        for j in range(o):
            d = float(Y[r, j]) - float(T[r, j])
            total += d * d
            dY[r, j] = d * scale
    out[0] = total / (n * o)


@jit
def mse(Y, T, dY, out):
    mse_of(Y, T, dY, out)


@inline
def _argmax(Y, r):
    """The first maximum of row r."""
    best, k = Y[r, 0], 0
    for j in range(1, Y.shape[1]):
        if Y[r, j] > best:
            best, k = Y[r, j], j
    return k


@helper
def count_correct_labels_of(Y, labels, out):
    """Targets (n,): class ids, or 0/1 for a single output."""
    hits = 0
    for r in range(Y.shape[0]):
        if Y.shape[1] == 1:
            hits += (Y[r, 0] > 0) == (labels[r] >= 0.5)
        else:
            hits += _argmax(Y, r) == labels[r]
    out[0] = hits


@jit
def count_correct_labels(Y, labels, out):
    count_correct_labels_of(Y, labels, out)


@helper
def count_correct_rows_of(Y, T, out):
    """Targets (n, o): probability rows (compared by argmax), or 0/1 for a single output."""
    hits = 0
    for r in range(Y.shape[0]):
        if Y.shape[1] == 1:
            hits += (Y[r, 0] > 0) == (T[r, 0] >= 0.5)
        else:
            hits += _argmax(Y, r) == _argmax(T, r)
    out[0] = hits


@jit
def count_correct_rows(Y, T, out):
    count_correct_rows_of(Y, T, out)
