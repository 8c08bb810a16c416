"""Argument types shared by the ``bpk`` commands: each turns one option's text into a value
or an argparse error, and ``as_option`` prefixes a library error with the option it came from."""
from __future__ import annotations

import argparse


def count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def positive_real(text: str) -> float:
    """A finite number > 0 (``--clip-grad-norm``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def probabilities(text: str) -> list[float]:
    """``--dropout``: one probability, or one per hidden layer (comma-separated); the range
    is checked by MLP (its message, prefixed by the option)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a probability in [0, 1) or one per hidden layer like 0.1,0.2; "
            f"got {text!r}") from None
    return values


def as_option(option: str, check, *args, **kwargs):
    """``check(...)``, its error message prefixed by the option that carried the bad value."""
    try:
        return check(*args, **kwargs)
    except (ValueError, TypeError, ImportError) as err:
        raise ValueError(f"{option}: {err}") from None


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def lr_schedule(text: str) -> tuple:
    """``--lr-schedule``: ("cosine",), ("onecycle",), ("plateau",) or ("step", epochs, gamma)."""
    name, *rest = text.strip().lower().split(":")
    if name in ("cosine", "onecycle", "plateau") and not rest:
        return (name,)
    if name == "step" and len(rest) == 2:
        try:
            size, gamma = int(rest[0]), float(rest[1])
        except ValueError:
            size, gamma = 0, -1.0
        if size >= 1 and 0 <= gamma <= 1:
            return ("step", size, gamma)
        raise argparse.ArgumentTypeError(f"step:STEP_SIZE:GAMMA takes epochs >= 1 and a gamma "
                                         f"in [0, 1], like step:10:0.5; got {text!r}")
    raise argparse.ArgumentTypeError(f"expected cosine, onecycle, plateau or "
                                     f"step:STEP_SIZE:GAMMA, got {text!r}")
