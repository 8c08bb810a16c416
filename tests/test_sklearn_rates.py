"""The schedulers of bpkernels.lr_sklearn against scikit-learn's own MLP and SGD optimizer: the
rate of every epoch, bit for bit, and the epoch training stops after."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

pytest.importorskip("sklearn", reason='bpkernels.sklearn needs pip install "bpkernels[sklearn]"')

from sklearn.neural_network import MLPClassifier as SkMLPClassifier  # noqa: E402
from sklearn.neural_network import _stochastic_optimizers as sk_optimizers  # noqa: E402

import bpkernels as bpk  # noqa: E402
from bpkernels.lr_sklearn import AdaptiveLR, InvScalingLR  # noqa: E402


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
