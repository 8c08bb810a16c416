"""GEMM for the Numba kernels, by the BLAS that NumPy itself calls.

Numba's own ``np.dot`` goes to SciPy's copy of OpenBLAS, a second library beside NumPy's, with
its own version and thread pool. On M's shapes it ran the same products ~10-20% slower than
NumPy's (the GEMM floor of ``bpk bench`` is timed with NumPy's), and two pools of spinning BLAS
threads share the cores. So the kernels call ``gemm`` below, which calls NumPy's OpenBLAS
directly through its CBLAS entry points.

The kernels reach it through two symbols of our own, ``bpkernels_cblas_sgemm`` and
``bpkernels_cblas_dgemm`` (CBLAS's signature with 64-bit integers), registered with LLVM at
import: compiled code that Numba caches on disk names these symbols, never an address, so a
later process links it against whatever they point to there. Where NumPy's BLAS has no 64-bit
CBLAS (a NumPy built against MKL or an LP64 OpenBLAS), they point to a small compiled fallback
that calls ``np.dot`` (SciPy's BLAS), with the same results.
"""
from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import types
from numba.extending import overload

from ...host import numpy_blas_libraries

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# The 64-bit-integer CBLAS entry points of the OpenBLAS builds NumPy's wheels ship
# (NumPy >= 2: scipy-openblas64, NumPy 1.x: openblas64_).
_NUMPY_SYMBOLS = ("scipy_cblas_{}gemm64_", "cblas_{}gemm64_")
_SYMBOL = "bpkernels_cblas_{}gemm"


def _signature(real):
    """cblas_?gemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), the
    pointers as pointer-sized integers (what ``array.ctypes.data`` is inside Numba)."""
    i32, i64, ptr = types.int32, types.int64, types.uintp
    return types.void(i32, i32, i32, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64)


def _numpy_gemm_addresses() -> dict[str, int] | None:
    """{'s': address, 'd': address} of NumPy's 64-bit CBLAS sgemm and dgemm, or None."""
    for path in numpy_blas_libraries():
        try:
            library = ctypes.CDLL(path)  # already loaded by NumPy: the same handle
        except OSError:
            continue
        for pattern in _NUMPY_SYMBOLS:
            try:
                return {t: ctypes.cast(getattr(library, pattern.format(t)), ctypes.c_void_p).value
                        for t in "sd"}
            except AttributeError:
                continue
    return None


