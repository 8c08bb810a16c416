"""The losses (value and gradient of the mean loss in one pass) and the hit counts, each
unweighted or weighted by row (base.Backend.loss).

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
# ``W``: the batch's row weights, or None (the unweighted mean; Numba prunes the weighted code
# by the None, and the unweighted numbers stay bit for bit those of the mean over n).


@inline
def _weight(W, r):
    """Row r's weight: 1.0 without weights (then w * x is x exactly)."""
    if W is None:
        return 1.0
    return float(W[r])


@inline
def _rows_weight(W, n):
    """What the mean divides the rows' summed losses by: n, or the sum of the rows' weights."""
    if W is None:
        return float(n)
    total = 0.0
    for r in range(n):
        total += W[r]
    return total


@inline
def _mean(total, count):
    """total / count, and 0 for a batch of zero total weight (which contributes nothing)."""
    return total / count if count > 0 else 0.0


@inline
def _inverse(count):
    return 1.0 / count if count > 0 else 0.0


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
def softmax_xent_labels_of(Y, labels, W, dY, out):
    n, o = Y.shape
    count = _rows_weight(W, n)
    scale = _inverse(count)
    total = 0.0
    for r in range(n):
        m = float(_row_max(Y, r))
        s = _exp_shifted(Y, r, m, dY)
        k = labels[r]
        w = _weight(W, r)
        total += w * ((m - Y[r, k]) + math.log(s))  # -log softmax of the true class
        for j in range(o):
            dY[r, j] = (dY[r, j] / s - (1.0 if j == k else 0.0)) * (w * scale)
    out[0] = _mean(total, count)


@jit
def softmax_xent_labels(Y, labels, W, dY, out):
    softmax_xent_labels_of(Y, labels, W, dY, out)


@helper
def softmax_xent_rows_of(Y, T, W, dY, out):
    n, o = Y.shape
    count = _rows_weight(W, n)
    scale = _inverse(count)
    total = 0.0
    for r in range(n):
        m = float(_row_max(Y, r))
        s = _exp_shifted(Y, r, m, dY)
        log_norm = math.log(s)
        t_sum = 0.0
        row = 0.0
        for j in range(o):
            t = float(T[r, j])
            t_sum += t
            row -= t * ((Y[r, j] - m) - log_norm)
        w = _weight(W, r)
        total += w * row
        for j in range(o):
            dY[r, j] = (dY[r, j] / s * t_sum - T[r, j]) * (w * scale)
    out[0] = _mean(total, count)


@jit
def softmax_xent_rows(Y, T, W, dY, out):
    softmax_xent_rows_of(Y, T, W, dY, out)


@helper
def binary_xent_of(Y, T, W, dY, out):
    # max(y, 0) - y t + log(1 + exp(-|y|)) is finite for any logit; a row's weight applies to
    # each of its elements
    n, o = Y.shape
    count = _rows_weight(W, n) * o
    scale = _inverse(count)
    total = 0.0
    for r in range(n):
        w = _weight(W, r)
        for j in range(o):
            y, t = float(Y[r, j]), float(T[r, j])
            total += w * ((math.log1p(math.exp(-abs(y))) + max(y, 0.0)) - y * t)
            dY[r, j] = (logistic(y) - t) * (w * scale)
    out[0] = _mean(total, count)


@jit
def binary_xent(Y, T, W, dY, out):
    binary_xent_of(Y, T, W, dY, out)


@helper
def mse_of(Y, T, W, dY, out):
    n, o = Y.shape
    count = _rows_weight(W, n) * o
    scale = 2.0 * _inverse(count)
    total = 0.0
    for r in range(n):
        w = _weight(W, r)
        for j in range(o):
            d = float(Y[r, j]) - float(T[r, j])
            total += w * (d * d)
            dY[r, j] = d * (w * scale)
    out[0] = _mean(total, count)


@jit
def mse(Y, T, W, dY, out):
    mse_of(Y, T, W, dY, out)


@inline
def _argmax(Y, r):
    """The first maximum of row r."""
    best, k = Y[r, 0], 0
    for j in range(1, Y.shape[1]):
        if Y[r, j] > best:
            best, k = Y[r, j], j
    return k


@helper
def count_correct_labels_of(Y, labels, W, out):
    """Targets (n,): class ids, or 0/1 for a single output. With weights: their sum over the
    rows classified right."""
    hits = 0.0
    for r in range(Y.shape[0]):
        if Y.shape[1] == 1:
            right = (Y[r, 0] > 0) == (labels[r] >= 0.5)
        else:
            right = _argmax(Y, r) == labels[r]
        if right:
            hits += _weight(W, r)
    out[0] = hits


@jit
def count_correct_labels(Y, labels, W, out):
    count_correct_labels_of(Y, labels, W, out)


@helper
def count_correct_rows_of(Y, T, W, out):
    """Targets (n, o): probability rows (compared by argmax), or 0/1 for a single output."""
    hits = 0.0
    for r in range(Y.shape[0]):
        if Y.shape[1] == 1:
            right = (Y[r, 0] > 0) == (T[r, 0] >= 0.5)
        else:
            right = _argmax(Y, r) == _argmax(T, r)
        if right:
            hits += _weight(W, r)
    out[0] = hits


@jit
def count_correct_rows(Y, T, W, out):
    count_correct_rows_of(Y, T, W, out)


# ------------------------------------------------------------------------- metric statistics
# Backend.accumulate_stats: added to ``out`` row by row (the epoch's sums, read once per epoch).

@inline
def _class_stats_row(Y, r, t, w, ks, out):
    """Row r of true class t: its cell of the confusion table, the class counts, and whether t
    ranks among the ks[i] largest outputs (ties: a larger index first, as scikit-learn)."""
    o = Y.shape[1]
    C = max(o, 2)
    p = (1 if Y[r, 0] > 0 else 0) if o == 1 else _argmax(Y, r)
    out[t * C + p] += w
    out[C * C + t] += 1.0
    out[C * C + C + p] += 1.0
    if ks.size > 0:
        score, rank = Y[r, t], 0
        for j in range(o):
            if Y[r, j] > score or (Y[r, j] == score and j > t):
                rank += 1
        for i in range(ks.size):
            if rank < ks[i]:
                out[C * C + 2 * C + i] += w


@helper
def class_stats_labels_of(Y, labels, W, ks, out):
    for r in range(Y.shape[0]):
        t = (1 if labels[r] >= 0.5 else 0) if Y.shape[1] == 1 else labels[r]
        _class_stats_row(Y, r, t, _weight(W, r), ks, out)


@jit
def class_stats_labels(Y, labels, W, ks, out):
    class_stats_labels_of(Y, labels, W, ks, out)


@helper
def class_stats_rows_of(Y, T, W, ks, out):
    for r in range(Y.shape[0]):
        t = (1 if T[r, 0] >= 0.5 else 0) if Y.shape[1] == 1 else _argmax(T, r)
        _class_stats_row(Y, r, t, _weight(W, r), ks, out)


@jit
def class_stats_rows(Y, T, W, ks, out):
    class_stats_rows_of(Y, T, W, ks, out)


@helper
def regression_stats_of(Y, T, W, out):
    n, o = Y.shape
    for r in range(n):
        w = _weight(W, r)
        out[0] += w
        for j in range(o):
            t = float(T[r, j])
            e = float(Y[r, j]) - t
            out[1 + j] += w * abs(e)
            out[1 + o + j] += w * (e * e)
            out[1 + 2 * o + j] += w * t
            out[1 + 3 * o + j] += w * (t * t)


@jit
def regression_stats(Y, T, W, out):
    regression_stats_of(Y, T, W, out)
