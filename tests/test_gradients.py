"""Model-level gradients: MLP.loss_and_grads against central finite differences (float64, by
bpkernels.testing.check_gradients), against small examples worked by hand, and against the float64
reference MLP of tests/reference.py.
Every test runs on every registered backend (skipped, with the reason, where one cannot run).
"""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels
import reference as ref
from bpkernels.backends.base import ACTIVATIONS
from bpkernels.testing import check_gradients

# (loss, output width k, target kind). k = 1 BCE takes (n,) 0/1 targets, as a binary classifier.
LOSS_CASES = [("mse", 3, "values"), ("cross_entropy", 3, "labels"),
              ("cross_entropy", 3, "probs"), ("binary_cross_entropy", 2, "soft"),
              ("binary_cross_entropy", 1, "binary")]
LOSS_IDS = [f"{loss}-k{k}-{kind}" for loss, k, kind in LOSS_CASES]
N_ROWS = 8
# Hidden pre-activations are kept at least this far from 0 (relu, leaky_relu kinks): a
# finite-difference step (h = 1e-6) moves a pre-activation by at most h * max|input| ~ 1e-5.
MARGIN = 1e-3


def targets(kind, n, k, rng):
    if kind == "values":
        return rng.standard_normal((n, k))
    if kind == "labels":
        return np.arange(n) % k  # every class present
    if kind == "probs":
        return rng.dirichlet(np.ones(k), n)
    if kind == "soft":
        return rng.uniform(0, 1, (n, k))
    return (np.arange(n) % 2).astype(float)  # "binary", shape (n,)


def problem(act, k, kind, seed=0):
    """Random weights (with non-zero biases), inputs and targets for MLP([5, 7, 6, k]), drawn
    again until every hidden pre-activation is at least MARGIN away from 0."""
    sizes = [5, 7, 6, k]
    for attempt in range(100):
        rng = np.random.default_rng([seed, k, attempt])
        weights = [(rng.standard_normal((i, o)) / np.sqrt(i), rng.uniform(-0.5, 0.5, o))
                   for i, o in zip(sizes[:-1], sizes[1:])]
        X = rng.standard_normal((N_ROWS, 5))
        layers = ref.mlp_forward(weights, X, [act, act, "identity"])
        if min(np.abs(Z).min() for Z, _ in layers[:-1]) > MARGIN:
            return sizes, weights, X, targets(kind, N_ROWS, k, rng)
    raise AssertionError("no draw kept the pre-activations away from 0")


def reference_targets(y, k):
    """y as the reference takes it: int labels (n,) or rows (n, k)."""
    y = np.asarray(y)
    return y.reshape(-1, 1) if (y.ndim == 1 and y.dtype.kind == "f") else y


