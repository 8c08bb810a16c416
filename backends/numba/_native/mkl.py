"""bfloat16 GEMM for the Numba kernels, by MKL's ``cblas_gemm_bf16bf16f32``.

``dtype="bf16"`` rounds every matrix product's inputs to bfloat16 and accumulates in float32
(torch.autocast's mixed precision). NumPy's OpenBLAS has no such product; MKL does, and runs
it on AMX-BF16 or AVX512-BF16 at 2-4x the speed of its sgemm (Xeon with AMX, 2 threads). On a
CPU without either it still answers, by converting to float32 first: slower than sgemm, so
such CPUs are refused here rather than served slowly.

MKL comes from the PyPI ``mkl`` wheel (``bpkernels[mkl]``), found and loaded on first use only
(``availability``): importing this module loads nothing. Compiled code calls a symbol of our own,
``bpkernels_cblas_gemm_bf16`` (CBLAS's argument order, 64-bit sizes), registered with LLVM once
MKL passed a self-test; a kernel that calls it names the symbol, never an address, and a copy
loaded from Numba's cache by a later process registers it first (a ``reload_init``), or raises
the reason MKL is unusable there instead of letting LLVM abort on an unresolved symbol.
Where MKL exports no 64-bit-integer entry point, the symbol names a small adapter that calls the
LP64 one. ``MKL_Set_Interface_Layer`` is never called: it is process-wide, and the process may
hold other users of MKL (NumPy or SciPy built against it) that chose their own.

One difference from exact products of the rounded inputs: MKL 2026.2 on AMX reads subnormal
bfloat16 inputs as zero and flushes subnormal results to zero (seen at 1x1x1 to 512^3), as the
AMX and AVX512-BF16 instructions do; a NumPy emulation that keeps subnormals differs there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
import sys
import threading

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from ...bf16 import to_bf16_bits, widen_bf16_bits
from ...host import cpu_name
from .switch import setting

__all__ = ["availability", "error_bound", "gemm_bf16", "get_threads", "info", "set_threads"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SYMBOL = "bpkernels_cblas_gemm_bf16"
_LP64_SYMBOL = "bpkernels_mkl_gemm_bf16_lp64"
_INT32_MAX = 2**31 - 1
_SONAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2")
_INSTALL = "pip install 'bpkernels[mkl]'"
# CBLAS's enums are C ints; sizes int64; pointers as pointer-sized integers (``.ctypes.data``).
_C_SIGNATURE = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64)


# ------------------------------------------------------------------------------ finding MKL
def _cpu_reason(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """None where the CPU multiplies bfloat16 in hardware, else why not."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "amd64"):
        return (f"bf16 products on the Numba backend need x86-64 Linux with AMX-BF16 or "
                f"AVX512-BF16 (this is {platform.system()} on {platform.machine()})")
    flags: set[str] = set()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    break
    except OSError as e:
        return f"cannot read {cpuinfo} to check the CPU for AMX-BF16 or AVX512-BF16: {e}"
    if flags & {"amx_bf16", "avx512_bf16"}:
        return None
    return (f"this CPU ({cpu_name()}) has neither AMX-BF16 nor AVX512-BF16 (no amx_bf16 or "
            f"avx512_bf16 among {cpuinfo}'s flags): bf16 products would be slower than float32")


def _candidates() -> list[str]:
    """Where libmkl_rt may be, most specific first: the ``mkl`` wheel puts it in
    ``<prefix>/lib``, outside site-packages, so it is not on the loader's path in a venv."""
    paths = [os.path.join(prefix, "lib", soname)
             for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix))
             for soname in _SONAMES]
    try:
        distribution = importlib.metadata.distribution("mkl")
        for file in distribution.files or ():
            if file.name in _SONAMES:
                paths.append(os.path.normpath(str(distribution.locate_file(file))))
    except importlib.metadata.PackageNotFoundError:
        pass
    found = [p for p in dict.fromkeys(paths) if os.path.exists(p)]
    system = ctypes.util.find_library("mkl_rt")  # a soname the loader resolves itself
    return found + ([system] if system else [])


