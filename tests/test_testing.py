"""The parity kit itself (bpkernels.testing and its pytest plugin): it passes honest backends,
and it catches deliberately broken ones, naming the backend, dtype, step, layer and entry."""
from __future__ import annotations

import re

import numpy as np
import pytest

import bpkernels
from bpkernels import SGD
from bpkernels.backends.numpy_backend import NumpyBackend
from bpkernels.model import DTYPES
from bpkernels.testing import TOLERANCES, assert_backends_agree, check_gradients, tolerance

pytest_plugins = ["pytester"]

SIZES = [4, 5, 3]


@pytest.fixture
def register_backend(monkeypatch):
    """``register(name, factory)`` for this test only: the registry's tables are replaced by
    copies for the test, so a broken backend never leaks into another test."""
    from bpkernels import backends
    for table in ("_REGISTRY", "_instances", "_unavailable"):
        monkeypatch.setattr(backends, table, dict(getattr(backends, table)))
    return backends.register


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, SIZES[0])), np.arange(n) % SIZES[-1]


def build(backend, dtype):
    return bpkernels.MLP(SIZES, activation="tanh", backend=backend, dtype=dtype, seed=3)


def shifting_backend(name, amount, at_step=3):
    """The NumPy backend, but SGD step ``at_step`` also adds ``amount`` to the last parameter
    (the output layer's last bias)."""
    class Shifting(NumpyBackend):
        def sgd_step(self, params, grads, momentum_buf, hp, step, halted):
            super().sgd_step(params, grads, momentum_buf, hp, step, halted)
            if step == at_step:
                params[-1] += amount
    Shifting.name = name
    return Shifting


class WrongTanhDerivative(NumpyBackend):
    """tanh'(z) taken as 1 - tanh(z) instead of 1 - tanh(z)^2."""

    name = "numpy-wrong-tanh"

    def dense_backward(self, X, W, dA, activation, A, Z, dW, db, dX=None):
        if activation == "tanh":
            dA *= 1.0 - A
            activation = "identity"
        super().dense_backward(X, W, dA, activation, A, Z, dW, db, dX)


# ====================================================================== tolerances
def test_tolerance_table_by_dtype():
    assert tolerance("float32") == TOLERANCES["float32"] == tolerance(np.float32)
    assert tolerance(np.dtype("float64")).rtol == 1e-12
    with pytest.raises(ValueError, match="valid dtypes: float32, float64"):
        tolerance("float16")


# ====================================================================== assert_backends_agree
@pytest.mark.parametrize("optimizer", [SGD(lr=0.1, momentum=0.9), "adam"],
                         ids=["sgd-momentum", "adam"])
def test_honest_backends_agree(optimizer):
    """Every available backend in both dtypes, 8 steps over two epochs of 3 batches (the last
    one partial); the optimizer instance given is copied, never trained itself."""
    X, y = data(n=20)
    assert_backends_agree(build, X, y, "cross_entropy", optimizer, 8, batch_size=8)
    if not isinstance(optimizer, str):
        assert optimizer.step_count == 0 and optimizer.state == {}


def test_broken_update_is_reported_with_step_and_layer(register_backend):
    register_backend("numpy-shift", shifting_backend("numpy-shift", 0.01))
    X, y = data()
    with pytest.raises(AssertionError) as info:
        assert_backends_agree(build, X, y, "cross_entropy", SGD(lr=0.1), 6,
                              backends=["numpy-shift"], batch_size=8)
    report = str(info.value)
    # The loss of step 3 is computed before step 3's update: the trajectory parts at step 4.
    for dtype, rtol in (("float32", "1e-05"), ("float64", "1e-12")):
        assert f"numpy-shift {dtype}: loss trajectory off from step 4 of 6" in report, report
        assert f"numpy-shift {dtype}: final layer 1 b[2] = " in report, report
        assert f"tolerance rtol={rtol}" in report
    values = re.search(r"numpy-shift float64: final layer 1 b\[2\] = (\S+), reference (\S+): "
                       r"largest relative error (\S+) \(of the layer's largest \|weight\| (\S+)\)",
                       report)
    mine, ref, rel, scale = (float(v) for v in values.groups())
    assert 0.005 < mine - ref < 0.02  # the shift, a little changed by the later steps
    assert rel == pytest.approx((mine - ref) / scale, rel=1e-2)


