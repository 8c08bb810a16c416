"""bpkernels.sklearn's ``learning_rate`` "constant", "invscaling" and "adaptive" (the schedulers
of bpkernels.lr_sklearn) against scikit-learn's own MLP and SGD optimizer: the rate of every
epoch, bit for bit, and the epoch training stops after; kept by pickles and checkpoints."""
from __future__ import annotations

import inspect
import json
import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", reason='bpkernels.sklearn needs pip install "bpkernels[sklearn]"')

from sklearn.datasets import make_blobs  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkMLPClassifier  # noqa: E402
from sklearn.neural_network import _stochastic_optimizers as sk_optimizers  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import bpkernels as bpk  # noqa: E402
import bpkernels.sklearn as bsk  # noqa: E402
from bpkernels.lr_scheduler import scheduler_from_config  # noqa: E402
from bpkernels.lr_sklearn import AdaptiveLR, InvScalingLR  # noqa: E402
from bpkernels.sklearn import MLPClassifier, MLPRegressor  # noqa: E402


def _blobs(n=120, seed=0):
    X, y = make_blobs(n_samples=n, centers=3, n_features=5, cluster_std=3.0, random_state=seed)
    return StandardScaler().fit_transform(X), y


@pytest.fixture
def epoch_rates(monkeypatch):
    """The learning rate each epoch of the estimators' fits ran at, in order (read by a
    callback placed before the estimator's own, which may set the next epoch's rate)."""
    seen: list[float] = []
    train = bsk._train

    def spy(model, *args, callbacks=(), **kwargs):
        def record(epoch, rec):
            seen.append(model.optimizer.lr)
        return train(model, *args, callbacks=[record, *callbacks], **kwargs)

    monkeypatch.setattr(bsk, "_train", spy)
    return seen


# ====================================================================== invscaling

def _sklearn_sgd(**params):
    return SkMLPClassifier(hidden_layer_sizes=(4,), solver="sgd", momentum=0.0, random_state=0,
                           **params)


