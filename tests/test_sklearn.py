"""bpkernels.sklearn: scikit-learn's own conformance suite on every backend, the estimators in
scikit-learn's tools, and their results against float64 NumPy and against bpkernels.fit."""
from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", reason='bpkernels.sklearn needs pip install "bpkernels[sklearn]"')

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, make_blobs, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import (GridSearchCV, cross_val_score,  # noqa: E402
                                     train_test_split)
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import (check_estimator,  # noqa: E402
                                            parametrize_with_checks)

import bpkernels as bpk  # noqa: E402
import reference as ref  # noqa: E402
from bpkernels.backends import BackendUnavailable, backend_names, get_backend  # noqa: E402
from bpkernels.sklearn import MLPClassifier, MLPRegressor  # noqa: E402
from bpkernels.testing import TOLERANCES  # noqa: E402

# The estimators train by fit(): on the Numba backend kernel by kernel here, not by epoch
# kernels compiled for scikit-learn's checks alone (its sample-weight checks: two; conftest.py)
pytestmark = pytest.mark.usefixtures("numba_kernel_by_kernel")


# ====================================================================== conformance suite
# Every backend in the registry (cupy-cudasim included: the whole suite costs it about 8 s
# on one thread, so it runs in full everywhere); one that cannot run here is skipped with the
# registry's reason. Small networks and few epochs keep the suite fast. The default dtype
# (float64 unless X is float32, scikit-learn's rule) runs on every backend with no expected
# failure; a forced float32 (its one documented expected failure), the early-stopping variants
# (another code path: the validation split; half the rows for validation because some checks
# fit on 10 rows of 3 classes) and the adaptive rate run on the numpy backend only.
def _conformance_instances():
    small = dict(hidden_layer_sizes=(16,), learning_rate_init=1e-2, max_iter=20)
    for name in backend_names():
        yield MLPClassifier(backend=name, **small)
        yield MLPRegressor(backend=name, **small)
    yield MLPClassifier(backend="numpy", dtype="float32", **small)
    yield MLPRegressor(backend="numpy", dtype="float32", **small)
    yield MLPClassifier(backend="numpy", early_stopping=True, validation_fraction=0.5,
                        learning_rate="adaptive", **small)
    yield MLPRegressor(backend="numpy", early_stopping=True, validation_fraction=0.5, **small)


def _expected_failed_checks(estimator) -> dict[str, str]:
    expected = {}
    if estimator.dtype == "float32":
        # Not strict: whether it fails depends on the BLAS build.
        expected["check_methods_subset_invariance"] = (
            "float32 matrix products round differently with the number of rows (the BLAS "
            "picks its kernel by shape): subsets agree to float32 precision (tested in "
            "test_predictions_do_not_depend_on_the_batch), not to the 1e-7 this check asks")
        expected["check_sample_weight_equivalence_on_dense_data"] = (
            "float32: a weighted row and its repeats sum in another order and round "
            "differently; the two models agree to float32 precision, not to the 1e-7 this "
            "check asks (in float64 they do, with no expected failure)")
    if estimator.early_stopping:
        why = ("these checks call partial_fit, which refuses early_stopping=True (one epoch on "
               "the data given leaves nothing to validate on), as scikit-learn's MLP does")
        expected.update(dict.fromkeys(["check_fit_score_takes_y",
                                       "check_n_features_in_after_fitting",
                                       "check_estimators_partial_fit_n_features"], why))
        expected["check_sample_weight_equivalence_on_dense_data"] = (
            "the validation split draws other rows from a weighted set than from one with the "
            "rows repeated, so the two fits see different training rows")
        if isinstance(estimator, MLPClassifier):
            expected["check_class_weight_classifiers"] = (
                "half of its 50 rows validate: the class-weighted score saturates in a few "
                "epochs, and the best epoch restored predicts class 0 for 82% of the test rows, "
                "not the 87% asked (it passes without early stopping)")
    return expected


try:
    _conformance = parametrize_with_checks(list(_conformance_instances()),
                                           expected_failed_checks=_expected_failed_checks)
    _XFAIL_BY_HAND = False