def test_wrong_gradient_shows_from_step_two(register_backend):
    register_backend(WrongTanhDerivative.name, WrongTanhDerivative)
    X, y = data()
    with pytest.raises(AssertionError) as info:
        assert_backends_agree(build, X, y, "cross_entropy", "sgd", 4,
                              backends=[WrongTanhDerivative.name], dtypes=["float64"])
    report = str(info.value)
    assert "numpy-wrong-tanh float64: loss trajectory off from step 2 of 4" in report, report
    assert "numpy-wrong-tanh float32" not in report
    # The hidden layer's gradient is wrong; the output layer's own gradient is right, but it
    # trains on different hidden activations from step 2 on, so both layers end up off.
    assert "final layer 0 W" in report and "final layer 1 W" in report


def test_rtol_overrides_the_table(register_backend):
    register_backend("numpy-nudge", shifting_backend("numpy-nudge", 1e-8))
    X, y = data()
    args = (build, X, y, "cross_entropy", SGD(lr=0.1), 5)
    with pytest.raises(AssertionError, match=r"numpy-nudge float64: final layer 1 b\[2\]"):
        assert_backends_agree(*args, backends=["numpy-nudge"], dtypes=["float64"])
    assert_backends_agree(*args, backends=["numpy-nudge"], dtypes=["float64"], rtol=1e-6)


def test_divergence_of_one_backend_is_a_disagreement(register_backend):
    register_backend("numpy-nan", shifting_backend("numpy-nan", np.nan, at_step=2))
    X, y = data()
    # Step 2's update writes NaN: the loss of step 3 is the first that is not finite.
    with pytest.raises(AssertionError, match=r"numpy-nan float64: training diverged at step 3 "
                                             r"\(the loss, a gradient or the update is not finite\); the "
                                             r"reference did not"):
        assert_backends_agree(build, X, y, "cross_entropy", "sgd", 4,
                              backends=["numpy-nan"], dtypes=["float64"])


