"""Metrics of fit() and evaluate(): their names, which losses they apply to, and their values
from the statistics that the backends sum on the device (Backend.accumulate_stats), read once
per epoch or evaluation. Definitions are scikit-learn's (its functions are the tests'
reference), weighted by sample_weight as its ``sample_weight`` arguments weigh.

Names: ``accuracy``, ``top<k>`` (``top5``: top_k_accuracy_score with k=5), ``f1_macro``,
``precision_macro``, ``recall_macro`` (average="macro", zero_division=0, over the classes
present in y or in the predictions), ``r2``, ``mae``, ``mse`` (multioutput="uniform_average").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .backends.base import stats_size

CLASS_METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro")
REGRESSION_METRICS = ("r2", "mae", "mse")
_TOP = re.compile(r"top([1-9][0-9]*)$")


@dataclass(frozen=True)
class MetricPlan:
    """What a run's metrics need from the device: ``kind`` ("classes" or "regression"), the
    k of each top-k metric, and the names, in the order given."""

    names: tuple[str, ...]
    kind: str
    ks: tuple[int, ...]

    def size(self, n_outputs: int) -> int:
        return stats_size(self.kind, n_outputs, len(self.ks))


def is_metric_name(name: str) -> bool:
    return name in CLASS_METRICS or name in REGRESSION_METRICS or bool(_TOP.match(name))


def check_metrics(metrics, loss: str, n_outputs: int) -> MetricPlan | None:
    """The plan of ``metrics`` (names, see the module docstring) for a model of ``n_outputs``
    trained with ``loss``; None for none. One ValueError naming ``metrics`` for a bad one."""
    if metrics is None:
        return None
    if isinstance(metrics, str):
        metrics = [metrics]
    try:
        names = list(metrics)
    except TypeError:
        raise TypeError(f"metrics must be a list of names, got {type(metrics).__name__}") from None
    if not names:
        return None
    classes = loss == "cross_entropy" or (loss == "binary_cross_entropy" and n_outputs == 1)
    ks: list[int] = []
    kinds = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"metrics must be names (str), got {type(name).__name__}")
        top = _TOP.match(name)
        if name in CLASS_METRICS or top:
            if not classes:
                raise ValueError(f"metrics: {name!r} needs class labels (cross_entropy, or "
                                 f"binary_cross_entropy with one output); this fit has {loss} "
                                 f"with {n_outputs} outputs")
            if top and loss != "cross_entropy":
                raise ValueError(f"metrics: {name!r} ranks the classes' scores: it needs "
                                 "cross_entropy")
            if top:
                ks.append(int(top.group(1)))
            kinds.add("classes")
        elif name in REGRESSION_METRICS:
            if loss != "mse":
                raise ValueError(f"metrics: {name!r} compares outputs with targets: it needs "
                                 f"the mse loss; this fit has {loss}")
            kinds.add("regression")
        else:
            raise ValueError(f"metrics: unknown metric {name!r}; valid metrics: "
                             f"{', '.join(CLASS_METRICS)}, top<k> (like top5), "
                             f"{', '.join(REGRESSION_METRICS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics: each metric once, got {names}")
    return MetricPlan(tuple(names), kinds.pop(), tuple(ks))


def values(plan: MetricPlan, stats: np.ndarray, n_outputs: int) -> dict[str, float]:
    """Each metric of ``plan`` from the summed statistics (host, float64)."""
    stats = np.asarray(stats, dtype=np.float64)
    if plan.kind == "regression":
        return _regression(plan, stats, n_outputs)
    return _classes(plan, stats, max(n_outputs, 2))


def _classes(plan: MetricPlan, stats: np.ndarray, C: int) -> dict[str, float]:
    confusion = stats[:C * C].reshape(C, C)  # [true, predicted], weighted
    # classes present in y or in the predictions (unweighted counts, as sklearn's labels)
    present = (stats[C * C:C * C + C] > 0) | (stats[C * C + C:C * C + 2 * C] > 0)
    total = confusion.sum()
    tp = np.diag(confusion)[present]
    predicted, actual = confusion.sum(0)[present], confusion.sum(1)[present]
    out: dict[str, float] = {}
    top = iter(stats[C * C + 2 * C:])
    for name in plan.names:
        if name == "accuracy":
            out[name] = float(np.trace(confusion) / total) if total > 0 else 0.0
        elif name == "precision_macro":
            out[name] = _mean(_ratio(tp, predicted))
        elif name == "recall_macro":
            out[name] = _mean(_ratio(tp, actual))
        elif name == "f1_macro":
            out[name] = _mean(_ratio(2 * tp, predicted + actual))
        else:
            out[name] = float(next(top) / total) if total > 0 else 0.0
    return out


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (scikit-learn's zero_division)."""
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else 0.0


def _regression(plan: MetricPlan, stats: np.ndarray, o: int) -> dict[str, float]:
    w = stats[0]
    abs_err, sq_err, t_sum, t_sq = (stats[1 + i * o:1 + (i + 1) * o] for i in range(4))
    out: dict[str, float] = {}
    for name in plan.names:
        if w <= 0:
            out[name] = 0.0
        elif name == "mae":
            out[name] = float(np.mean(abs_err / w))
        elif name == "mse":
            out[name] = float(np.mean(sq_err / w))
        else:  # r2: 1 - SSE / SST per output; a constant target: 1 if predicted exactly, else 0
            sst = np.maximum(t_sq - t_sum * t_sum / w, 0.0)
            r2 = np.where(sst > 0, 1.0 - sq_err / np.where(sst > 0, sst, 1.0),
                          np.where(sq_err == 0, 1.0, 0.0))
            out[name] = float(np.mean(r2))
    return out
