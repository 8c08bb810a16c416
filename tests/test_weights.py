"""Sample and class weights (issue 19): training on every backend and path equals a PyTorch
loop with the same weighting (CrossEntropyLoss(weight=) for class weights; reduction="none"
then sum(w l) / sum(w) for sample weights) to 1e-12 in float64; "balanced" equals
scikit-learn's compute_class_weight; bad weights are one clear error naming the field."""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk
import cudasim
import reference as ref
from bpkernels.backends.base import Backend

torch = pytest.importorskip("torch")
F = torch.nn.functional

N, FEATURES, HIDDEN, BATCH, EPOCHS, LR, SEED = 43, 5, 7, 8, 3, 0.1, 4


def _problem(loss, outputs, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, FEATURES))
    if loss == "cross_entropy":
        y = rng.integers(0, outputs, N)
        X += 1.5 * np.eye(outputs, FEATURES)[y]
    elif loss == "probs":
        y = rng.dirichlet(np.ones(outputs), N)
    elif loss == "binary_cross_entropy":
        y = (X[:, 0] + 0.3 * rng.standard_normal(N) > 0.4).astype(float)
    else:
        y = X[:, :outputs] @ rng.standard_normal((outputs, outputs))
    return X, y


# name: (loss, outputs, sample_weight(rng) or None, class_weight or None, shuffle)
CASES = {
    "ce-class-dict": ("cross_entropy", 3, None, {0: 0.5, 1: 2.0, 2: 1.25}, True),
    "ce-balanced": ("cross_entropy", 3, None, "balanced", True),
    # rows 0..7 weigh 0: with shuffle off, the first batch has zero total weight
    "ce-sample-zero-batch": ("cross_entropy", 3,
                             lambda r: np.r_[np.zeros(BATCH), r.uniform(0, 3, N - BATCH)], None,
                             False),
    "ce-probs-sample": ("probs", 3, lambda r: r.uniform(0, 2, N), None, True),
    "mse-sample": ("mse", 2, lambda r: r.integers(0, 4, N).astype(float), None, True),
    "bce-sample-and-class": ("binary_cross_entropy", 1, lambda r: r.uniform(0.5, 2, N),
                             {0: 3.0}, True),
}


def _row_weights(case, y):
    loss, outputs, sample, klass, _ = CASES[case]
    w = np.ones(N) if sample is None else sample(np.random.default_rng(9))
    if klass is not None:
        labels = y.astype(np.int64).ravel()
        if klass == "balanced":
            from sklearn.utils.class_weight import compute_class_weight
            classes = np.unique(labels)
            table = dict(zip(classes, compute_class_weight("balanced", classes=classes,
                                                           y=labels)))
        else:
            table = klass
        w = w * np.array([table.get(c, 1.0) for c in labels])
    return w


def _torch_fit(initial, X, y, case):
    """The reference: torch.nn layers from the same initial weights, the batches fit() draws,
    plain SGD, each batch's loss weighted as issue 19 says."""
    loss, outputs, sample, klass, shuffle = CASES[case]
    net = ref.torch_mlp(initial, "tanh")
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    w_all = torch.from_numpy(_row_weights(case, y))
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y if loss != "cross_entropy" else y.astype(np.int64))
    if loss in ("mse", "binary_cross_entropy") and yt.ndim == 1:
        yt = yt.reshape(-1, 1)
    records = []
    for epoch in range(EPOCHS):
        order = np.random.default_rng([SEED, epoch]).permutation(N) if shuffle else np.arange(N)
        weighted_sum = 0.0
        for start in range(0, N, BATCH):
            idx = torch.from_numpy(order[start:start + BATCH])
            out, t, w = net(Xt[idx]), yt[idx], w_all[idx]
            if klass is not None and sample is None and loss == "cross_entropy":
                table = torch.ones(outputs, dtype=torch.float64)
                labels = y.astype(np.int64)
                for c, v in _class_table(klass, labels).items():
                    table[c] = v
                value = torch.nn.CrossEntropyLoss(weight=table, reduction="mean")(out, t)
            elif loss in ("cross_entropy", "probs"):
                value = (w * F.cross_entropy(out, t, reduction="none")).sum() / w.sum()
            elif loss == "mse":
                value = (w[:, None] * F.mse_loss(out, t, reduction="none")).sum() / (
                    w.sum() * outputs)
            else:
                value = (w[:, None] * F.binary_cross_entropy_with_logits(
                    out, t, reduction="none")).sum() / (w.sum() * outputs)
            opt.zero_grad()
            if w.sum() == 0:  # zero total weight: loss 0, gradient 0 (torch gives 0 / 0)
                for p in net.parameters():
                    p.grad = torch.zeros_like(p)
                value = torch.zeros(())
            else:
                value.backward()
            opt.step()
            weighted_sum += float(value.detach()) * float(w.sum())
        records.append(weighted_sum / float(w_all.sum()))
    return ref.torch_mlp_weights(net), records