def other_sizes_in_float32(backend, dtype):
    return bpkernels.MLP([4, 6, 3] if dtype == "float32" else SIZES, backend=backend, dtype=dtype)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(optimizer="lbfgs"), ValueError, "unknown optimizer 'lbfgs'; valid optimizers: sgd"),
    (dict(backends="numpy"), TypeError, "backends must be a list of backend names"),
    (dict(backends=["tpu"]), ValueError, "unknown backend 'tpu'"),
    (dict(dtypes=["float64"]), ValueError, "nothing to compare"),
    (dict(rtol=-1.0), ValueError, "rtol must be finite and >= 0"),
    (dict(build_model=lambda backend, dtype: build("numpy", "float64")), ValueError,
     r"build_model\('numpy', 'float32'\) returned a model on backend 'numpy' with dtype float64"),
    (dict(build_model=other_sizes_in_float32), ValueError,
     r"returned sizes \[4, 6, 3\].*the architecture must not depend"),
    (dict(build_model=lambda backend, dtype: None), TypeError, "must return a bpkernels.MLP"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    X, y = data(n=6)
    args = dict(build_model=build, X=X, y=y, loss="cross_entropy", optimizer="sgd", steps=1,
                backends=["numpy"])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        assert_backends_agree(**args)


# ====================================================================== check_gradients
def gradient_problem(backend):
    model = bpkernels.MLP([4, 5, 5, 3], activation="tanh", backend=backend, dtype="float64", seed=1)
    rng = np.random.default_rng(2)
    model.set_weights([(W, rng.uniform(-0.5, 0.5, b.shape)) for W, b in model.get_weights()])
    X = rng.standard_normal((6, 4))
    return model, X, np.arange(6) % 3


def test_check_gradients_passes_a_correct_backend():
    model, X, y = gradient_problem("numpy")
    before = model.get_weights()
    check_gradients(model, X, y, "cross_entropy")
    for (W, b), (W0, b0) in zip(model.get_weights(), before):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


def test_check_gradients_catches_a_wrong_activation_derivative(register_backend):
    register_backend(WrongTanhDerivative.name, WrongTanhDerivative)
    model, X, y = gradient_problem(WrongTanhDerivative.name)
    with pytest.raises(AssertionError) as info:
        check_gradients(model, X, y, "cross_entropy")
    report = str(info.value)
    assert "'numpy-wrong-tanh' backend" in report
    # Both tanh layers (0 and 1) have wrong gradients; the linear output layer 2 is right.
    for name in ("layer 0 dW[", "layer 0 db[", "layer 1 dW[", "layer 1 db["):
        assert name in report, report
    assert "layer 2" not in report
    line = next(line for line in report.splitlines() if "layer 1 db[" in line)
    analytic, numeric = (float(v) for v in
                         re.search(r"analytic (\S+), numeric (\S+),", line).groups())
    assert abs(analytic - numeric) > 1e-4  # a real difference, not a rounding one


def test_check_gradients_needs_float64():
    model = bpkernels.MLP([2, 2], dtype="float32")
    with pytest.raises(ValueError, match="needs a float64 model.*got float32"):
        check_gradients(model, np.ones((1, 2)), np.array([0]), "cross_entropy")


def test_check_gradients_refuses_a_point_on_a_kink():
    model = bpkernels.MLP([2, 2, 1], activation="relu", dtype="float64")
    # Z[0, 0] = 1 * 1 + 1 * (-1) + 0 = 0: relu's kink.
    model.set_weights([(np.array([[1.0, 0.5], [-1.0, 0.5]]), np.array([0.0, 0.1])),
                       (np.array([[1.0], [2.0]]), np.array([0.0]))])
    with pytest.raises(ValueError, match=r"layer 0 \(relu\) pre-activation Z\[0, 0\] = 0 lies "
                                         r"within .* of the kink at 0"):
        check_gradients(model, np.array([[1.0, 1.0]]), np.array([[1.0]]), "mse")


# ====================================================================== the pytest plugin
CONFTEST = """
import sys

from bpkernels.backends import register
from bpkernels.backends.numpy_backend import NumpyBackend

sys.modules["cupy"] = None  # CuPy unavailable here, whatever is installed


class Twin(NumpyBackend):
    name = "numpy-twin"
    dtypes = ("float64",)


register("numpy-twin", Twin)  # at conftest import, before collection
"""

TESTS = """
import sys

import pytest

import bpkernels
import bpkernels.testing


def test_plugin_is_loaded_and_light(request):
    assert request.config.pluginmanager.hasplugin("bpkernels")
    assert sys.modules.get("numba") is None and sys.modules.get("cupy") is None


def test_backend(bpk_backend, bpk_dtype, bpk_tolerance):
    model = bpkernels.MLP([2, 3], backend=bpk_backend, dtype=bpk_dtype)
    assert model.backend is bpkernels.get_backend(bpk_backend)
    assert model.forward([[1.0, 2.0]]).dtype == bpk_dtype
    assert bpk_tolerance == bpkernels.testing.TOLERANCES[bpk_dtype]


@pytest.mark.parametrize("bpk_backend", ["numpy"])
def test_own_parametrization_wins(bpk_backend, bpk_dtype):
    assert bpk_backend == "numpy"
"""


def test_plugin_in_another_project(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_project=TESTS)
    result = pytester.runpytest_subprocess("-v", "-rs", "-p", "no:cacheprovider")
    output = result.stdout.str()

    ids = set(re.findall(r"::test_backend\[(\S+)\] ", output))
    names = ("cupy", "numba", "numpy", "numpy-twin")
    assert ids == {f"{name}-{dtype}" for name in names for dtype in DTYPES}, output
    result.stdout.fnmatch_lines([
        "*::test_backend[[]cupy-float32[]] SKIPPED*",
        "*::test_backend[[]numpy-twin-float64[]] PASSED*",
        "*::test_own_parametrization_wins[[]float32-numpy[]] PASSED*",
    ])
    result.stdout.fnmatch_lines(['SKIPPED [[]2[]] *backend \'cupy\' needs the package \'cupy\': '
                                 'pip install "bpkernels[[]cuda12[]]"',
                                 "SKIPPED [[]1[]] *backend 'numpy-twin' does not support float32; "
                                 "it supports float64"])
    numba = "numba" in bpkernels.available_backends()
    skipped = 3 + (0 if numba else 2)
    result.assert_outcomes(passed=1 + 8 - skipped + 2, skipped=skipped)
