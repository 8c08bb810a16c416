"""Every user mistake gets one clear exception, and nothing is lost."""
import subprocess
import sys

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels.backends import register
from bpkernels.backends.numpy_backend import NumpyBackend


def _data(n=12):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3)), rng.integers(0, 2, n)


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "tpu"}, r"unknown backend 'tpu'; valid backends: auto, .*numpy"),
    ({"activation": "swish"}, r"unknown activation 'swish'; valid activations: identity, relu"),
    ({"activation": ["relu"]}, r"1 names but the model has 2 hidden layers"),
    ({"dtype": "float16"}, r"unsupported dtype 'float16'; valid dtypes: float32, float64"),
    ({"dtype": "int32"}, r"valid dtypes"),
    ({"seed": -1}, r"seed must be a non-negative integer"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bpk.MLP([3, 4, 4, 2], **kwargs)


def test_an_unknown_activation_is_refused_without_hidden_layers_too():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'"):
        bpk.MLP([3, 2], activation="swish")


@pytest.mark.parametrize("sizes", [[3], [3, 0, 2], [3, -1], [3, 2.5]])
def test_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes|widths"):
        bpk.MLP(sizes)


def test_sizes_must_be_a_list():
    with pytest.raises(TypeError, match="sizes must be a list"):
        bpk.MLP("64,10")


def test_uninstalled_backend_names_the_extra(monkeypatch):
    from bpkernels import backends
    monkeypatch.setitem(backends._REGISTRY, "fake", ("no_such_package", "X", "fakeextra"))
    monkeypatch.delitem(backends._unavailable, "fake", raising=False)
    with pytest.raises(bpk.BackendUnavailable, match=r'pip install "bpkernels\[fakeextra\]"') as info:
        bpk.MLP([2, 2], backend="fake")
    assert isinstance(info.value, ImportError)
    assert "fake" in backends.unavailable_reasons()
    assert "fake" not in bpk.available_backends()


def test_register_a_backend():
    class Renamed(NumpyBackend):
        name = "numpy-renamed"
    register("numpy-renamed", Renamed)
    assert bpk.MLP([2, 2], backend="numpy-renamed").backend.name == "numpy-renamed"
    with pytest.raises(TypeError, match="must subclass"):
        register("bad", object)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"loss": "hinge"}, ValueError, r"unknown loss 'hinge'; valid losses: mse, cross_entropy"),
    ({"optimizer": "lbfgs"}, ValueError, r"unknown optimizer 'lbfgs'; valid optimizers: sgd, adam"),
    ({"optimizer": 3}, TypeError, r"optimizer must be a name or an Optimizer"),
    ({"batch_size": 0}, ValueError, r"batch_size must be >= 1, got 0"),
    ({"batch_size": 2.5}, TypeError, r"batch_size must be an integer"),
    ({"epochs": -1}, ValueError, r"epochs must be >= 0, got -1"),
    ({"callbacks": [3]}, TypeError, r"callbacks must be callables"),
    ({"validation_data": (np.zeros((2, 3)),)}, ValueError, r"validation_data must be a pair"),
    ({"validation_data": (np.zeros((2, 4)), np.zeros(2))}, ValueError, r"4 features per row .* expects 3"),
])
def test_bad_fit_arguments(kwargs, exc, match):
    X, y = _data()
    model = bpk.MLP([3, 2])
    before = model.get_weights()
    with pytest.raises(exc, match=match):
        bpk.fit(model, X, y, **kwargs)
    for (W, b), (W2, b2) in zip(before, model.get_weights()):
        np.testing.assert_array_equal(W, W2)
    assert model.epochs_trained == 0


@pytest.mark.parametrize("X, y, match", [
    (np.zeros((0, 3)), np.zeros(0, int), r"X is empty"),
    (np.zeros((4, 5)), np.zeros(4, int), r"X has 5 features per row but the model expects 3"),
    (np.zeros(3), np.zeros(1, int), r"X must be 2-D"),
    (np.zeros((4, 3)), np.zeros(5, int), r"y has 5 rows but X has 4"),
    (np.array([[0, 0, 0], [0, np.nan, 0]]), np.zeros(2, int), r"X contains nan at index \[1, 1\]"),
    (np.array([[0, 0, 0], [0, np.inf, 0]]), np.zeros(2, int), r"X contains inf"),
    (np.zeros((3, 3)), np.array([0.0, np.nan, 1.0]), r"y contains nan at index 1"),
    (np.zeros((3, 3)), np.array([0, 2, 1]), r"labels must lie in 0..1 .* y\[1\] = 2"),
    (np.zeros((3, 3)), np.array([0, -1, 1]), r"labels must lie in 0..1"),
    (np.zeros((3, 3)), np.array([0, 0.5, 1]), r"labels must be integers .* y\[1\] = 0.5"),
    (np.zeros((3, 3)), np.zeros((3, 3)), r"y for cross_entropy must have shape \(3,\) labels or \(3, 2\)"),
])
def test_bad_data(X, y, match):
    model = bpk.MLP([3, 2])
    with pytest.raises(ValueError, match=match):
        bpk.fit(model, X, y)
    with pytest.raises(ValueError, match=match):
        model.loss_and_grads(X, y, "cross_entropy")