except TypeError:  # scikit-learn < 1.6 has no expected_failed_checks: the test applies them
    _conformance = parametrize_with_checks(list(_conformance_instances()))
    _XFAIL_BY_HAND = True


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 20 epochs
@_conformance
def test_scikit_learn_conformance(estimator, check):
    _require(estimator.backend)
    name = getattr(check, "func", check).__name__
    reason = _expected_failed_checks(estimator).get(name) if _XFAIL_BY_HAND else None
    if reason is None:
        check(estimator)
        return
    try:
        check(estimator)
    except Exception:
        pytest.xfail(reason)


# The issue's own words: the defaults (100 hidden units, 200 epochs), no expected failure; on
# the "auto" backend and on numpy, where float32 (the old default) failed the subset check.
# About 30 s for the four on one thread.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("backend", ["auto", "numpy"])
@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_check_estimator_passes_with_default_parameters(Estimator, backend):
    check_estimator(Estimator() if backend == "auto" else Estimator(backend=backend))


def _require(backend: str) -> None:
    try:
        get_backend(backend)
    except BackendUnavailable as why:
        pytest.skip(str(why))


# ====================================================================== data

@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def _blobs(n=120, classes=3, seed=0):
    X, y = make_blobs(n_samples=n, centers=classes, n_features=5, cluster_std=1.5,
                      random_state=seed)
    return StandardScaler().fit_transform(X), y


def _regression(n=300, targets=1, seed=0):
    X, y = make_regression(n_samples=n, n_features=8, n_informative=5, n_targets=targets,
                           noise=5.0, random_state=seed)
    return StandardScaler().fit_transform(X), y / np.std(y)


def _reference_logits(estimator, X) -> np.ndarray:
    """The fitted network's outputs by the float64 reference, from its weights alone."""
    model = estimator.model_
    layers = ref.mlp_forward(model.get_weights(), X, list(model.activations) + ["identity"])
    return layers[-1][1]


# ====================================================================== import and errors

# In a fresh interpreter, away from the source tree: the installed package is what is tested.
def test_importing_bpkernels_does_not_import_scikit_learn(tmp_path):
    code = "import sys, bpkernels; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "False"


def test_missing_scikit_learn_names_the_extra_to_install(tmp_path):
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "try:\n    import bpkernels.sklearn\nexcept ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert 'pip install "bpkernels[sklearn]"' in out.stdout