class _Mkl:
    """libmkl_rt, loaded: its path, version, and the address compiled code calls."""

    def __init__(self, path: str, library: ctypes.CDLL) -> None:
        self.path, self.library = path, library
        self.version = _version(library)
        entry = getattr(library, "cblas_gemm_bf16bf16f32_64", None)
        self.ilp64 = entry is not None
        if entry is None:
            entry = getattr(library, "cblas_gemm_bf16bf16f32", None)
        if entry is None:
            raise LookupError(f"MKL {self.version} at {path} has no cblas_gemm_bf16bf16f32 "
                              f"(MKL 2020 or newer has it): pip install -U 'bpkernels[mkl]'")
        self.mkl_address = ctypes.cast(entry, ctypes.c_void_p).value
        # Kept alive here: the adapter's machine code is freed with it.
        self.adapter = None if self.ilp64 else _lp64_adapter(self.mkl_address)
        self.address = self.mkl_address if self.ilp64 else self.adapter.address
        self.gemm = ctypes.CFUNCTYPE(None, *_C_SIGNATURE)(self.address)


def _version(library: ctypes.CDLL) -> str:
    buffer = ctypes.create_string_buffer(256)
    try:
        library.MKL_Get_Version_String(buffer, len(buffer))
    except AttributeError:
        return "(version unknown)"
    return buffer.value.decode(errors="replace").strip()


def _open() -> _Mkl | str:
    """MKL loaded, or why not."""
    candidates = _candidates()
    if not candidates:
        return (f"bf16 on the Numba backend needs MKL: {_INSTALL} (no libmkl_rt.so.3 or .so.2 "
                f"in {os.path.join(sys.prefix, 'lib')}, the mkl package's files or the "
                f"system's libraries)")
    errors = []
    for path in candidates:
        try:
            return _Mkl(path, ctypes.CDLL(path))
        except (OSError, LookupError) as e:
            errors.append(str(e))
    return f"bf16 on the Numba backend needs a working MKL ({_INSTALL}): " + "; ".join(errors)


