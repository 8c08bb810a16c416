"""Micro-benchmark of MKL's bf16 GEMM as the Numba kernels call it (not a test).

    PYTHONPATH=. python benchmarks/mkl_bf16.py [--threads 2]

GFLOP/s of C = A @ B (m x k times k x n, the forward shapes of configs M and L) by
- ``gemm_bf16`` called from an njit loop (the symbol, as the epoch kernel calls it),
- MKL's ``cblas_gemm_bf16bf16f32_64`` called directly by ctypes (no bpkernels code),
- float32 sgemm: NumPy's OpenBLAS (``np.dot`` into a buffer) and MKL's own ``cblas_sgemm_64``;
then the rounding pass the kernels run (``mixed.round_bf16``, float32 -> bf16 bits) in ns per
element, serial and in the row chunks the backend's ``par`` rule gives a bf16 layer, and a
check that MKL's OpenMP threads and Numba's parallel kernels take turns without a hang.
"""
from __future__ import annotations

import argparse
import ctypes
import time

import numba
import numpy as np

from bpkernels.backends.bf16 import to_bf16_bits
from bpkernels.backends.host import cpu_name
from bpkernels.backends.numba import mixed
from bpkernels.backends.numba._native import mkl
from bpkernels.backends.numba.backend import PARALLEL_MIN_BF16
from bpkernels.backends.numba.layers import MAX_CHUNKS

SHAPES = ((128, 784, 256), (128, 256, 128), (512, 1024, 2048), (512, 2048, 2048))
ROW_MAJOR, NO_TRANS = 101, 111


def best_seconds(call, budget=0.4, repeats=5):
    """The fastest of ``repeats`` timings of ``call`` (which runs its product ``count`` times),
    per product."""
    count = 1
    while True:  # grow the loop until one timing takes budget / repeats
        start = time.perf_counter()
        call(count)
        elapsed = time.perf_counter() - start
        if elapsed > budget / repeats or count > 1 << 20:
            break
        count *= 2
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(count)
        times.append((time.perf_counter() - start) / count)
    return min(times)


@numba.njit(nogil=True)
def njit_loop(A, B, C, count):
    for _ in range(count):
        mkl.gemm_bf16(A, False, B, False, C, 1.0, 0.0)


@numba.njit(nogil=True)
def round_loop(src, dst, par, count):
    for _ in range(count):
        mixed.round_bf16(src, dst, par)


@numba.njit(parallel=True, nogil=True)
def prange_pass(x):
    for i in numba.prange(x.shape[0]):
        x[i] = x[i] * np.float32(0.999) + np.float32(0.001)


def gemm_table(library):
    bf16 = library.cblas_gemm_bf16bf16f32_64
    sgemm = library.cblas_sgemm_64
    c_int, i64, f32, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for function in (bf16, sgemm):
        function.restype = None
        function.argtypes = (c_int, c_int, c_int, i64, i64, i64, f32, ptr, i64, ptr, i64, f32,
                             ptr, i64)
    rng = np.random.default_rng(0)
    print(f"{'m x k x n':>18} {'njit bf16':>10} {'ctypes bf16':>12} {'MKL sgemm':>10} "
          f"{'NumPy sgemm':>12}   (GFLOP/s)")
    for m, k, n in SHAPES:
        A32 = rng.standard_normal((m, k), dtype=np.float32)
        B32 = rng.standard_normal((k, n), dtype=np.float32)
        A, B = to_bf16_bits(A32), to_bf16_bits(B32)
        C = np.empty((m, n), np.float32)
        args = (m, n, k, 1.0)

        def direct(count, f=bf16, a=A, b=B):
            for _ in range(count):
                f(ROW_MAJOR, NO_TRANS, NO_TRANS, *args, a.ctypes.data, k, b.ctypes.data, n, 0.0,
                  C.ctypes.data, n)
        rates = [best_seconds(lambda count: njit_loop(A, B, C, count)),
                 best_seconds(direct),
                 best_seconds(lambda count: direct(count, sgemm, A32, B32)),
                 best_seconds(lambda count: [np.dot(A32, B32, C) for _ in range(count)])]
        flops = 2.0 * m * n * k
        print(f"{f'{m} x {k} x {n}':>18} " + " ".join(
            f"{flops / s / 1e9:{w}.0f}" for s, w in zip(rates, (10, 12, 10, 12))))


def rounding_table():
    rng = np.random.default_rng(1)
    print(f"\n{'rounding rows x cols':>22} {'serial':>8} {'chunked':>8}  (ns/element; chunks)")
    for rows, cols in ((128, 784), (512, 2048), (2048, 2048), (4096, 4096)):
        src = rng.standard_normal((rows, cols), dtype=np.float32)
        dst = np.empty(src.shape, np.uint16)
        # NumbaBackend._par's rule for a bf16 layer on more than one thread, and
        # mixed.round_bf16's chunks (layers.chunk_count is compiled code, not callable here)
        par = PARALLEL_MIN_BF16 if src.size >= 2 * PARALLEL_MIN_BF16 else None
        chunks = 1 if par is None else min(src.size // par, MAX_CHUNKS, rows)
        seconds = [best_seconds(lambda count, p=p: round_loop(src, dst, p, count))
                   for p in (None, par)]
        print(f"{f'{rows} x {cols}':>22} " +
              " ".join(f"{s / src.size * 1e9:8.3f}" for s in seconds) + f"  ({chunks})")


def take_turns(rounds=200):
    """MKL's OpenMP pool and Numba's threads, alternately; returns seconds per prange pass
    alone and right after an MKL call."""
    rng = np.random.default_rng(2)
    A = to_bf16_bits(rng.standard_normal((512, 1024), dtype=np.float32))
    B = to_bf16_bits(rng.standard_normal((1024, 512), dtype=np.float32))
    C = np.empty((512, 512), np.float32)
    x = rng.standard_normal(1 << 22, dtype=np.float32)
    prange_pass(x)
    start = time.perf_counter()
    for _ in range(rounds):
        prange_pass(x)
    alone = (time.perf_counter() - start) / rounds
    after = 0.0
    for _ in range(rounds):
        mkl.gemm_bf16(A, False, B, False, C, 1.0, 0.0)
        start = time.perf_counter()
        prange_pass(x)
        after += time.perf_counter() - start
    return alone, after / rounds, numba.threading_layer()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    threads = parser.parse_args().threads
    reason = mkl.availability()
    if reason is not None:
        raise SystemExit(reason)
    mkl.set_threads(threads)
    numba.set_num_threads(threads)
    info = mkl.info()
    print(f"{cpu_name()}; {info['version']}; {threads} threads; numba {numba.__version__}")
    gemm_table(mkl._loaded().library)
    rounding_table()
    alone, after, layer = take_turns()
    print(f"\nprange pass over 4M floats ({layer} layer): {alone * 1e3:.2f} ms alone, "
          f"{after * 1e3:.2f} ms right after an MKL bf16 GEMM")


if __name__ == "__main__":
    main()
