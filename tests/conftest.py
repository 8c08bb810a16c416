"""The kernel, gradient and optimizer tests' fixtures, on top of the bpkernels pytest plugin
(bpkernels/_pytest_plugin.py): the plugin's ``bpk_backend`` and ``bpk_dtype`` are the one
parametrization source, and bpkernels.testing.TOLERANCES the one table of tolerances per dtype.

A backend that joins the registry (``bpkernels.backends.register``) is tested by the whole suite
with no change to any test; one that cannot run here shows up as skipped, with the reason.
"""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels
import cudasim
from bpkernels.testing import TOLERANCES, Tolerance

# The CuPy backend's host code and CUDA kernels, run on the CPU (tests/cudasim): a backend
# like any other to every test below, named "cupy-cudasim", wherever a C++ compiler is. The
# plugin reads the registry when tests are collected, after this import.
cudasim.register()


@pytest.fixture
def backend_dtype(bpk_backend, bpk_dtype):
    """(backend name, dtype name): every registered backend with each dtype it supports."""
    return bpk_backend, bpk_dtype


@pytest.fixture
def be(backend_dtype):
    """The Backend instance of this parametrization."""
    return bpkernels.get_backend(backend_dtype[0])


@pytest.fixture
def dtype(backend_dtype):
    return np.dtype(backend_dtype[1])


@pytest.fixture
def tol(bpk_tolerance) -> Tolerance:
    return bpk_tolerance


@pytest.fixture
def backend_name(bpk_backend):
    """Every registered backend, alone: for float64 model-level tests (finite differences)."""
    return bpk_backend


@pytest.fixture
def to_device(be, dtype):
    """``to_device(host)`` -> a new device array of the test's dtype; ``to_device(host, np.int64)``
    for labels and indices."""
    def convert(host, as_dtype=dtype):
        return be.asarray(np.ascontiguousarray(host), as_dtype)
    return convert


@pytest.fixture
def to_host(be):
    """``to_host(device_array)`` -> a new host NumPy array."""
    return be.to_host


@pytest.fixture
def assert_close(tol):
    """``assert_close(actual, expected)`` with the test dtype's tolerance (``tol=`` overrides);
    ``actual`` is compared in float64 so float32 results are judged against the float64
    reference, not against a copy of their own rounding."""
    def check(actual, expected, tol=tol, err_msg=""):
        np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                                   np.asarray(expected, dtype=np.float64),
                                   rtol=tol.rtol, atol=tol.atol, err_msg=err_msg)
    return check


@pytest.fixture
def tolerances() -> dict[str, Tolerance]:
    """The whole table, for tests that compare across dtypes (float32 model vs float64)."""
    return TOLERANCES


@pytest.fixture
def numba_large_path():
    """A function ``(patch, mode)`` that sends the Numba epoch kernel of any model down the
    large models' path, on the monkeypatch context ``patch``: "bound" (the bound on dW, plain
    SGD fused into dW's GEMM) or "pool" (the BLAS pool's shared gather too; skipped where
    OpenBLAS has no thread callback)."""
    def force(patch, mode):
        from bpkernels.backends.numba import backend as numba_backend
        patch.setattr(numba_backend, "BOUND_MIN_PARAMS", 0)
        patch.setattr(numba_backend, "POOL_MIN_PARAMS", 0 if mode == "pool" else 1 << 62)
        if mode == "pool":
            if not numba_backend.pool.available():
                pytest.skip("no BLAS thread callback here")
            patch.setattr(numba_backend.pool, "blas_threads", lambda: 2)
    return force


@pytest.fixture
def numba_kernel_by_kernel(monkeypatch):
    """The Numba backend trains by its per-kernel methods (Backend.train_epoch's loop: Numba's
    kernels, one call each), not by its fused epoch kernel, which Numba compiles afresh for
    each combination of optimizer rule, target kind, dtype, activations, weights, metrics,
    clipping and schedule (3-10 s each on a cold cache: the suite's largest cost). For the
    tests of what trains, not of how (the estimators, the CLI): ``pytestmark =
    pytest.mark.usefixtures("numba_kernel_by_kernel")``, or that mark on a test. The fused
    kernel is tested against this loop in test_numba.py, and its weights, metrics, clipping
    and schedules against the references in test_weights.py, test_metrics.py,
    test_clip_grad_norm.py and test_schedules_fit.py. (Function-scoped: a module-scoped
    fixture that trains runs before it, on the fused path.)"""
    try:
        from bpkernels.backends.numba.backend import NumbaBackend
    except ImportError:  # no Numba here: nothing to route
        return
    from bpkernels.backends.base import Backend
    monkeypatch.setattr(NumbaBackend, "train_epoch", Backend.train_epoch)