@pytest.mark.parametrize("params, error, message", [
    ({"hidden_layer_sizes": (0,)}, ValueError,
     r"hidden_layer_sizes must hold positive integers.*\(0,\)"),
    ({"hidden_layer_sizes": (16, -2)}, ValueError, "hidden_layer_sizes must hold positive"),
    ({"hidden_layer_sizes": "16"}, TypeError, "hidden_layer_sizes must be an int or a sequence"),
    ({"optimizer": "adagrad"}, ValueError,
     "unknown optimizer 'adagrad'; valid optimizers: sgd, adam, adamw, rmsprop"),
    ({"optimizer": 3}, TypeError, "optimizer must be a name .* or a bpkernels Optimizer"),
    ({"activation": "swish"}, ValueError,
     "unknown activation 'swish'; valid activations: identity"),
    ({"activation": ["relu", "tanh"]}, ValueError,
     "activation list has 2 names but the model has 1"),
    ({"learning_rate": 0.0}, ValueError, r"learning_rate must be finite and lie in \(0.0, inf\)"),
    ({"weight_decay": -1e-3}, ValueError, r"weight_decay must be finite and lie in \[0.0, inf\)"),
    ({"batch_size": 0}, ValueError, 'batch_size must be an integer >= 1 or "auto"'),
    ({"batch_size": "big"}, TypeError, 'batch_size must be an integer >= 1 or "auto"'),
    ({"max_iter": 0}, ValueError, "max_iter must be an integer >= 1"),
    ({"n_iter_no_change": 0}, ValueError, "n_iter_no_change must be an integer >= 1"),
    ({"tol": -1.0}, ValueError, "tol must be finite"),
    ({"validation_fraction": 1.0}, ValueError,
     r"validation_fraction must be finite and lie in \(0.0, 1.0\)"),
    ({"shuffle": "yes"}, TypeError, "shuffle must be True or False"),
    ({"verbose": 1.5}, TypeError, "verbose must be a bool or an integer >= 0"),
    ({"random_state": -1}, ValueError, "random_state must be None, an integer >= 0 or a numpy"),
    ({"random_state": "0"}, TypeError, "random_state must be None, an integer >= 0 or a numpy"),
    ({"dtype": "float16"}, ValueError,
     "unsupported dtype 'float16'; valid dtypes: float32, float64"),
    ({"backend": "tpu"}, ValueError, "unknown backend 'tpu'; valid backends: auto"),
    ({"optimizer": bpk.SGD(lr=0.1), "learning_rate": 0.5}, ValueError,
     "set them on the SGD instance instead .*learning_rate=0.5 but optimizer has lr=0.1"),
])
def test_bad_parameters_raise_at_fit_naming_them(params, error, message):
    X, y = _blobs()
    clf = MLPClassifier(**params)  # stored as given: scikit-learn validates at fit
    assert clf.get_params()[next(iter(params))] is params[next(iter(params))]
    with pytest.raises(error, match=message):
        clf.fit(X, y)
    assert not hasattr(clf, "n_features_in_")  # refused before any fitted state


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_target_errors():
    X, y = _blobs()
    with pytest.raises(ValueError, match="needs at least 2 classes in y, got 1 class"):
        MLPClassifier().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="Unknown label type: '?continuous"):
        MLPClassifier().fit(X, np.linspace(0, 1, len(X)))
    with pytest.raises(ValueError, match="y should be a 1d array"):  # multilabel: not supported
        MLPClassifier().fit(X, np.eye(3)[y].astype(int))
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        MLPClassifier().partial_fit(X, y)
    clf = MLPClassifier(hidden_layer_sizes=(4,)).partial_fit(X, y, classes=[0, 1, 2])
    with pytest.raises(ValueError, match=r"y has labels \[7\] that are not among the classes"):
        clf.partial_fit(X, np.where(y == 2, 7, y))
    with pytest.raises(ValueError, match="differs from the classes of the previous calls"):
        clf.partial_fit(X, y, classes=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="warm_start can only be used where y has the same"):
        MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, warm_start=True).fit(X, y).fit(
            X[y < 2], y[y < 2])
    warm = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, warm_start=True).fit(X, y)
    with pytest.raises(ValueError,
                       match="sizes, activation, backend, dtype, dropout and norm must stay"):
        warm.set_params(hidden_layer_sizes=(5,)).fit(X, y)
    with pytest.raises(NotFittedError):
        MLPRegressor().predict(X)
    with pytest.raises(ValueError, match="X has 4 features, but MLPClassifier is expecting 5"):
        clf.predict(X[:, :4])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_feature_names_are_recorded_and_checked():
    pd = pytest.importorskip("pandas", reason="feature names come from pandas DataFrames")
    X, y = _blobs()
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0).fit(frame, y)
    assert list(clf.feature_names_in_) == list(frame.columns)
    assert clf.n_features_in_ == 5
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        unnamed = clf.predict(X)
    np.testing.assert_array_equal(clf.predict(frame), unnamed)
    with pytest.raises(ValueError, match="feature names should match"):
        clf.predict(frame.rename(columns={"f0": "other"}))


