"""Dropout's kernel: ``D = A * noise`` (forward) and ``dD *= noise`` (backward, the same pass
with ``D`` = ``A`` = ``dD``), the noise drawn inside the loop from Philox (``philox.py``), four
units per call: no mask is ever stored, and the backward pass draws again what the forward
pass drew (base.Dropout; docs/dropout.md)."""
from __future__ import annotations

import numba

from .jit import inline, jit, phelper
from .layers import chunk_bounds, chunk_count
from .philox import dropout_bits, dropout_keeps


@inline
def _noise(word, threshold, scale, nothing):
    return scale if dropout_keeps(word, threshold) else nothing


@inline
def _dropout_rows(A, D, rows, k0, k1, step, layer, threshold, scale, r0, r1):
    """Rows r0..r1 of the pass. A product, not a select: a dropped inf gives NaN, as PyTorch's
    ``input * noise`` does, so that the latch sees it."""
    units = A.shape[1]
    nothing = scale - scale  # 0 in the dtype of ``scale`` (the model's)
    full = units - units % 4
    for r in range(r0, r1):
        row = rows[r]
        for block in range(full // 4):  # (a range with a step of 4 kept LLVM from vectorizing)
            j = 4 * block
            w0, w1, w2, w3 = dropout_bits(k0, k1, step, layer, row, block)
            D[r, j] = A[r, j] * _noise(w0, threshold, scale, nothing)
            D[r, j + 1] = A[r, j + 1] * _noise(w1, threshold, scale, nothing)
            D[r, j + 2] = A[r, j + 2] * _noise(w2, threshold, scale, nothing)
            D[r, j + 3] = A[r, j + 3] * _noise(w3, threshold, scale, nothing)
        if full < units:
            w = dropout_bits(k0, k1, step, layer, row, full // 4)
            for lane in range(units - full):
                D[r, full + lane] = A[r, full + lane] * _noise(w[lane], threshold, scale,
                                                               nothing)


@phelper
def _dropout_par(A, D, rows, k0, k1, step, layer, threshold, scale, chunks):
    for c in numba.prange(chunks):
        r0, r1 = chunk_bounds(c, chunks, A.shape[0])
        _dropout_rows(A, D, rows, k0, k1, step, layer, threshold, scale, r0, r1)


@inline
def dropout_pass(A, D, rows, k0, k1, step, layer, threshold, scale, par):
    """``D = A * noise`` over every row (``D`` may be ``A``); ``scale`` of the model's dtype,
    ``rows`` the batch's data-set row indices (int64)."""
    chunks = chunk_count(A.size, par)
    if par is None or chunks == 1:
        _dropout_rows(A, D, rows, k0, k1, step, layer, threshold, scale, 0, A.shape[0])
    else:
        _dropout_par(A, D, rows, k0, k1, step, layer, threshold, scale, chunks)


@jit
def dropout(A, D, rows, k0, k1, step, layer, threshold, scale, par):
    dropout_pass(A, D, rows, k0, k1, step, layer, threshold, scale, par)
