"""Learning-rate schedules with the names, arguments, defaults and numbers of
``torch.optim.lr_scheduler``.

A scheduler is made without an optimizer; :meth:`LRScheduler.start` binds it to one when
training starts and reads the optimizer's ``lr`` as the base learning rate (one-cycle sets its
own). From then on ``scheduler.lr`` is the learning rate of the next optimizer step (or epoch)
and :meth:`LRScheduler.step` advances it: the rate used by step ``t`` is the rate after ``t``
calls of ``step()``, both counted from 0, as in PyTorch.

The arithmetic is PyTorch's own, operation for operation: its chainable (recursive) forms where
it uses them, its closed forms where it does (SequentialLR's milestones), so that the rates agree
to the last bit, not just to a tolerance. :meth:`LRScheduler.rates` gives the rates of the steps
ahead as one array, which the training loop hands to the fused epoch once per epoch.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np

from .validation import check_positive_int, check_real

__all__ = ["LRScheduler", "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR",
           "LinearLR", "OneCycleLR", "SequentialLR", "ReduceLROnPlateau", "SCHEDULERS",
           "scheduler_from_config"]


def _real(name: str, value: Any, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False) -> float:
    return check_real(value, name, -math.inf if low is None else low,
                      math.inf if high is None else high, low_open=low_open,
                      high_open=high_open)


def _count(name: str, value: Any, low: int = 1) -> int:
    return check_positive_int(value, name, low)


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


class _Group:
    """What PyTorch keeps in ``optimizer.param_groups[0]`` and its schedulers read and write:
    schedulers chained in a SequentialLR share one."""

    def __init__(self, lr: float, momentum: float | None) -> None:
        self.lr = lr
        self.initial_lr: float | None = None
        self.momentum = momentum  # SGD's/RMSprop's momentum or Adam's beta1; None: neither
        self.max_lr = self.min_lr = 0.0
        self.max_momentum = self.base_momentum = 0.0

    def state(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_Group":
        group = cls(0.0, None)
        if set(state) != set(vars(group)):
            raise ValueError(f"scheduler state field 'group' has keys {sorted(state)}; "
                             f"expected {sorted(vars(group))}")
        for key in vars(group):
            setattr(group, key, state[key])
        return group


def _momentum_of(optimizer: Any) -> tuple[str | None, float | None]:
    """Which hyper-parameter one-cycle's momentum cycling drives, and its value."""
    if hasattr(optimizer, "beta1"):
        return "beta1", float(optimizer.beta1)
    if hasattr(optimizer, "momentum"):
        return "momentum", float(optimizer.momentum)
    return None, None


