"""Activation names and what the engine needs to know about each one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .backends.base import ACTIVATION_TABLE
from .validation import check_ordered


@dataclass(frozen=True)
class Activation:
    name: str
    grad_from_output: bool  # act'(z) computable from act(z): the model need not keep Z
    init: str               # "he" (ReLU family) or "glorot"


# The one fact about activations that is the engine's, not the kernels': the initialisation.
_INIT = {"identity": "glorot", "relu": "he", "leaky_relu": "he", "sigmoid": "glorot",
         "tanh": "glorot", "gelu": "he", "silu": "he"}
assert set(_INIT) == {a.name for a in ACTIVATION_TABLE}, \
    "activations.py: give each activation of backends/base.py's table an initialisation"

# Every activation of backends/base.py's table, in its order.
ACTIVATIONS: dict[str, Activation] = {
    a.name: Activation(a.name, a.derivative_from == "output", _INIT[a.name])
    for a in ACTIVATION_TABLE}


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
        get_activation(activation)  # checked even where no layer uses it (no hidden layers)
        names = [activation] * n_hidden
    else:
        names = check_ordered(activation, "activation",
                              "a name like 'relu' or a list of names, one per hidden layer")
        if len(names) != n_hidden:
            raise ValueError(f"activation list has {len(names)} names but the model has "
                             f"{n_hidden} hidden layers; give one name per hidden layer or a single name")
    return tuple(get_activation(name).name for name in names)
