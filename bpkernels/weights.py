"""Sample and class weights: one non-negative weight per training row, checked on the host.

A row's weight is its ``sample_weight`` times its class's ``class_weight`` (as scikit-learn
and Keras combine them). The losses then take the weighted mean of each batch,
``sum(w_i l_i) / sum(w_i)`` (backends/base.py), and the hit counts the weight of the rows
classified right.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from .validation import check_numeric


class DeviceWeights(NamedTuple):
    """Row weights (row_weights') kept on the device for a whole run, so that an evaluation
    repeated every epoch (fit's validation) uploads them once; the host copy gives the totals
    without a device read."""
    host: np.ndarray
    device: Any


def row_weights(sample_weight: Any, class_weight: Any, T: np.ndarray, loss: str,
                n_outputs: int, dtype: Any, where: str = "fit", *, name: str = "sample_weight",
                rows: str | None = None) -> np.ndarray | None:
    """The rows' weights for prepared targets ``T`` (losses.prepare_targets: int64 labels
    (n,) or (n, o) rows) of a model with ``n_outputs`` outputs, as a host array of ``dtype``,
    or None when both are None (the unweighted mean, whose numbers stay exactly those of an
    unweighted run). ``class_weight``: a mapping class -> weight (classes absent from it weigh
    1, as in scikit-learn) or ``"balanced"``: ``n_samples / (n_classes * bincount(y))`` over
    the classes present in y (scikit-learn's compute_class_weight). ``where`` names the call
    in the error of weights that are all 0; ``name`` names ``sample_weight`` in every error,
    and ``rows`` the rows it weighs in that one (default ``where()``'s: fit's validation
    weights are ``validation_data[2]``, weighing ``validation_data``)."""
    if sample_weight is None and class_weight is None:
        return None
    n = T.shape[0]
    weights = np.ones(n)
    if sample_weight is not None:
        weights = _sample_weight(sample_weight, n, name)
    if class_weight is not None:
        weights = weights * _class_weights(class_weight, T, loss, n_outputs)
    if not weights.sum() > 0:
        names = " and ".join(given for given, value in ((name, sample_weight),
                                                         ("class_weight", class_weight))
                             if value is not None)
        of = f"{where}()" if rows is None else rows
        verb = "give" if " and " in names else "gives"
        raise ValueError(f"{names} {verb} every row of {of} a weight of zero: no row would "
                         "count; at least one weight must be positive")
    cast = weights.astype(dtype)
    if not np.isfinite(cast).all() or not np.isfinite(cast.sum()):
        raise ValueError(f"{name}: the weights overflow {np.dtype(dtype).name}, the "
                         "model's dtype (they and their sum must be finite in it); scale them "
                         "down (only their ratios matter)")
    return cast


def _sample_weight(sample_weight: Any, n: int, name: str) -> np.ndarray:
    if isinstance(sample_weight, (str, bytes, Mapping)):
        raise TypeError(f"{name} must be an array of numbers, one per row, got "
                        f"{type(sample_weight).__name__}")
    w = check_numeric(sample_weight, name)
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"{name} must have one number per row: shape ({n},), got {w.shape}")
    w = w.astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must be finite and >= 0; {name}[{i}] = {w[i]}")
    return w


def _classes(T: np.ndarray, loss: str, n_outputs: int) -> tuple[np.ndarray, int]:
    """Each row's class id and how many classes the model has."""
    if loss == "cross_entropy" and T.ndim == 1:
        return T, n_outputs
    if loss == "binary_cross_entropy" and T.shape[1] == 1 and np.isin(T, (0, 1)).all():
        return T[:, 0].astype(np.int64), 2
    raise ValueError("class_weight needs class labels: cross_entropy with integer labels "
                     "(not probability rows), or binary_cross_entropy with one output and 0/1 "
                     f"targets; this fit has {loss} with targets of shape {T.shape}")


def _class_weights(class_weight: Any, T: np.ndarray, loss: str, n_outputs: int) -> np.ndarray:
    """Each row's class weight."""
    y, n_classes = _classes(T, loss, n_outputs)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be 'balanced' or a mapping class -> weight, "
                             f"got {class_weight!r}")
        present = np.unique(y)
        counts = np.bincount(y)
        table = np.zeros(int(y.max()) + 1)
        table[present] = y.size / (present.size * counts[present])
        return table[y]
    if not isinstance(class_weight, Mapping):
        raise TypeError(f"class_weight must be 'balanced' or a mapping class -> weight, got "
                        f"{type(class_weight).__name__}")
    table = np.ones(n_classes)
    for key, value in class_weight.items():
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) or \
                not 0 <= key < n_classes:
            raise ValueError(f"class_weight has an unknown class {key!r}; its keys must be "
                             f"the class ids 0..{n_classes - 1}")
        try:
            weight = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"class_weight[{key!r}] must be a number, got "
                            f"{type(value).__name__}") from None
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"class_weight[{key!r}] must be finite and >= 0, got {value!r}")
        table[int(key)] = weight
    return table[y]


def step_totals(W: np.ndarray, order: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The total weight of each step's rows (float64, on the host, once per epoch): ``order``
    holds the epoch's rows step after step, ``rows`` how many each step takes."""
    w = W[order].astype(np.float64)
    ends = np.cumsum(rows.astype(np.int64))
    return np.array([w[end - count:end].sum() for end, count in zip(ends, rows.astype(np.int64))])
