"""Numbers given as NumPy scalars are numbers (issue 18 item 14): every hyper-parameter of every
optimizer, of fit, of MLP and of the scikit-learn estimators takes np.float32, np.float64,
np.int64 and np.int32 values where such a value is allowed, and gives what the same value as a
Python number gives. A bool is not a number, a set has no order, and error messages show
numbers as numbers (``y[2, 0]``, never ``y[np.int64(2), np.int64(0)]``)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import bpkernels as bpk

FLOATS = (np.float32, np.float64)
INTS = (np.int64, np.int32)
OPTIMIZERS = (bpk.SGD, bpk.Adam, bpk.AdamW, bpk.RMSprop)


def _data(n=24, features=3, classes=3):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


def _numeric_hyperparameters(cls):
    """(name, default) of each number an optimizer takes (bools and betas apart)."""
    return [(p.name, p.default) for p in inspect.signature(cls).parameters.values()
            if type(p.default) in (int, float)]


def _optimizer_cases():
    for cls in OPTIMIZERS:
        for name, default in _numeric_hyperparameters(cls):
            # every one of these allows 0.5 and 1 (momentum, dampening and alpha included)
            for kind in FLOATS:
                yield cls, name, kind(0.5)
            for kind in INTS:
                yield cls, name, kind(1)
        if "betas" in inspect.signature(cls).parameters:
            for kind in FLOATS + INTS:
                yield cls, "betas", (kind(0.5), kind(0))
                yield cls, "betas", np.array([0.5, 0], dtype=kind)


@pytest.mark.parametrize("cls, name, value", list(_optimizer_cases()),
                         ids=lambda v: getattr(v, "__name__", None) or repr(v))
def test_every_optimizer_hyperparameter_takes_numpy_scalars(cls, name, value):
    as_python = [float(v) for v in value] if name == "betas" else float(value)
    given, reference = cls(**{name: value}), cls(**{name: as_python})
    assert given.hyperparameters() == reference.hyperparameters()
    for attribute, stored in vars(given).items():  # stored as Python numbers, never NumPy's
        assert not isinstance(stored, np.generic), f"{attribute} kept {type(stored).__name__}"
    # and it trains as the Python number does
    X, y = _data()
    runs = [bpk.fit(bpk.MLP([3, 4, 3], dtype="float64", seed=1), X, y, optimizer=opt,
                    epochs=2, batch_size=8, progress=False)["loss"] for opt in (given, reference)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kind", INTS)
def test_fit_and_mlp_take_numpy_integers(kind):
    X, y = _data()
    runs = []
    for cast in (int, kind):
        model = bpk.MLP([cast(3), cast(4), cast(3)], dtype="float64", seed=cast(2))
        history = bpk.fit(model, X, y, optimizer="sgd", epochs=cast(2), batch_size=cast(5),
                          seed=cast(3), threads=cast(1), shuffle=np.bool_(True),
                          progress=np.bool_(False))
        runs.append((model.sizes, model.seed, history["loss"], model.get_weights()[0][0]))
    assert runs[0][:3] == runs[1][:3]
    assert np.array_equal(runs[0][3], runs[1][3])


@pytest.mark.parametrize("kind", FLOATS)
@pytest.mark.parametrize("name", ["epochs", "batch_size", "seed", "threads"])
def test_fit_refuses_a_float_where_a_count_is_expected(name, kind):
    X, y = _data()
    with pytest.raises(TypeError, match=f"{name} must be an integer, got {kind.__name__}"):
        bpk.fit(bpk.MLP([3, 3]), X, y, **{name: kind(2)})


@pytest.mark.parametrize("call, exc, match", [
    (lambda: bpk.Adam(lr=True), TypeError, r"lr must be a number, got a bool \(True\)"),
    (lambda: bpk.SGD(momentum=np.True_), TypeError, r"momentum must be a number, got a bool"),
    (lambda: bpk.RMSprop(eps=False), TypeError, r"eps must be a number, got a bool"),
    (lambda: bpk.Adam(betas=(True, 0.9)), TypeError, r"betas\[0\] must be a number"),
    (lambda: bpk.SGD(lr=0.1, momentum=0.9, nesterov="yes"), TypeError,
     r"nesterov must be True or False, got 'yes'"),
    (lambda: bpk.RMSprop(centered=1), TypeError, r"centered must be True or False, got 1"),
    (lambda: bpk.Adam(betas={0.9, 0.999}), TypeError, r"betas must be a pair .* got set"),
    (lambda: bpk.Adam(betas=(0.9,)), ValueError, r"betas must be a pair \(beta1, beta2\), got 1"),
    (lambda: bpk.MLP([3, True]), ValueError, r"layer widths must be positive integers, got \[3, True\]"),
    (lambda: bpk.MLP([3, np.int64(-1)]), ValueError, r"got \[3, -1\]$"),
    (lambda: bpk.MLP({3, 4, 10}), TypeError, r"sizes must be a list or tuple .* got set \(unordered\)"),
    (lambda: bpk.MLP({3: 0, 2: 0}), TypeError, r"sizes must be .* got dict \(unordered\)"),
    (lambda: bpk.MLP(s for s in (3, 2)), TypeError, r"sizes must be .* got generator"),
    (lambda: bpk.MLP([3, 4, 2], activation=None), TypeError,
     r"activation must be a name like 'relu' or a list of names, one per hidden layer, got NoneType"),
    (lambda: bpk.MLP([3, 4, 4, 2], activation={"relu", "tanh"}), TypeError,
     r"activation must be .* got set \(unordered\)"),
])
def test_bools_unordered_collections_and_none_get_one_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("name, value", [("shuffle", "no"), ("shuffle", 0), ("progress", None)])
def test_fit_flags_must_be_bools(name, value):
    X, y = _data()
    with pytest.raises(TypeError, match=f"{name} must be True or False, got {value!r}"):
        bpk.fit(bpk.MLP([3, 3]), X, y, **{name: value})


def test_relatives_of_the_same_mistakes_elsewhere():
    from bpkernels import datasets
    X, y = _data()
    model = bpk.MLP([3, 3])
    with pytest.raises(TypeError, match=r"callbacks must be a list .* got set \(unordered\)"):
        bpk.fit(model, X, y, callbacks={print})
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got True"):
        datasets.make_classification(10, 3, seed=True)
    with pytest.raises(TypeError, match=r"noise must be a number, got str"):
        datasets.make_regression(10, 3, noise="0.1")
    with pytest.raises(TypeError, match=r"thread count must be an integer >= 1, got 2.0$"):
        bpk.set_num_threads(np.float64(2))
    prepared = model.prepare(X, y, "cross_entropy")
    with bpk.EpochLoop(model, *prepared, loss="cross_entropy", optimizer=bpk.SGD(),
                       batch_size=8) as loop:
        with pytest.raises(TypeError, match=r"shuffle must be True or False, got 'no'"):
            loop.epoch(shuffle="no")
        with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
            loop.epoch(seed=-1)
        assert loop.epoch(shuffle=np.True_, seed=np.int32(3))["epoch"] == 1


def test_error_messages_show_indices_as_plain_numbers():
    model = bpk.MLP([3, 1])
    y = np.array([[0.0], [1.0], [2.0]])
    with pytest.raises(ValueError) as info:
        bpk.fit(model, np.zeros((3, 3)), y, loss="binary_cross_entropy")
    assert str(info.value) == "binary_cross_entropy targets must lie in [0, 1]; y[2, 0] = 2.0"


# ------------------------------------------------------------------------ scikit-learn
def estimator(name: str):
    """MLPClassifier or MLPRegressor, or a skip where scikit-learn is missing."""
    pytest.importorskip("sklearn", reason='bpkernels.sklearn needs "bpkernels[sklearn]"')
    from bpkernels import sklearn
    return getattr(sklearn, name)


# Each numeric parameter, a value it allows, and whether floats are allowed for it.
ESTIMATOR_NUMBERS = [("learning_rate", 1, True), ("learning_rate_init", 1, True),
                     ("power_t", 1, True), ("weight_decay", 1, True), ("tol", 1, True),
                     ("validation_fraction", 0.5, True), ("batch_size", 5, False),
                     ("max_iter", 2, False), ("n_iter_no_change", 1, False),
                     ("random_state", 4, False), ("threads", 1, False), ("verbose", 0, False)]


def _estimator_cases():
    for cls in ("MLPClassifier", "MLPRegressor"):
        for name, value, real in ESTIMATOR_NUMBERS:
            kinds = (FLOATS if real else ()) + (INTS if value == int(value) else ())
            for kind in kinds:
                yield cls, name, kind(value)
        for kind in INTS:
            yield cls, "hidden_layer_sizes", (kind(4), kind(2))
            yield cls, "hidden_layer_sizes", kind(4)


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")  # scikit-learn's ConvergenceWarning
@pytest.mark.parametrize("cls, name, value", list(_estimator_cases()),
                         ids=lambda v: getattr(v, "__name__", None) or repr(v))
def test_estimators_take_numpy_scalars(cls, name, value):
    cls, (X, y) = estimator(cls), _data(40)
    base = dict(hidden_layer_sizes=(4,), max_iter=2, backend="numpy", dtype="float64",
                random_state=0, early_stopping=name == "validation_fraction")
    python = [int(v) for v in value] if isinstance(value, tuple) else value.item()
    fitted = [cls(**{**base, name: v}).fit(X, y) for v in (value, python)]
    assert fitted[0].loss_curve_ == fitted[1].loss_curve_
    assert np.array_equal(fitted[0].predict(X), fitted[1].predict(X))


@pytest.mark.parametrize("params, exc, match", [
    ({"hidden_layer_sizes": {4, 2}}, TypeError, r"hidden_layer_sizes must be .* got set \(unordered\)"),
    ({"hidden_layer_sizes": (s for s in (4,))}, TypeError, r"hidden_layer_sizes must be .* got generator"),
    ({"hidden_layer_sizes": (4, np.int64(0))}, ValueError, r"got \(4, 0\)$"),
    ({"learning_rate": np.True_}, TypeError, r"learning_rate must be .*a number, got bool"),
    ({"learning_rate_init": np.True_}, TypeError, r"learning_rate_init must be a number, got bool"),
    ({"max_iter": np.float64(2)}, TypeError, r"max_iter must be an integer >= 1, got 2.0$"),
])
def test_estimator_parameters_get_one_clear_error(params, exc, match):
    X, y = _data(40)
    with pytest.raises(exc, match=match):
        estimator("MLPClassifier")(**{"max_iter": 1, "backend": "numpy", **params}).fit(X, y)
