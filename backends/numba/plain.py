"""Plain mode's names for the kernels: public Numba only (``@njit``, ``np.dot``, slices).

The same names as ``_native/toolkit.py``, for where the native layer is off (an untested
Numba, llvmlite or OpenBLAS, a failed self-test, ``BPK_NUMBA_NATIVE=0``, NUMBA_DISABLE_JIT):
the kernels compile and compute the same, slower. Helpers are linked into their callers as
Numba does by default, views are slices, GEMMs are ``np.dot`` (Numba's, by SciPy's BLAS).

Compiled code is cached on disk as in native mode, under names of its own: the kernels are the
same Python functions in both modes, and Numba names a function's cache files after its module
and qualified name and keys them by signature, not by what the names it calls meant when it
was compiled. Plain mode's decorators add ``_plain`` to the qualified name, so that neither mode
ever loads what the other compiled.
"""
from __future__ import annotations

import numba
import numpy as np

BLAS_SOURCE = "numba-np.dot"
FLAGS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False, fastmath=False)


def _plain(**options):
    compile = numba.njit(**dict(FLAGS, **options))

    def decorate(function):
        function.__qualname__ += "_plain"  # cache files of its own (see above)
        return compile(function)
    return decorate


jit = helper = linked = epoch = _plain()
phelper = _plain(parallel=True)
inline = _plain(inline="always")
summing = _plain(fastmath={"reassoc"})  # (_native/toolkit.py says why)


@inline
def as_matrix(flat, start, rows, cols):
    return flat[start:start + rows * cols].reshape((rows, cols))


@inline
def span(array, start, length):
    return array[start:start + length]


@jit
def gemm_t(A, trans_a, B, trans_b, C, alpha, beta):
    """C = op(A) @ op(B), op transposing where asked: _native/blas.py's, for the calls plain
    mode makes (alpha 1, beta 0, at most one operand transposed: native mode's fused SGD
    update is the only other caller). Each np.dot form compiles its own shape checks and their
    messages (~1.5 s each): three forms, not eight."""
    if alpha != 1.0 or beta != 0.0 or (trans_a and trans_b):
        raise ValueError("plain gemm_t: C = op(A) @ op(B) with one operand transposed at most")
    if trans_a:
        np.dot(A.T, B, C)
    elif trans_b:
        np.dot(A, B.T, C)
    else:
        np.dot(A, B, C)


__all__ = ["BLAS_SOURCE", "as_matrix", "epoch", "gemm_t", "helper", "inline", "jit",
           "linked", "phelper", "span", "summing"]
