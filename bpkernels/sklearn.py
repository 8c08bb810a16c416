"""scikit-learn estimators around :class:`bpkernels.MLP`: ``MLPClassifier`` and ``MLPRegressor``.

``from bpkernels.sklearn import MLPClassifier`` needs scikit-learn (``pip install
"bpkernels[sklearn]"``); ``import bpkernels`` never imports this module.

Choices where scikit-learn's own MLP leaves room, or where ours differs:

- A binary problem has one output trained with ``binary_cross_entropy`` (sigmoid), as
  scikit-learn does; more classes have one output each, trained with ``cross_entropy``
  (softmax). Multilabel targets are refused. The regressor trains ``mse`` (the mean over all
  elements, without scikit-learn's factor 1/2) and predicts arrays shaped like the ``y`` it was
  fitted on.
- ``batch_size`` is 32 by default; ``"auto"`` means ``min(200, n_samples)`` as in scikit-learn.
- ``dtype=None`` follows scikit-learn: float32 data trains in float32, anything else in
  float64 (decided at the first fit; the fitted model's dtype then stays).
- ``learning_rate`` ("constant", "invscaling", "adaptive") has scikit-learn's definitions
  (bpkernels.lr_sklearn's schedulers, passed to fit) but applies to every optimizer, not only
  SGD. A number there is the older spelling of ``learning_rate_init`` with a constant rate.
- ``random_state`` gives one seed: an int is used as is, None or a RandomState draws one at fit
  time. It sets the initial weights, the batch order of every epoch and the early-stopping split.
- Stopping follows scikit-learn: training ends once the training loss (or, with
  ``early_stopping``, the validation score: accuracy or R^2) has not improved by ``tol`` for more
  than ``n_iter_no_change`` epochs in a row, else after ``max_iter`` epochs with a
  ConvergenceWarning. Early stopping restores the weights of the best validation epoch (the
  optimizer state stays that of the last epoch, as in scikit-learn). The rule runs as a
  :class:`bpkernels.EarlyStopping` (``_sklearn_support.ScikitLearnStopping``), whose Keras
  rule differs from scikit-learn's in when the best value moves and when patience runs out.
- ``sample_weight`` (fit, partial_fit) and the classifier's ``class_weight`` weigh each row's
  loss (bpkernels.fit's weighted batch mean) and the early-stopping score.
- ``fit`` with ``warm_start`` continues the fitted model with a fresh optimizer (as scikit-learn);
  ``partial_fit`` trains one more epoch with the optimizer and its state carried over. Both need
  the architecture, backend and dtype unchanged. ``loss_curve_`` and ``n_iter_`` then
  accumulate; the stopping criterion starts afresh with every ``fit``.
- Pickling stores the model as host arrays (architecture, weights, optimizer state), never
  backend objects; unpickling rebuilds it on the same backend, or on "auto" where that one is
  unavailable (as :func:`bpkernels.load` does).
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.utils.multiclass import check_classification_targets, unique_labels
    from sklearn.utils.validation import check_is_fitted
except ImportError as err:
    raise ImportError('bpkernels.sklearn needs scikit-learn: pip install "bpkernels[sklearn]" '
                      f"({err})") from err

try:
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # scikit-learn < 1.6 validates through a method instead
    def _validate_data(estimator, X="no_validation", y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)

from .activations import hidden_activations
from .backends import get_backend
from .lr_sklearn import AdaptiveLR, InvScalingLR
from .lr_scheduler import LRScheduler
from .model import MLP, check_dropout, check_norm, resolve_dtype
from .optim import Optimizer, make_optimizer
from ._sklearn_support import (ScikitLearnStopping, check_bool, check_hidden_layer_sizes,
                               check_int, check_random_state_value, check_real, check_threads,
                               class_index, is_auto, model_from_host, model_seed, model_to_host,
                               sample_weights, sigmoid)
from .threads import limit_threads
from .train import fit as _train

__all__ = ["MLPClassifier", "MLPRegressor"]

# scikit-learn's name for the sigmoid, so its users' settings carry over.
_ACTIVATION_ALIASES = {"logistic": "sigmoid"}
_AUTO_BATCH = 200
_DEFAULT_LEARNING_RATE = 1e-3
_SCHEDULES = ("constant", "invscaling", "adaptive")


class _BaseMLP(BaseEstimator):
    """The estimator contract shared by the classifier and the regressor; subclasses say how
    targets become model outputs and outputs become predictions."""

    _stratify = False  # whether the early-stopping split keeps the class proportions

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, optimizer="adam",
                 learning_rate="constant", learning_rate_init=_DEFAULT_LEARNING_RATE,
                 power_t=0.5, weight_decay=0.0, batch_size=32, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, n_iter_no_change=10, early_stopping=False,
                 validation_fraction=0.1, backend="auto", dtype=None, verbose=False,
                 warm_start=False, threads=None, dropout=0.0, norm=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.backend = backend
        self.dtype = dtype
        self.verbose = verbose
        self.warm_start = warm_start
        self.threads = threads
        self.dropout = dropout
        self.norm = norm

    # ------------------------------------------------------------------ training
    def fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None
            ) -> "_BaseMLP":
        """Train for up to ``max_iter`` epochs (see the module docstring for when it stops).
        ``sample_weight``: one number >= 0 per row; each batch's loss is then the weighted mean
        ``sum(w_i l_i) / sum(w_i)``, and the early-stopping score weighs the validation rows."""
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def _fit(self, X, y, incremental: bool, sample_weight=None):
        settings = self._check_params()
        with limit_threads(settings["threads"]):
            return self._fit_checked(X, y, incremental, settings, sample_weight)

    def _fit_checked(self, X, y, incremental: bool, settings: dict[str, Any], sample_weight):
        if incremental and settings["early_stopping"]:
            raise ValueError("partial_fit does not support early_stopping=True (it trains one "
                             "epoch on the data given); use fit, or set early_stopping=False")
        continuing = hasattr(self, "model_") and (incremental or settings["warm_start"])
        if not continuing:
            # A new model: if this fit fails, the estimator is unfitted, not half the old one.
            self.__dict__.pop("model_", None)
        X, y = _validate_data(self, X, y, reset=not continuing, dtype=(np.float64, np.float32),
                              **self._y_checks())
        T, n_outputs = self._encode_targets(y, continuing, incremental)
        W = self._row_weights(sample_weight, y, incremental)
        if continuing:
            model = self.model_
            self._check_same_architecture(model, settings, X.shape[1], n_outputs)
        else:
            # dtype=None: scikit-learn's rule, float32 data in float32, anything else in float64.
            model = MLP([X.shape[1], *settings["hidden_layer_sizes"], n_outputs],
                        activation=settings["activation"], backend=settings["backend"],
                        dtype=settings["dtype"] or X.dtype.name, seed=model_seed(self.random_state),
                        dropout=settings["dropout"], norm=settings["norm"])
        keep_optimizer = incremental and model.optimizer is not None
        optimizer = None if keep_optimizer else self._make_optimizer(settings)
        X = np.asarray(X, dtype=model.storage)
        loss = self._model_loss(n_outputs)

        X_val = T_val = W_val = None
        if settings["early_stopping"]:
            X, X_val, T, T_val, W, W_val = self._validation_split(
                X, T, W, settings["validation_fraction"], model.seed)
        batch_size = settings["batch_size"]
        if batch_size == "auto":
            batch_size = min(_AUTO_BATCH, X.shape[0])
        epochs = 1 if incremental else settings["max_iter"]
        score = None if X_val is None else \
            (lambda: self._score_outputs(model.forward(X_val), T_val, W_val))
        seen = getattr(self, "t_", 0) if continuing else 0  # 0: pickled before t_ existed
        schedule = self._schedule(model, settings, keep_optimizer, X.shape[0], seen)
        # fit() steps a schedule on its History records; the validation score is not one, so
        # an adaptive rate with early stopping is stepped by the monitor instead.
        by_monitor = schedule if isinstance(schedule, AdaptiveLR) and score is not None else None
        monitor = ScikitLearnStopping(settings["tol"], settings["n_iter_no_change"], score,
                                      schedule if isinstance(schedule, AdaptiveLR) else None,
                                      optimizer if by_monitor is not None else None)
        if by_monitor is not None:
            by_monitor.start(optimizer)
        if not keep_optimizer:
            # fit() would otherwise continue the schedule of a warm-started model.
            model.lr_scheduler = None
        try:
            _train(model, X, T, loss=loss, optimizer=optimizer, epochs=epochs,
                   batch_size=batch_size, shuffle=settings["shuffle"], seed=model.seed,
                   sample_weight=W, callbacks=[monitor], progress=bool(settings["verbose"]),
                   lr_scheduler=None if by_monitor is not None or keep_optimizer else schedule)
        except KeyboardInterrupt:
            # scikit-learn's MLP keeps what was trained so far; so do we.
            warnings.warn("Training interrupted by user.")
            monitor._restore(model)  # (fit ran no on_fit_end)
        if not incremental and not monitor.stopped and len(monitor.losses) == epochs:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({epochs}) reached and the "
                          "optimization hasn't converged yet.", ConvergenceWarning)
        self._store_fitted(model, monitor, continuing, n_outputs)
        self.t_ = seen + X.shape[0] * len(monitor.losses)
        return self

    def _schedule(self, model: MLP, settings: dict, keep_optimizer: bool, n_rows: int,
                  seen: int) -> LRScheduler | None:
        """The schedule of this fit: scikit-learn's learning_rate as a bpkernels scheduler.
        partial_fit continues the model's (None: fit() goes on with model.lr_scheduler), as
        scikit-learn keeps its optimizer; fit, warm or not, starts a new one, as it does."""
        if keep_optimizer:
            current = model.lr_scheduler
            if isinstance(current, InvScalingLR):
                current.samples_per_epoch = n_rows  # this call's rows, scikit-learn's t_ step
            return current
        kind = settings["learning_rate"]
        if kind == "invscaling":
            return InvScalingLR(settings["power_t"], samples_per_epoch=n_rows,
                                samples_seen=seen)
        if kind == "adaptive":
            early = settings["early_stopping"]
            return AdaptiveLR(settings["n_iter_no_change"], settings["tol"],
                              mode="max" if early else "min", monitor="score" if early else "loss")
        return None

    def _store_fitted(self, model: MLP, monitor: ScikitLearnStopping, continuing: bool,
                      n_outputs: int) -> None:
        previous = self.loss_curve_ if continuing else []
        self.model_ = model
        self.n_outputs_ = n_outputs
        self.loss_curve_ = previous + monitor.losses
        self.loss_ = self.loss_curve_[-1] if self.loss_curve_ else math.nan
        self.n_iter_ = model.epochs_trained
        early = monitor.score is not None
        self.best_loss_ = None if early else min(self.loss_curve_, default=math.inf)
        self.validation_scores_ = monitor.scores if early else None
        self.best_validation_score_ = monitor.best if early else None

    def _validation_split(self, X, T, W, fraction: float, seed: int):
        stratify = T.reshape(T.shape[0], -1)[:, 0] if self._stratify else None
        parts = train_test_split(X, T, *([] if W is None else [W]), test_size=fraction,
                                 random_state=seed, stratify=stratify)
        X_train, X_val, T_train, T_val = parts[:4]
        W_train, W_val = parts[4:] if W is not None else (None, None)
        if X_val.shape[0] < 2:
            raise ValueError(f"The validation set is too small ({X_val.shape[0]} sample of "
                             f"{X.shape[0]}): increase 'validation_fraction' (now {fraction}) "
                             "or the size of your dataset")
        return X_train, X_val, T_train, T_val, W_train, W_val

    def _make_optimizer(self, settings: dict) -> Optimizer:
        spec = settings["optimizer"]
        if isinstance(spec, str):
            return make_optimizer(spec, lr=settings["learning_rate_init"],
                                  weight_decay=settings["weight_decay"])
        # A copy per fit: the estimator's parameter stays unbound, so clone() and refits work.
        fresh = copy.copy(spec)
        Optimizer.__init__(fresh)  # drops any state, step count and model binding
        return fresh

    def _check_same_architecture(self, model: MLP, settings: dict, n_features: int,
                                 n_outputs: int) -> None:
        wanted = ([n_features, *settings["hidden_layer_sizes"], n_outputs],
                  list(settings["activation"]), settings["backend"],
                  settings["dtype"] or model.dtype.name,  # None: the fitted model's stays
                  list(settings["dropout"]), settings["norm"])
        have = (list(model.sizes), list(model.activations), model.backend.name, model.dtype.name,
                list(model.dropout), model.norm)
        if wanted != have:
            raise ValueError(
                "warm_start and partial_fit continue the fitted model, so sizes, activation, "
                f"backend, dtype, dropout and norm must stay as they were: fitted {have}, now {wanted}; "
                "refit with warm_start=False to start a new model")

    # ------------------------------------------------------------------ inference
    def _outputs(self, X: ArrayLike) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = _validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        with limit_threads(check_threads(self.threads)):
            return self.model_.forward(np.asarray(X, dtype=self.model_.storage))

    # ------------------------------------------------------------------ parameters
    def _check_params(self) -> dict[str, Any]:
        """The constructor parameters, validated and resolved (scikit-learn validates at fit)."""
        sizes = check_hidden_layer_sizes(self.hidden_layer_sizes)
        activation = self.activation
        if isinstance(activation, str):
            activation = _ACTIVATION_ALIASES.get(activation.lower(), activation)
        elif isinstance(activation, (list, tuple)):
            activation = [_ACTIVATION_ALIASES.get(a.lower(), a) if isinstance(a, str) else a
                          for a in activation]
        else:
            raise TypeError("activation must be a name or one name per hidden layer, got "
                            f"{type(activation).__name__}")
        settings = {
            "hidden_layer_sizes": sizes,
            "activation": hidden_activations(activation, len(sizes)),
            **self._check_learning_rate(),
            "power_t": check_real("power_t", self.power_t, low=0.0),
            "weight_decay": check_real("weight_decay", self.weight_decay, low=0.0),
            "batch_size": "auto" if is_auto(self.batch_size) else
            check_int("batch_size", self.batch_size, 1, 'an integer >= 1 or "auto"'),
            "max_iter": check_int("max_iter", self.max_iter, 1),
            "shuffle": check_bool("shuffle", self.shuffle),
            "tol": check_real("tol", self.tol, low=0.0),
            "n_iter_no_change": check_int("n_iter_no_change", self.n_iter_no_change, 1),
            "early_stopping": check_bool("early_stopping", self.early_stopping),
            "validation_fraction": check_real("validation_fraction", self.validation_fraction,
                                               low=0.0, low_open=True, high=1.0),
            "verbose": bool(self.verbose) if isinstance(self.verbose, (bool, np.bool_)) else
            check_int("verbose", self.verbose, 0, "a bool or an integer >= 0"),
            "warm_start": check_bool("warm_start", self.warm_start),
            "dtype": None if self.dtype is None else resolve_dtype(self.dtype).name,
            "threads": check_threads(self.threads),
            "dropout": check_dropout(self.dropout, len(sizes)),
            "norm": check_norm(self.norm),
        }
        check_random_state_value(self.random_state)
        settings["backend"] = get_backend(self.backend, bf16=settings["dtype"] == "bf16").name
        settings["optimizer"] = self._check_optimizer(settings)
        return settings

    def _check_learning_rate(self) -> dict[str, Any]:
        """learning_rate (a schedule's name, or a number: the older spelling of
        learning_rate_init with the constant schedule) and learning_rate_init, resolved."""
        init = check_real("learning_rate_init", self.learning_rate_init, low=0.0, low_open=True)
        kind, names = self.learning_rate, ", ".join(map(repr, _SCHEDULES))
        if isinstance(kind, str):
            if kind not in _SCHEDULES:
                raise ValueError(f"learning_rate must be one of {names} (or a number, the older "
                                 f"spelling of learning_rate_init), got {kind!r}")
            return {"learning_rate": kind, "learning_rate_init": init,
                    "rate_field": "learning_rate_init"}
        if isinstance(kind, bool) or not isinstance(kind, numbers.Real):
            raise TypeError(f"learning_rate must be one of {names} or a number, got "
                            f"{type(kind).__name__}")
        rate = check_real("learning_rate", kind, low=0.0, low_open=True)
        if init != _DEFAULT_LEARNING_RATE:
            raise ValueError(f"learning_rate={rate} (a number: the older spelling of "
                             f"learning_rate_init) and learning_rate_init={init} both set the "
                             "initial rate; give learning_rate_init only")
        return {"learning_rate": "constant", "learning_rate_init": rate,
                "rate_field": "learning_rate"}

    def _check_optimizer(self, settings: dict):
        spec = self.optimizer
        if isinstance(spec, str):
            make_optimizer(spec)  # the unknown-name error, naming the valid ones
            return spec
        if not isinstance(spec, Optimizer):
            raise TypeError("optimizer must be a name (sgd, adam, adamw, rmsprop) or a "
                            f"bpkernels Optimizer, got {type(spec).__name__}")
        # With an instance its own hyper-parameters rule; a conflicting estimator setting is
        # an error rather than silently ignored.
        conflicts = [
            f"{shown_as}={settings[name]} but optimizer has {attr}={getattr(spec, attr, None)}"
            for name, shown_as, attr, default in (
                ("learning_rate_init", settings["rate_field"], "lr", _DEFAULT_LEARNING_RATE),
                ("weight_decay", "weight_decay", "weight_decay", 0.0))
            if settings[name] != default and settings[name] != getattr(spec, attr, None)]
        if conflicts:
            raise ValueError("learning_rate_init and weight_decay apply to an optimizer given by "
                             f"name; set them on the {type(spec).__name__} instance instead ("
                             + "; ".join(conflicts) + ")")
        return spec

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        # A copy: object.__getstate__ hands out the instance's own __dict__.
        state = dict(super().__getstate__())
        if "model_" in state:
            state["model_"] = model_to_host(state["model_"])
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if "model_" in state:
            state["model_"] = model_from_host(state["model_"])
        super().__setstate__(state)

    # ------------------------------------------------------------------ subclass hooks
    def _y_checks(self) -> dict:
        """Keyword arguments of validate_data for y."""
        raise NotImplementedError

    def _encode_targets(self, y, continuing: bool, incremental: bool):
        raise NotImplementedError

    def _model_loss(self, n_outputs: int) -> str:
        raise NotImplementedError

    def _score_outputs(self, outputs: np.ndarray, T: np.ndarray, W: np.ndarray | None
                       ) -> float:
        """The validation score, weighted by W (None, or rows that all weigh 0: unweighted)."""
        raise NotImplementedError

    def _row_weights(self, sample_weight, y, incremental: bool) -> np.ndarray | None:
        return sample_weights(sample_weight, None, y, None,
                              "partial_fit" if incremental else "fit")


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multilayer perceptron classifier trained by bpkernels on any backend.

    Parameters (stored as given, validated by ``fit``):

    - ``hidden_layer_sizes`` (100,): one width per hidden layer (an int for one layer, () none).
    - ``activation`` "relu": identity, relu, leaky_relu, sigmoid (alias "logistic"), tanh,
      gelu, silu; or one name per hidden layer. The output layer is linear (logits).
    - ``optimizer`` "adam": sgd, adam, adamw or rmsprop, built with ``learning_rate_init``
      (1e-3) and ``weight_decay`` (0.0); or a :class:`bpkernels.Optimizer`, copied unbound at
      every fit and then using its own hyper-parameters (a differing non-default
      ``learning_rate_init``/``weight_decay`` is an error).
    - ``learning_rate`` "constant", "invscaling" (with ``power_t`` 0.5) or "adaptive":
      scikit-learn's schedules, for any optimizer; a number: the older spelling of
      ``learning_rate_init``.
    - ``batch_size`` 32 or "auto" (min(200, n_samples)); ``max_iter`` 200 epochs;
      ``shuffle`` True; ``random_state`` None.
    - ``tol`` 1e-4, ``n_iter_no_change`` 10, ``early_stopping`` False,
      ``validation_fraction`` 0.1: the stopping rule of scikit-learn's MLP.
    - ``backend`` "auto", ``dtype`` None: where and in what precision it trains (None:
      float32 for float32 X, else float64).
    - ``verbose`` False: a progress bar (or line) per epoch; ``warm_start`` False.
    - ``threads`` None: the most threads (BLAS and Numba) that fit, partial_fit and the
      predictions run on, the previous counts restored afterwards (see
      :func:`bpkernels.set_num_threads`); None leaves the counts as they are.
    - ``dropout`` 0.0: each hidden layer's output is dropped in training with this probability
      (one per hidden layer, or one for all), as ``torch.nn.Dropout``; predictions never drop.
    - ``norm`` None or "layer": ``torch.nn.LayerNorm`` between each hidden layer's product and
      its activation.
    - ``class_weight`` None: a mapping label -> weight (labels absent from it weigh 1) or
      "balanced" (``n_samples / (n_classes * bincount(y))``, scikit-learn's rule; not in
      partial_fit). A row weighs its ``sample_weight`` times its class's weight, and the loss
      is their weighted mean, as ``torch.nn.CrossEntropyLoss(weight=...)``.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``feature_names_in_`` (for named
    columns), ``model_`` (the :class:`bpkernels.MLP`), ``n_outputs_``, ``loss_curve_``,
    ``loss_``, ``n_iter_`` (epochs trained), ``t_`` (training samples seen),
    ``best_loss_`` (without early stopping),
    ``validation_scores_`` and ``best_validation_score_`` (with it, for the last fit).
    """

    _stratify = True

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, optimizer="adam",
                 learning_rate="constant", learning_rate_init=_DEFAULT_LEARNING_RATE,
                 power_t=0.5, weight_decay=0.0, batch_size=32, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, n_iter_no_change=10, early_stopping=False,
                 validation_fraction=0.1, backend="auto", dtype=None, verbose=False,
                 warm_start=False, threads=None, dropout=0.0, norm=None, class_weight=None):
        super().__init__(hidden_layer_sizes, activation, optimizer=optimizer,
                         learning_rate=learning_rate, learning_rate_init=learning_rate_init,
                         power_t=power_t, weight_decay=weight_decay, batch_size=batch_size,
                         max_iter=max_iter, shuffle=shuffle, random_state=random_state, tol=tol,
                         n_iter_no_change=n_iter_no_change, early_stopping=early_stopping,
                         validation_fraction=validation_fraction, backend=backend, dtype=dtype,
                         verbose=verbose, warm_start=warm_start, threads=threads,
                         dropout=dropout, norm=norm)
        self.class_weight = class_weight

    def partial_fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None,
                    classes: ArrayLike | None = None) -> "MLPClassifier":
        """One epoch over X, y on the current model (a new one on the first call, which needs
        ``classes``: every label that will ever appear, e.g. ``np.unique(y_all)``). The
        arguments are in scikit-learn's order: pass ``classes`` by name."""
        if not hasattr(self, "model_"):
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit "
                                 "(every label that will ever appear, e.g. np.unique(y_all))")
            self._partial_classes = unique_labels(classes)
        elif classes is not None and not np.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(f"classes={classes!r} differs from the classes of the previous "
                             f"calls, {self.classes_!r}")
        try:
            return self._fit(X, y, incremental=True, sample_weight=sample_weight)
        finally:
            self.__dict__.pop("_partial_classes", None)

    def _y_checks(self) -> dict:
        return {}

    def _encode_targets(self, y, continuing: bool, incremental: bool):
        check_classification_targets(y)
        present = unique_labels(y)
        if continuing:
            classes = self.classes_
            if not incremental and set(present) != set(classes):
                raise ValueError("warm_start can only be used where y has the same classes as "
                                 f"in the previous call to fit: previously {classes}, y has "
                                 f"{present}")
        else:
            classes = getattr(self, "_partial_classes", present)
        unknown = np.setdiff1d(present, classes)
        if unknown.size:
            raise ValueError(f"y has labels {unknown} that are not among the classes {classes}")
        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes in y, got 1 class: {classes}")
        self.classes_ = classes
        T = np.searchsorted(classes, y).astype(np.int64)
        if len(classes) == 2:
            return T.astype(np.float64).reshape(-1, 1), 1
        return T, len(classes)

    def _model_loss(self, n_outputs: int) -> str:
        return "binary_cross_entropy" if n_outputs == 1 else "cross_entropy"

    def _score_outputs(self, outputs, T, W) -> float:
        hits = class_index(outputs) == np.asarray(T).reshape(-1)
        return float(np.average(hits, weights=W if W is not None and W.sum() > 0 else None))

    def _row_weights(self, sample_weight, y, incremental: bool) -> np.ndarray | None:
        if incremental and isinstance(self.class_weight, str) and \
                self.class_weight == "balanced":
            raise ValueError("class_weight='balanced' is not supported by partial_fit (one "
                             "call sees a part of the data); compute the weights once, e.g. "
                             "sklearn.utils.class_weight.compute_class_weight('balanced', "
                             "classes=classes, y=y_all), and pass them as a mapping")
        return sample_weights(sample_weight, self.class_weight, y, self.classes_,
                              "partial_fit" if incremental else "fit")

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """The logits in float64: shape (n,) for two classes (> 0 means ``classes_[1]``),
        else (n, n_classes)."""
        Y = self._outputs(X).astype(np.float64)
        return Y[:, 0] if Y.shape[1] == 1 else Y

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities in float64, columns in the order of ``classes_``: the softmax
        of the logits, or sigmoid and its complement for two classes."""
        Y = self._outputs(X).astype(np.float64)
        if Y.shape[1] == 1:
            # sigmoid(-z) rather than 1 - sigmoid(z): no cancellation for confident rows.
            return np.hstack([sigmoid(-Y), sigmoid(Y)])
        Y -= Y.max(axis=1, keepdims=True)  # exp stays finite
        np.exp(Y, out=Y)
        Y /= Y.sum(axis=1, keepdims=True)
        return Y

    def predict_log_proba(self, X: ArrayLike) -> np.ndarray:
        """The log of :meth:`predict_proba`."""
        return np.log(self.predict_proba(X))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The most likely class of each row, a label from ``classes_``."""
        index = class_index(self._outputs(X))  # first: it raises NotFittedError
        return self.classes_[index]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags

    def _more_tags(self) -> dict:  # scikit-learn < 1.6
        return {"multilabel": False}


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multilayer perceptron regressor trained by bpkernels (loss ``mse``) on any backend.

    Parameters and fitted attributes as :class:`MLPClassifier`'s (less ``classes_``; the
    validation score is R^2). ``y`` may be 1-D or 2-D; ``predict`` returns float64 arrays
    shaped like it.
    """

    def partial_fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None
                    ) -> "MLPRegressor":
        """One epoch over X, y on the current model (a new one on the first call)."""
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def _y_checks(self) -> dict:
        return {"multi_output": True, "y_numeric": True}

    def _encode_targets(self, y, continuing: bool, incremental: bool):
        y = np.asarray(y, dtype=np.float64)
        n_outputs = 1 if y.ndim == 1 else y.shape[1]
        if n_outputs < 1:
            raise ValueError(f"y must have at least one column, got shape {y.shape}")
        self._y_is_2d = y.ndim == 2
        return y.reshape(y.shape[0], n_outputs), n_outputs

    def _model_loss(self, n_outputs: int) -> str:
        return "mse"

    def _score_outputs(self, outputs, T, W) -> float:
        return float(r2_score(T, outputs,
                              sample_weight=W if W is not None and W.sum() > 0 else None))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predictions in float64 (scikit-learn's convention), shaped like the fitted ``y``."""
        Y = self._outputs(X).astype(np.float64)
        return Y if self._y_is_2d else Y[:, 0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self) -> dict:  # scikit-learn < 1.6
        return {"multioutput": True}