def _class_table(klass, labels):
    if klass != "balanced":
        return klass
    from sklearn.utils.class_weight import compute_class_weight
    classes = np.unique(labels)
    return dict(zip(classes.tolist(), compute_class_weight("balanced", classes=classes,
                                                           y=labels)))


def _paths():
    paths = ["numpy"]
    if "numba" in bpk.available_backends():
        paths += ["numba-fused", "numba-kernels", "numba-bound"]
    if cudasim.unavailable_reason() is None:
        paths += ["cudasim-graphs", "cudasim-kernels"]
    return paths


def _backend(path, monkeypatch):
    if path.startswith("numba"):
        from bpkernels.backends.numba import backend as numba_backend
        if path == "numba-kernels":
            monkeypatch.setattr(numba_backend.NumbaBackend, "train_epoch", Backend.train_epoch)
        if path == "numba-bound":  # as large models: bounded dW, SGD fused into its GEMM
            monkeypatch.setattr(numba_backend, "BOUND_MIN_PARAMS", 0)
            monkeypatch.setattr(numba_backend, "POOL_MIN_PARAMS", 1 << 62)
        return "numba"
    if path.startswith("cudasim"):
        return cudasim.make_backend(graphs=path == "cudasim-graphs")
    return path


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("case", list(CASES))
def test_weighted_training_equals_torch(case, path, monkeypatch):
    if CASES[case][3] == "balanced":
        pytest.importorskip("sklearn")
    loss, outputs, sample, klass, shuffle = CASES[case]
    X, y = _problem(loss, outputs)
    model = bpk.MLP([FEATURES, HIDDEN, outputs], activation="tanh",
                    backend=_backend(path, monkeypatch), dtype="float64", seed=2)
    initial = model.get_weights()
    history = bpk.fit(model, X, y, loss="cross_entropy" if loss == "probs" else loss,
                      optimizer=bpk.SGD(lr=LR), epochs=EPOCHS, batch_size=BATCH,
                      shuffle=shuffle, seed=SEED,
                      sample_weight=None if sample is None else sample(np.random.default_rng(9)),
                      class_weight=klass)
    params, records = _torch_fit(initial, X, y, case)
    for (W, b), (W_ref, b_ref) in zip(model.get_weights(), params):
        np.testing.assert_allclose(W, W_ref, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(history["loss"], records, rtol=1e-12)
    assert np.isfinite(history["loss"]).all()


@pytest.mark.parametrize("path", _paths())
def test_weighted_accuracy_and_evaluate(path, monkeypatch):
    """The History's accuracy is the weight of the rows classified right over the total
    weight (scikit-learn's accuracy_score with sample_weight); evaluate() weighs alike."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    X, y = _problem("cross_entropy", 3)
    w = np.random.default_rng(9).uniform(0, 3, N)
    model = bpk.MLP([FEATURES, HIDDEN, 3], activation="tanh",
                    backend=_backend(path, monkeypatch), dtype="float64", seed=2)
    # lr 0: every step sees the initial weights, so the epoch's records are evaluate()'s
    history = bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.0), epochs=1, batch_size=BATCH,
                      sample_weight=w)
    result = model.evaluate(X, y, "cross_entropy", sample_weight=w)
    expected = sklearn_metrics.accuracy_score(y, model.predict(X), sample_weight=w)
    assert result["accuracy"] == pytest.approx(expected, rel=1e-12)
    assert history["accuracy"][0] == pytest.approx(expected, rel=1e-12)
    Y = torch.from_numpy(np.asarray(model.forward(X)))
    ref = float((torch.from_numpy(w) * F.cross_entropy(Y, torch.from_numpy(y),
                                                       reduction="none")).sum() / w.sum())
    assert result["loss"] == pytest.approx(ref, rel=1e-12)
    assert history["loss"][0] == pytest.approx(ref, rel=1e-12)


def test_unweighted_numbers_are_unchanged_by_unit_weights():
    """Weights of 1 give the unweighted mean (the two paths agree to rounding)."""
    X, y = _problem("mse", 2)
    runs = []
    for sample in (None, np.ones(N)):
        model = bpk.MLP([FEATURES, HIDDEN, 2], activation="tanh", dtype="float64", seed=2)
        bpk.fit(model, X, y, loss="mse", optimizer=bpk.SGD(lr=LR), epochs=2, batch_size=BATCH,
                sample_weight=sample)
        runs.append(model.get_weights())
    for (W, b), (W2, b2) in zip(*runs):
        np.testing.assert_allclose(W, W2, rtol=1e-13)


def test_balanced_matches_sklearn():
    utils = pytest.importorskip("sklearn.utils.class_weight")
    from bpkernels.weights import row_weights
    y = np.array([0, 0, 0, 0, 1, 3, 3, 1, 0, 3])  # class 2 absent, as compute_class_weight allows
    classes = np.unique(y)
    table = dict(zip(classes, utils.compute_class_weight("balanced", classes=classes, y=y)))
    got = row_weights(None, "balanced", y.astype(np.int64), "cross_entropy", 4, np.float64)
    np.testing.assert_allclose(got, [table[c] for c in y], rtol=1e-15)


BAD = [
    (dict(sample_weight=-np.ones(12)), ValueError, r"sample_weight\[0\] = -1"),
    (dict(sample_weight=np.r_[np.ones(11), np.nan]), ValueError, r"sample_weight\[11\] = nan"),
    (dict(sample_weight=np.ones(11)), ValueError, r"sample_weight must have one number per row"),
    (dict(sample_weight=np.zeros(12)), ValueError, r"sample_weight gives every row .* of zero"),
    (dict(sample_weight="balanced"), TypeError, r"sample_weight must hold numbers"),
    (dict(class_weight={5: 1.0}), ValueError, r"class_weight has an unknown class 5"),
    (dict(class_weight={0: -1.0}), ValueError, r"class_weight\[0\] must be finite and >= 0"),
    (dict(class_weight={0: float("nan")}), ValueError, r"class_weight\[0\] must be finite"),
    (dict(class_weight="heavy"), ValueError, r"class_weight must be 'balanced' or a mapping"),
    (dict(class_weight=[1.0, 2.0]), TypeError, r"class_weight must be 'balanced' or a mapping"),
    (dict(class_weight={0: 0.0, 1: 0.0, 2: 0.0}), ValueError,
     r"class_weight gives every row of fit\(\) a weight of zero"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_weights_are_one_clear_error(kwargs, error, message):
    X, y = np.random.default_rng(0).standard_normal((12, 4)), np.arange(12) % 3
    model = bpk.MLP([4, 3], dtype="float64")
    before = model.get_weights()
    with pytest.raises(error, match=message):
        bpk.fit(model, X, y, epochs=1, **kwargs)
    for (W, b), (W0, b0) in zip(model.get_weights(), before):
        np.testing.assert_array_equal(W, W0)
    assert model.epochs_trained == 0


def test_class_weight_needs_labels():
    X = np.random.default_rng(0).standard_normal((6, 4))
    model = bpk.MLP([4, 2], dtype="float64")
    with pytest.raises(ValueError, match="class_weight needs class labels"):
        bpk.fit(model, X, X[:, :2] * 0.1, loss="mse", class_weight="balanced", epochs=1)


def test_evaluate_refuses_bad_sample_weight():
    X, y = np.random.default_rng(0).standard_normal((6, 4)), np.arange(6) % 2
    model = bpk.MLP([4, 2], dtype="float64")
    with pytest.raises(ValueError, match=r"sample_weight must have one number per row"):
        model.evaluate(X, y, "cross_entropy", sample_weight=np.ones(5))


# ------------------------------------------------------------------ the kernels, every backend
KERNEL_CASES = [(kind, n, o) for kind in ("labels", "probs", "bce", "mse")
                for n, o in ((1, 3), (7, 4), (33, 1)) if o > 1 or kind in ("bce", "mse")]


def _torch_weighted(kind, Y, T, w):
    Yt = torch.tensor(Y, dtype=torch.float64, requires_grad=True)
    wt = torch.from_numpy(w)
    if kind in ("labels", "probs"):
        rows = F.cross_entropy(Yt, torch.from_numpy(T), reduction="none")
    elif kind == "bce":
        rows = F.binary_cross_entropy_with_logits(Yt, torch.from_numpy(T), reduction="none")
    else:
        rows = F.mse_loss(Yt, torch.from_numpy(T), reduction="none")
    per_row = 1 if rows.ndim == 1 else rows.shape[1]
    if rows.ndim == 2:
        rows = rows.sum(1)
    value = (wt * rows).sum() / (wt.sum() * per_row)
    value.backward()
    return float(value.detach()), Yt.grad.numpy()


@pytest.mark.parametrize("kind, n, o", KERNEL_CASES,
                         ids=[f"{k}-{n}x{o}" for k, n, o in KERNEL_CASES])
def test_weighted_loss_kernel_equals_torch(be, dtype, to_device, to_host, assert_close, kind,
                                           n, o):
    """Backend.loss with row weights: value and gradient of sum(w_i l_i) / sum(w_i) (a row's
    weight on each of its elements), as torch's reduction="none" weighted by hand; all-zero
    weights give loss 0 and gradient 0."""
    rng = np.random.default_rng([n, o, len(kind)])
    Y = (3.0 * rng.standard_normal((n, o))).astype(dtype).astype(np.float64)
    T = {"labels": lambda: rng.integers(0, o, n),
         "probs": lambda: rng.dirichlet(np.ones(o), n),
         "bce": lambda: rng.uniform(0, 1, (n, o)),
         "mse": lambda: rng.standard_normal((n, o))}[kind]()
    if kind != "labels":
        T = T.astype(dtype).astype(np.float64)
    w = rng.uniform(0, 2, n).astype(dtype).astype(np.float64)
    w[1::3] = 0.0
    value_ref, grad_ref = _torch_weighted(kind, Y, T, w)
    T_dev = to_device(T, np.int64) if kind == "labels" else to_device(T)
    dY, out = be.empty((n, o), dtype), be.zeros((1,), dtype)
    name = {"labels": "cross_entropy", "probs": "cross_entropy", "bce": "binary_cross_entropy",
            "mse": "mse"}[kind]
    be.loss(name, to_device(Y), T_dev, dY, out, to_device(w))
    assert_close(to_host(dY), grad_ref, err_msg="dY")
    assert_close(to_host(out)[0], value_ref, err_msg="loss")
    be.loss(name, to_device(Y), T_dev, dY, out, to_device(np.zeros(n)))
    assert to_host(out)[0] == 0.0 and not to_host(dY).any()


@pytest.mark.parametrize("n, o", [(1, 3), (9, 4), (12, 1)])
def test_weighted_count_correct(be, dtype, to_device, to_host, assert_close, n, o):
    """count_correct with row weights: the weight of the rows classified right."""
    rng = np.random.default_rng([n, o])
    Y = rng.standard_normal((n, o))
    labels = rng.integers(0, max(o, 2), n)
    w = rng.uniform(0, 2, n).astype(dtype).astype(np.float64)
    predicted = (Y[:, 0] > 0).astype(int) if o == 1 else Y.argmax(1)
    out = be.zeros((1,), dtype)
    be.count_correct(to_device(Y), to_device(labels, np.int64), out, to_device(w))
    assert_close(to_host(out)[0], float(w @ (predicted == labels)))


_PLAIN_FIT = """
import json, sys, numpy as np, bpkernels as bpk
from bpkernels.backends.numba import jit
sys.path.insert(0, sys.argv[1])
from test_weights import CASES, _problem, FEATURES, HIDDEN, BATCH, EPOCHS, LR, SEED, PLAIN_METRICS
out = {"mode": jit.MODE}
for case in ("ce-sample-zero-batch", "bce-sample-and-class"):
    loss, outputs, sample, klass, shuffle = CASES[case]
    X, y = _problem(loss, outputs)
    model = bpk.MLP([FEATURES, HIDDEN, outputs], activation="tanh", backend="numba",
                    dtype="float64", seed=2)
    history = bpk.fit(model, X, y, loss=loss, optimizer=bpk.SGD(lr=LR), epochs=EPOCHS,
                      batch_size=BATCH, shuffle=shuffle, seed=SEED,
                      sample_weight=sample(np.random.default_rng(9)), class_weight=klass,
                      metrics=PLAIN_METRICS[case])
    out[case] = [np.asarray(model.params).tolist(),
                 {k: list(history[k]) for k in ["loss", *PLAIN_METRICS[case]]}]
print(json.dumps(out))
"""


PLAIN_METRICS = {"ce-sample-zero-batch": ["f1_macro", "top2"],
                 "bce-sample-and-class": ["recall_macro"]}


def test_plain_numba_epoch_kernel_weighs_as_the_reference(tmp_path):
    """The epoch kernel in plain mode (BPK_NUMBA_NATIVE=0, another process): the weighted
    training, and the metrics accumulated over it, of the NumPy backend (whose training equals
    PyTorch's, above, and whose metrics scikit-learn's, test_metrics.py)."""
    pytest.importorskip("numba")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, BPK_NUMBA_NATIVE="0", OPENBLAS_NUM_THREADS="1",
               NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _PLAIN_FIT, str(Path(__file__).parent)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["mode"] == "plain"
    for case in ("ce-sample-zero-batch", "bce-sample-and-class"):
        loss, outputs, sample, klass, shuffle = CASES[case]
        X, y = _problem(loss, outputs)
        model = bpk.MLP([FEATURES, HIDDEN, outputs], activation="tanh", dtype="float64", seed=2)
        history = bpk.fit(model, X, y, loss=loss, optimizer=bpk.SGD(lr=LR), epochs=EPOCHS,
                          batch_size=BATCH, shuffle=shuffle, seed=SEED,
                          sample_weight=sample(np.random.default_rng(9)), class_weight=klass,
                          metrics=PLAIN_METRICS[case])
        np.testing.assert_allclose(got[case][0], model.params, rtol=1e-12, atol=1e-13)
        for name, column in got[case][1].items():
            np.testing.assert_allclose(column, history[name], rtol=1e-12, err_msg=name)


def test_sample_weight_from_another_library():
    """sample_weight is taken from any array library, as y is (bpkernels.interop)."""
    X, y = _problem("cross_entropy", 3)
    w = np.random.default_rng(9).uniform(0, 2, N)
    runs = []
    for weights in (w, torch.from_numpy(w), list(w)):
        model = bpk.MLP([FEATURES, HIDDEN, 3], activation="tanh", dtype="float64", seed=2)
        bpk.fit(model, X, y, optimizer=bpk.SGD(lr=LR), epochs=1, batch_size=BATCH,
                sample_weight=weights)
        runs.append((model.get_weights()[0][0], model.evaluate(X, y, "cross_entropy",
                                                                sample_weight=weights)))
    for W, result in runs[1:]:
        np.testing.assert_array_equal(W, runs[0][0])
        assert result == runs[0][1]