def _lp64_adapter(address: int):
    """A compiled function with our 64-bit signature that calls MKL's LP64 entry point at
    ``address``. Sizes of 2^31 or more cannot be passed: ``gemm_bf16`` refuses them before the
    call, and the adapter skips such a call rather than truncate them."""
    llvm.add_symbol(_LP64_SYMBOL, address)
    i32, i64, f32, ptr = types.int32, types.int64, types.float32, types.uintp
    lp64 = types.ExternalFunction(
        _LP64_SYMBOL, types.void(i32, i32, i32, i32, i32, i32, f32, ptr, i32, ptr, i32, f32, ptr,
                                 i32))
    signature = types.void(i32, i32, i32, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64)

    @numba.cfunc(signature, nogil=True)
    def adapter(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        if max(m, n, k, lda, ldb, ldc) > _INT32_MAX:
            return
        lp64(order, trans_a, trans_b, np.int32(m), np.int32(n), np.int32(k), alpha, a,
             np.int32(lda), b, np.int32(ldb), beta, c, np.int32(ldc))
    return adapter


# ------------------------------------------------------------------------------ the self-test
def error_bound(A64, B64, C0, beta):
    """The most a float32 accumulation of ``A64 @ B64 + beta C0`` (float64 arrays holding the
    bf16 inputs) may differ from the exact value, elementwise. A product of two bfloat16
    values (8-bit significands) is exact in float32, so only the k additions round (and one
    more for beta C): in any order, |error| <= gamma_(k+2) * (|A| @ |B| + |beta C|), where
    gamma_n = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability, 3.1). Twice that
    covers gamma's denominator and the float64 reference's own rounding; 2^-126 * (k + 2)
    covers subnormal results flushed to zero (MKL flushes them). Inputs must be normal or zero:
    MKL reads subnormal bfloat16 inputs as zero, an error this bound does not cover."""
    k = A64.shape[1]
    magnitude = np.abs(A64) @ np.abs(B64)
    if beta != 0:  # (beta 0: C0 is not read, and may be NaN)
        magnitude = magnitude + abs(beta) * np.abs(C0)
    return 2 * (k + 2) * 2.0**-24 * magnitude + (k + 2) * 2.0**-126


def _self_test(mkl: _Mkl) -> str | None:
    """None where MKL's product agrees with float64 of the rounded inputs, else what failed.
    Through ``mkl.gemm``, the very address the compiled code will call."""
    rng = np.random.default_rng(7)
    m, n, k = 5, 3, 37
    A = to_bf16_bits(rng.standard_normal((k, m), dtype=np.float32))  # used transposed
    B = to_bf16_bits(rng.standard_normal((k, n), dtype=np.float32))
    A64 = widen_bf16_bits(A).astype(np.float64).T
    B64 = widen_bf16_bits(B).astype(np.float64)
    for beta in (0.0, 1.0):
        # beta 0 must only write C (BLAS's rule), never read the NaN there
        C0 = np.full((m, n), np.nan if beta == 0 else 0.5, np.float32)
        C = C0.copy()
        mkl.gemm(_ROW_MAJOR, _TRANS, _NO_TRANS, m, n, k, 2.0, A.ctypes.data, m, B.ctypes.data,
                 n, beta, C.ctypes.data, n)
        exact = 2 * (A64 @ B64) + (beta * C0.astype(np.float64) if beta else 0)
        bound = error_bound(2 * A64, B64, C0.astype(np.float64), beta)
        if not np.all(np.abs(C - exact) <= bound):
            worst = float(np.nanmax(np.abs(C - exact) / np.maximum(np.abs(exact), 1e-30)))
            return (f"MKL's bf16 GEMM ({mkl.version}, {mkl.path}) failed its self-test: a "
                    f"{m}x{k}x{n} product with beta={beta} is off by {worst:.3g} relative")
    return None


_lock = threading.Lock()
_state: dict[str, object] = {}  # "reason": str | None, "mkl": _Mkl, once decided


def _decide() -> str | None:
    if setting() == "0":
        return "BPK_NUMBA_NATIVE=0 turns MKL's bf16 GEMM off (it calls MKL from compiled code)"
    reason = _cpu_reason()
    if reason is not None:
        return reason
    mkl = _open()
    if isinstance(mkl, str):
        return mkl
    try:
        reason = _self_test(mkl)
    except Exception as e:  # noqa: BLE001  (any failure of a foreign library: unavailable)
        reason = f"MKL's bf16 GEMM ({mkl.path}) failed its self-test: {e!r}"
    if reason is None:
        llvm.add_symbol(_SYMBOL, mkl.address)
        _state["mkl"] = mkl
    return reason


def availability() -> str | None:
    """None where compiled code can call MKL's bf16 GEMM (found, on a CPU with AMX-BF16 or
    AVX512-BF16, its self-test passed, its symbol registered), else why not and how to fix it.
    Decided once per process, on first call; thread-safe."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _decide()
        return _state["reason"]  # type: ignore[return-value]


def info() -> dict[str, object]:
    """What was found: {"available", "reason", "path", "version", "ilp64", "threads"}."""
    reason = availability()
    mkl = _state.get("mkl")
    return {"available": reason is None, "reason": reason,
            "path": getattr(mkl, "path", None), "version": getattr(mkl, "version", None),
            "ilp64": getattr(mkl, "ilp64", None), "threads": get_threads()}


def _loaded() -> _Mkl:
    reason = availability()
    if reason is not None:
        raise RuntimeError(reason)
    return _state["mkl"]  # type: ignore[return-value]


def _link() -> None:
    """A cached kernel's reload_init: register the symbol before its code loads, or raise why
    MKL is unusable in this process (LLVM would abort on the unresolved symbol)."""
    _loaded()


# ------------------------------------------------------------------------------ threads
def set_threads(n: int) -> None:
    """Run MKL on ``n`` threads from now on, in every thread of the process: the process-wide
    count (``MKL_Set_Num_Threads``), which is the one threadpoolctl sets too; a thread-local
    count (``MKL_Set_Num_Threads_Local``) would silently override threadpoolctl's later ones
    in the calling thread. Raises RuntimeError where MKL is unavailable."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"MKL's thread count must be an integer >= 1, got {n!r}")
    _loaded().library.MKL_Set_Num_Threads(ctypes.c_int(int(n)))


def loaded() -> bool:
    """Whether MKL is loaded and usable in this process (without loading it)."""
    return "mkl" in _state


def get_threads() -> int | None:
    """The threads MKL would run a product on, from the calling thread; None where MKL is
    unavailable."""
    mkl = _state.get("mkl") if availability() is None else None
    return None if mkl is None else int(mkl.library.MKL_Get_Max_Threads())


# ------------------------------------------------------------------------------ the GEMM
@intrinsic
def _call_gemm(typingctx, order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
               ldc):
    """Call our symbol, after making sure it is registered here and, through a reload_init,
    in any process that loads this code from Numba's cache."""
    i32, i64, f32, ptr = types.int32, types.int64, types.float32, types.uintp
    signature = types.void(i32, i32, i32, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64)

    def codegen(context, builder, sig, args):
        _link()
        context.active_code_library._reload_init.add(_link)
        i32_, i64_ = ir.IntType(32), ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i32_] * 3 + [i64_] * 3 + [
            ir.FloatType(), i64_, i64_, i64_, i64_, ir.FloatType(), i64_, i64_])
        callee = cgutils.get_or_insert_function(builder.module, fnty, _SYMBOL)
        builder.call(callee, args)
        return context.get_dummy_value()
    return signature, codegen


