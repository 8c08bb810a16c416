"""Activation names and what the engine needs to know about each one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .backends.base import ACTIVATIONS as _NAMES


@dataclass(frozen=True)
class Activation:
    name: str
    grad_from_output: bool  # act'(z) computable from act(z): the model need not keep Z
    init: str               # "he" (ReLU family) or "glorot"


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation("identity", True, "glorot"),
    "relu": Activation("relu", True, "he"),
    "leaky_relu": Activation("leaky_relu", True, "he"),
    "sigmoid": Activation("sigmoid", True, "glorot"),
    "tanh": Activation("tanh", True, "glorot"),
    "gelu": Activation("gelu", False, "he"),
    "silu": Activation("silu", False, "he"),
}
assert tuple(ACTIVATIONS) == _NAMES, "activations.py and backends/base.py disagree"


def get_activation(name: str) -> Activation:
    if not isinstance(name, str):
        raise TypeError(f"activation must be a name (str), got {type(name).__name__}")
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid activations: "
                         f"{', '.join(ACTIVATIONS)}") from None


def hidden_activations(activation: str | Sequence[str], n_hidden: int) -> tuple[str, ...]:
    """One activation name per hidden layer, from one name or a list of them."""
    if isinstance(activation, str):
        names = [activation] * n_hidden
    else:
        names = list(activation)
        if len(names) != n_hidden:
            raise ValueError(f"activation list has {len(names)} names but the model has "
                             f"{n_hidden} hidden layers; give one name per hidden layer or a single name")
    return tuple(get_activation(name).name for name in names)