def _fallback_gemm(real):
    """A compiled function with the CBLAS signature that computes the product by ``np.dot``,
    for the calls ``gemm`` makes: row-major storage, contiguous rows (ld = columns). The
    pointers are typed here, which changes nothing in the C calling convention."""
    import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot calls BLAS through SciPy)
    pointer, i32, i64 = types.CPointer(real), types.int32, types.int64
    signature = types.void(i32, i32, i32, i64, i64, i64, real, pointer, i64, pointer, i64, real,
                           pointer, i64)

    @numba.cfunc(signature, nogil=True)
    def fallback(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        A = numba.carray(a, (k, m) if trans_a == _TRANS else (m, k))
        B = numba.carray(b, (n, k) if trans_b == _TRANS else (k, n))
        C = numba.carray(c, (m, n))
        if trans_a == _TRANS:
            if trans_b == _TRANS:
                np.dot(A.T, B.T, C)
            else:
                np.dot(A.T, B, C)
        elif trans_b == _TRANS:
            np.dot(A, B.T, C)
        else:
            np.dot(A, B, C)
    return fallback.address


def _register() -> str:
    """Point our symbols at NumPy's BLAS, or else at the fallback; returns which."""
    addresses = _numpy_gemm_addresses()
    source = "numpy"
    if addresses is None:
        addresses = {"s": _fallback_gemm(types.float32), "d": _fallback_gemm(types.float64)}
        source = "numba-fallback"
    for t, address in addresses.items():
        llvm.add_symbol(_SYMBOL.format(t), address)
    return source


BLAS_SOURCE = _register()
_sgemm = types.ExternalFunction(_SYMBOL.format("s"), _signature(types.float32))
_dgemm = types.ExternalFunction(_SYMBOL.format("d"), _signature(types.float64))


# Helpers of the GEMM overloads, inlined into them by Numba: compiled on their own, each would be
# optimized by LLVM again in every kernel above it (compile time, see ../layers.py on inlining).
_inline = numba.njit(inline="always", cache=True, nogil=True)


@_inline
def _storage(M):
    """(transposed, leading dimension) of a matrix whose rows or columns are contiguous: a
    C-ordered array, or the transpose (a view) of one."""
    unit = M.itemsize
    if M.strides[1] == unit and M.strides[0] >= max(M.shape[1], 1) * unit:
        return False, M.strides[0] // unit
    if M.strides[0] == unit and M.strides[1] >= max(M.shape[0], 1) * unit:
        return True, M.strides[1] // unit
    raise ValueError("gemm needs operands with contiguous rows or columns")


def gemm(A, B, C):
    """C = A @ B into C, as ``np.dot(A, B, C)``: A and B C-ordered or transposes (views) of
    C-ordered arrays, C C-ordered, one dtype (float32 or float64). This Python version runs
    under NUMBA_DISABLE_JIT; compiled code gets the overload below."""
    np.dot(A, B, C)


def gemm_t(A, trans_a, B, trans_b, C, alpha, beta):
    """C = alpha op(A) @ op(B) + beta C into C, op transposing where ``trans_a`` / ``trans_b``:
    A, B and C C-ordered (rows may be padded), one dtype. With beta = 0, C is only written
    (NaN there does not leak in). The kernels call this rather than ``gemm`` with transposed
    views: a view's layout is part of its Numba type, so each transposed call would compile
    another copy of the GEMM, while runtime flags share one. So do alpha and beta, which the
    kernels always pass: one compiled GEMM per dtype."""
    product = np.dot(A.T if trans_a else A, B.T if trans_b else B)
    C[...] = product * alpha if beta == 0 else product * alpha + C * beta


_GEMM_JIT = dict(cache=True, nogil=True, no_cpython_wrapper=True)


@_inline
def _call(routine, trans_a, lda, trans_b, ldb, A, B, C, k, alpha, beta):
    m, n = C.shape
    if m == 0 or n == 0:
        return
    trans_c, ldc = _storage(C)
    if trans_c:
        raise ValueError("gemm needs a C-ordered output")
    cast = C.dtype.type
    routine(np.int32(_ROW_MAJOR), np.int32(_TRANS if trans_a else _NO_TRANS),
            np.int32(_TRANS if trans_b else _NO_TRANS), m, n, k, cast(alpha), A.ctypes.data,
            lda, B.ctypes.data, ldb, cast(beta), C.ctypes.data, ldc)


@overload(gemm, jit_options=_GEMM_JIT)
def _gemm_compiled(A, B, C):
    routine = _sgemm if C.dtype == types.float32 else _dgemm

    def gemm_impl(A, B, C):
        m, n = C.shape
        k = A.shape[1]
        if A.shape[0] != m or B.shape[0] != k or B.shape[1] != n:
            raise ValueError("gemm: shapes do not match")
        trans_a, lda = _storage(A)
        trans_b, ldb = _storage(B)
        _call(routine, trans_a, lda, trans_b, ldb, A, B, C, k, 1.0, 0.0)
    return gemm_impl


@_inline
def _inner_size(A, trans_a, B, trans_b, C):
    """k of C (m, n) = op(A) (m, k) @ op(B) (k, n), after checking that the shapes agree."""
    m, n = C.shape
    k = A.shape[0] if trans_a else A.shape[1]
    if (A.shape[1] if trans_a else A.shape[0]) != m or \
            (B.shape[1] if trans_b else B.shape[0]) != k or \
            (B.shape[0] if trans_b else B.shape[1]) != n:
        raise ValueError("gemm: shapes do not match")
    return k


@overload(gemm_t, jit_options=_GEMM_JIT)
def _gemm_t_compiled(A, trans_a, B, trans_b, C, alpha, beta):
    routine = _sgemm if C.dtype == types.float32 else _dgemm
    # Operands whose Numba type is C-ordered (the epoch kernel's, all of them) need none of
    # _storage's tests: a third of the code, and ~0.25 s less of the epoch kernel's first compile.
    if A.layout == B.layout == C.layout == "C":
        def gemm_t_contiguous(A, trans_a, B, trans_b, C, alpha, beta):
            k = _inner_size(A, trans_a, B, trans_b, C)
            m, n = C.shape
            if m == 0 or n == 0:
                return
            cast = C.dtype.type
            routine(np.int32(_ROW_MAJOR), np.int32(_TRANS if trans_a else _NO_TRANS),
                    np.int32(_TRANS if trans_b else _NO_TRANS), m, n, k, cast(alpha),
                    A.ctypes.data, max(A.shape[1], 1), B.ctypes.data, max(B.shape[1], 1),
                    cast(beta), C.ctypes.data, max(n, 1))
        return gemm_t_contiguous

    def gemm_t_impl(A, trans_a, B, trans_b, C, alpha, beta):
        k = _inner_size(A, trans_a, B, trans_b, C)
        a_transposed, lda = _storage(A)
        b_transposed, ldb = _storage(B)
        if a_transposed or b_transposed:
            raise ValueError("gemm_t needs C-ordered operands")
        _call(routine, trans_a, lda, trans_b, ldb, A, B, C, k, alpha, beta)
    return gemm_t_impl
