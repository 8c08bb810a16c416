"""Validation weights (issue 19): fit(validation_data=(X_val, y_val, sample_weight_val)) on every
backend weighs val_loss and every val_ metric as model.evaluate(..., sample_weight=) does: the
loss equals a float64 NumPy sum(w_i l_i) / sum(w_i) over the model's outputs at each epoch's end,
the metrics scikit-learn's with sample_weight; class_weight never weighs the validation rows; the
pair keeps its numbers; bad weights or shapes are one clear error naming validation_data."""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk

N, N_VAL, FEATURES, EPOCHS = 48, 37, 5, 3


@pytest.fixture(autouse=True)
def _numba_trains_kernel_by_kernel(monkeypatch):
    """The val_ records come from evaluate after each epoch, whatever trained the model: the
    Numba backend trains here by its per-kernel methods (Backend.train_epoch's loop), not by an
    epoch kernel compiled afresh for each combination of weights, metrics, target kind and dtype
    (~10 s each, most of this file's time). The fused kernels' weights and metrics are tested
    against PyTorch and scikit-learn in test_weights.py and test_metrics.py."""
    try:
        from bpkernels.backends.numba.backend import NumbaBackend
    except ImportError:  # no Numba here: nothing to route
        return
    from bpkernels.backends.base import Backend
    monkeypatch.setattr(NumbaBackend, "train_epoch", Backend.train_epoch)


# kind: (loss, outputs, metrics, class_weight given to fit)
KINDS = {
    "labels": ("cross_entropy", 4, ["f1_macro"], {0: 4.0, 1: 0.25}),
    "binary": ("binary_cross_entropy", 1, ["f1_macro"], {0: 3.0}),
    "regression": ("mse", 2, ["r2", "mae"], None),
}


def _data(kind, n, seed):
    outputs = KINDS[kind][1]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, FEATURES))
    if kind == "labels":
        y = rng.integers(0, outputs, n)
        X += np.eye(outputs, FEATURES)[y]
    elif kind == "binary":
        y = (X[:, 0] + 0.5 * rng.standard_normal(n) > 0).astype(float)
    else:
        y = X[:, :outputs] @ rng.standard_normal((outputs, outputs)) + 1.0
    return X, y


def _val_weights(n=N_VAL):
    # Quarters: exact in float32 too, so both dtypes weigh by the same numbers; some rows 0.
    w = np.random.default_rng(7).integers(0, 12, n) / 4.0
    w[:3] = 0.0
    return w


def _loss(loss, Y, y, w):
    """The weighted mean loss, sum(w_i l_i) / sum(w_i), in float64, written for clarity."""
    Y = np.asarray(Y, dtype=np.float64)
    if loss == "cross_entropy":
        top = Y.max(axis=1)
        logsumexp = top + np.log(np.exp(Y - top[:, None]).sum(axis=1))
        rows = logsumexp - Y[np.arange(len(y)), y.astype(np.int64)]
    elif loss == "binary_cross_entropy":
        T = y.reshape(Y.shape)
        rows = (np.maximum(Y, 0) - Y * T + np.log1p(np.exp(-np.abs(Y)))).mean(axis=1)
    else:
        rows = ((Y - y.reshape(Y.shape)) ** 2).mean(axis=1)
    return float(np.sum(w * rows) / np.sum(w))


def _metrics(kind, Y, y, names, w):
    """scikit-learn's value of each metric (and of accuracy for classifiers)."""
    skm = pytest.importorskip("sklearn.metrics")
    Y = np.asarray(Y, dtype=np.float64)
    if kind == "regression":
        fns = {"r2": skm.r2_score, "mae": skm.mean_absolute_error}
        return {n: fns[n](y, Y, sample_weight=w) for n in names}
    pred = (Y[:, 0] > 0).astype(np.int64) if Y.shape[1] == 1 else Y.argmax(axis=1)
    true = y.astype(np.int64)
    return {"accuracy": skm.accuracy_score(true, pred, sample_weight=w),
            "f1_macro": skm.f1_score(true, pred, average="macro", sample_weight=w,
                                     zero_division=0)}


