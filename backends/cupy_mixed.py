"""``dtype="bf16"`` on the CuPy backend: the products on bfloat16 inputs by cuBLAS.

The inputs are rounded by ``round_bf16`` (cuda/dense.cu) into uint16 scratch; ``gemm_bf16``
multiplies them with ``cublasGemmEx`` (bfloat16 A and B, float32 C, CUBLAS_COMPUTE_32F: tensor
cores from compute capability 8.0, float32 accumulation). ``cupy.matmul`` cannot do this (CuPy
has no bfloat16 dtype), so this module calls cuBLAS through CuPy's binding of its C API
(``cupy.cuda.cublas``) on CuPy's own handle: the one use of another library's internals in the
CuPy backend besides TF32's setter. It is switched on by :func:`unavailable` only after a
self-test product (each transpose the backend uses) equals the exact one; otherwise the backend
reports why and models refuse ``dtype="bf16"`` (nothing trains in float32 instead).
"""
from __future__ import annotations

import numpy as np

import cupy

try:  # at import, not at call: the stand-in of tests/cudasim is bound only while this loads
    from cupy.cuda import cublas, device
except ImportError:
    cublas = device = None

from .bf16 import to_bf16_bits, widen_bf16_bits

# cuBLAS's C enums (library_types.h, cublas_api.h): its ABI, the same since CUDA 11. Written
# here rather than read from CuPy, whose Python names for them have moved between releases.
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0
MIN_CAPABILITY = (8, 0)  # bfloat16 tensor cores (Ampere)

# alpha and beta in host memory: cuBLAS reads them when a call is queued (or captured), so
# they only have to outlive the call; module constants do.
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def gemm_bf16(a, trans_a: bool, b, trans_b: bool, out) -> None:
    """``out = op(a) @ op(b)`` on the current stream: ``a``, ``b`` C-contiguous uint16
    (bfloat16 bits), ``op`` a transpose where asked, ``out`` C-contiguous float32 (never read:
    beta is 0). Row-major ``out`` is the column-major ``out.T = op(b).T @ op(a).T``, so cuBLAS
    gets b first; a row-major array is its own transpose in column-major, with its row length
    as the leading dimension."""
    M, N = out.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != K or \
            (a.shape[1] if trans_a else a.shape[0]) != M or \
            (b.shape[0] if trans_b else b.shape[1]) != N:
        raise ValueError(f"gemm_bf16 shapes {a.shape}{'.T' * trans_a} @ "
                         f"{b.shape}{'.T' * trans_b} -> {out.shape}")
    for name, x, dtype in (("a", a, np.uint16), ("b", b, np.uint16), ("out", out, np.float32)):
        if x.dtype != dtype or not x.flags.c_contiguous:
            raise TypeError(f"gemm_bf16: {name} must be C-contiguous {np.dtype(dtype)}, got a "
                            f"{'' if x.flags.c_contiguous else 'non-contiguous '}{x.dtype} array")
    handle = device.get_cublas_handle()
    # CuPy's own calls set the handle's stream only where a stream was ever made current
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    cublas.gemmEx(handle, CUBLAS_OP_T if trans_b else CUBLAS_OP_N,
                  CUBLAS_OP_T if trans_a else CUBLAS_OP_N, N, M, K, _ONE.ctypes.data,
                  b.data.ptr, CUDA_R_16BF, b.shape[1], a.data.ptr, CUDA_R_16BF, a.shape[1],
                  _ZERO.ctypes.data, out.data.ptr, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                  CUBLAS_GEMM_DEFAULT)


def unavailable(properties: dict) -> str | None:
    """Why the device of ``properties`` (cudaDeviceProp as CuPy gives it) cannot run bf16
    products with this CuPy, or None after the self-test passed. Synchronizes: call it outside
    graph captures (the backend caches the answer)."""
    major, minor = int(properties["major"]), int(properties["minor"])
    if (major, minor) < MIN_CAPABILITY:
        return (f"the GPU's compute capability is {major}.{minor}; bfloat16 products need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later (Ampere)")
    try:
        for name in ("gemmEx", "setStream", "setPointerMode"):
            getattr(cublas, name)
        device.get_cublas_handle  # noqa: B018 (only whether it exists)
    except AttributeError as err:  # (None where CuPy has no such module)
        return f"CuPy {cupy.__version__} lacks the cuBLAS binding of cublasGemmEx ({err})"
    try:
        return _self_test()
    except Exception as err:  # noqa: BLE001 (a binding that moved fails in any way)
        return f"cuBLAS's bfloat16 product failed its self-test: {type(err).__name__}: {err}"


def _self_test() -> str | None:
    """Each transpose the dense kernels use, on values whose products and sums are exact in
    float32 (multiples of 1/8 below 2): any order of summation gives the exact result."""
    rng = np.random.default_rng(0)
    A = rng.integers(-12, 13, (3, 5)).astype(np.float32) / 8
    B = rng.integers(-12, 13, (5, 4)).astype(np.float32) / 8
    bits = {name: cupy.asarray(to_bf16_bits(np.ascontiguousarray(x)))
            for name, x in (("A", A), ("At", A.T), ("B", B), ("Bt", B.T))}
    outs = [cupy.empty((3, 4), np.float32) for _ in range(3)]
    gemm_bf16(bits["A"], False, bits["B"], False, outs[0])
    gemm_bf16(bits["At"], True, bits["B"], False, outs[1])
    gemm_bf16(bits["A"], False, bits["Bt"], True, outs[2])
    exact = widen_bf16_bits(to_bf16_bits(A)).astype(np.float64) @ B
    for out, form in zip(outs, ("a @ b", "a.T @ b", "a @ b.T")):
        got = cupy.asnumpy(out)
        if not np.array_equal(got, exact):
            return (f"cuBLAS's bfloat16 product ({form}) failed its self-test: largest error "
                    f"{np.abs(got - exact).max():.3g}")
    return None
