"""Metrics (issue 19): evaluate(metrics=...) and fit(metrics=...) on every backend and path
(the Numba epoch kernel and the CUDA graph included) equal scikit-learn's functions, weighted
by sample_weight as its sample_weight arguments weigh; bad names are one clear error."""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk
from test_weights import _backend, _paths

skm = pytest.importorskip("sklearn.metrics")

N, FEATURES = 61, 5
CLASS_METRICS = ["accuracy", "f1_macro", "precision_macro", "recall_macro", "top2", "top3"]
# test_weights.py's paths but the Numba epoch kernel's bound: it sums the statistics in the
# loss pass, as the scan does (the bound's weighted training is test_weights.py's), and each
# of its cases would be an epoch kernel compiled for it alone
PATHS = [path for path in _paths() if path != "numba-bound"]


def _data(kind, outputs, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, FEATURES))
    if kind == "labels":  # class 4 of 5 never occurs, and is rarely if ever predicted
        y = rng.integers(0, outputs - 1, N)
        X += 1.0 * np.eye(outputs, FEATURES)[y]
    elif kind == "probs":
        y = rng.dirichlet(np.ones(outputs), N)
    elif kind == "binary":
        y = (X[:, 0] + 0.5 * rng.standard_normal(N) > 0).astype(float)
    else:
        y = X[:, :outputs] @ rng.standard_normal((outputs, outputs)) + 3.0
    return X, y


def _reference(kind, model, X, y, names, w):
    """scikit-learn's value of each metric for the model's outputs on X."""
    Y = np.asarray(model.forward(X), dtype=np.float64)
    if kind == "regression":
        fns = {"r2": skm.r2_score, "mae": skm.mean_absolute_error, "mse": skm.mean_squared_error}
        return {n: fns[n](y, Y, sample_weight=w) for n in names}
    o = Y.shape[1]
    true = y.argmax(1) if kind == "probs" else y.astype(np.int64)
    pred = (Y[:, 0] > 0).astype(np.int64) if o == 1 else Y.argmax(1)
    out = {}
    for n in names:
        if n == "accuracy":
            out[n] = skm.accuracy_score(true, pred, sample_weight=w)
        elif n.startswith("top"):
            out[n] = skm.top_k_accuracy_score(true, Y, k=int(n[3:]), labels=np.arange(o),
                                              sample_weight=w)
        else:
            fn = {"f1_macro": skm.f1_score, "precision_macro": skm.precision_score,
                  "recall_macro": skm.recall_score}[n]
            out[n] = fn(true, pred, average="macro", sample_weight=w, zero_division=0)
    return out


# kind: (loss, outputs, metrics)
KINDS = {
    "labels": ("cross_entropy", 5, CLASS_METRICS),
    "probs": ("cross_entropy", 3, ["accuracy", "f1_macro", "top2"]),
    "binary": ("binary_cross_entropy", 1, ["accuracy", "f1_macro", "precision_macro",
                                           "recall_macro"]),
    "regression": ("mse", 2, ["r2", "mae", "mse"]),
}


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", bpk.available_backends())
def test_evaluate_metrics_equal_sklearn(backend, kind, weighted):
    loss, outputs, names = KINDS[kind]
    X, y = _data(kind, outputs)
    w = np.random.default_rng(5).integers(0, 4, N).astype(float) if weighted else None
    model = bpk.MLP([FEATURES, 8, outputs], activation="tanh", backend=backend,
                    dtype="float64", seed=3)
    bpk.fit(model, X, y, loss=loss, optimizer=bpk.Adam(lr=0.02), epochs=3, batch_size=16)
    got = model.evaluate(X, y, loss, sample_weight=w, metrics=names)
    expected = _reference(kind, model, X, y, names, w)
    for name in names:
        assert got[name] == pytest.approx(expected[name], rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["labels", "binary", "regression"])
def test_fit_records_metrics_over_the_epoch_and_validation(path, kind, monkeypatch):
    """With lr 0 every step sees the initial weights, so the epoch's metrics, accumulated
    over its batches on the device, are the whole training set's; val_ ones evaluate's."""
    loss, outputs, names = KINDS[kind]
    X, y = _data(kind, outputs)
    X_val, y_val = _data(kind, outputs, seed=1)
    w = np.random.default_rng(5).uniform(0, 2, N)
    model = bpk.MLP([FEATURES, 8, outputs], activation="tanh",
                    backend=_backend(path, monkeypatch), dtype="float64", seed=3)
    history = bpk.fit(model, X, y, loss=loss, optimizer=bpk.SGD(lr=0.0), epochs=2,
                      batch_size=16, sample_weight=w, metrics=names,
                      validation_data=(X_val, y_val))
    train = _reference(kind, model, X, y, names, w)
    val = _reference(kind, model, X_val, y_val, names, None)
    for epoch in range(2):
        for name in names:
            assert history[name][epoch] == pytest.approx(train[name], rel=1e-10), name
            assert history[f"val_{name}"][epoch] == pytest.approx(val[name], rel=1e-10), name


