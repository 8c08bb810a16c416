"""scikit-learn's MLP learning-rate schedules as schedulers of :mod:`bpkernels.lr_scheduler`:
``InvScalingLR`` (``learning_rate="invscaling"``) and ``AdaptiveLR`` (``"adaptive"``).

Their arithmetic is that of scikit-learn's ``SGDOptimizer``, operation for operation, so the
rates agree to the last bit. They are registered in ``bpkernels.lr_scheduler.SCHEDULERS`` on
import (``bpkernels.model`` imports this module), so checkpoints and pickles keep them. They
live apart from lr_scheduler.py, which holds PyTorch's schedules and is near its size limit.
"""
from __future__ import annotations

import math
from typing import Any

from .lr_scheduler import SCHEDULERS, LRScheduler
from .validation import check_positive_int, check_real

__all__ = ["InvScalingLR", "AdaptiveLR"]

# Below this rate AdaptiveLR no longer divides: scikit-learn stops training instead.
ADAPTIVE_MIN_LR = 1e-6


def _state_int(state: dict[str, Any], key: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"scheduler state field {key!r} is {value!r:.60}; expected an "
                         "integer >= 0")
    return value


class InvScalingLR(LRScheduler):
    """scikit-learn's ``learning_rate="invscaling"``: the first step (epoch) runs at the base
    rate; after each, ``t`` grows by ``samples_per_epoch`` and the rate becomes
    ``base_lr / (t + 1) ** power_t``. ``t`` starts at ``samples_seen`` (scikit-learn's ``t_``
    carries over a warm start while its new optimizer restarts at the base rate).
    ``samples_per_epoch`` may be changed between fits (partial_fit on batches of any size)."""

    name = "InvScalingLR"

    def __init__(self, power_t: float = 0.5, samples_per_epoch: int = 1,
                 samples_seen: int = 0) -> None:
        super().__init__()
        self.power_t = check_real(power_t, "power_t", 0.0)
        self.samples_per_epoch = check_positive_int(samples_per_epoch, "samples_per_epoch", 1)
        self.samples_seen = check_positive_int(samples_seen, "samples_seen", 0)
        self.t = self.samples_seen

    def _get_lr(self, group):
        if self._is_initial:
            self.t = self.samples_seen
            return self.base_lr
        # A running count (state), not last_epoch * samples_per_epoch: the size may change.
        self.t += self.samples_per_epoch
        return float(self.base_lr) / (self.t + 1) ** self.power_t

    def hyperparameters(self):
        return {"power_t": self.power_t, "samples_per_epoch": self.samples_per_epoch,
                "samples_seen": self.samples_seen}

    def _extra_state(self):
        return {"t": self.t}

    def _load(self, state, group):
        super()._load(state, group)
        self.t = _state_int(state, "t")


class AdaptiveLR(LRScheduler):
    """scikit-learn's ``learning_rate="adaptive"``: once the monitored record has failed for
    more than ``patience`` epochs in a row to beat the best value by ``tol`` (``mode`` "min";
    "max" for a score), the rate is divided by 5 and the count starts again; if the rate is
    already <= 1e-6, ``exhausted`` becomes True for that epoch instead (scikit-learn stops
    there). Steps once per epoch. Not ReduceLROnPlateau(factor=0.2, threshold_mode="abs"):
    its best value moves only on an improvement of more than the threshold, this one's on
    any, and ``x * 0.2`` is not always ``x / 5`` to the last bit."""

    name = "AdaptiveLR"
    per_epoch_only = True

    def __init__(self, patience: int = 10, tol: float = 1e-4, mode: str = "min",
                 monitor: str = "loss") -> None:
        super().__init__()
        self.patience = check_positive_int(patience, "patience", 0)
        self.tol = check_real(tol, "tol", 0.0)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must name a History record such as 'loss', "
                            f"got {monitor!r}")
        self.monitor = monitor
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.exhausted = False

    def _bind(self, group):
        self._group = group
        group.initial_lr = group.lr
        self.base_lr = group.lr
        self.last_epoch = 0

    def step(self, metric: float | None = None) -> None:  # type: ignore[override]
        """One epoch's end, given the monitored record's value."""
        group = self._started_group()
        if metric is None:
            raise TypeError(f"AdaptiveLR.step needs the value of {self.monitor!r}")
        value = check_real(metric, self.monitor)
        self.last_epoch += 1
        # scikit-learn's _update_no_improvement_count, written for both directions.
        if self.mode == "min":
            worse = value > self.best - self.tol
            self.best = min(self.best, value)
        else:
            worse = value < self.best + self.tol
            self.best = max(self.best, value)
        self.num_bad_epochs = self.num_bad_epochs + 1 if worse else 0
        self.exhausted = False
        if self.num_bad_epochs > self.patience:
            if group.lr <= ADAPTIVE_MIN_LR:
                self.exhausted = True  # the count stays: scikit-learn does not reset it here
            else:
                group.lr /= 5.0
                self.num_bad_epochs = 0

    def rates(self, n: int):
        raise TypeError("AdaptiveLR steps once per epoch on a record; it has no per-step "
                        "rates (use lr_scheduler_interval='epoch')")

    def hyperparameters(self):
        return {"patience": self.patience, "tol": self.tol, "mode": self.mode,
                "monitor": self.monitor}

    def _extra_state(self):
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "exhausted": self.exhausted}

    def _load(self, state, group):
        super()._load(state, group)
        best = state.get("best")
        if isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best):
            raise ValueError(f"scheduler state field 'best' is {best!r:.60}; expected a number")
        exhausted = state.get("exhausted")
        if not isinstance(exhausted, bool):
            raise ValueError(f"scheduler state field 'exhausted' is {exhausted!r:.60}; "
                             "expected true or false")
        self.best = float(best)
        self.num_bad_epochs = _state_int(state, "num_bad_epochs")
        self.exhausted = exhausted


SCHEDULERS.update({cls.name: cls for cls in (InvScalingLR, AdaptiveLR)})