def _model(backend, kind, dtype="float64"):
    return bpk.MLP([FEATURES, 8, KINDS[kind][1]], activation="tanh", backend=backend,
                   dtype=dtype, seed=3)


def _fit(model, kind, validation_data, epochs=EPOCHS, **kwargs):
    loss, _, names, _ = KINDS[kind]
    X, y = _data(kind, N, seed=0)
    return bpk.fit(model, X, y, loss=loss, optimizer=bpk.Adam(lr=0.05), epochs=epochs,
                   batch_size=16, metrics=names, validation_data=validation_data, **kwargs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_val_records_are_weighted_by_the_triple(bpk_backend, bpk_dtype, bpk_tolerance, kind):
    """Each epoch's val_ records equal the references on the model's outputs at that epoch's
    end (captured by a callback, which runs after the epoch's validation), although fit's
    class_weight weighs the training rows."""
    loss, _, names, class_weight = KINDS[kind]
    X_val, y_val = _data(kind, N_VAL, seed=1)
    w = _val_weights()
    model, outputs = _model(bpk_backend, kind, bpk_dtype), []

    def capture(epoch, record):
        outputs.append(np.asarray(model.forward(X_val), dtype=np.float64))

    history = _fit(model, kind, (X_val, y_val, w), class_weight=class_weight,
                   callbacks=[capture])
    rel = 1e-10 if bpk_dtype == "float64" else bpk_tolerance.rtol
    atol = 1e-12 if bpk_dtype == "float64" else bpk_tolerance.atol
    assert len(outputs) == EPOCHS
    for epoch, Y in enumerate(outputs):
        expected = _metrics(kind, Y, y_val, names, w)
        expected["loss"] = _loss(loss, Y, y_val, w)
        for name, value in expected.items():
            got = history[f"val_{name}"][epoch]
            assert got == pytest.approx(value, rel=rel, abs=atol), (epoch, name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_val_records_equal_evaluate_with_sample_weight(bpk_backend, kind):
    loss, _, names, _ = KINDS[kind]
    X_val, y_val = _data(kind, N_VAL, seed=1)
    w = _val_weights()
    model = _model(bpk_backend, kind)
    history = _fit(model, kind, (X_val, y_val, w))
    got = model.evaluate(X_val, y_val, loss, sample_weight=w, metrics=names)
    for name, value in got.items():
        assert history[f"val_{name}"][-1] == pytest.approx(value, rel=1e-12, abs=1e-15), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_pair_keeps_its_numbers(bpk_backend, kind):
    """The pair's records are evaluate()'s unweighted ones; a triple of ones gives the same."""
    loss, _, names, _ = KINDS[kind]
    X_val, y_val = _data(kind, N_VAL, seed=1)
    model = _model(bpk_backend, kind)
    pair = _fit(model, kind, (X_val, y_val))
    unweighted = model.evaluate(X_val, y_val, loss, metrics=names)
    ones = _fit(_model(bpk_backend, kind), kind, (X_val, y_val, np.ones(N_VAL)))
    none = _fit(_model(bpk_backend, kind), kind, [X_val, y_val, None])  # Keras's "unweighted"
    columns = [name for name in pair.epochs[0] if name.startswith("val_")]
    assert sorted(columns) == sorted(f"val_{name}" for name in unweighted)
    for name in columns:
        assert pair[name][-1] == unweighted[name[4:]], name
        assert none[name] == pair[name], name
        assert ones[name] == pytest.approx(pair[name], rel=1e-12, abs=1e-15), name


def test_weights_go_to_the_device_once_per_fit(bpk_backend, monkeypatch):
    """The validation weights are uploaded once (none at all on a host backend); every epoch
    moves no more to the device than the pair's validation does."""
    X_val, y_val = _data("labels", N_VAL, seed=1)
    w = _val_weights()
    model = _model(bpk_backend, "labels")
    be, calls = model.backend, {"asarray": [], "upload": 0}
    asarray, upload = be.asarray, model._upload

    def spy_asarray(host, *args, **kwargs):
        calls["asarray"].append(np.array(host, copy=True))
        return asarray(host, *args, **kwargs)

    def spy_upload(host, out):
        calls["upload"] += 1
        return upload(host, out)

    monkeypatch.setattr(be, "asarray", spy_asarray)
    monkeypatch.setattr(model, "_upload", spy_upload)
    X, y = _data("labels", N, seed=0)
    counts = []
    for validation_data in ((X_val, y_val), (X_val, y_val, w)):
        calls["asarray"].clear()
        calls["upload"] = 0
        bpk.fit(model, X, y, epochs=EPOCHS, batch_size=16, validation_data=validation_data)
        counts.append(calls["upload"])
        uploads_of_w = sum(a.shape == w.shape and np.array_equal(a, w) for a in calls["asarray"])
        assert uploads_of_w <= 1
    assert counts[1] == counts[0]


def test_callbacks_and_schedules_read_the_weighted_val_loss(bpk_backend):
    X_val, y_val = _data("labels", N_VAL, seed=1)
    w = _val_weights()
    stop = bpk.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    plateau = bpk.lr_scheduler.ReduceLROnPlateau(factor=0.5, patience=0)
    model = _model(bpk_backend, "labels")
    history = _fit(model, "labels", (X_val, y_val, w), epochs=8, callbacks=[stop],
                   lr_scheduler=plateau)
    column = history["val_loss"]
    assert history.best_epoch == history["epoch"][int(np.argmin(column))]
    weighted = model.evaluate(X_val, y_val, "cross_entropy", sample_weight=w)["loss"]
    assert weighted == pytest.approx(min(column), rel=1e-12)  # the best epoch's weights


BAD = [
    ("short", lambda X, y, w: (X, y, w[:-1]), ValueError,
     r"validation_data\[2\] must have one number per row: shape \(37,\), got \(36,\)"),
    ("negative", lambda X, y, w: (X, y, np.r_[w[:-1], -1.0]), ValueError,
     r"validation_data\[2\] must be finite and >= 0; validation_data\[2\]\[36\] = -1.0"),
    ("nan", lambda X, y, w: (X, y, np.r_[np.nan, w[1:]]), ValueError,
     r"validation_data\[2\] must be finite and >= 0; validation_data\[2\]\[0\] = nan"),
    ("zero", lambda X, y, w: (X, y, np.zeros_like(w)), ValueError,
     r"validation_data\[2\] gives every row of validation_data a weight of zero"),
    ("text", lambda X, y, w: (X, y, "balanced"), TypeError,
     r"validation_data\[2\] must hold numbers"),
    ("four", lambda X, y, w: (X, y, w, w), ValueError,
     r"validation_data must be a pair \(X_val, y_val\) or a triple "
     r"\(X_val, y_val, sample_weight_val\), got 4 items"),
    ("one", lambda X, y, w: (X,), ValueError, r"validation_data must be a pair .* got 1 items"),
    ("array", lambda X, y, w: X, ValueError, r"validation_data must be a pair .* got ndarray"),
]


@pytest.mark.parametrize("make, error, message", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_validation_data_is_one_clear_error(bpk_backend, make, error, message):
    X_val, y_val = _data("labels", N_VAL, seed=1)
    X, y = _data("labels", N, seed=0)
    model = _model(bpk_backend, "labels")
    before = model.get_weights()
    with pytest.raises(error, match=message):
        bpk.fit(model, X, y, epochs=1, validation_data=make(X_val, y_val, _val_weights()))
    assert model.epochs_trained == 0
    for (W0, b0), (W1, b1) in zip(before, model.get_weights()):
        assert np.array_equal(W0, W1) and np.array_equal(b0, b1)
