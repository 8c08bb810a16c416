"""bfloat16 for dtype="bf16": the NumPy rounding reference (backends/bf16.py), and the Numba
backend's MKL GEMM (backends/numba/_native/mkl.py). The rounding pass the Numba kernels run
(backends/numba/mixed.py) is tested against the reference in test_bf16.py.

The reference's tests need neither Numba nor MKL. The rest skip, with the reason MKL is
unusable here, on machines without MKL or without AMX-BF16 / AVX512-BF16."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bpkernels.backends.bf16 import bf16_round, to_bf16_bits, widen_bf16_bits

JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")


def _floats(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def _specials():
    """Float32 patterns around every place rounding can go wrong."""
    return np.array([
        0x00000000, 0x80000000,  # +-0
        0x7F800000, 0xFF800000,  # +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7F80FFFF,
        0x7FA00000,  # NaNs: quiet, signalling, payloads only in the dropped bits
        0x7F7FFFFF, 0xFF7FFFFF,  # the largest finite: round to inf
        0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001,  # below, at and above the last tie before inf
        0x00800000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000, 0x00007FFF,  # subnormals
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # 1 and its ties
    ], np.uint32)


def _boundary_patterns():
    """Every bfloat16 value (the upper 16 bits) with each low half that decides its rounding:
    exact, just above exact, just below the tie, the tie, just above it, just below the next."""
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    return (upper[:, None] | low[None, :]).ravel()


def _random_patterns(count=1 << 20, seed=0):
    return np.random.default_rng(seed).integers(0, 1 << 32, count, dtype=np.uint32)


def _all_patterns():
    return np.concatenate([_specials(), _boundary_patterns(), _random_patterns()])


# ============================================================ the NumPy reference (backends/bf16.py)
def test_the_reference_rounds_worked_examples_to_nearest_even():
    x = _floats([0x3F808000,   # 1 + 2^-8: a tie between 1 (even) and 1 + 2^-7 -> 1
                 0x3F818000,   # 1 + 3 * 2^-8: a tie between odd 1 + 2^-7 and 1 + 2^-6 -> up
                 0x3F808001,   # just above the tie -> up
                 0x7F7FFFFF,   # the largest float32 -> inf
                 0xFFC00001])  # a negative NaN with a payload -> the negative quiet NaN
    assert [hex(b) for b in to_bf16_bits(x)] == ["0x3f80", "0x3f82", "0x3f81", "0x7f80", "0xffc0"]
    assert bf16_round(np.float32(1 / 3)) == np.float32(0.333984375)  # 0x3EAB
    assert to_bf16_bits(x).dtype == np.uint16 and bf16_round(x).dtype == np.float32


def test_the_reference_equals_ml_dtypes_bit_for_bit():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = _floats(_all_patterns())
    with np.errstate(invalid="ignore"):
        expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    ours = to_bf16_bits(x)
    wrong = np.flatnonzero(ours != expected)
    assert wrong.size == 0, [(hex(x.view(np.uint32)[i]), hex(ours[i]), hex(expected[i]))
                             for i in wrong[:5]]


def test_widening_is_exact_and_rounding_is_idempotent():
    bits = np.arange(1 << 16, dtype=np.uint16)
    wide = widen_bf16_bits(bits)
    assert np.array_equal(wide.view(np.uint32), bits.astype(np.uint32) << 16)
    finite = np.isfinite(wide)
    assert np.array_equal(to_bf16_bits(wide)[finite], bits[finite])
    assert np.isnan(bf16_round(wide[~np.isinf(wide) & ~finite])).all()
    x = _floats(_random_patterns(1 << 12))
    once = bf16_round(x)
    twice = bf16_round(once)
    nan = np.isnan(once)
    assert np.array_equal(np.isnan(twice), nan)
    assert np.array_equal(twice[~nan].view(np.uint32), once[~nan].view(np.uint32))
    assert bf16_round(x.reshape(64, 64)).shape == (64, 64)


# ============================================================ MKL's GEMM in the Numba kernels
@pytest.fixture(scope="module")
def mkl():
    """backends/numba/_native/mkl.py where MKL's bf16 GEMM is usable here, else a skip that
    says why."""
    pytest.importorskip("numba")
    from bpkernels.backends.numba._native import mkl as module
    reason = module.availability()
    if reason is not None:
        pytest.skip(reason)
    return module


def _padded(M, pad):
    """M as the first columns of a wider C-ordered array: rows ``pad`` elements apart beyond
    its width (to Numba, layout 'A'). The padding holds NaN's bits, which must not be read."""
    if not pad:
        return M
    fill = np.float32(np.nan) if M.dtype == np.float32 else np.uint16(0x7FC0)
    wide = np.full((M.shape[0], M.shape[1] + pad), fill, M.dtype)
    wide[:, :M.shape[1]] = M
    return wide[:, :M.shape[1]]


