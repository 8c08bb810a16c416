"""The stand-in's ``cupy.cuda.cublas`` and ``cupy.cuda.device.get_cublas_handle`` (shim.py
builds those modules from these functions), as far as the CuPy backend's bf16 products
(backends/cupy_mixed.py) call them. Device memory, streams and the queue are shim.py's.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import shim
from .shim import SimError, ndarray

# ``cupy.cuda.cublas`` and ``cupy.cuda.device.get_cublas_handle``, as far as the backend's
# bf16 products (backends/cupy_mixed.py) call them: cublasGemmEx with bfloat16 A and B (uint16
# memory), float32 C and CUBLAS_COMPUTE_32F, column-major with cuBLAS's own argument rules. The
# call is queued on the stream set on the handle (setStream), where cuBLAS queues it: a handle
# left on another stream fails a capture here. alpha and beta are read from host memory when
# the call is made, as cuBLAS does in host pointer mode. The product is float32 arithmetic on
# the bfloat16 values (exact products; the accumulation order is NumPy's, not a GPU's).
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1
_GEMM_ALGOS = (-1, 99)  # CUBLAS_GEMM_DEFAULT and its tensor-op alias


class CUBLASError(RuntimeError):
    pass


class _CublasHandle:
    def __init__(self) -> None:
        self.stream, self.pointer_mode = 0, CUBLAS_POINTER_MODE_HOST


_cublas_handles: dict[int, _CublasHandle] = {}


def get_cublas_handle() -> int:
    """The current device's handle, made on first use (an int, as CuPy's)."""
    handle = 0x1000 + shim._current_device[0]
    _cublas_handles.setdefault(handle, _CublasHandle())
    return handle


def _cublas_handle(handle) -> _CublasHandle:
    if not shim._is_int(handle) or handle not in _cublas_handles:
        raise CUBLASError("CUBLAS_STATUS_NOT_INITIALIZED: not a handle of get_cublas_handle()")
    return _cublas_handles[handle]


def set_stream(handle: int, stream: int) -> None:
    shim._stream_at(stream)  # a live stream's pointer
    _cublas_handle(handle).stream = stream


def get_stream(handle: int) -> int:
    return _cublas_handle(handle).stream


def set_pointer_mode(handle: int, mode: int) -> None:
    if mode not in (CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE):
        raise CUBLASError(f"CUBLAS_STATUS_INVALID_VALUE: pointer mode {mode}")
    _cublas_handle(handle).pointer_mode = mode


def get_pointer_mode(handle: int) -> int:
    return _cublas_handle(handle).pointer_mode


def _column_major(pointer: int, rows: int, cols: int, ld: int, dtype: np.dtype,
                  type_name: str, what: str) -> tuple[ndarray, np.ndarray]:
    """The (rows, cols) column-major matrix at ``pointer`` with leading dimension ``ld``: the
    device array spanning it (a SimError where that runs past its allocation or is another
    type) and a NumPy view of the matrix itself."""
    count = ld * (cols - 1) + rows if rows and cols else 0
    span = shim._device_range(pointer, count, dtype, type_name, what, caller="gemmEx")
    matrix = np.lib.stride_tricks.as_strided(span._a, (rows, cols),
                                             (dtype.itemsize, ld * dtype.itemsize))
    return span, matrix


def gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
            Ctype, ldc, computeType, algo) -> None:
    """Queue ``C = alpha op(A) op(B) + beta C`` (column-major, cuBLAS's rules)."""
    args = dict(transa=transa, transb=transb, m=m, n=n, k=k, alpha=alpha, A=A, Atype=Atype,
                lda=lda, B=B, Btype=Btype, ldb=ldb, beta=beta, C=C, Ctype=Ctype, ldc=ldc,
                computeType=computeType, algo=algo)
    for name, value in args.items():
        if not shim._is_int(value):
            raise TypeError(f"gemmEx: {name} is an int (pointers are .data.ptr or a host "
                            f"address), got {type(value).__name__}")
    state = _cublas_handle(handle)
    if (Atype, Btype, Ctype, computeType) != (CUDA_R_16BF, CUDA_R_16BF, CUDA_R_32F,
                                              CUBLAS_COMPUTE_32F) or algo not in _GEMM_ALGOS:
        raise CUBLASError(f"CUBLAS_STATUS_NOT_SUPPORTED: cudasim models bf16 x bf16 -> float32 "
                          f"with CUBLAS_COMPUTE_32F only (types {Atype}, {Btype}, {Ctype}, "
                          f"compute {computeType}, algo {algo})")
    if shim._properties(shim._current_device[0])["major"] < 8:
        raise CUBLASError("CUBLAS_STATUS_ARCH_MISMATCH: bfloat16 needs compute capability 8.0")
    if state.pointer_mode != CUBLAS_POINTER_MODE_HOST:
        raise SimError("gemmEx: alpha and beta given as host memory in device pointer mode")
    if transa not in (CUBLAS_OP_N, CUBLAS_OP_T) or transb not in (CUBLAS_OP_N, CUBLAS_OP_T):
        raise CUBLASError(f"CUBLAS_STATUS_INVALID_VALUE: operations {transa}, {transb}")
    a_rows, a_cols = (m, k) if transa == CUBLAS_OP_N else (k, m)
    b_rows, b_cols = (k, n) if transb == CUBLAS_OP_N else (n, k)
    if min(m, n, k) < 0 or lda < max(1, a_rows) or ldb < max(1, b_rows) or ldc < max(1, m):
        raise CUBLASError(f"CUBLAS_STATUS_INVALID_VALUE: m {m}, n {n}, k {k}, lda {lda}, "
                          f"ldb {ldb}, ldc {ldc}")
    a, a_view = _column_major(A, a_rows, a_cols, lda, np.dtype(np.uint16), "CUDA_R_16BF", "A")
    b, b_view = _column_major(B, b_rows, b_cols, ldb, np.dtype(np.uint16), "CUDA_R_16BF", "B")
    c, c_view = _column_major(C, m, n, ldc, np.dtype(np.float32), "CUDA_R_32F", "C")
    if np.shares_memory(c._a, a._a) or np.shares_memory(c._a, b._a):
        raise SimError("gemmEx: C overlaps an input (cuBLAS's result is undefined)")
    scale = ctypes.c_float.from_address(alpha).value
    keep = ctypes.c_float.from_address(beta).value

    def run():
        left, right = _widen(a_view), _widen(b_view)
        product = np.matmul(left if transa == CUBLAS_OP_N else left.T,
                            right if transb == CUBLAS_OP_N else right.T)
        product *= np.float32(scale)
        if keep:  # beta 0: C is not read (it may hold NaN), as cuBLAS promises
            product += np.float32(keep) * c_view
        c_view[...] = product
    shim._enqueue(run, [a, b, c], "gemms", stream=shim._stream_at(state.stream))


def _widen(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 bits: exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
