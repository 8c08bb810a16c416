"""``bpk train``'s ``--class-weight`` and ``--metrics``: the options' text as fit()'s
``class_weight`` and ``metrics``, and the summary's line of test metrics."""
from __future__ import annotations

import argparse
import math

from .metrics import CLASS_METRICS, REGRESSION_METRICS, is_metric_name


def class_weight(text: str) -> str | dict[int, float]:
    """``balanced``, or ``CLASS:WEIGHT`` pairs separated by commas (``0:1,1:5``; classes left
    out weigh 1). Whether each class exists is fit()'s check, once the data is known."""
    if text.strip() == "balanced":
        return "balanced"
    table: dict[int, float] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition(":")
        try:
            cls, weight = int(key), float(value)
        except ValueError:
            cls, weight = -1, math.nan
        if not sep or cls < 0 or not (math.isfinite(weight) and weight >= 0) or cls in table:
            raise argparse.ArgumentTypeError(
                f"expected 'balanced' or CLASS:WEIGHT pairs like 0:1,1:5 (class ids >= 0 once "
                f"each, weights finite and >= 0), got {text!r}")
        table[cls] = weight
    return table


def metrics(text: str) -> list[str]:
    """Metric names separated by commas (``f1_macro,top5``). Whether they suit the loss is
    fit()'s check, once the data (and so the loss) is known."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [n for n in names if not is_metric_name(n)]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected metric names separated by commas, each once, from "
            f"{', '.join(CLASS_METRICS)}, top<k> (like top5), {', '.join(REGRESSION_METRICS)}; "
            f"got {text!r}")
    return names


def summary_line(result: dict[str, float], names: list[str] | None) -> str | None:
    """``test metrics: f1_macro 0.9312, top5 0.9981`` for the summary, or None without any."""
    shown = [n for n in names or () if n != "accuracy" and n in result]
    if not shown:
        return None
    return "test metrics: " + ", ".join(f"{n} {result[n]:.4f}" for n in shown)
