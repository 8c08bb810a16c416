"""Native mode's self-test: each trick once, on a tiny case, against the plain result.

Run at the first import of the Numba backend (``load``); cached like the kernels, so a later
process loads it rather than compiling it (and so tests the cache's reload path as well).
A mismatch or any error means plain mode for this process.
"""
from __future__ import annotations

import numpy as np

from .gather import gather_shared
from .toolkit import as_matrix, bits, epoch, gemm_t, helper, span


@helper
def _row_sums(M, out, first):
    """A helper called by symbol: out[r] = the sum of row r of M from row ``first`` on;
    returns how many rows it summed."""
    for r in range(first, M.shape[0]):
        total = 0.0
        for j in range(M.shape[1]):
            total += M[r, j]
        out[r - first] = total
    return M.shape[0] - first


@epoch
def _tricks(flat, product, product_t, sums, signs, X, order, batch, largest):
    """Views of ``flat`` by intrinsics, GEMMs by NumPy's BLAS (plain and transposed), a call
    by symbol, the floats' bits, and a large model's gather (a helper called by its address,
    on memory reached by address), in a kernel without reference counting."""
    largest[0] = gather_shared(0, X, order, 1, batch.shape[0], batch, largest)
    A = as_matrix(flat, 2, 3, 4)
    B = as_matrix(flat, 14, 4, 2)
    gemm_t(A, False, B, False, product, 1.0, 0.0)
    gemm_t(A, True, A, False, product_t, 2.0, 0.0)
    counted = _row_sums(A, span(sums, 0, 2), 1)
    floats = bits(span(flat, 0, 6))
    for i in range(floats.size):
        signs[i] = floats[i] < 0
    return counted


def run() -> None:
    flat = np.linspace(-1.5, 2.0, 22)
    product, product_t = np.empty((3, 2)), np.empty((4, 4))
    sums, signs = np.full(3, 7.0), np.zeros(6, np.bool_)
    # (float32, the default dtype: a float32 model then compiles no gather of its own, and
    # nothing compiles the float64 one before a float64 model needs it)
    X = np.arange(-12.0, 12.0, dtype=np.float32).reshape(6, 4)
    order = np.array([5, 0, 3, 1, 2], np.int64)
    batch, largest = np.zeros((3, 4), np.float32), np.zeros(1, np.float32)
    counted = _tricks(flat, product, product_t, sums, signs, X, order, batch, largest)
    A, B = flat[2:14].reshape(3, 4), flat[14:22].reshape(4, 2)
    checks = {"a GEMM": np.allclose(product, A @ B, rtol=1e-12, atol=1e-12),
              "a transposed GEMM": np.allclose(product_t, 2 * A.T @ A, rtol=1e-12, atol=1e-12),
              "a helper called by symbol": counted == 2 and np.allclose(sums[:2], A[1:].sum(1))
              and sums[2] == 7.0,
              "the floats' bits": np.array_equal(signs, flat[:6] < 0),
              "a gather by address": np.array_equal(batch, X[order[1:4]])
              and largest[0] == np.abs(X[order[1:4]]).max()}
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise RuntimeError("wrong results from " + ", ".join(failed))
