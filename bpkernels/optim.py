"""Optimizers: hyper-parameters, state layout and step count; the update itself is one
backend kernel over the flat parameter buffer. Update rules and defaults are torch.optim's.
"""
from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

from .backends.base import RULES
from .validation import check_bool, check_ordered, check_real

if TYPE_CHECKING:
    from .model import MLP

# State buffers that are running averages of squares: a negative value is corruption, and would
# reach a square root in the update.
NONNEGATIVE_STATES = frozenset({"exp_avg_sq", "square_avg"})


def _check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf,
                  high_open: bool = False) -> float:
    return check_real(value, name, low, high, high_open=high_open)


def _extra(clip: Any, rate: Any = None, bounds: Any = None) -> dict[str, Any]:
    """The update kernels' ``clip``, ``rate`` and ``bounds`` arguments, each passed only when
    given: a backend written against the contract before it had them still trains without
    them."""
    given = {"clip": clip, "rate": rate, "bounds": bounds}
    return {name: value for name, value in given.items() if value is not None}


class Optimizer:
    """Base class: holds hyper-parameters, the state buffers (same layout as the parameters)
    and the number of steps taken. Bound to one model by :func:`bpkernels.fit`."""

    name: ClassVar[str] = ""
    state_names: ClassVar[tuple[str, ...]] = ()
    lr: float  # every rule has a learning rate; a callback may change it between epochs

    def __init__(self) -> None:
        self.step_count = 0
        self.state: dict[str, Any] = {}
        self._model: weakref.ref | None = None  # a weak reference: ids are reused after GC

    # -------------------------------------------------------------- state
    def needed_states(self) -> tuple[str, ...]:
        """The state buffers this configuration uses (e.g. no momentum buffer without momentum)."""
        return self.state_names

    def bound_to(self, model: "MLP") -> bool:
        """Whether bind(model) has allocated state that still fits the model."""
        bound = self._model() if self._model is not None else None
        return bound is model and self.state_matches(model)

    def bind(self, model: "MLP") -> None:
        """Allocate zeroed state buffers on the model's backend, once per model."""
        if self.bound_to(model):
            return
        bound = self._model() if self._model is not None else None
        if bound is not None and bound is not model:
            raise ValueError(f"this {type(self).__name__} is already bound to another model; "
                             "create one optimizer per model")
        be = model.backend
        self.state = {n: be.zeros(model.params.shape, model.storage) for n in self.needed_states()}
        self._model = weakref.ref(model)

    def state_matches(self, model: "MLP") -> bool:
        return all(s.shape == model.params.shape and s.dtype == model.storage
                   for s in self.state.values()) and set(self.state) == set(self.needed_states())

    def step(self, model: "MLP", halted: Any, clip: Any = None, rate: Any = None,
             bounds: Any = None) -> None:
        """One update of ``model.params`` from ``model.grads`` (skipped on device when halted);
        ``clip``: check_step's clipping array, ``rate``: a per-step schedule's row for this
        step, ``bounds``: the update's bounds (backends/base.py), each or None."""
        self.step_count += 1
        self._update(model.backend, model.params, model.grads, self.step_count, halted,
                     _extra(clip, rate, bounds))

    def _update(self, backend, params, grads, step, halted, extra) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- description
    def hyperparameters(self) -> dict[str, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.hyperparameters()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    name = "sgd"
    state_names = RULES["sgd"].state

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr = _check_number("lr", lr)
        self.momentum = _check_number("momentum", momentum)
        self.dampening = _check_number("dampening", dampening, high=1.0)
        self.nesterov = check_bool(nesterov, "nesterov")
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")

    def needed_states(self) -> tuple[str, ...]:
        return self.state_names if self.momentum else ()

    def _update(self, backend, params, grads, step, halted, extra):
        backend.sgd_step(params, grads, self.state.get("momentum_buffer"), self, step, halted,
                         **extra)

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient, as torch.optim.Adam."""

    name = "adam"
    state_names = RULES["adam"].state
    decoupled = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr = _check_number("lr", lr)
        betas = check_ordered(betas, "betas", "a pair (beta1, beta2) like (0.9, 0.999)")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {len(betas)} values")
        self.beta1 = _check_number("betas[0]", betas[0], high=1.0, high_open=True)
        self.beta2 = _check_number("betas[1]", betas[1], high=1.0, high_open=True)
        self.eps = _check_number("eps", eps)
        self.weight_decay = _check_number("weight_decay", weight_decay)

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def _update(self, backend, params, grads, step, halted, extra):
        backend.adam_step(params, grads, self.state["exp_avg"], self.state["exp_avg_sq"],
                          self, step, halted, **extra)

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay}


class AdamW(Adam):
    """Adam with decoupled weight decay, as torch.optim.AdamW (default weight_decay 1e-2)."""

    name = "adamw"
    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(lr, betas, eps, weight_decay)


class RMSprop(Optimizer):
    name = "rmsprop"
    state_names = RULES["rmsprop"].state

    def __init__(self, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        super().__init__()
        self.lr = _check_number("lr", lr)
        self.alpha = _check_number("alpha", alpha, high=1.0)
        self.eps = _check_number("eps", eps)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        self.momentum = _check_number("momentum", momentum)
        self.centered = check_bool(centered, "centered")

    def needed_states(self) -> tuple[str, ...]:
        names = ["square_avg"]
        if self.momentum > 0:
            names.append("momentum_buffer")
        if self.centered:
            names.append("grad_avg")
        return tuple(names)

    def _update(self, backend, params, grads, step, halted, extra):
        backend.rmsprop_step(params, grads, self.state["square_avg"],
                             self.state.get("momentum_buffer"), self.state.get("grad_avg"),
                             self, step, halted, **extra)

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "alpha": self.alpha, "eps": self.eps,
                "weight_decay": self.weight_decay, "momentum": self.momentum,
                "centered": self.centered}


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW,
                                           "rmsprop": RMSprop}


def make_optimizer(spec: str | Optimizer, **kwargs: Any) -> Optimizer:
    """An optimizer from a name (with keyword hyper-parameters) or an Optimizer as is."""
    if isinstance(spec, Optimizer):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"optimizer must be a name or an Optimizer, got {type(spec).__name__}")
    cls = OPTIMIZERS.get(spec.lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {spec!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    return cls(**kwargs)


def optimizer_from_config(config: dict[str, Any]) -> Optimizer:
    """Inverse of :meth:`Optimizer.config` (used by checkpoints)."""
    config = dict(config)
    name = config.pop("name")
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    return make_optimizer(name, **config)
