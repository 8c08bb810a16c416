"""The MLP: sizes, activations, one flat parameter buffer with per-layer views, and the forward
and backward passes as calls of the backend contract."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from .activations import ACTIVATIONS, hidden_activations
from .backends import get_backend
from .losses import check_loss, has_accuracy, prepare_targets
from .validation import check_features, check_numeric

DTYPES = ("float32", "float64")
# Inference and evaluation run in chunks of this many rows: bounded memory for any input size.
_CHUNK_ROWS = 4096
# Workspaces are cached per batch size; a few sizes cover training (full + last partial batch)
# and inference, without letting arbitrary input sizes pile up.
_MAX_WORKSPACES = 6


def resolve_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    return resolved


class Workspace:
    """The device buffers of one batch size: inputs, targets, activations and their gradients.
    Allocated once and reused every step."""

    def __init__(self, model: "MLP", rows: int, target_shape: tuple | None, target_dtype) -> None:
        be, dtype = model.backend, model.dtype
        self.rows = rows
        self.X = be.empty((rows, model.sizes[0]), dtype)
        self.T = None if target_shape is None else be.empty((rows,) + target_shape, target_dtype)
        widths = model.sizes[1:]
        self.A = [be.empty((rows, w), dtype) for w in widths]
        self.Z = [be.empty((rows, w), dtype) if not ACTIVATIONS[a].grad_from_output else None
                  for w, a in zip(widths, model.layer_activations)]
        self.dA = [be.empty((rows, w), dtype) for w in widths]
        self.loss = be.zeros((1,), dtype)
        self.correct = be.zeros((1,), dtype)


class MLP:
    """A multilayer perceptron: ``sizes`` like ``[64, 128, 10]``; hidden layers use
    ``activation`` (one name, or one per hidden layer); the output layer is linear (logits)."""

    def __init__(self, sizes: Sequence[int], activation: str | Sequence[str] = "relu",
                 backend: str = "numpy", dtype: str = "float32", seed: int = 0) -> None:
        self.sizes = _check_sizes(sizes)
        self.activations = hidden_activations(activation, len(self.sizes) - 2)
        self.layer_activations = self.activations + ("identity",)
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(backend)
        if self.dtype.name not in self.backend.dtypes:
            raise ValueError(f"backend {self.backend.name!r} does not support {self.dtype.name}; "
                             f"it supports {', '.join(self.backend.dtypes)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.optimizer = None
        self.epochs_trained = 0
        self._layout = [(i, o) for i, o in zip(self.sizes[:-1], self.sizes[1:])]
        self.n_params = sum(i * o + o for i, o in self._layout)
        self.params = self.backend.asarray(self._initial_params(), self.dtype)
        self.grads = self.backend.zeros((self.n_params,), self.dtype)
        self._weights = self._views(self.params)
        self._gradients = self._views(self.grads)
        self._workspaces: OrderedDict[tuple, Workspace] = OrderedDict()

    # ---------------------------------------------------------------- layout
    def _views(self, flat) -> list[tuple[Any, Any]]:
        """(W, b) views into a flat buffer: W (in, out) row-major, then b (out,), per layer."""
        views, offset = [], 0
        for i, o in self._layout:
            W = flat[offset:offset + i * o].reshape(i, o)
            offset += i * o
            b = flat[offset:offset + o]
            offset += o
            views.append((W, b))
        return views

    def _initial_params(self) -> np.ndarray:
        """He (ReLU family) or Glorot initial weights, zero biases, drawn on the host in
        float64 from the seed, so every backend and dtype starts from the same numbers."""
        rng = np.random.default_rng(self.seed)
        parts = []
        for (i, o), act in zip(self._layout, self.layer_activations):
            if ACTIVATIONS[act].init == "he":
                W = rng.standard_normal((i, o)) * np.sqrt(2.0 / i)
            else:
                limit = np.sqrt(6.0 / (i + o))
                W = rng.uniform(-limit, limit, (i, o))
            parts += [W.ravel(), np.zeros(o)]
        return np.concatenate(parts)

    def workspace(self, rows: int, target_shape: tuple | None = None, target_dtype=None) -> Workspace:
        key = (rows, target_shape, None if target_dtype is None else np.dtype(target_dtype))
        ws = self._workspaces.get(key)
        if ws is None:
            ws = Workspace(self, rows, target_shape, target_dtype)
            self._workspaces[key] = ws
            while len(self._workspaces) > _MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(key)
        return ws

    # ---------------------------------------------------------------- passes
    def _forward(self, ws: Workspace, X) -> Any:
        be = self.backend
        for (W, b), act, A, Z in zip(self._weights, self.layer_activations, ws.A, ws.Z):
            be.dense_forward(X, W, b, act, A, Z)
            X = A
        return X

    def _backward(self, ws: Workspace) -> None:
        """Gradients into ``self.grads`` from ``ws.dA[-1]`` (the loss gradient of the output)."""
        be = self.backend
        for layer in reversed(range(len(self._layout))):
            W, _ = self._weights[layer]
            dW, db = self._gradients[layer]
            X = ws.X if layer == 0 else ws.A[layer - 1]
            dX = None if layer == 0 else ws.dA[layer - 1]
            be.dense_backward(X, W, ws.dA[layer], self.layer_activations[layer],
                              ws.A[layer], ws.Z[layer], dW, db, dX)

    def _forward_backward(self, ws: Workspace, loss: str, loss_out) -> None:
        """One training pass on the batch already in ``ws.X`` / ``ws.T``: the mean loss into
        ``loss_out`` (on the device) and its gradient into ``self.grads``."""
        Y = self._forward(ws, ws.X)
        self.backend.loss(loss, Y, ws.T, ws.dA[-1], loss_out)
        self._backward(ws)

    def _chunks(self, X: np.ndarray, T: np.ndarray | None = None):
        """Yield (workspace, rows) with each chunk of X (and T) copied into the workspace."""
        be = self.backend
        for start in range(0, X.shape[0], _CHUNK_ROWS):
            rows = slice(start, min(start + _CHUNK_ROWS, X.shape[0]))
            n = rows.stop - rows.start
            ws = self.workspace(n) if T is None else self.workspace(n, T.shape[1:], T.dtype)
            be.copy(be.asarray(X[rows]), ws.X)
            if T is not None:
                be.copy(be.asarray(T[rows]), ws.T)
            yield ws, rows

    # ---------------------------------------------------------------- public API
    def forward(self, X) -> np.ndarray:
        """Outputs (logits for classifiers) for the rows of X, as a NumPy array."""
        X = check_features(X, self.sizes[0])
        out = np.empty((X.shape[0], self.sizes[-1]), self.dtype)
        for ws, rows in self._chunks(X):
            out[rows] = self.backend.to_host(self._forward(ws, ws.X))
        return out

    def predict(self, X) -> np.ndarray:
        """Class ids: the argmax of the outputs, or ``output > 0`` for a single output."""
        Y = self.forward(X)
        if Y.shape[1] == 1:
            return (Y[:, 0] > 0).astype(np.int64)
        return np.argmax(Y, axis=1).astype(np.int64)

    def evaluate(self, X, y, loss: str) -> dict[str, float]:
        """Mean loss (and accuracy where it applies) over the whole of X, y."""
        X = check_features(X, self.sizes[0])
        T = prepare_targets(loss, y, X.shape[0], self.sizes[-1], self.dtype)
        be, total, correct = self.backend, 0.0, 0.0
        metric = has_accuracy(loss, self.sizes[-1])
        for ws, _ in self._chunks(X, T):
            Y = self._forward(ws, ws.X)
            be.loss(loss, Y, ws.T, ws.dA[-1], ws.loss)
            total += float(be.to_host(ws.loss)[0]) * ws.rows
            if metric:
                be.count_correct(Y, ws.T, ws.correct)
                correct += float(be.to_host(ws.correct)[0])
        result = {"loss": total / X.shape[0]}
        if metric:
            result["accuracy"] = correct / X.shape[0]
        return result

    def loss_and_grads(self, X, y, loss: str) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """The mean loss over the rows of X, y and its gradients ``[(dW, db), ...]``."""
        check_loss(loss)
        X = check_features(X, self.sizes[0])
        T = prepare_targets(loss, y, X.shape[0], self.sizes[-1], self.dtype)
        be = self.backend
        ws = self.workspace(X.shape[0], T.shape[1:], T.dtype)
        be.copy(be.asarray(X), ws.X)
        be.copy(be.asarray(T), ws.T)
        self._forward_backward(ws, loss, ws.loss)
        value = float(be.to_host(ws.loss)[0])
        grads = [(be.to_host(dW), be.to_host(db)) for dW, db in self._gradients]
        return value, grads

    def get_weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A copy of every layer's ``(W, b)`` as NumPy arrays, W shaped (in, out)."""
        host = self.backend.to_host(self.params)
        return [(W.copy(), b.copy()) for W, b in self._views(host)]

    def set_weights(self, weights: Sequence[tuple[Any, Any]]) -> None:
        """Replace every layer's ``(W, b)``. All are validated before any is written, so a bad
        list leaves the model untouched; float arrays are converted to the model's dtype."""
        if not isinstance(weights, (list, tuple)) or len(weights) != len(self._layout):
            got = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
            raise ValueError(f"set_weights needs a list of {len(self._layout)} (W, b) pairs, got {got}")
        flat = np.empty(self.n_params, self.dtype)
        for layer, ((i, o), pair, (W_dst, b_dst)) in enumerate(
                zip(self._layout, weights, self._views(flat))):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"layer {layer}: expected a (W, b) pair, got {type(pair).__name__}")
            for name, value, dst in (("W", pair[0], W_dst), ("b", pair[1], b_dst)):
                arr = check_numeric(value, f"layer {layer} {name}")
                if arr.dtype.kind != "f":
                    raise TypeError(f"layer {layer} {name} must be a float array, got dtype {arr.dtype}")
                if arr.shape != dst.shape:
                    raise ValueError(f"layer {layer} {name} must have shape {dst.shape}, got {arr.shape}")
                if not np.isfinite(arr).all():
                    raise ValueError(f"layer {layer} {name} contains NaN or inf")
                dst[...] = arr
        self.backend.copy(self.backend.asarray(flat), self.params)

    def save(self, path) -> None:
        """Write the model (and its optimizer state) to one portable file, atomically."""
        from .checkpoint import save
        save(self, path)

    def __repr__(self) -> str:
        return (f"MLP(sizes={list(self.sizes)}, activation={list(self.activations)}, "
                f"backend={self.backend.name!r}, dtype={self.dtype.name!r}, seed={self.seed})")


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
        raise TypeError(f"sizes must be a list of layer widths like [64, 128, 10], got {sizes!r}")
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output width, got {list(sizes)}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"layer widths must be positive integers, got {list(sizes)}")
    return tuple(int(s) for s in sizes)