def test_invscaling_rates_are_scikit_learns(epoch_rates, monkeypatch):
    X, y = _blobs(n=90)
    params = dict(learning_rate="invscaling", learning_rate_init=0.05, power_t=0.3,
                  batch_size=16, tol=0.0, n_iter_no_change=50)
    # scikit-learn's rates: what its SGD optimizer holds after each epoch's iteration_ends.
    theirs_after: list[float] = []
    ends = sk_optimizers.SGDOptimizer.iteration_ends

    def ends_spy(self, time_step):
        ends(self, time_step)
        theirs_after.append(self.learning_rate)

    monkeypatch.setattr(sk_optimizers.SGDOptimizer, "iteration_ends", ends_spy)
    theirs = _sklearn_sgd(max_iter=4, warm_start=True, **params)
    ours = MLPClassifier(hidden_layer_sizes=(4,), optimizer="sgd", max_iter=4, warm_start=True,
                         random_state=0, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for est in (theirs, ours):  # a fit, then a warm start: scikit-learn's t_ carries over
            est.fit(X, y)
            est.set_params(max_iter=3).fit(X[:70], y[:70])
    assert ours.t_ == theirs.t_ == 4 * 90 + 3 * 70
    # Each fit starts at learning_rate_init (a new optimizer), then runs at the rate
    # scikit-learn's optimizer holds after the epoch before.
    assert epoch_rates == [0.05, *theirs_after[:3], 0.05, *theirs_after[4:6]]
    assert ours.model_.lr_scheduler.lr == theirs_after[-1]

    # partial_fit on batches of changing size continues the optimizer and its rate.
    del epoch_rates[:], theirs_after[:]
    theirs, ours = _sklearn_sgd(**params), MLPClassifier(
        hidden_layer_sizes=(4,), optimizer="sgd", random_state=0, **params)
    for n in (90, 40, 90, 17):
        theirs.partial_fit(X[:n], y[:n], classes=[0, 1, 2])
        ours.partial_fit(X[:n], y[:n], classes=[0, 1, 2])
        assert ours.t_ == theirs.t_
        assert ours.model_.lr_scheduler.lr == theirs._optimizer.learning_rate
    assert epoch_rates == [0.05, *theirs_after[:-1]]


# ====================================================================== adaptive

def _sklearn_adaptive(values, lr_init, tol, n_iter_no_change, early_stopping=False):
    """scikit-learn's own code on a curve of training losses (or validation scores): its MLP's
    no-improvement count, its SGD optimizer's adaptive rate and the lines of _fit_stochastic
    that join them. Returns the rate of each epoch and the epoch it stops after (or None)."""
    mlp = SkMLPClassifier(tol=tol, n_iter_no_change=n_iter_no_change)
    mlp.loss_curve_, mlp.validation_scores_, mlp._no_improvement_count = [], [], 0
    mlp.best_loss_, mlp.best_validation_score_ = np.inf, -np.inf
    mlp.coefs_ = mlp.intercepts_ = []
    optimizer = sk_optimizers.SGDOptimizer([], learning_rate_init=lr_init,
                                           lr_schedule="adaptive")
    extra = (None,) * (len(inspect.signature(mlp._update_no_improvement_count).parameters) - 3)
    rates = []
    for value in values:
        rates.append(optimizer.learning_rate)
        mlp.loss_curve_.append(value)
        mlp._score = lambda *args, value=value, **kwargs: value  # the validation score
        mlp._update_no_improvement_count(early_stopping, None, None, *extra)
        if mlp._no_improvement_count > n_iter_no_change:
            if optimizer.trigger_stopping("", False):
                return rates, len(rates)
            mlp._no_improvement_count = 0
    return rates, None


@pytest.mark.parametrize("early_stopping", [False, True], ids=["loss", "validation"])
def test_adaptive_rates_and_stop_are_scikit_learns(epoch_rates, early_stopping):
    X, y = _blobs(n=200, seed=1)
    params = dict(learning_rate="adaptive", learning_rate_init=0.02, tol=1e-2,
                  n_iter_no_change=2, max_iter=150, random_state=0, backend="numpy")
    est = MLPClassifier(hidden_layer_sizes=(8,), early_stopping=early_stopping,
                        validation_fraction=0.3, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # it stops on its own
        est.fit(X, y)
    curve = est.validation_scores_ if early_stopping else est.loss_curve_
    rates, stop = _sklearn_adaptive(curve, 0.02, 1e-2, 2, early_stopping)
    assert stop == est.n_iter_ < 150
    assert epoch_rates == rates
    assert len(set(rates)) >= 6  # divided by 5 several times: 0.02 down to <= 1e-6
    assert rates[-1] <= 1e-6 < rates[-1] * 5


def test_adaptive_scheduler_on_random_curves_is_scikit_learns():
    # The scheduler alone on curves with long plateaus, small gains (less than tol: they move
    # the best value but count as no improvement), and both directions.
    rng = np.random.default_rng(0)
    for trial in range(40):
        maximise = trial % 2 == 1
        steps = rng.choice([0.0, 1e-4, 3e-3, 0.05], size=200, p=[0.4, 0.2, 0.2, 0.2])
        curve = np.cumsum(steps) if maximise else 10.0 - np.cumsum(steps)
        patience, tol = int(rng.integers(0, 4)), float(rng.choice([0.0, 1e-3, 1e-2]))
        rates, stop = _sklearn_adaptive(curve.tolist(), 0.1, tol, patience, maximise)
        ours = AdaptiveLR(patience, tol, mode="max" if maximise else "min")
        ours.start(bpk.SGD(lr=0.1))
        mine = []
        for value in curve[:len(rates)]:
            mine.append(ours.lr)
            ours.step(float(value))
        assert mine == rates
        assert ours.exhausted == (stop is not None)


def test_invscaling_scheduler_is_scikit_learns():
    # A run that starts with samples already seen (a warm start) at the base rate.
    ours = InvScalingLR(power_t=0.37, samples_per_epoch=90, samples_seen=500)
    ours.start(bpk.SGD(lr=0.03))
    theirs = sk_optimizers.SGDOptimizer([], learning_rate_init=0.03, lr_schedule="invscaling",
                                        power_t=0.37)
    t = 500
    for _ in range(60):
        assert ours.lr == theirs.learning_rate
        ours.step()
        t += 90
        theirs.iteration_ends(t)
    assert ours.t == t


# ====================================================================== persistence

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("kind", ["invscaling", "adaptive"])
def test_schedules_survive_pickle_and_checkpoint(tmp_path, kind):
    X, y = _blobs(n=60)
    est = MLPClassifier(hidden_layer_sizes=(4,), learning_rate=kind, max_iter=3, tol=1.0,
                        n_iter_no_change=1, random_state=0, backend="numpy").fit(X, y)
    sched = est.model_.lr_scheduler
    assert type(sched) is (InvScalingLR if kind == "invscaling" else AdaptiveLR)
    copy = pickle.loads(pickle.dumps(est))
    assert copy.model_.lr_scheduler.config() == sched.config()
    assert copy.model_.lr_scheduler.state_dict() == sched.state_dict()
    copy.partial_fit(X, y)
    est.partial_fit(X, y)
    assert copy.model_.lr_scheduler.state_dict() == est.model_.lr_scheduler.state_dict()
    np.testing.assert_array_equal(copy.predict_proba(X), est.predict_proba(X))
    est.model_.save(tmp_path / "m.npz")
    loaded = bpk.load(tmp_path / "m.npz").lr_scheduler
    assert loaded.config() == sched.config() and loaded.state_dict() == sched.state_dict()
    # JSON-compatible, and a state is loaded whole or not at all.
    again = scheduler_from_config(json.loads(json.dumps(sched.config())))
    state = json.loads(json.dumps(sched.state_dict()))
    again.load_state_dict(state)
    assert again.state_dict() == sched.state_dict()
    field = "t" if kind == "invscaling" else "num_bad_epochs"
    with pytest.raises(ValueError, match=f"scheduler state field '{field}' is -1"):
        again.load_state_dict({**state, field: -1})


# ====================================================================== parameters

@pytest.mark.parametrize("params, error, message", [
    ({"learning_rate": "optimal"}, ValueError,
     "learning_rate must be one of 'constant', 'invscaling', 'adaptive' .*got 'optimal'"),
    ({"learning_rate": [0.1]}, TypeError,
     "learning_rate must be one of 'constant', 'invscaling', 'adaptive' or a number, got list"),
    ({"learning_rate_init": 0.0}, ValueError, r"learning_rate_init must be finite and lie in"),
    ({"learning_rate": 0.01, "learning_rate_init": 0.1}, ValueError,
     "learning_rate=0.01 .*older spelling.* learning_rate_init=0.1 both set"),
    ({"power_t": -0.5}, ValueError, r"power_t must be finite and lie in \[0.0, inf\)"),
    ({"optimizer": bpk.SGD(lr=0.1), "learning_rate_init": 0.5}, ValueError,
     "set them on the SGD instance instead .*learning_rate_init=0.5 but optimizer has lr=0.1"),
])
def test_bad_rate_parameters_name_the_field(params, error, message):
    X, y = _blobs(n=30)
    with pytest.raises(error, match=message):
        MLPClassifier(**params).fit(X, y)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_number_is_the_older_spelling_of_a_constant_rate(epoch_rates):
    X, y = _blobs(n=60)
    old = MLPClassifier(hidden_layer_sizes=(4,), learning_rate=0.03, max_iter=3,
                        random_state=0).fit(X, y)
    new = MLPClassifier(hidden_layer_sizes=(4,), learning_rate_init=0.03, max_iter=3,
                        random_state=0).fit(X, y)
    assert epoch_rates == [0.03] * 6 and old.model_.lr_scheduler is None
    np.testing.assert_array_equal(old.predict_proba(X), new.predict_proba(X))