def gemm_bf16(A, trans_a, B, trans_b, C, alpha, beta):
    """C = alpha op(A) @ op(B) + beta C into C, as ``gemm_t`` of blas.py: op transposing where
    ``trans_a`` / ``trans_b``; A and B bfloat16 bits (uint16, ``to_bf16_bits``), C float32, all
    2-D with contiguous rows (C-ordered, rows may be padded). Products of the bfloat16 values,
    accumulated in float32; with beta = 0, C is only written. Compiled code gets the overload
    below; this Python version (NUMBA_DISABLE_JIT, or a call from Python) calls MKL by ctypes.
    Raises RuntimeError with ``availability()``'s reason where MKL is unusable."""
    _check_operands(A, B, C)
    m, n, k, lda, ldb, ldc = _sizes(A, trans_a, B, trans_b, C)
    if m == 0 or n == 0:
        return
    _loaded().gemm(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
                   m, n, k, alpha, A.ctypes.data, lda, B.ctypes.data, ldb, beta, C.ctypes.data,
                   ldc)


def _check_operands(A, B, C):
    for name, M, dtype in (("A", A, np.uint16), ("B", B, np.uint16), ("C", C, np.float32)):
        if M.ndim != 2 or M.dtype != dtype:
            raise TypeError(f"gemm_bf16: {name} must be a 2-D {np.dtype(dtype)} array")


_inline = numba.njit(inline="always", cache=True, nogil=True)