def test_metrics_follow_training_as_keras_accumulates():
    """With learning, the record is over the batches as each was trained (the weights
    changing between them), not the model at the epoch's end: the confusion table of each
    batch, taken before its step, summed."""
    loss, outputs, names = KINDS["labels"]
    X, y = _data("labels", outputs)
    model = bpk.MLP([FEATURES, 8, outputs], activation="tanh", dtype="float64", seed=3)
    start = bpk.MLP([FEATURES, 8, outputs], activation="tanh", dtype="float64", seed=3)
    history = bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.5), epochs=1, batch_size=16,
                      shuffle=False, metrics=["f1_macro"])
    preds = []
    for s in range(0, N, 16):
        preds.append(start.predict(X[s:s + 16]))
        bpk.fit(start, X[s:s + 16], y[s:s + 16], optimizer=bpk.SGD(lr=0.5), epochs=1,
                batch_size=16, shuffle=False)
    expected = skm.f1_score(y, np.concatenate(preds), average="macro", zero_division=0)
    assert history["f1_macro"][0] == pytest.approx(expected, rel=1e-12)


BAD = [
    (["f1_micro"], ValueError, r"metrics: unknown metric 'f1_micro'"),
    (["r2"], ValueError, r"metrics: 'r2' compares outputs with targets: it needs the mse loss"),
    (["top0"], ValueError, r"metrics: unknown metric 'top0'"),
    (["accuracy", "accuracy"], ValueError, r"metrics: each metric once"),
    ([3], TypeError, r"metrics must be names"),
]


@pytest.mark.parametrize("metrics, error, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_metrics_are_one_clear_error(metrics, error, message):
    X, y = np.random.default_rng(0).standard_normal((12, 4)), np.arange(12) % 3
    model = bpk.MLP([4, 3], dtype="float64")
    with pytest.raises(error, match=message):
        bpk.fit(model, X, y, epochs=1, metrics=metrics)
    with pytest.raises(error, match=message):
        model.evaluate(X, y, "cross_entropy", metrics=metrics)
    assert model.epochs_trained == 0


def test_class_metrics_need_classes():
    X = np.random.default_rng(0).standard_normal((6, 4))
    model = bpk.MLP([4, 2], dtype="float64")
    with pytest.raises(ValueError, match="'f1_macro' needs class labels"):
        model.evaluate(X, X[:, :2], "mse", metrics=["f1_macro"])
    with pytest.raises(ValueError, match="'top2' ranks the classes' scores"):
        bpk.fit(bpk.MLP([4, 1]), X, X[:, 0] > 0, loss="binary_cross_entropy", metrics=["top2"])


def test_early_stopping_maximises_a_val_metric():
    X, y = _data("labels", 5)
    X_val, y_val = _data("labels", 5, seed=1)
    model = bpk.MLP([FEATURES, 8, 5], activation="tanh", dtype="float64", seed=3)
    stop = bpk.EarlyStopping(monitor="val_f1_macro", patience=2)
    history = bpk.fit(model, X, y, optimizer=bpk.Adam(lr=0.05), epochs=30, batch_size=16,
                      metrics=["f1_macro"], validation_data=(X_val, y_val), callbacks=[stop])
    column = history["val_f1_macro"]
    assert history.best_epoch == history["epoch"][int(np.argmax(column))]


@pytest.mark.parametrize("path", PATHS)
def test_float32_models_sum_statistics_in_float64(path, monkeypatch):
    """A float32 model's statistics are summed in float64 (a float32 count stops growing at
    2**24): the metrics are scikit-learn's on its float32 outputs, to float64's rounding."""
    loss, outputs, names = KINDS["labels"]
    X, y = _data("labels", outputs)
    w = np.random.default_rng(5).uniform(0, 2, N).astype(np.float32).astype(np.float64)
    model = bpk.MLP([FEATURES, 8, outputs], activation="tanh",
                    backend=_backend(path, monkeypatch), dtype="float32", seed=3)
    history = bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.0), epochs=1, batch_size=16,
                      sample_weight=w, metrics=names)
    expected = _reference("labels", model, X, y, names, w)
    got = model.evaluate(X, y, loss, sample_weight=w, metrics=names)
    for name in names:
        # (accuracy is count_correct's, whose per-step slots hold the model's dtype)
        rel = 1e-6 if name == "accuracy" else 1e-12
        assert history[name][0] == pytest.approx(expected[name], rel=rel), name
        assert got[name] == pytest.approx(expected[name], rel=rel), name