@pytest.fixture(scope="module")
def kernels(mkl):
    """Compiled callers of the helpers, as the epoch kernel calls them."""
    import numba

    from bpkernels.backends.numba import mixed

    @numba.njit
    def gemm(A, trans_a, B, trans_b, C, alpha, beta):
        mkl.gemm_bf16(A, trans_a, B, trans_b, C, alpha, beta)

    # as the fused epoch kernel: without reference counting (toolkit.epoch's flags), the
    # parallel rounding pass a helper of its own
    @numba.njit(_nrt=False, nogil=True, no_cfunc_wrapper=True)
    def round_then_multiply(X, X16, W16, Z, par):
        mixed.round_bf16(X, X16, par)
        mkl.gemm_bf16(X16, False, W16, False, Z, 1.0, 0.0)
    return {"gemm": gemm, "epoch": round_then_multiply}


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_kernel_without_reference_counting_rounds_in_parallel_and_multiplies(mkl, kernels):
    from bpkernels.backends.numba.backend import PARALLEL_MIN_BF16
    rng = np.random.default_rng(4)
    X = rng.standard_normal(((3 << 22) // 256, 256), dtype=np.float32)
    W = to_bf16_bits(rng.standard_normal((256, 8), dtype=np.float32))
    X16, Z = np.empty(X.shape, np.uint16), np.empty((X.shape[0], 8), np.float32)
    kernels["epoch"](X, X16, W, Z, PARALLEL_MIN_BF16)  # (64 row chunks)
    assert np.array_equal(X16, to_bf16_bits(X))
    X64, W64 = bf16_round(X).astype(np.float64), widen_bf16_bits(W).astype(np.float64)
    assert np.all(np.abs(Z - X64 @ W64) <= mkl.error_bound(X64, W64, None, 0.0))


def _product_case(m, k, n, trans_a, trans_b, seed):
    """bf16 bits of op(A) (m x k) and op(B) (k x n), stored transposed where asked, and
    float64 copies of op(A) and op(B) holding the same values."""
    rng = np.random.default_rng(seed)
    A = to_bf16_bits(rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32))
    B = to_bf16_bits(rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32))
    A64, B64 = widen_bf16_bits(A).astype(np.float64), widen_bf16_bits(B).astype(np.float64)
    return A, B, A64.T if trans_a else A64, B64.T if trans_b else B64


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 5, 7), (127, 257, 33), (4, 0, 3)])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True),
                                              (True, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_product_is_float32_accumulation_of_the_rounded_inputs(
        mkl, kernels, m, k, n, trans_a, trans_b, beta):
    A, B, A64, B64 = _product_case(m, k, n, trans_a, trans_b, seed=m * k * n)
    alpha = 1.5
    # beta 0: C is only written, never read (the NaN there stays out of the result)
    C0 = np.full((m, n), np.nan, np.float32) if beta == 0 else \
        np.random.default_rng(1).standard_normal((m, n), dtype=np.float32)
    exact = alpha * (A64 @ B64) + (beta * C0.astype(np.float64) if beta else 0.0)
    # |float32 accumulation - exact| <= gamma_(k+2) * (|alpha A| @ |B| + |beta C0|), doubled:
    # the products of bf16 values are exact in float32, only the additions round (mkl.error_bound)
    bound = mkl.error_bound(alpha * A64, B64, C0.astype(np.float64), beta)
    for caller in (kernels["gemm"], mkl.gemm_bf16):
        C = C0.copy()
        caller(A, trans_a, B, trans_b, C, alpha, beta)
        assert np.all(np.abs(C - exact) <= bound), np.abs(C - exact).max()


def test_the_product_reads_padded_rows_and_writes_only_its_columns(mkl, kernels):
    A, B, A64, B64 = _product_case(9, 13, 6, True, False, seed=3)
    C = np.full((9, 6 + 4), 7.0, np.float32)
    kernels["gemm"](_padded(A, 3), True, _padded(B, 2), False, C[:, :6], 1.0, 0.0)
    assert np.all(C[:, 6:] == 7.0)
    assert np.all(np.abs(C[:, :6] - A64 @ B64) <= mkl.error_bound(A64, B64, None, 0.0))


def test_the_product_refuses_what_it_cannot_compute(mkl, kernels):
    from numba.core.errors import TypingError
    A, B = np.zeros((2, 3), np.uint16), np.zeros((3, 4), np.uint16)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels["gemm"](A, False, B, False, np.zeros((2, 5), np.float32), 1.0, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        kernels["gemm"](A, False, B[:, ::2], False, np.zeros((2, 2), np.float32), 1.0, 0.0)
    with pytest.raises(TypingError if JIT else TypeError, match="uint16"):
        kernels["gemm"](A.astype(np.float32), False, B, False, np.zeros((2, 4), np.float32),
                        1.0, 0.0)
    with pytest.raises(TypeError, match="uint16"):
        mkl.gemm_bf16(A.astype(np.float32), False, B, False, np.zeros((2, 4), np.float32),
                      1.0, 0.0)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled adapter")
def test_the_lp64_adapter_computes_what_the_64_bit_entry_point_computes(mkl):
    import ctypes
    library = mkl._loaded().library
    lp64 = ctypes.cast(library.cblas_gemm_bf16bf16f32, ctypes.c_void_p).value
    adapter = mkl._lp64_adapter(lp64)
    call = ctypes.CFUNCTYPE(None, *mkl._C_SIGNATURE)(adapter.address)
    A, B, A64, B64 = _product_case(17, 40, 11, False, True, seed=5)
    C = np.full((17, 11), np.nan, np.float32)
    call(101, 111, 112, 17, 11, 40, 1.0, A.ctypes.data, 40, B.ctypes.data, 40, 0.0,
         C.ctypes.data, 11)
    assert np.all(np.abs(C - A64 @ B64) <= mkl.error_bound(A64, B64, None, 0.0))
    # a size LP64 cannot hold: the call is skipped, C left as it was
    C[...] = 3.0
    call(101, 111, 112, 17, 11, 1 << 31, 1.0, A.ctypes.data, 40, B.ctypes.data, 40, 0.0,
         C.ctypes.data, 11)
    assert np.all(C == 3.0)


def test_availability_names_what_is_missing_and_the_fix(mkl, tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    reason = mkl._cpu_reason(str(cpuinfo))
    assert "neither AMX-BF16 nor AVX512-BF16" in reason
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert mkl._cpu_reason(str(cpuinfo)) is None
    monkeypatch.setattr(mkl, "_candidates", lambda: [])
    assert "pip install 'bpkernels[mkl]'" in mkl._open()
    monkeypatch.setattr(mkl, "_candidates", lambda: [str(tmp_path / "libmkl_rt.so.3")])
    assert "needs a working MKL" in mkl._open()
    info = mkl.info()
    assert info["available"] and info["ilp64"] is not None and info["threads"] >= 1


def test_threads_are_set_for_mkl_and_threadpoolctl_sees_them(mkl):
    before = mkl.get_threads()
    try:
        mkl.set_threads(1)
        assert mkl.get_threads() == 1
        threadpoolctl = pytest.importorskip("threadpoolctl")
        with threadpoolctl.threadpool_limits(2, user_api="blas"):  # as NumbaBackend.set_threads
            assert mkl.get_threads() == 2
        assert mkl.get_threads() == 1
    finally:
        mkl.set_threads(before)
    with pytest.raises(ValueError):
        mkl.set_threads(0)


def _python(code, cache, **env):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=240,
                          env=dict(os.environ, NUMBA_CACHE_DIR=str(cache), **env))
    return done


_CACHED_CALLER = """
    import sys, numpy as np, numba
    sys.path.insert(0, {folder!r})
    from caller import product
    from bpkernels.backends.numba._native import mkl
    A = np.full((3, 4), 0x3F80, np.uint16)  # ones
    C = np.zeros((3, 3), np.float32)
    product(A, C)
    print(C[0, 0], sum(product.stats.cache_hits.values()))
"""


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_kernel_loaded_from_the_cache_registers_the_symbol_or_says_why_not(mkl, tmp_path):
    (tmp_path / "caller.py").write_text(textwrap.dedent("""
        import numba
        from bpkernels.backends.numba._native.mkl import gemm_bf16

        @numba.njit(cache=True)
        def product(A, C):
            gemm_bf16(A, False, A, True, C, 1.0, 0.0)
    """))
    code = _CACHED_CALLER.format(folder=str(tmp_path))
    first = _python(code, tmp_path / "cache")
    assert first.returncode == 0 and first.stdout.split() == ["4.0", "0"], first.stderr
    second = _python(code, tmp_path / "cache")  # availability() never called before the load
    assert second.returncode == 0 and second.stdout.split() == ["4.0", "1"], second.stderr
    refused = _python(code, tmp_path / "cache", BPK_NUMBA_NATIVE="0")
    assert refused.returncode == 1 and "BPK_NUMBA_NATIVE=0" in refused.stderr, refused.stderr


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("first", ["mkl", "numba"])
def test_mkl_openmp_and_numba_threads_take_turns(mkl, tmp_path, first):
    """MKL's OpenMP (libiomp5) and Numba's threading layer in one process, alternately, each
    run started by either: no crash, no hang, the right answers."""
    done = _python(f"""
        import numpy as np, numba
        from bpkernels.backends.numba._native import mkl
        assert mkl.availability() is None

        @numba.njit(parallel=True)
        def scale(x):
            for i in numba.prange(x.shape[0]):
                x[i] = x[i] * np.float32(0.5)

        A = np.full((256, 512), 0x3F80, np.uint16)
        C = np.empty((256, 256), np.float32)
        x = np.ones(1 << 20, np.float32)
        for i in range(30):
            if {first!r} == "mkl":
                mkl.gemm_bf16(A, False, A, True, C, 1.0, 0.0)
                scale(x)
            else:
                scale(x)
                mkl.gemm_bf16(A, False, A, True, C, 1.0, 0.0)
            assert np.all(C == 512.0) and x[0] == np.float32(0.5) ** (i + 1)
            x[:] = np.float32(0.5) ** (i + 1)
        print(numba.threading_layer(), mkl.get_threads())
    """, tmp_path / "cache", NUMBA_NUM_THREADS="2")
    assert done.returncode == 0, done.stderr