# ====================================================================== results

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_digits_accuracy_in_a_pipeline(digits, bpk_backend):
    X_tr, X_te, y_tr, y_te = digits
    pipe = Pipeline([("scale", StandardScaler()),
                     ("mlp", MLPClassifier(hidden_layer_sizes=(128,), max_iter=25,
                                           random_state=0, backend=bpk_backend))])
    pipe.fit(X_tr, y_tr)
    assert pipe.score(X_te, y_te) >= 0.95
    np.testing.assert_array_equal(pipe.classes_, np.arange(10))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_regression_beats_the_mean_predictor(bpk_backend):
    X, y = _regression(n=400)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(64,), learning_rate=1e-2, max_iter=60,
                       random_state=0, backend=bpk_backend).fit(X_tr, y_tr)
    pred = reg.predict(X_te)
    assert pred.shape == y_te.shape and pred.dtype == np.float64
    mse = np.mean((pred - y_te) ** 2)
    mean_mse = np.mean((y_tr.mean() - y_te) ** 2)
    assert mse < 0.1 * mean_mse
    assert reg.score(X_te, y_te) == pytest.approx(1 - mse / np.mean((y_te - y_te.mean()) ** 2))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_regression_outputs_are_shaped_like_y():
    X, Y = _regression(n=200, targets=2)
    reg = MLPRegressor(hidden_layer_sizes=(32,), learning_rate=1e-2, max_iter=60,
                       random_state=0).fit(X, Y)
    assert reg.predict(X).shape == (200, 2) and reg.n_outputs_ == 2
    assert reg.score(X, Y) > 0.9
    column = MLPRegressor(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, Y[:, :1])
    assert column.predict(X).shape == (200, 1)
    np.testing.assert_allclose(column.predict(X)[:, 0], _reference_logits(column, X)[:, 0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("classes", [3, 2], ids=["softmax", "sigmoid"])
def test_probabilities_match_the_float64_reference(bpk_backend, bpk_dtype, classes):
    X, y = _blobs(classes=classes)
    labels = np.array(["cat", "dog", "eel"])[y]  # arbitrary labels: classes_ maps them
    clf = MLPClassifier(hidden_layer_sizes=(8, 6), activation="tanh", max_iter=3,
                        random_state=0, backend=bpk_backend, dtype=bpk_dtype).fit(X, labels)
    assert clf.model_.sizes[-1] == (1 if classes == 2 else classes)
    Z = _reference_logits(clf, X)
    if classes == 2:
        expected = np.column_stack([1 / (1 + np.exp(Z[:, 0])), 1 / (1 + np.exp(-Z[:, 0]))])
        decision = Z[:, 0]
    else:
        expected = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
        decision = Z
    tol = TOLERANCES[bpk_dtype]
    proba = clf.predict_proba(X)
    assert proba.dtype == np.float64 and proba.shape == (len(X), classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(proba, expected, rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_allclose(clf.decision_function(X), decision, rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba))


def test_predictions_do_not_depend_on_the_batch(bpk_backend, bpk_dtype):
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=1, random_state=0,
                        backend=bpk_backend, dtype=bpk_dtype)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    tol = TOLERANCES[bpk_dtype]
    whole = clf.decision_function(X)
    parts = np.concatenate([clf.decision_function(X[i:i + 7]) for i in range(0, len(X), 7)])
    np.testing.assert_allclose(parts, whole, rtol=tol.rtol, atol=tol.atol)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_dtype_follows_X_unless_given(Estimator):
    X, y = _blobs(n=40)
    small = dict(hidden_layer_sizes=(4,), max_iter=1, random_state=0, backend="numpy")
    assert Estimator().dtype is None
    cases = [(X, None, "float64"), (X.astype(np.float32), None, "float32"),
             (np.rint(X * 10).astype(np.int64), None, "float64"),
             (X.astype(np.float32), "float64", "float64"), (X, "float32", "float32")]
    for data, dtype, expected in cases:
        est = Estimator(dtype=dtype, **small).fit(data, y)
        assert est.model_.dtype == np.dtype(expected), (data.dtype, dtype)
    # Decided at the first fit: partial_fit and warm_start keep the fitted model's dtype.
    est = Estimator(warm_start=True, **small).fit(X.astype(np.float32), y)
    est.partial_fit(X, y)
    est.fit(X, y)
    assert est.model_.dtype == np.float32
    with pytest.raises(ValueError, match="dtype, dropout and norm must stay as they were"):
        est.set_params(dtype="float64").fit(X, y)


# ====================================================================== training semantics

@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_fit_is_bpkernels_fit_and_partial_fit_continues_it(bpk_backend, Estimator):
    classify = Estimator is MLPClassifier
    X, y = _blobs(n=70) if classify else _regression(n=70)
    params = dict(hidden_layer_sizes=(6,), learning_rate=1e-2, batch_size=16, max_iter=4,
                  n_iter_no_change=4, random_state=3, backend=bpk_backend)  # never stops early
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(4\) reached"):
        fitted = Estimator(**params).fit(X, y)

    # The same run through the core API: same seed for weights and batches, Adam(lr), and
    # float64 (the estimators' dtype for float64 data).
    model = bpk.MLP([5 if classify else 8, 6, 3 if classify else 1], backend=bpk_backend, seed=3,
                    dtype="float64")
    history = bpk.fit(model, X, y, loss="cross_entropy" if classify else "mse",
                      optimizer=bpk.Adam(lr=1e-2), epochs=4, batch_size=16, seed=3)

    stepped = Estimator(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # partial_fit never warns about convergence
        for _ in range(4):
            stepped.partial_fit(X, y, **({"classes": [0, 1, 2]} if classify else {}))
    for est in (fitted, stepped):
        assert est.n_iter_ == 4 and len(est.loss_curve_) == 4
        np.testing.assert_array_equal(est.loss_curve_, history["loss"])
        for (W, b), (W_ref, b_ref) in zip(est.model_.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(W, W_ref)
            np.testing.assert_array_equal(b, b_ref)
    assert fitted.best_loss_ == min(history["loss"]) and fitted.validation_scores_ is None


def test_warm_start_continues_with_a_fresh_optimizer(bpk_backend):
    X, y = _regression(n=60)
    reg = MLPRegressor(hidden_layer_sizes=(5,), learning_rate=1e-2, batch_size=20, max_iter=3,
                       random_state=1, warm_start=True, backend=bpk_backend)
    with pytest.warns(ConvergenceWarning):
        reg.fit(X, y)
    with pytest.warns(ConvergenceWarning):
        reg.set_params(max_iter=2).fit(X, y)
    model = bpk.MLP([8, 5, 1], backend=bpk_backend, seed=1, dtype="float64")
    first = bpk.fit(model, X, y, loss="mse", optimizer=bpk.Adam(1e-2), epochs=3, batch_size=20,
                    seed=1)
    second = bpk.fit(model, X, y, loss="mse", optimizer=bpk.Adam(1e-2), epochs=2,
                     batch_size=20, seed=1)
    assert reg.n_iter_ == 5
    np.testing.assert_array_equal(reg.loss_curve_, first["loss"] + second["loss"])
    np.testing.assert_array_equal(reg.model_.get_weights()[0][0], model.get_weights()[0][0])


def _sklearn_stopping_epoch(curve, tol, patience, higher_is_better):
    """scikit-learn's MLP rule, written out: the epoch after which training stops, or None."""
    best, bad = (-np.inf if higher_is_better else np.inf), 0
    for epoch, value in enumerate(curve, start=1):
        worse = value < best + tol if higher_is_better else value > best - tol
        bad = bad + 1 if worse else 0
        best = max(best, value) if higher_is_better else min(best, value)
        if bad > patience:
            return epoch
    return None


def test_training_loss_plateau_stops_without_a_warning():
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(16,), learning_rate=1e-2, max_iter=300, tol=1e-3,
                        n_iter_no_change=4, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf.fit(X, y)
    assert clf.n_iter_ < 300
    assert _sklearn_stopping_epoch(clf.loss_curve_, 1e-3, 4, False) == clf.n_iter_
    assert clf.best_loss_ == min(clf.loss_curve_)


def test_early_stopping_stops_and_restores_the_best_weights(bpk_backend):
    X, y = _regression(n=240, seed=4)
    X = np.hstack([X, np.random.default_rng(0).standard_normal((240, 24))])  # room to overfit
    reg = MLPRegressor(hidden_layer_sizes=(128,), learning_rate=3e-2, batch_size=8,
                       max_iter=200, early_stopping=True, validation_fraction=0.25,
                       n_iter_no_change=5, random_state=7, backend=bpk_backend).fit(X, y)
    scores = reg.validation_scores_
    assert reg.n_iter_ < 200 and len(scores) == reg.n_iter_ and reg.best_loss_ is None
    assert _sklearn_stopping_epoch(scores, 1e-4, 5, True) == reg.n_iter_
    assert reg.best_validation_score_ == max(scores)
    assert scores[-1] < max(scores)  # the last epoch is not the best: restoring matters
    # The validation rows, split as documented: train_test_split with the seed.
    _, X_val, _, y_val = train_test_split(X, y, test_size=0.25, random_state=7)
    assert reg.score(X_val, y_val) == pytest.approx(reg.best_validation_score_, rel=1e-4)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_early_stopping_classifier_validates_on_a_stratified_split():
    X, y = _blobs(n=200, seed=2)
    clf = MLPClassifier(hidden_layer_sizes=(16,), learning_rate=1e-2, max_iter=100,
                        early_stopping=True, validation_fraction=0.2, n_iter_no_change=3,
                        random_state=5).fit(X, y)
    assert clf.n_iter_ < 100 and clf.best_validation_score_ == max(clf.validation_scores_)
    _, X_val, _, y_val = train_test_split(X, y, test_size=0.2, random_state=5, stratify=y)
    assert clf.score(X_val, y_val) == clf.best_validation_score_


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_smaller_options_reach_the_model(capsys):
    X, y = _blobs(n=70)
    clf = MLPClassifier(hidden_layer_sizes=3, activation="logistic", batch_size="auto",
                        max_iter=2, random_state=0, verbose=True).fit(X, y)
    assert clf.model_.sizes == (5, 3, 3) and clf.model_.activations == ("sigmoid",)
    assert "epoch 1/2" in capsys.readouterr().err  # verbose: fit's per-epoch progress
    # "auto" is min(200, n): one batch of all 70 rows per epoch, i.e. 2 optimizer steps.
    assert clf.model_.optimizer.step_count == 2
    assert isinstance(clf.model_.optimizer, bpk.Adam)
    sgd = MLPClassifier(optimizer="sgd", learning_rate=0.2, weight_decay=0.01, max_iter=1,
                        random_state=0).fit(X, y)
    assert repr(sgd.model_.optimizer) == repr(bpk.SGD(lr=0.2, weight_decay=0.01))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_random_state_none_draws_from_numpy_global_rng():
    X, y = _blobs(n=40)
    runs = []
    for reseed in (True, True, False):
        if reseed:
            np.random.seed(123)
        runs.append(MLPClassifier(hidden_layer_sizes=(4,), max_iter=1).fit(X, y).model_)
    assert runs[0].seed == runs[1].seed != runs[2].seed
    np.testing.assert_array_equal(runs[0].get_weights()[0][0], runs[1].get_weights()[0][0])
    assert MLPClassifier(hidden_layer_sizes=(4,), max_iter=1,
                         random_state=np.random.RandomState(5)).fit(X, y).model_.seed == \
        np.random.RandomState(5).randint(np.iinfo(np.int32).max)


# ====================================================================== scikit-learn tools

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_grid_search_and_cross_validation():
    X, y = _blobs(n=150)
    search = GridSearchCV(MLPClassifier(max_iter=15, random_state=0),
                          {"hidden_layer_sizes": [(4,), (16,)], "learning_rate": [1e-3, 1e-2]},
                          cv=3)
    search.fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_estimator_.model_.sizes[1:-1] == search.best_params_["hidden_layer_sizes"]
    assert search.best_score_ >= 0.9
    scores = cross_val_score(MLPRegressor(hidden_layer_sizes=(16,), learning_rate=1e-2,
                                          max_iter=40, random_state=0), *_regression(n=150), cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_clone_with_an_optimizer_instance_leaves_it_unbound():
    X, y = _blobs()
    sgd = bpk.SGD(lr=0.05, momentum=0.9)
    clf = MLPClassifier(hidden_layer_sizes=(8,), optimizer=sgd, max_iter=3, random_state=0)
    clf.fit(X, y)
    twin = clone(clf).fit(X, y)
    assert not hasattr(clone(clf), "model_")
    assert clf.optimizer is sgd and sgd.step_count == 0 and sgd.state == {}
    assert twin.optimizer is not sgd and repr(twin.optimizer) == repr(sgd)
    assert clf.model_.optimizer is not sgd and repr(clf.model_.optimizer) == repr(sgd)
    np.testing.assert_array_equal(twin.predict_proba(X), clf.predict_proba(X))


# ====================================================================== pickling

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_pickle_round_trip(bpk_backend):
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0, backend=bpk_backend)
    blank = pickle.loads(pickle.dumps(clf))
    assert blank.get_params() == clf.get_params() and not hasattr(blank, "model_")

    clf.fit(X, y)
    state = clf.__getstate__()
    arrays = state["model_"]["arrays"]  # host arrays (MLP.state()), no backend objects
    assert isinstance(arrays["params"], np.ndarray) and len(arrays) > 1
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    copy = pickle.loads(pickle.dumps(clf))
    assert copy.model_.backend.name == bpk_backend
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    assert copy.loss_curve_ == clf.loss_curve_ and copy.n_iter_ == clf.n_iter_
    # The optimizer state came along: one more epoch on each gives the same weights.
    copy.partial_fit(X, y)
    clf.partial_fit(X, y)
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    assert copy.model_.optimizer.step_count == clf.model_.optimizer.step_count == 4 * 4
