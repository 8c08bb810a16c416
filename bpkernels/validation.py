"""Checks of user arrays shared by the model, the losses and the training loop."""
from __future__ import annotations

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


def check_positive_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