class LRScheduler:
    """Base class. Subclasses give :meth:`_get_lr` (PyTorch's ``get_lr``) and may give
    :meth:`_closed_form`. ``lr`` is the rate of the next step; ``momentum`` the momentum (or
    Adam's beta1) of the next step where the schedule cycles it, else None."""

    name: ClassVar[str] = ""
    per_epoch_only: ClassVar[bool] = False  # ReduceLROnPlateau: it steps on an epoch's record

    def __init__(self) -> None:
        self._group: _Group | None = None
        self.last_epoch = -1
        self._step_count = 0
        self._is_initial = False
        self.base_lr = 0.0

    # ----------------------------------------------------------------- binding
    @property
    def started(self) -> bool:
        return self._group is not None

    def start(self, optimizer: Any) -> None:
        """Bind to ``optimizer`` (its ``lr`` becomes the base rate) unless already started, as
        after loading a checkpoint, where the schedule continues where it stopped."""
        if self._group is not None:
            return
        _, momentum = _momentum_of(optimizer)
        self._bind(_Group(_real("the optimizer's lr", optimizer.lr, 0.0), momentum))

    def _bind(self, group: _Group) -> None:
        self._group = group
        self._prepare(group)
        if group.initial_lr is None:
            group.initial_lr = group.lr
        self.base_lr = group.initial_lr
        self._initial_step()

    def _prepare(self, group: _Group) -> None:
        """Set up the group before the initial step (one-cycle writes its own rates)."""

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def _started_group(self) -> _Group:
        if self._group is None:
            raise RuntimeError(f"{type(self).__name__} has not started: fit() starts it, or "
                               "call start(optimizer) to read its base learning rate")
        return self._group

    # ----------------------------------------------------------------- stepping
    @property
    def lr(self) -> float:
        return self._started_group().lr

    @property
    def momentum(self) -> float | None:
        return None

    def step(self) -> None:
        """Advance the schedule by one step (or epoch)."""
        self._step_count += 1
        self._update_lr(None)

    def _update_lr(self, epoch: int | None) -> None:
        group = self._started_group()
        if epoch is None:
            self.last_epoch += 1
            value = self._get_lr(group)
        else:
            self.last_epoch = epoch
            value = self._closed_form() if type(self)._closed_form is not LRScheduler._closed_form \
                else self._get_lr(group)
        group.lr = value

    def _get_lr(self, group: _Group) -> float:
        raise NotImplementedError

    def _closed_form(self) -> float:
        raise NotImplementedError

    def rates(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The learning rates (and cycled momenta, else None) of the next ``n`` steps, as
        float64 arrays, advancing the schedule by ``n`` steps."""
        lrs = np.empty(n)
        moms = None if self.momentum is None else np.empty(n)
        for i in range(n):
            lrs[i] = self.lr
            if moms is not None:
                moms[i] = self.momentum
            self.step()
        return lrs, moms

    # ----------------------------------------------------------------- persistence
    def hyperparameters(self) -> dict[str, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.hyperparameters()}

    def state_dict(self) -> dict[str, Any]:
        """Where the schedule stands (JSON-compatible); empty before it starts."""
        if self._group is None:
            return {}
        return {"last_epoch": self.last_epoch, "step_count": self._step_count,
                "base_lr": self.base_lr, "group": self._group.state(), **self._extra_state()}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`. Every field is checked (it may come from a
        file): a ValueError names the first that is wrong, and the scheduler is unchanged."""
        if not isinstance(state, dict):
            raise ValueError(f"a scheduler state is a mapping, got {type(state).__name__}")
        if not state:
            self._group = None
            return
        group = _Group.from_state(_field(state, "group", dict))
        _rate(group.lr, "group.lr")
        if group.initial_lr is not None:
            _rate(group.initial_lr, "group.initial_lr")
        for key in ("max_lr", "min_lr", "max_momentum", "base_momentum"):
            _rate(getattr(group, key), f"group.{key}")
        if group.momentum is not None:
            _rate(group.momentum, "group.momentum")
        trial = scheduler_from_config(self.config())  # all or nothing: load a copy first
        trial._load(state, group)
        self._load(state, group)

    def _load(self, state: dict[str, Any], group: _Group) -> None:
        self._group = group
        self.last_epoch = _field(state, "last_epoch", int, -1)
        self._step_count = _field(state, "step_count", int, 0)
        self.base_lr = _rate(_field(state, "base_lr", float), "base_lr")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


def _field(state: dict[str, Any], key: str, kind: type, low: int | None = None) -> Any:
    value = state.get(key, ...)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float \
        else isinstance(value, kind) and not isinstance(value, bool)
    if not ok or (low is not None and value < low):
        want = {int: "an integer", float: "a number", dict: "a mapping",
                list: "a list"}[kind] + ("" if low is None else f" >= {low}")
        shown = "missing" if value is ... else repr(value)[:60]
        raise ValueError(f"scheduler state field {key!r} is {shown}; expected {want}")
    return value


def _rate(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"scheduler state field {name!r} is {value!r:.60}; expected a finite "
                         f"number >= 0")
    return float(value)


class StepLR(LRScheduler):
    """Multiply the rate by ``gamma`` every ``step_size`` steps."""

    name = "StepLR"

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        super().__init__()
        self.step_size = _count("step_size", step_size)
        self.gamma = _real("gamma", gamma, 0.0)

    def _get_lr(self, group):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return group.lr
        return group.lr * self.gamma

    def _closed_form(self):
        return self.base_lr * self.gamma ** (self.last_epoch // self.step_size)

    def hyperparameters(self):
        return {"step_size": self.step_size, "gamma": self.gamma}


class MultiStepLR(LRScheduler):
    """Multiply the rate by ``gamma`` at each milestone (a milestone given twice, twice)."""

    name = "MultiStepLR"

    def __init__(self, milestones: Iterable[int], gamma: float = 0.1) -> None:
        super().__init__()
        if isinstance(milestones, (str, bytes, set, frozenset, dict)) or \
                not isinstance(milestones, Iterable):
            raise TypeError(f"milestones must be a sequence of step counts, "
                            f"got {type(milestones).__name__}")
        self.milestones = Counter(_count("milestones[]", m, 0) for m in milestones)
        self.gamma = _real("gamma", gamma, 0.0)

    def _get_lr(self, group):
        if self.last_epoch not in self.milestones:
            return group.lr
        return group.lr * self.gamma ** self.milestones[self.last_epoch]

    def _closed_form(self):
        milestones = sorted(self.milestones.elements())
        return self.base_lr * self.gamma ** bisect.bisect_right(milestones, self.last_epoch)

    def hyperparameters(self):
        return {"milestones": sorted(self.milestones.elements()), "gamma": self.gamma}


class ExponentialLR(LRScheduler):
    """Multiply the rate by ``gamma`` every step."""

    name = "ExponentialLR"

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = _real("gamma", gamma, 0.0)

    def _get_lr(self, group):
        return group.lr if self._is_initial else group.lr * self.gamma

    def _closed_form(self):
        return self.base_lr * self.gamma ** self.last_epoch

    def hyperparameters(self):
        return {"gamma": self.gamma}


class CosineAnnealingLR(LRScheduler):
    """Cosine from the base rate down to ``eta_min`` over ``T_max`` steps, then back up (SGDR
    without restarts, as PyTorch)."""

    name = "CosineAnnealingLR"

    def __init__(self, T_max: int, eta_min: float = 0.0) -> None:
        super().__init__()
        self.T_max = _count("T_max", T_max)
        self.eta_min = _real("eta_min", eta_min, 0.0)

    def _get_lr(self, group):
        if self._is_initial:
            return group.lr
        if (self.last_epoch - 1 - self.T_max) % (2 * self.T_max) == 0:
            return group.lr + (self.base_lr - self.eta_min) * (
                1 - math.cos(math.pi / self.T_max)) / 2
        return ((1 + math.cos(math.pi * self.last_epoch / self.T_max))
                / (1 + math.cos(math.pi * (self.last_epoch - 1) / self.T_max))
                * (group.lr - self.eta_min) + self.eta_min)

    def _closed_form(self):
        return self.eta_min + (self.base_lr - self.eta_min) * (
            1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2

    def hyperparameters(self):
        return {"T_max": self.T_max, "eta_min": self.eta_min}


class LinearLR(LRScheduler):
    """Scale the rate linearly from ``start_factor`` to ``end_factor`` over ``total_iters``
    steps (a warm-up, usually)."""

    name = "LinearLR"

    def __init__(self, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5) -> None:
        super().__init__()
        self.start_factor = _real("start_factor", start_factor, 0.0, 1.0, low_open=True)
        self.end_factor = _real("end_factor", end_factor, 0.0, 1.0)
        self.total_iters = _count("total_iters", total_iters)

    def _get_lr(self, group):
        if self.last_epoch == 0:
            return group.lr * self.start_factor
        if self._is_initial or self.last_epoch > self.total_iters:
            return group.lr
        return group.lr * (1.0 + (self.end_factor - self.start_factor) / (
            self.total_iters * self.start_factor
            + (self.last_epoch - 1) * (self.end_factor - self.start_factor)))

    def _closed_form(self):
        return self.base_lr * (self.start_factor + (self.end_factor - self.start_factor)
                               * min(self.total_iters, self.last_epoch) / self.total_iters)

    def hyperparameters(self):
        return {"start_factor": self.start_factor, "end_factor": self.end_factor,
                "total_iters": self.total_iters}


class OneCycleLR(LRScheduler):
    """The one-cycle policy: up from ``max_lr / div_factor`` to ``max_lr`` over ``pct_start``
    of ``total_steps``, then down to ``max_lr / div_factor / final_div_factor``; with
    ``cycle_momentum`` the momentum (Adam: beta1) moves the opposite way between
    ``max_momentum`` and ``base_momentum``. The optimizer's own ``lr`` is not used."""

    name = "OneCycleLR"

    def __init__(self, max_lr: float, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False) -> None:
        super().__init__()
        self.max_lr = _real("max_lr", max_lr, 0.0, low_open=True)
        if total_steps is not None:
            self.total_steps = _count("total_steps", total_steps)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = _count("epochs", epochs) * _count("steps_per_epoch",
                                                                 steps_per_epoch)
        else:
            raise ValueError("OneCycleLR needs total_steps, or epochs and steps_per_epoch")
        self.pct_start = _real("pct_start", pct_start, 0.0, 1.0)
        self.anneal_strategy = _choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        self.cycle_momentum = bool(cycle_momentum)
        self.base_momentum = _real("base_momentum", base_momentum, 0.0)
        self.max_momentum = _real("max_momentum", max_momentum, 0.0)
        self.div_factor = _real("div_factor", div_factor, 0.0, low_open=True)
        self.final_div_factor = _real("final_div_factor", final_div_factor, 0.0, low_open=True)
        self.three_phase = bool(three_phase)
        total = self.total_steps
        up = float(self.pct_start * total) - 1
        if self.three_phase:
            self._phases = [(up, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                            (float(2 * self.pct_start * total) - 2, "max_lr", "initial_lr",
                             "base_momentum", "max_momentum"),
                            (total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
        else:
            self._phases = [(up, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                            (total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]

    def start(self, optimizer: Any) -> None:
        if self._group is None and self.cycle_momentum:
            which, value = _momentum_of(optimizer)
            if which is None:
                raise ValueError(f"OneCycleLR(cycle_momentum=True) needs an optimizer with a "
                                 f"momentum or betas, got {type(optimizer).__name__}; pass "
                                 f"cycle_momentum=False")
            if which == "momentum" and not value:
                # PyTorch would switch momentum on behind the optimizer's back; say so instead
                raise ValueError(f"OneCycleLR(cycle_momentum=True) cycles the momentum of "
                                 f"{type(optimizer).__name__}, which has momentum=0; give it a "
                                 f"momentum > 0 or pass cycle_momentum=False")
        super().start(optimizer)

    def _prepare(self, group):
        group.initial_lr = self.max_lr / self.div_factor
        group.max_lr = self.max_lr
        group.min_lr = group.initial_lr / self.final_div_factor
        if self.cycle_momentum:
            group.momentum = self.max_momentum
            group.max_momentum = self.max_momentum
            group.base_momentum = self.base_momentum

    @property
    def momentum(self) -> float | None:
        return self._started_group().momentum if self.cycle_momentum else None

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _get_lr(self, group):
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR stepped {step} times, past its total_steps="
                             f"{self.total_steps}; make total_steps cover every step of the fit")
        start_step = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(self._phases):
            if step <= end_step or i == len(self._phases) - 1:
                pct = (step - start_step) / (end_step - start_step)
                lr = self._anneal(getattr(group, lr0), getattr(group, lr1), pct)
                if self.cycle_momentum:
                    group.momentum = self._anneal(getattr(group, m0), getattr(group, m1), pct)
                return lr
            start_step = end_step
        raise AssertionError("unreachable: the last phase always matches")

    def hyperparameters(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps,
                "pct_start": self.pct_start, "anneal_strategy": self.anneal_strategy,
                "cycle_momentum": self.cycle_momentum, "base_momentum": self.base_momentum,
                "max_momentum": self.max_momentum, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "three_phase": self.three_phase}


class SequentialLR(LRScheduler):
    """Run ``schedulers[i]`` from ``milestones[i-1]`` on (a warm-up, then a decay, say)."""

    name = "SequentialLR"

    def __init__(self, schedulers: Sequence[LRScheduler], milestones: Sequence[int]) -> None:
        super().__init__()
        if isinstance(schedulers, LRScheduler) or not isinstance(schedulers, Sequence) \
                or not schedulers:
            raise TypeError("schedulers must be a non-empty list of schedulers")
        for i, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler) or s.per_epoch_only:
                raise TypeError(f"schedulers[{i}] must be a scheduler other than "
                                f"ReduceLROnPlateau, got {type(s).__name__}")
            if s.started:
                raise ValueError(f"schedulers[{i}] has already started; give fresh schedulers")
        if len(set(map(id, schedulers))) != len(schedulers):
            raise ValueError("schedulers lists one scheduler twice; give distinct ones")
        if isinstance(milestones, (str, bytes, set, frozenset, dict)) or \
                not isinstance(milestones, Sequence):
            raise TypeError(f"milestones must be a list of step counts, "
                            f"got {type(milestones).__name__}")
        milestones = [_count("milestones[]", m) for m in milestones]
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR needs one milestone fewer than schedulers: got "
                             f"{len(schedulers)} schedulers and {len(milestones)} milestones")
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must increase, got {milestones}")
        self.schedulers = list(schedulers)
        self.milestones = milestones

    def _bind(self, group):
        # PyTorch's order: each scheduler is made (its initial step included) on the shared
        # group, then the group's rate is reset and the first one's initial step rerun.
        self._group = group
        for s in self.schedulers:
            s._bind(group)
        self.last_epoch = 0
        group.lr = group.initial_lr
        for s in self.schedulers:
            s.last_epoch -= 1
        self.schedulers[bisect.bisect_right(self.milestones, 0)]._initial_step()
        self.base_lr = group.initial_lr

    @property
    def momentum(self) -> float | None:
        return self._active().momentum

    def _active(self) -> LRScheduler:
        return self.schedulers[bisect.bisect_right(self.milestones, self.last_epoch)]

    def step(self) -> None:
        self._started_group()
        self.last_epoch += 1
        idx = bisect.bisect_right(self.milestones, self.last_epoch)
        scheduler = self.schedulers[idx]
        if idx > 0 and self.milestones[idx - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()

    def hyperparameters(self):
        return {"schedulers": [s.config() for s in self.schedulers],
                "milestones": list(self.milestones)}

    def _extra_state(self):
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def _load(self, state, group):
        super()._load(state, group)
        inner = _field(state, "schedulers", list)
        if len(inner) != len(self.schedulers) or not all(isinstance(i, dict) for i in inner):
            raise ValueError(f"scheduler state field 'schedulers' holds {len(inner)} states; "
                             f"expected {len(self.schedulers)} mappings")
        for s, s_state in zip(self.schedulers, inner):
            s._load(s_state, group)  # one shared group, as when they were bound


class ReduceLROnPlateau(LRScheduler):
    """Multiply the rate by ``factor`` once the monitored record (``val_loss`` by default)
    has not improved for ``patience`` epochs. Steps once per epoch, never per step."""

    name = "ReduceLROnPlateau"
    per_epoch_only = True

    def __init__(self, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float = 0.0, eps: float = 1e-8, monitor: str = "val_loss") -> None:
        super().__init__()
        self.mode = _choice("mode", mode, ("min", "max"))
        self.factor = _real("factor", factor, 0.0, 1.0, high_open=True)
        self.patience = _count("patience", patience, 0)
        self.threshold = _real("threshold", threshold, 0.0)
        self.threshold_mode = _choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.cooldown = _count("cooldown", cooldown, 0)
        self.min_lr = _real("min_lr", min_lr, 0.0)
        self.eps = _real("eps", eps, 0.0)
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must name a History record such as 'val_loss', "
                            f"got {monitor!r}")
        self.monitor = monitor
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def _bind(self, group):
        self._group = group
        group.initial_lr = group.lr
        self.base_lr = group.lr
        self.last_epoch = 0

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, metric: float | None = None) -> None:  # type: ignore[override]
        """One epoch's end, given the monitored record's value."""
        group = self._started_group()
        if metric is None:
            raise TypeError(f"ReduceLROnPlateau.step needs the value of {self.monitor!r}")
        current = _real(self.monitor, metric)
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = float(group.lr)
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                group.lr = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def rates(self, n: int):
        raise TypeError("ReduceLROnPlateau steps once per epoch on a record; it has no "
                        "per-step rates (use lr_scheduler_interval='epoch')")

    def hyperparameters(self):
        return {"mode": self.mode, "factor": self.factor, "patience": self.patience,
                "threshold": self.threshold, "threshold_mode": self.threshold_mode,
                "cooldown": self.cooldown, "min_lr": self.min_lr, "eps": self.eps,
                "monitor": self.monitor}

    def _extra_state(self):
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter}

    def _load(self, state, group):
        super()._load(state, group)
        best = _field(state, "best", float)
        if math.isnan(best):
            raise ValueError("scheduler state field 'best' is nan; expected a number")
        self.best = float(best)
        self.num_bad_epochs = _field(state, "num_bad_epochs", int, 0)
        self.cooldown_counter = _field(state, "cooldown_counter", int, 0)


SCHEDULERS: dict[str, type[LRScheduler]] = {
    cls.name: cls for cls in (StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, LinearLR,
                              OneCycleLR, SequentialLR, ReduceLROnPlateau)}


def scheduler_from_config(config: dict[str, Any]) -> LRScheduler:
    """Inverse of :meth:`LRScheduler.config` (used by checkpoints)."""
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ValueError(f"a scheduler config is a mapping with a 'name', got {config!r:.80}")
    config = dict(config)
    cls = SCHEDULERS.get(config.pop("name"))
    if cls is None:
        raise ValueError(f"unknown scheduler; valid ones: {', '.join(SCHEDULERS)}")
    if cls is SequentialLR:
        inner = config.get("schedulers")
        if not isinstance(inner, list):
            raise ValueError("a SequentialLR config lists its schedulers")
        config["schedulers"] = [scheduler_from_config(c) for c in inner]
    return cls(**config)