def test_non_numeric_data():
    model = bpk.MLP([3, 2])
    with pytest.raises(TypeError, match="X must hold numbers"):
        model.forward(np.array([["a", "b", "c"]]))
    with pytest.raises(TypeError, match="y must hold numbers"):
        bpk.fit(model, np.zeros((1, 3)), np.array(["cat"]))


def test_loss_specific_targets():
    one = bpk.MLP([3, 1])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        bpk.fit(one, np.zeros((2, 3)), np.array([0.0, 2.0]), loss="binary_cross_entropy")
    with pytest.raises(ValueError, match="cross_entropy needs at least 2 outputs"):
        bpk.fit(one, np.zeros((2, 3)), np.array([0, 0]), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"y for mse must have shape \(2, 2\)"):
        bpk.fit(bpk.MLP([3, 2]), np.zeros((2, 3)), np.zeros(2), loss="mse")


def test_set_weights_validates_everything_before_writing():
    model = bpk.MLP([3, 4, 2], seed=0)
    before = model.get_weights()
    good = [(W + 1, b + 1) for W, b in before]
    cases = [
        ([good[0]], ValueError, "list of 2"),
        ([good[0], (good[1][0].T, good[1][1])], ValueError, r"layer 1 W must have shape \(4, 2\), got \(2, 4\)"),
        ([good[0], (good[1][0], np.zeros(3))], ValueError, r"layer 1 b must have shape \(2,\)"),
        ([good[0], (good[1][0].astype(int), good[1][1])], TypeError, "must be a float array"),
        ([good[0], (good[1][0] * np.nan, good[1][1])], ValueError, "NaN or inf"),
        ([good[0], good[1][0]], ValueError, "expected a \\(W, b\\) pair"),
    ]
    for weights, exc, match in cases:
        with pytest.raises(exc, match=match):
            model.set_weights(weights)
        for (W, b), (W2, b2) in zip(before, model.get_weights()):
            np.testing.assert_array_equal(W, W2)  # layer 0 was valid but was not written
    model.set_weights(good)
    np.testing.assert_allclose(model.get_weights()[1][0], before[1][0] + 1, rtol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: bpk.SGD(lr=-1), r"lr must lie in"),
    (lambda: bpk.SGD(lr=0.1, nesterov=True), r"nesterov momentum requires momentum > 0"),
    (lambda: bpk.Adam(betas=(0.9, 1.0)), r"betas\[1\] must lie in \[0.0, 1.0\)"),
    (lambda: bpk.RMSprop(alpha=1.5), r"alpha must lie in"),
    (lambda: bpk.AdamW(eps=float("nan")), r"eps must be finite"),
])
def test_bad_optimizer_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_one_optimizer_per_model():
    X, y = _data()
    opt = bpk.Adam()
    first = bpk.MLP([3, 2])
    bpk.fit(first, X, y, optimizer=opt, epochs=1)
    with pytest.raises(ValueError, match="already bound to another model"):
        bpk.fit(bpk.MLP([3, 2]), X, y, optimizer=opt, epochs=1)
    del first  # once its model is gone, an optimizer may serve another (ids are not reused)
    bpk.fit(bpk.MLP([3, 2]), X, y, optimizer=opt, epochs=1)


def test_import_needs_no_optional_dependency():
    # Optional packages must be imported lazily: importing bpkernels pulls in none of them.
    code = ("import sys, bpkernels, bpkernels.datasets, bpkernels.cli; "
            "heavy = {'sklearn', 'tqdm', 'numba', 'cupy', 'matplotlib', 'scipy', 'torch', 'rich'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_broken_backend_module_is_reported_as_is(monkeypatch):
    # A module of our own that fails to import is a bug or a broken library, not a missing extra.
    from bpkernels import backends
    monkeypatch.setitem(backends._REGISTRY, "broken", (".no_such_module", "X", "someextra"))
    monkeypatch.setattr(backends, "_unavailable", {})
    with pytest.raises(bpk.BackendUnavailable, match="failed to import") as info:
        bpk.get_backend("broken")
    assert "pip install" not in str(info.value)


def test_auto_with_no_backend_says_why(monkeypatch):
    from bpkernels import backends
    monkeypatch.setattr(backends, "_REGISTRY", {"gone": ("no_such_package", "X", "gone")})
    monkeypatch.setattr(backends, "_instances", {})
    monkeypatch.setattr(backends, "_unavailable", {})
    with pytest.raises(bpk.BackendUnavailable, match=r"no backend can run here: .*bpkernels\[gone\]"):
        bpk.get_backend("auto")