@_inline
def _leading(M):
    """The leading dimension of a matrix whose rows are contiguous (C-ordered, rows may be
    padded): MKL reads rows ``ld`` elements apart."""
    rows, cols = M.shape
    unit = M.itemsize
    if rows == 0 or cols == 0:  # (NumPy gives empty arrays any strides)
        return max(cols, 1)
    if cols > 1 and M.strides[1] != unit:
        raise ValueError("gemm_bf16 needs operands whose rows are contiguous")
    if rows == 1:
        return max(cols, 1)
    if M.strides[0] % unit != 0 or M.strides[0] < cols * unit:
        raise ValueError("gemm_bf16 needs operands whose rows are contiguous")
    return max(M.strides[0] // unit, 1)


@_inline
def _sizes(A, trans_a, B, trans_b, C):
    """(m, n, k, lda, ldb, ldc) of C = op(A) @ op(B), checked: the shapes agree, every size
    fits MKL's 32-bit integers. One check for the Python and the compiled gemm_bf16."""
    m, n = C.shape
    k = A.shape[0] if trans_a else A.shape[1]
    if (A.shape[1] if trans_a else A.shape[0]) != m or \
            (B.shape[1] if trans_b else B.shape[0]) != k or \
            (B.shape[0] if trans_b else B.shape[1]) != n:
        raise ValueError("gemm_bf16: shapes do not match")
    lda, ldb, ldc = _leading(A), _leading(B), _leading(C)
    if max(m, n, k, lda, ldb, ldc) > _INT32_MAX:
        raise ValueError("gemm_bf16: sizes of 2**31 or more")
    return m, n, k, lda, ldb, ldc


_GEMM_JIT = dict(cache=True, nogil=True, no_cpython_wrapper=True)


def _matrix(t, dtype):
    return isinstance(t, types.Array) and t.ndim == 2 and t.dtype == dtype


@overload(gemm_bf16, jit_options=_GEMM_JIT)
def _gemm_bf16_compiled(A, trans_a, B, trans_b, C, alpha, beta):
    if not (_matrix(A, types.uint16) and _matrix(B, types.uint16) and
            _matrix(C, types.float32)):
        raise TypingError("gemm_bf16 takes 2-D uint16 A and B (bfloat16 bits) and a 2-D "
                          f"float32 C, got {A}, {B}, {C}")
    reason = availability()
    if reason is not None:
        raise TypingError(reason)

    def gemm_bf16_impl(A, trans_a, B, trans_b, C, alpha, beta):
        m, n, k, lda, ldb, ldc = _sizes(A, trans_a, B, trans_b, C)
        if m == 0 or n == 0:
            return
        _call_gemm(np.int32(_ROW_MAJOR), np.int32(_TRANS if trans_a else _NO_TRANS),
                   np.int32(_TRANS if trans_b else _NO_TRANS), np.int64(m), np.int64(n),
                   np.int64(k), np.float32(alpha), A.ctypes.data, np.int64(lda), B.ctypes.data,
                   np.int64(ldb), np.float32(beta), C.ctypes.data, np.int64(ldc))
    return gemm_bf16_impl


# ------------------------------------------------------------------------------ rounding
@intrinsic
def _float_bits(typingctx, x):
    """The bits of a float32, as a uint32 (a bitcast: vectorizes like any integer op)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


if numba.config.DISABLE_JIT:  # (intrinsics do not run as plain Python)
    def _float_bits(x):
        return np.float32(x).view(np.uint32)


@_inline
def _to_bf16(x):
    """As ../../bf16.py's to_bf16_bits, for one float32; branch-free (a select) so that LLVM
    vectorizes the loop of round_span."""
    # (np.uint32 throughout: Numba widens uint32 arithmetic to 64 bits, half as many lanes)
    bits = _float_bits(x)
    upper = np.uint32(bits >> np.uint32(16))
    rounded = np.uint32(np.uint32(bits + np.uint32(0x7FFF + (upper & np.uint32(1))))
                        >> np.uint32(16))
    quiet = np.uint32((upper & np.uint32(0x8000)) | np.uint32(0x7FC0))
    return np.uint16(quiet if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded)


@_inline
def round_span(src, dst, first, last):
    """Rows first..last of a 2-D rounding pass (inlined where it is called). Only the span
    lives here: the passes that drive it, serial or in parallel row chunks, are ../mixed.py's,
    helpers called by symbol (unlinked.py), because a parallel driver compiled here and reached
    by a kernel that Numba cached crashed when a later process loaded that kernel."""
    for i in range(first, last):
        s, d = src[i], dst[i]
        for j in range(s.shape[0]):
            d[j] = _to_bf16(s[j])
