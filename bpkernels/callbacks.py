"""Callbacks of fit() beyond a plain function: early stopping.

fit() calls each callback as ``callback(epoch, record)`` after every epoch (True stops
training). An object may also have ``on_fit_start(model, optimizer)``, called once the
optimizer is bound and before the first epoch, and ``on_fit_end(model, history)``, called
when the epochs end (finished, or stopped by a callback) before fit() returns; not when fit()
raises (divergence, Ctrl-C), which leaves the model as that error says.
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

from .validation import check_positive_int

if TYPE_CHECKING:
    from .history import History
    from .model import MLP
    from .optim import Optimizer

# Records where larger is better; any other (losses, errors) is better smaller.
MAXIMIZED = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "r2")


def _maximized(name: str) -> bool:
    base = name[4:] if name.startswith("val_") else name
    return base in MAXIMIZED or (base.startswith("top") and base[3:].isdigit())


class EarlyStopping:
    """Stop when ``monitor`` has stopped improving, with the semantics of Keras's
    ``EarlyStopping``: an epoch improves when its value beats the best by more than
    ``min_delta`` (in the direction ``mode`` says; ``"auto"`` maximises accuracies, F1, R^2 and
    minimises the rest); training stops after ``patience`` epochs in a row without improvement
    (never at the first epoch); epochs before ``start_from_epoch`` (counted from 0 in this fit)
    are not watched. ``baseline``: the wait restarts only on epochs that also beat it.

    With ``restore_best_weights`` the model ends with the weights and optimizer state of its
    best epoch (a copy kept on the device, taken on each improvement). The History records
    ``best_epoch`` and ``stopped_epoch`` (epoch numbers as in its records)."""

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 mode: str = "auto", restore_best_weights: bool = False,
                 start_from_epoch: int = 0, baseline: float | None = None) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must name a History record such as 'val_loss', "
                            f"got {monitor!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or \
                not math.isfinite(min_delta):
            raise ValueError(f"min_delta must be a finite number, got {min_delta!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be one of 'auto', 'min', 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.min_delta = abs(float(min_delta))
        self.patience = _count("patience", patience)
        self.start_from_epoch = _count("start_from_epoch", start_from_epoch)
        self.restore_best_weights = bool(restore_best_weights)
        if baseline is not None and (isinstance(baseline, bool) or
                                     not isinstance(baseline, numbers.Real)):
            raise TypeError(f"baseline must be a number or None, got {type(baseline).__name__}")
        self.baseline = None if baseline is None else float(baseline)
        self.maximize = mode == "max" or (mode == "auto" and _maximized(monitor))
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._seen = 0
        self._snapshot: tuple[Any, dict[str, Any], int] | None = None
        self._model: "MLP | None" = None
        self._optimizer: "Optimizer | None" = None

    # ------------------------------------------------------------------ fit's hooks
    def on_fit_start(self, model: "MLP", optimizer: "Optimizer") -> None:
        self._reset()
        self._model, self._optimizer = model, optimizer

    def __call__(self, epoch: int, record: dict[str, float]) -> bool:
        index, self._seen = self._seen, self._seen + 1
        if self.monitor not in record:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, which the History does "
                           f"not record (it has {', '.join(record)}); pass validation_data "
                           f"for val_ records")
        current = float(record[self.monitor])
        if index < self.start_from_epoch:
            return False
        if self.restore_best_weights and self._snapshot is None:
            self._keep(epoch)  # until something improves, this epoch is the best
        self.wait += 1
        if self._improves(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self._keep(epoch)
            if self.baseline is None or self._improves(current, self.baseline):
                self.wait = 0
            return False
        if self.wait >= self.patience and index > 0:
            self.stopped_epoch = epoch
            return True
        return False

    def on_fit_end(self, model: "MLP", history: "History") -> None:
        history.best_epoch, history.stopped_epoch = self.best_epoch, self.stopped_epoch
        self._restore(model)

    # ------------------------------------------------------------------ helpers
    def _restore(self, model: "MLP") -> None:
        """The best epoch's weights (and optimizer state) back into the model, with
        restore_best_weights; then the copies are freed."""
        if self.restore_best_weights and self._snapshot is not None:
            params, state, step_count = self._snapshot
            be = model.backend
            be.copy(params, model.params)
            opt = self._optimizer
            if opt is not None:
                for name, buf in state.items():
                    be.copy(buf, opt.state[name])
                opt.step_count = step_count
        self._snapshot = None  # the copies are freed with the fit
        self._model = self._optimizer = None

    def _improves(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.maximize:
            return value - self.min_delta > reference
        return value + self.min_delta < reference

    def _keep(self, epoch: int) -> None:
        model, opt = self._model, self._optimizer
        if model is None:
            raise RuntimeError("EarlyStopping(restore_best_weights=True) is driven by fit(); "
                               "it was called without on_fit_start")
        be = model.backend
        if self._snapshot is None:
            state = {} if opt is None else {n: be.empty(b.shape, b.dtype)
                                            for n, b in opt.state.items()}
            self._snapshot = (be.empty(model.params.shape, model.params.dtype), state, 0)
        params, state, _ = self._snapshot
        be.copy(model.params, params)
        for name, buf in state.items():
            be.copy(opt.state[name], buf)  # type: ignore[union-attr]
        self._snapshot = (params, state, 0 if opt is None else opt.step_count)

    def __repr__(self) -> str:
        return (f"EarlyStopping(monitor={self.monitor!r}, min_delta={self.min_delta}, "
                f"patience={self.patience}, mode={self.mode!r}, "
                f"restore_best_weights={self.restore_best_weights}, "
                f"start_from_epoch={self.start_from_epoch})")


def _count(name: str, value: Any) -> int:
    return check_positive_int(value, name, 0)
