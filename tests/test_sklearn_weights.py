"""The estimators' sample_weight (fit, partial_fit) and the classifier's class_weight: training
against PyTorch's weighted losses, the combination and "balanced" rules against
scikit-learn's own, the weighted early-stopping score against scikit-learn's metrics, and the
errors. On every backend the registry has (bpk_backend)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn", reason='bpkernels.sklearn needs pip install "bpkernels[sklearn]"')
torch = pytest.importorskip("torch")

from sklearn.metrics import accuracy_score, r2_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.utils.class_weight import compute_sample_weight  # noqa: E402

import bpkernels as bpk  # noqa: E402
import reference as ref  # noqa: E402
from bpkernels.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

LR, EPOCHS, HIDDEN = 0.2, 3, 6
LABELS = np.array(["ant", "bee", "cat"])


@pytest.fixture(autouse=True)
def _numba_trains_kernel_by_kernel(monkeypatch):
    """The estimators hand their weights to bpkernels.fit, whatever path it takes: the Numba
    backend trains here by its per-kernel methods (Backend.train_epoch's loop), not by an epoch
    kernel compiled afresh for each combination of weights, metrics, target kind and dtype (~10
    s each, most of this file's time). The fused kernels' weights and metrics are tested against
    PyTorch and scikit-learn in test_weights.py and test_metrics.py."""
    try:
        from bpkernels.backends.numba.backend import NumbaBackend
    except ImportError:  # no Numba here: nothing to route
        return
    from bpkernels.backends.base import Backend
    monkeypatch.setattr(NumbaBackend, "train_epoch", Backend.train_epoch)


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    y = LABELS[np.argmax(X[:, :3] + 0.5 * rng.standard_normal((n, 3)), axis=1)]
    return X, y


def _full_batch(backend, **params):
    """SGD on the whole set per step, no shuffle, no early end: EPOCHS plain steps."""
    return dict(hidden_layer_sizes=(HIDDEN,), activation="tanh", optimizer="sgd",
                learning_rate_init=LR, batch_size=1000, max_iter=EPOCHS, shuffle=False,
                tol=0.0, n_iter_no_change=1000, random_state=0, backend=backend,
                dtype="float64", **params)


def _torch_sgd(initial, X, T, loss_fn):
    net = ref.torch_mlp(initial, "tanh")
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for _ in range(EPOCHS):
        opt.zero_grad()
        loss_fn(net(torch.from_numpy(X)), T).backward()
        opt.step()
    return ref.torch_mlp_weights(net)


def _initial(sizes, backend):
    return bpk.MLP(sizes, activation="tanh", backend=backend, dtype="float64",
                   seed=0).get_weights()


def _assert_weights(model, expected):
    for (W, b), (W_ref, b_ref) in zip(model.get_weights(), expected):
        np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b, b_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_class_weight_trains_as_torch_weighted_cross_entropy(bpk_backend):
    """A mapping keyed by the labels, times sample_weight: PyTorch's
    CrossEntropyLoss(weight=..., reduction='none') times the sample weights, over their sum."""
    X, y = _data()
    sw = np.random.default_rng(1).uniform(0.0, 3.0, len(y))
    class_weight = {"ant": 0.5, "cat": 4.0}  # "bee" absent: weight 1
    est = MLPClassifier(**_full_batch(bpk_backend, class_weight=class_weight))
    est.fit(X, y, sample_weight=sw)
    T = torch.from_numpy(np.searchsorted(LABELS, y))
    w = torch.from_numpy(sw * np.array([0.5, 1.0, 4.0])[T.numpy()])
    per_row = torch.nn.CrossEntropyLoss(reduction="none")
    expected = _torch_sgd(_initial([4, HIDDEN, 3], bpk_backend), X, T,
                          lambda out, t: (per_row(out, t) * w).sum() / w.sum())
    _assert_weights(est.model_, expected)

    # the class weights alone are torch's weight= with the mean reduction
    est = MLPClassifier(**_full_batch(bpk_backend, class_weight=class_weight)).fit(X, y)
    loss = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64))
    _assert_weights(est.model_, _torch_sgd(_initial([4, HIDDEN, 3], bpk_backend), X, T, loss))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_binary_class_weight_and_balanced_follow_scikit_learn(bpk_backend):
    """'balanced' is scikit-learn's compute_sample_weight('balanced', y): the same model as
    passing those weights as sample_weight; one logistic output takes them as torch's
    BCEWithLogitsLoss with per-row weights."""
    X, y = _data()
    y = np.where(y == "ant", "ant", "other")
    balanced = MLPClassifier(**_full_batch(bpk_backend, class_weight="balanced")).fit(X, y)
    by_rows = MLPClassifier(**_full_batch(bpk_backend)).fit(
        X, y, sample_weight=compute_sample_weight("balanced", y))
    _assert_weights(balanced.model_, by_rows.model_.get_weights())

    w = torch.from_numpy(compute_sample_weight("balanced", y))
    T = torch.from_numpy((y == "other").astype(np.float64).reshape(-1, 1))
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")
    expected = _torch_sgd(_initial([4, HIDDEN, 1], bpk_backend), X, T,
                          lambda out, t: (bce(out, t)[:, 0] * w).sum() / w.sum())
    _assert_weights(balanced.model_, expected)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_regressor_sample_weight_trains_as_torch_weighted_mse(bpk_backend):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 4))
    Y = np.stack([X @ rng.standard_normal(4), np.sin(X[:, 0])], axis=1)
    sw = rng.integers(0, 4, 30).astype(float)
    est = MLPRegressor(**_full_batch(bpk_backend)).fit(X, Y, sample_weight=sw)
    w = torch.from_numpy(sw)
    expected = _torch_sgd(_initial([4, HIDDEN, 2], bpk_backend), X, torch.from_numpy(Y),
                          lambda out, t: (((out - t) ** 2).mean(dim=1) * w).sum() / w.sum())
    _assert_weights(est.model_, expected)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_early_stopping_scores_the_weighted_validation_rows_and_keeps_the_best(bpk_backend,
                                                                                kind):
    """The validation split takes the weights with the rows; the score of each epoch is
    scikit-learn's accuracy or R^2 with those weights; the model ends with the best epoch's
    weights, so its score on the validation rows is best_validation_score_."""
    X, y = _data(80, seed=3)
    sw = np.random.default_rng(4).uniform(0.0, 2.0, len(y))
    params = dict(hidden_layer_sizes=(8,), learning_rate_init=0.05, max_iter=15,
                  early_stopping=True, validation_fraction=0.3, n_iter_no_change=3,
                  random_state=5, backend=bpk_backend, dtype="float64")
    if kind == "classifier":
        est, metric, target = MLPClassifier(**params), accuracy_score, y
        stratify = y
    else:
        target = X @ np.array([1.0, -2.0, 0.5, 0.0])
        est, metric, stratify = MLPRegressor(**params), r2_score, None
    est.fit(X, target, sample_weight=sw)
    _, X_val, _, t_val, _, w_val = train_test_split(X, target, sw, test_size=0.3,
                                                    random_state=5, stratify=stratify)
    score = metric(t_val, est.predict(X_val), sample_weight=w_val)
    assert score == pytest.approx(est.best_validation_score_, rel=1e-12)
    assert est.best_validation_score_ == max(est.validation_scores_)
    unweighted = metric(t_val, est.predict(X_val))
    assert unweighted != pytest.approx(score, rel=1e-9)  # the weights did change the score


def test_weights_errors_name_what_is_wrong():
    X, y = _data()
    with pytest.raises(ValueError, match=r"class_weight has labels \['dog'\] that are not "
                                         r"among the classes"):
        MLPClassifier(backend="numpy", class_weight={"dog": 2.0}, max_iter=1).fit(X, y)
    with pytest.raises(ValueError, match=r"sample_weight\[3\] = -1.0"):
        MLPClassifier(backend="numpy", max_iter=1).fit(
            X, y, sample_weight=np.r_[np.ones(3), -1.0, np.ones(36)])
    with pytest.raises(ValueError, match=r"one number per row: shape \(40,\)"):
        MLPRegressor(backend="numpy", max_iter=1).fit(X, X[:, 0], sample_weight=np.ones(39))
    with pytest.raises(ValueError, match="not supported by partial_fit"):
        MLPClassifier(backend="numpy", class_weight="balanced").partial_fit(
            X, y, classes=LABELS)
    with pytest.raises(ValueError, match="class_weight must be 'balanced' or a mapping"):
        MLPClassifier(backend="numpy", class_weight="even", max_iter=1).fit(X, y)
    with pytest.raises(ValueError, match="a weight of zero"):
        MLPClassifier(backend="numpy", max_iter=1).fit(X, y, sample_weight=np.zeros(40))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_partial_fit_takes_sample_weight_and_a_class_weight_mapping():
    """partial_fit with weights is one epoch of fit with them (the same optimizer carried)."""
    X, y = _data()
    sw = np.linspace(0.0, 2.0, len(y))
    params = _full_batch("numpy", class_weight={"bee": 3.0})
    once = MLPClassifier(**{**params, "max_iter": 2}).fit(X, y, sample_weight=sw)
    step = MLPClassifier(**params)
    step.partial_fit(X, y, sw, classes=LABELS)
    step.partial_fit(X, y, sample_weight=sw)
    _assert_weights(step.model_, once.model_.get_weights())
