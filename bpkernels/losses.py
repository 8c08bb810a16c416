"""Loss names and target validation (PyTorch conventions, see backends/base.py)."""
from __future__ import annotations

import numpy as np

from .backends.base import LOSSES
from .validation import check_finite, check_numeric


def check_loss(loss: str) -> str:
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name (str), got {type(loss).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    return loss


def has_accuracy(loss: str, n_outputs: int) -> bool:
    """Whether 'accuracy' means something for this loss: classes, or one binary output."""
    return loss == "cross_entropy" or (loss == "binary_cross_entropy" and n_outputs == 1)


def prepare_targets(loss: str, y, n_rows: int, n_outputs: int, dtype) -> np.ndarray:
    """Validate ``y`` for ``loss`` and return the host array the kernels expect:
    int64 labels (n,) or (n, n_outputs) rows of ``dtype``."""
    check_loss(loss)
    y = check_numeric(y, "y")
    if y.shape[:1] != (n_rows,):
        raise ValueError(f"y has {y.shape[0] if y.ndim else 0} rows but X has {n_rows}; "
                         f"they must match (y shape {y.shape})")
    check_finite(y, "y")
    if loss == "cross_entropy":
        if n_outputs < 2:
            raise ValueError("cross_entropy needs at least 2 outputs; for one output use "
                             "binary_cross_entropy or mse")
        if y.ndim == 1:
            return _class_labels(y, n_outputs)
    if y.ndim == 1 and n_outputs == 1:
        y = y.reshape(-1, 1)
    if y.ndim != 2 or y.shape[1] != n_outputs:
        expected = f"({n_rows},) labels or ({n_rows}, {n_outputs})" if loss == "cross_entropy" \
            else f"({n_rows}, {n_outputs})" + (f" or ({n_rows},)" if n_outputs == 1 else "")
        raise ValueError(f"y for {loss} must have shape {expected}, got {y.shape}")
    if loss == "binary_cross_entropy" and (y.min() < 0 or y.max() > 1):
        bad = tuple(int(i) for i in np.argwhere((y < 0) | (y > 1))[0])
        raise ValueError(f"binary_cross_entropy targets must lie in [0, 1]; "
                         f"y[{', '.join(map(str, bad))}] = {y[bad]}")
    with np.errstate(over="ignore"):  # overflow is reported below, once
        T = np.ascontiguousarray(y, dtype=dtype)
    if not np.isfinite(T).all():  # finite before the cast: 1e300 in float32
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(T))[0])
        raise ValueError(f"y[{', '.join(map(str, bad))}] = {y[bad]} overflows {T.dtype}, the "
                         "model's dtype; targets must be finite in it")
    return T


def _class_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    if y.dtype.kind == "b" or y.dtype.kind == "f":
        whole = np.equal(np.mod(y, 1), 0)
        if not whole.all():
            i = int(np.argmin(whole))
            raise ValueError(f"cross_entropy labels must be integers (class ids); y[{i}] = {y[i]}")
    # Checked before the cast: int64 holds neither 1e20 nor uint64's 2**63.
    out_of_range = (y < 0) | (y >= n_classes)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise ValueError(f"cross_entropy labels must lie in 0..{n_classes - 1} (the model has "
                         f"{n_classes} outputs); y[{i}] = {y[i]}")
    return y.astype(np.int64)
