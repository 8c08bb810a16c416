"""What only a real GPU can check, on the "cupy" backend: the same graphs, streams and kernels as
test_cuda_backend.py runs through the CPU emulation, here through NVRTC, cuBLAS and the CUDA
driver. The rest of the suite also runs on "cupy" wherever it is available (ci/gpu.sh).
Skipped, with the registry's reason, on machines without a usable GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk

REASON = bpk.backends.unavailable_reasons().get("cupy")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no CUDA GPU here: {REASON}")

TOL = {"float32": dict(rtol=2e-4, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


def _backend(**options):
    from bpkernels.backends.cupy_backend import CupyBackend
    return CupyBackend(**options)


def _data(n=203, features=9, classes=4):
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    return rng.standard_normal((n, features)) + 2.0 * np.eye(classes, features)[y], y


def _fit(backend, dtype, **options):
    X, y = _data()
    model = bpk.MLP([9, 33, 17, 4], activation="gelu", backend=backend, dtype=dtype, seed=0)
    history = bpk.fit(model, X, y, optimizer=bpk.Adam(lr=0.01), epochs=3, batch_size=16,
                      **options)
    return history["loss"], [a for pair in model.get_weights() for a in pair]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_graphs_streams_and_kernels_agree_on_the_gpu(dtype):
    """Replayed graphs, kernel-by-kernel launches, data streamed from pinned host memory, and
    the NumPy reference: the same training, to the dtype's tolerance."""
    runs = {"graphs": _fit(_backend(), dtype), "kernels": _fit(_backend(graphs=False), dtype),
            "streamed": _fit(_backend(max_resident_bytes=4096), dtype),
            "numpy": _fit("numpy", dtype)}
    for name in ("kernels", "streamed", "numpy"):
        np.testing.assert_allclose(runs["graphs"][0], runs[name][0], **TOL[dtype], err_msg=name)
        for a, b in zip(runs["graphs"][1], runs[name][1]):
            np.testing.assert_allclose(a, b, **TOL[dtype], err_msg=name)


def test_tf32_changes_float32_products_only_when_asked():
    rng = np.random.default_rng(1)
    X, W = (rng.standard_normal(s).astype(np.float32) for s in ((256, 512), (512, 256)))
    exact = X.astype(np.float64) @ W
    errors = {}
    for tf32 in (False, True):
        be = _backend(tf32=tf32)
        A = be.empty((256, 256), np.float32)
        be.dense_forward(be.asarray(X), be.asarray(W), be.zeros((256,), np.float32),
                         "identity", A)
        errors[tf32] = np.abs(be.to_host(A) - exact).max() / np.abs(exact).max()
    _backend()  # leave CuPy's process-wide compute type at the default
    assert errors[False] < 1e-5 < errors[True] < 1e-2


def test_gemm_floor_is_timed_by_cuda_events():
    seconds = _backend().gemm_floor_seconds((1024, 2048, 2048, 10), [512] * 4, "float32", 3)
    assert len(seconds) == 3 and all(0 < t < 10 for t in seconds)


def _bf16_backend():
    be = _backend()
    if be.bf16_unavailable() is not None:
        pytest.skip(f"no bf16 on this GPU: {be.bf16_unavailable()}")
    return be


def test_bf16_rounding_kernel_equals_the_reference_on_the_gpu():
    """round_bf16 built by NVRTC, bit for bit against backends/bf16.py (NaNs included)."""
    from bpkernels.backends.bf16 import to_bf16_bits
    from test_bf16 import _random_bits, _special_bits
    be = _bf16_backend()
    x = np.concatenate([_special_bits(), _random_bits(1 << 20, 6)]).view(np.float32)
    np.testing.assert_array_equal(be.to_host(be._rounded("X", be.asarray(x))), to_bf16_bits(x))


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "kernels"])
def test_bf16_training_on_the_gpu_agrees_with_numpy(graphs):
    """cuBLAS's bf16 products (tensor cores), captured or launched one by one, train as the
    NumPy reference's float32 products of the rounded inputs do. Summation orders differ, and
    a value near a rounding point may then round the other way (2^-8 relative): so the weights
    are compared by their distance, relative to how far training moved them."""
    _bf16_backend()  # skips where this GPU has no bf16
    X, y = _data()
    weights = []
    for backend in (_backend(graphs=graphs), "numpy", None):
        model = bpk.MLP([9, 33, 17, 4], activation="gelu", backend=backend or "numpy",
                        dtype="bf16", seed=0)
        if backend is not None:
            bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.05, momentum=0.9), epochs=2,
                    batch_size=16)
        weights.append(np.concatenate([a.ravel() for pair in model.get_weights()
                                       for a in pair]).astype(np.float64))
    got, ref, start = weights
    assert np.linalg.norm(got - ref) < 1e-3 * np.linalg.norm(ref - start)


def test_bf16_gemm_floor_is_timed_by_cuda_events():
    seconds = _bf16_backend().gemm_floor_seconds((1024, 2048, 2048, 10), [512] * 4, "bf16", 3)
    assert len(seconds) == 3 and all(0 < t < 10 for t in seconds)
