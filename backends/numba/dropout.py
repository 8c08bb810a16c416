"""Dropout's kernel: ``D = A * noise`` (forward) and ``dD *= noise`` (backward, the same pass
with ``D`` = ``A`` = ``dD``), the noise drawn row by row from Philox (``philox.py``), four
units per call: no mask outlives its row, and the backward pass draws again what the forward
pass drew (base.Dropout; docs/dropout.md)."""
from __future__ import annotations

import numba
import numpy as np

from .jit import inline, jit, phelper, span
from .layers import chunk_bounds, chunk_count
from .philox import dropout_keeps, dropout_words


def words_scratch(size, units, par):
    """Scratch for ``dropout_pass``'s ``words``, for passes of up to ``size`` elements and
    ``units`` wide: a row's words for each parallel chunk (``par``), rounded up to Philox's four
    words a call. Flat: the epoch kernel's layers of every width share it."""
    chunks = getattr(chunk_count, "py_func", chunk_count)(size, par)  # (its Python source)
    return np.empty(chunks * 4 * ((units + 3) // 4), np.uint32)


@inline
def _noise(word, threshold, scale, nothing):
    return scale if dropout_keeps(word, threshold) else nothing


@inline
def _dropout_rows(A, D, rows, k0, k1, step, layer, threshold, scale, r0, r1, words):
    """Rows r0..r1 of the pass, each row's words drawn into ``words`` (a row of the scratch)
    first, then applied: two loops that each vectorize. Drawn and applied in one loop, Philox's
    products stayed scalar (4.8 ns a unit against 0.7, float32, Xeon with AVX-512). A product,
    not a select: a dropped inf gives NaN, as PyTorch's ``input * noise`` does, so that the
    latch sees it."""
    units = A.shape[1]
    nothing = scale - scale  # 0 in the dtype of ``scale`` (the model's)
    for r in range(r0, r1):
        dropout_words(words, (units + 3) // 4, k0, k1, step, layer, rows[r])
        for j in range(units):
            D[r, j] = A[r, j] * _noise(words[j], threshold, scale, nothing)


@phelper
def _dropout_par(A, D, rows, k0, k1, step, layer, threshold, scale, chunks, words):
    width = 4 * ((A.shape[1] + 3) // 4)
    for c in numba.prange(chunks):
        r0, r1 = chunk_bounds(c, chunks, A.shape[0])
        _dropout_rows(A, D, rows, k0, k1, step, layer, threshold, scale, r0, r1,
                      span(words, c * width, width))


@inline
def dropout_pass(A, D, rows, k0, k1, step, layer, threshold, scale, par, words):
    """``D = A * noise`` over every row (``D`` may be ``A``); ``scale`` of the model's dtype,
    ``rows`` the batch's data-set row indices (int64); ``words``: ``words_scratch`` for as
    ``A``'s size and width or more."""
    chunks = chunk_count(A.size, par)
    if par is None or chunks == 1:
        _dropout_rows(A, D, rows, k0, k1, step, layer, threshold, scale, 0, A.shape[0], words)
    else:
        _dropout_par(A, D, rows, k0, k1, step, layer, threshold, scale, chunks, words)


@jit
def dropout(A, D, rows, k0, k1, step, layer, threshold, scale, par, words):
    dropout_pass(A, D, rows, k0, k1, step, layer, threshold, scale, par, words)
