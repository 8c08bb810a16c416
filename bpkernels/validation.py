"""Checks of user arrays shared by the model, the losses and the training loop."""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np


def check_numeric(a, name: str) -> np.ndarray:
    """``a`` as a NumPy array of numbers (bool, int or float), else TypeError."""
    try:
        arr = np.asarray(a)
    except Exception as err:
        raise TypeError(f"{name} must be an array of numbers, got {type(a).__name__}: {err}") from None
    check_number_kind(arr.dtype, arr.ndim, name)
    return arr


def check_number_kind(dtype: np.dtype, ndim: int, name: str) -> None:
    """TypeError unless ``dtype`` holds numbers; ValueError for a scalar. For host and device
    arrays alike (both describe themselves by NumPy dtypes)."""
    if np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"{name} must hold numbers (bool, int or float), got dtype {dtype}")
    if ndim == 0:
        raise ValueError(f"{name} must be an array, got a scalar")


def check_finite(arr: np.ndarray, name: str) -> None:
    """ValueError naming the first NaN or inf in ``arr``."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        index = bad[0] if len(bad) == 1 else list(bad)
        raise ValueError(f"{name} contains {arr[bad]} at index {index}; inputs must be finite")


def check_features(X, n_features: int) -> np.ndarray:
    """X as a 2-D numeric host array with ``n_features`` columns, at least one row, finite."""
    X = check_numeric(X, "X")
    check_feature_shape(X.shape, n_features)
    check_finite(X, "X")
    return X


def check_feature_shape(shape: tuple[int, ...], n_features: int, name: str = "X") -> None:
    """ValueError unless ``shape`` is (n >= 1, n_features)."""
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows); give at least one sample")
    if shape[1] != n_features:
        raise ValueError(f"{name} has {shape[1]} features per row but the model expects "
                         f"{n_features} (shape {shape}, expected (n, {n_features}))")


def check_positive_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: any integer (NumPy's too), never a bool."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got a bool ({value})")
    try:
        value = operator.index(value)  # int, np.int64, ...: exact, never a truncated float
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(value: Any, name: str, low: float = -math.inf, high: float = math.inf, *,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval: any real number (NumPy's scalars too),
    never a bool (``lr=True`` is a mistake, not 1.0)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        got = f"a bool ({value})" if isinstance(value, (bool, np.bool_)) else type(value).__name__
        raise TypeError(f"{name} must be a number, got {got}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or value > high or (low_open and value == low) or \
            (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: True or False (NumPy's too); 0, 1, "no" or None are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_ordered(value: Any, name: str, allowed: str) -> list:
    """``value`` as a list, if it is an ordered collection (list, tuple, range, 1-D array).
    Sets and dicts are refused (their order is not the caller's), as are iterators (consumed
    once) and strings."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        why = " (unordered)" if isinstance(value, (set, frozenset, dict)) else ""
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}{why}")
    return list(value)


def shown(value: Any) -> str:
    """``repr(value)`` with NumPy scalars shown as plain numbers: ``[2, -1]``, never
    ``[np.int64(2), np.int64(-1)]``."""
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, (list, tuple)):
        inner = ", ".join(shown(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else \
            f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value)
