"""The one parametrization source of the kernel, gradient and optimizer tests, and the one table
of tolerances per dtype.

A backend that joins the registry (``bpkernels.backends._REGISTRY``) and can run here is tested
by the whole suite with no change to any test: every fixture below draws from
``bpkernels.available_backends()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import bpkernels
import cudasim

# The CuPy backend's host code and CUDA kernels, run on the CPU (tests/cudasim): a backend
# like any other to every test below, named "cupy-cudasim", wherever a C++ compiler is.
cudasim.register()
BACKENDS = tuple(bpkernels.available_backends())
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


# Kernel results versus the float64 reference evaluated on the *same* inputs (float32 inputs are
# widened exactly), so the only difference is the kernel's own rounding. Inputs in the tests are
# of unit scale, so absolute and relative errors are comparable.
#   float64: eps = 2.2e-16. The longest sums in the tests have 64 terms (dW, db over a batch of
#            64 rows): their rounding is up to ~64 eps ~ 1.4e-14 of the sum of |terms|. 1e-12
#            leaves room for BLAS summation order and the package's own erf (Cody's, ~1e-16),
#            while a wrong formula (a missing factor, a wrong derivative) is off by >= 1e-8.
#            Measured: the NumPy backend passes every test with 10x tighter bounds, not 100x.
#   float32: eps = 1.2e-7. The same sums err by a few 1e-7 of their scale; rtol 1e-5 (~80 ulp)
#            and atol 1e-6 cover that and results that cancel to ~0 (the GELU derivative near its
#            zero at z ~ -0.75, dW entries summing terms of both signs). Measured: 10x tighter
#            fails dW over 64 rows and 5-step momentum trajectories, so the headroom is 3-10x.
#            A GPU backend must not use TF32 matmuls (errors ~1e-3) to pass it.
TOL = {
    "float64": Tol(rtol=1e-12, atol=1e-12),
    "float32": Tol(rtol=1e-5, atol=1e-6),
}


@pytest.fixture(params=[(b, d) for b in BACKENDS for d in DTYPES],
                ids=[f"{b}-{d}" for b in BACKENDS for d in DTYPES])
def backend_dtype(request):
    """(backend name, dtype name): every available backend with each dtype it supports."""
    name, dtype = request.param
    if dtype not in bpkernels.get_backend(name).dtypes:
        pytest.skip(f"backend {name!r} does not support {dtype}")
    return request.param


@pytest.fixture
def be(backend_dtype):
    """The Backend instance of this parametrization."""
    return bpkernels.get_backend(backend_dtype[0])


@pytest.fixture
def dtype(backend_dtype):
    return np.dtype(backend_dtype[1])


@pytest.fixture
def tol(dtype) -> Tol:
    return TOL[dtype.name]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    """Every available backend, alone: for float64 model-level tests (finite differences)."""
    return request.param


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
def tolerances() -> dict[str, Tol]:
    """The whole table, for tests that compare across dtypes (float32 model vs float64)."""
    return TOL
