"""What bpkernels.sklearn's estimators share beyond the estimator classes: scikit-learn's
stopping rule (on :class:`bpkernels.EarlyStopping`), the rows' weights, the parameter checks,
and the host form of a model that pickling uses. Imported by bpkernels.sklearn only."""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
from sklearn.utils import check_random_state

from .callbacks import EarlyStopping
from .lr_sklearn import AdaptiveLR
from .model import MLP
from .optim import Optimizer
from .train import set_rate
from .validation import check_ordered, shown
from .weights import row_weights


class ScikitLearnStopping(EarlyStopping):
    """scikit-learn's MLP stopping rule as an :class:`EarlyStopping`: an epoch is bad unless its
    value beats the best so far by ``tol`` (the training loss, smaller is better, or with
    ``score`` the validation score, larger is better); the best moves on any gain, even one
    under ``tol``; more than ``patience`` bad epochs in a row stop. Keras's rule (what
    EarlyStopping itself does) differs in those two places: its best moves only on a gain over
    ``min_delta`` and it stops at ``patience`` bad epochs. With a score it restores the weights
    of the best validation epoch (EarlyStopping's device copy) and leaves the optimizer state
    that of the last epoch, as scikit-learn does.

    With an adaptive rate a plateau divides the rate by 5 instead of stopping, until it is
    <= 1e-6: the schedule counts and says when to stop (its ``exhausted``). ``steps_adaptive``:
    the optimizer whose rate this callback sets, where it (not fit()) steps the schedule on the
    validation score."""

    def __init__(self, tol: float, patience: int, score: Callable[[], float] | None,
                 adaptive: AdaptiveLR | None = None,
                 steps_adaptive: Optimizer | None = None) -> None:
        super().__init__(monitor="loss" if score is None else "val_score", min_delta=tol,
                         patience=patience, mode="min" if score is None else "max",
                         restore_best_weights=score is not None)
        self.score, self.adaptive, self.steps_adaptive = score, adaptive, steps_adaptive
        self.losses: list[float] = []
        self.scores: list[float] = []
        self.stopped = False

    def on_fit_start(self, model: MLP, optimizer: Optimizer) -> None:
        super().on_fit_start(model, None)  # type: ignore[arg-type]  # (weights only)

    def __call__(self, epoch: int, record: dict[str, float]) -> bool:
        self.losses.append(record["loss"])
        if self.score is None:
            value = record["loss"]
        else:
            value = self.score()
            self.scores.append(value)
        sign = 1.0 if self.maximize else -1.0
        best = -math.inf if self.best is None else sign * self.best
        self.wait = self.wait + 1 if sign * value < best + self.min_delta else 0
        if sign * value > best:
            self.best, self.best_epoch = value, epoch
            if self.restore_best_weights:
                self._keep(epoch)
        if self.steps_adaptive is not None:
            self.adaptive.step(value)  # type: ignore[union-attr]
            set_rate(self.steps_adaptive, self.adaptive.lr, None)  # type: ignore[union-attr]
        if self.adaptive is not None:
            self.stopped = self.adaptive.exhausted
        else:
            self.stopped = self.wait > self.patience
        if self.stopped:
            self.stopped_epoch = epoch
        return self.stopped


def sample_weights(sample_weight: Any, class_weight: Any, y: np.ndarray,
                   classes: np.ndarray | None, where: str) -> np.ndarray | None:
    """Each row's weight, ``sample_weight`` times its class's ``class_weight`` (keys: labels
    of ``classes``, or "balanced": scikit-learn's ``n_samples / (n_classes * bincount(y))`` over
    the classes present in y), checked by bpkernels.weights; None when both are None."""
    if sample_weight is None and class_weight is None:
        return None
    index = None if classes is None else np.searchsorted(classes, y).astype(np.int64)
    if isinstance(class_weight, Mapping):
        unknown = [key for key in class_weight if not np.isin(key, classes).item()]
        if unknown:
            raise ValueError(f"class_weight has labels {shown(unknown)} that are not among "
                             f"the classes {shown(list(classes))}")  # type: ignore[arg-type]
        class_weight = {int(np.searchsorted(classes, key)): value  # type: ignore[arg-type]
                        for key, value in class_weight.items()}
    T = index if index is not None else np.zeros(y.shape[0], np.int64)
    n_classes = 1 if classes is None else len(classes)
    return row_weights(sample_weight, class_weight, T, "cross_entropy", n_classes, np.float64,
                       where)


# ---------------------------------------------------------------------- host form of a model

def model_to_host(model: MLP) -> dict[str, Any]:
    """``model.state()``, and the optimizer object itself (a user's subclass survives the
    pickle), unbound: hyper-parameters only, no device buffers, no model link."""
    meta, arrays = model.state()
    unbound = None
    if model.optimizer is not None:
        unbound = copy.copy(model.optimizer)
        Optimizer.__init__(unbound)
    return {"meta": meta, "arrays": arrays, "optimizer": unbound}


def model_from_host(state: dict[str, Any]) -> MLP:
    return MLP.from_state(state["meta"], state["arrays"], optimizer=state["optimizer"])


# ---------------------------------------------------------------------- helpers

def model_seed(random_state) -> int:
    """The model's seed: an int random_state as is, else one drawn from it (None: NumPy's
    global RNG), as scikit-learn's check_random_state would."""
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def class_index(outputs: np.ndarray) -> np.ndarray:
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0).astype(np.int64)
    return np.argmax(outputs, axis=1)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def check_hidden_layer_sizes(value) -> tuple[int, ...]:
    sizes = [value] if isinstance(value, numbers.Integral) else check_ordered(
        value, "hidden_layer_sizes", "an int or a sequence of ints (one width per hidden layer, "
        "e.g. (100,) or (64, 32))")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1
               for s in sizes):
        raise ValueError("hidden_layer_sizes must hold positive integers (one width per hidden "
                         f"layer, e.g. (100,) or (64, 32); () for none), got {shown(value)}")
    return tuple(int(s) for s in sizes)


def check_int(name: str, value, minimum: int, allowed: str = "") -> int:
    allowed = allowed or f"an integer >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {shown(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {shown(value)}")
    return int(value)


def check_threads(value) -> int | None:
    return None if value is None else check_int("threads", value, 1, "None or an integer >= 1")


def is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def check_random_state_value(value) -> None:
    allowed = "None, an integer >= 0 or a numpy RandomState"
    if value is None or isinstance(value, np.random.RandomState):
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"random_state must be {allowed}, got {shown(value)}")
    if not 0 <= value < 2**32:
        raise ValueError(f"random_state must be {allowed} (below 2**32), got {shown(value)}")


def check_real(name: str, value, low: float, low_open: bool = False,
                high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or (high is not None and value >= high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"{name} must be finite and lie in {bounds}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {shown(value)}")
    return bool(value)