# ====================================================================== finite differences
@pytest.mark.parametrize("loss, k, kind", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradients_match_finite_differences(backend_name, act, loss, k, kind):
    sizes, weights, X, y = problem(act, k, kind)
    model = bpkernels.MLP(sizes, activation=act, dtype="float64", backend=backend_name)
    model.set_weights(weights)

    value, _ = model.loss_and_grads(X, y, loss)
    assert np.isfinite(value) and value > 0
    # Central differences in float64 with h = 1e-6, every entry within rtol 1e-6 / atol 1e-8
    # (the defaults; why they catch any wrong factor or missing term: bpkernels.testing).
    check_gradients(model, X, y, loss)
    for (W, b), (W0, b0) in zip(model.get_weights(), weights):  # left as it was found
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


# ====================================================================== worked by hand
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_single_layer_mse_by_hand(backend_name, dtype):
    """MLP([2, 2]), one row; every number is a binary fraction, so both dtypes are exact.
    x = [1, 2], W = [[0.5, -1], [0.25, 1]], b = [0.25, -0.5], t = [1, 1]
    z = x W + b = [0.5 + 0.5 + 0.25, -1 + 2 - 0.5] = [1.25, 0.5]
    loss = ((1.25 - 1)^2 + (0.5 - 1)^2) / 2 = (0.0625 + 0.25) / 2 = 0.15625
    dz = 2 (z - t) / 2 = [0.25, -0.5]; dW = x^T dz = [[0.25, -0.5], [0.5, -1]]; db = dz."""
    model = bpkernels.MLP([2, 2], dtype=dtype, backend=backend_name)
    model.set_weights([(np.array([[0.5, -1.0], [0.25, 1.0]]), np.array([0.25, -0.5]))])
    X, t = np.array([[1.0, 2.0]]), np.array([[1.0, 1.0]])

    np.testing.assert_array_equal(model.forward(X), [[1.25, 0.5]])
    value, [(dW, db)] = model.loss_and_grads(X, t, "mse")
    assert value == 0.15625
    np.testing.assert_array_equal(dW, [[0.25, -0.5], [0.5, -1.0]])
    np.testing.assert_array_equal(db, [0.25, -0.5])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_two_layer_relu_mse_by_hand(backend_name, dtype):
    """MLP([2, 2, 1], relu), one row, integers throughout.
    x = [1, 2], W1 = [[1, -1], [1, 1]], b1 = [0, -4]: z1 = [3, -3], a1 = relu(z1) = [3, 0]
    W2 = [[2], [5]], b2 = [1]: y = 3*2 + 0*5 + 1 = 7; t = 5: loss = (7 - 5)^2 = 4
    dy = 2 (7 - 5) = 4: dW2 = a1^T dy = [[12], [0]], db2 = [4]
    da1 = dy W2^T = [8, 20]; dz1 = da1 * relu'(z1) = [8, 0]
    dW1 = x^T dz1 = [[8, 0], [16, 0]], db1 = [8, 0]."""
    model = bpkernels.MLP([2, 2, 1], activation="relu", dtype=dtype, backend=backend_name)
    model.set_weights([(np.array([[1.0, -1.0], [1.0, 1.0]]), np.array([0.0, -4.0])),
                       (np.array([[2.0], [5.0]]), np.array([1.0]))])
    X = np.array([[1.0, 2.0]])

    np.testing.assert_array_equal(model.forward(X), [[7.0]])
    value, [(dW1, db1), (dW2, db2)] = model.loss_and_grads(X, np.array([[5.0]]), "mse")
    assert value == 4.0
    np.testing.assert_array_equal(dW2, [[12.0], [0.0]])
    np.testing.assert_array_equal(db2, [4.0])
    np.testing.assert_array_equal(dW1, [[8.0, 0.0], [16.0, 0.0]])
    np.testing.assert_array_equal(db1, [8.0, 0.0])


def test_cross_entropies_by_hand(backend_name):
    """Zero weights give zero logits.
    cross_entropy, 2 classes, label 0: softmax = [1/2, 1/2], loss = log 2,
        dlogits = [1/2 - 1, 1/2] = [-1/2, 1/2], dW = x^T dlogits with x = [3]: [[-1.5, 1.5]].
    binary_cross_entropy, 1 output, target 1: sigmoid(0) = 1/2, loss = log 2,
        dlogit = 1/2 - 1 = -1/2, dW = [[-1.5]]."""
    X = np.array([[3.0]])
    ce = bpkernels.MLP([1, 2], dtype="float64", backend=backend_name)
    ce.set_weights([(np.zeros((1, 2)), np.zeros(2))])
    value, [(dW, db)] = ce.loss_and_grads(X, np.array([0]), "cross_entropy")
    assert value == pytest.approx(np.log(2), rel=1e-15)
    np.testing.assert_allclose(dW, [[-1.5, 1.5]], rtol=1e-15)
    np.testing.assert_allclose(db, [-0.5, 0.5], rtol=1e-15)

    bce = bpkernels.MLP([1, 1], dtype="float64", backend=backend_name)
    bce.set_weights([(np.zeros((1, 1)), np.zeros(1))])
    value, [(dW, db)] = bce.loss_and_grads(X, np.array([1.0]), "binary_cross_entropy")
    assert value == pytest.approx(np.log(2), rel=1e-15)
    np.testing.assert_allclose(dW, [[-1.5]], rtol=1e-15)
    np.testing.assert_allclose(db, [-0.5], rtol=1e-15)


# ====================================================================== reference MLP
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss, k, kind", LOSS_CASES, ids=LOSS_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_loss_and_grads_match_reference_mlp(backend_name, tolerances, act, loss, k, kind, dtype):
    """The model against the float64 reference MLP on the same (dtype-rounded) weights and
    inputs, to the dtype's tolerance: float32 models are judged against float64 arithmetic."""
    sizes, weights, X, y = problem(act, k, kind, seed=1)
    round_ = lambda a: np.asarray(a, dtype).astype(np.float64)  # noqa: E731
    weights = [(round_(W), round_(b)) for W, b in weights]
    X = round_(X)
    if kind != "labels":
        y = round_(y)
    model = bpkernels.MLP(sizes, activation=act, dtype=dtype, backend=backend_name)
    model.set_weights(weights)

    value, grads = model.loss_and_grads(X, y, loss)
    value_ref, grads_ref = ref.mlp_loss_and_grads(weights, X, reference_targets(y, k),
                                                  [act, act, "identity"], loss)

    tol = tolerances[dtype]
    close = dict(rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_allclose(value, value_ref, **close, err_msg="loss")
    for layer, ((dW, db), (rW, rb)) in enumerate(zip(grads, grads_ref)):
        assert dW.dtype == np.dtype(dtype) and dW.shape == rW.shape
        np.testing.assert_allclose(dW, rW, **close, err_msg=f"layer {layer} dW")
        np.testing.assert_allclose(db, rb, **close, err_msg=f"layer {layer} db")


def test_loss_and_grads_is_repeatable(backend_name):
    """The workspace is reused between calls: a second call, after one of another batch size,
    returns the same numbers (gradients are overwritten, not accumulated)."""
    sizes, weights, X, y = problem("tanh", 3, "labels")
    model = bpkernels.MLP(sizes, activation="tanh", dtype="float64", backend=backend_name)
    model.set_weights(weights)
    first = model.loss_and_grads(X, y, "cross_entropy")
    model.loss_and_grads(X[:3], y[:3], "cross_entropy")
    again = model.loss_and_grads(X, y, "cross_entropy")
    assert first[0] == again[0]
    for (a, b), (c, d) in zip(first[1], again[1]):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
