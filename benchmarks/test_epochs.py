"""pytest-benchmark suites: one training epoch per (config, backend), and the GEMM floor of
each config, grouped by config so the tables compare like with like.

    pytest benchmarks --benchmark-only                 # the usual tables
    pytest benchmarks --benchmark-only --benchmark-autosave
    pytest benchmarks --benchmark-only --benchmark-compare

BPK_BENCH_QUICK=1 shrinks every config to a few batches (CI runs the suite that way with
--benchmark-disable, so it cannot rot). The workloads are those of ``bpk bench``.
"""
import os

import pytest

import bpkernels as bpk
from bpkernels import bench

QUICK = os.environ.get("BPK_BENCH_QUICK") == "1"
CONFIGS = [c.quick() if QUICK else c for c in bench.CONFIGS.values()]
DTYPE = os.environ.get("BPK_BENCH_DTYPE", "float32")


@pytest.fixture(params=CONFIGS, ids=[c.name for c in CONFIGS])
def config(request, benchmark):
    benchmark.group = f"{request.param.name} {'-'.join(map(str, request.param.sizes))} " \
                      f"batch {request.param.batch} {DTYPE}"
    benchmark.extra_info["samples"] = request.param.samples
    return request.param


@pytest.mark.parametrize("backend", bpk.available_backends())
def test_epoch(benchmark, config, backend):
    X, y = bench.workload(config, DTYPE)
    try:
        model = config.model(backend, DTYPE)
    except ValueError as why:  # no kernels for the config's layers (CuPy: LayerNorm)
        pytest.skip(str(why))
    opt = bpk.SGD(lr=bench.LEARNING_RATE)
    bpk.fit(model, X, y, optimizer=opt, epochs=1, batch_size=config.batch)  # warm-up, JIT
    history = benchmark(bpk.fit, model, X, y, optimizer=opt, epochs=1, batch_size=config.batch)
    assert len(history) == 1


def test_gemm_floor(benchmark, config):
    epoch = bench.gemm_floor_epoch(config, DTYPE)
    epoch()
    benchmark(epoch)
