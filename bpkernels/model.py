"""The MLP: sizes, activations, one flat parameter buffer with per-layer views, and the forward
and backward passes as calls of the backend contract."""
from __future__ import annotations

import numbers
import os
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from . import checkpoint, interop, memory, philox
from .activations import ACTIVATIONS, hidden_activations
from .backends import BackendUnavailable, get_backend
from .backends.base import BF16, BF16_NAMES, DTYPES, PRECISIONS, Backend, MixedPrecision, \
    storage_dtype
from .interop import ArrayLike
from .losses import check_loss, has_accuracy, prepare_targets
from .lr_scheduler import LRScheduler, scheduler_from_config
# Registers scikit-learn's schedules, so that from_state (checkpoints, pickles) knows them.
from . import lr_sklearn  # noqa: F401
from .optim import Optimizer, optimizer_from_config
from .validation import check_ordered, check_real, shown
from .metrics import MetricPlan, check_metrics
from .metrics import values as metric_values
from .weights import DeviceWeights, row_weights

# torch.nn.LayerNorm's default eps, which norm="layer" uses
NORM_EPS = 1e-5
# Inference and evaluation run in chunks of this many rows: bounded memory for any input size.
CHUNK_ROWS = 4096
# Workspaces are cached per batch size; a few sizes cover training (full + last partial batch)
# and inference, without letting arbitrary input sizes pile up.
_MAX_WORKSPACES = 6


def resolve_dtype(dtype: Any) -> np.dtype | MixedPrecision:
    """A NumPy dtype of DTYPES, or BF16 for "bf16" (mixed precision: stored in float32)."""
    if isinstance(dtype, MixedPrecision) or (isinstance(dtype, str) and
                                             dtype.lower() in BF16_NAMES):
        return BF16
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is not None and resolved.name in BF16_NAMES:  # ml_dtypes.bfloat16
        return BF16
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; valid dtypes: {', '.join(PRECISIONS)}")
    return resolved


class Workspace:
    """The device buffers of one batch size: inputs, targets, activations and their gradients.
    Allocated once and reused every step."""

    def __init__(self, model: "MLP", rows: int, target_shape: tuple | None, target_dtype) -> None:
        be, dtype = model.backend, model.storage
        self.rows = rows
        self.X = be.empty((rows, model.sizes[0]), dtype)
        self.T = None if target_shape is None else be.empty((rows,) + target_shape, target_dtype)
        widths = model.sizes[1:]
        self.A = [be.empty((rows, w), dtype) for w in widths]
        normed = [model.norm is not None] * (len(widths) - 1) + [False]
        self.Z = [be.empty((rows, w), dtype) if not ACTIVATIONS[a].grad_from_output and not n
                  else None for w, a, n in zip(widths, model.layer_activations, normed)]
        # LayerNorm's xhat (the product's, normalized) and 1 / std of each row
        self.H = [be.empty((rows, w), dtype) if n else None for w, n in zip(widths, normed)]
        self.rstd = [be.empty((rows,), dtype) if n else None for n in normed]
        self.dA = [be.empty((rows, w), dtype) for w in widths]
        # dropout's output, the next layer's input in training (None: no dropout there)
        self.D = [be.empty((rows, w), dtype) if p > 0 else None
                  for w, p in zip(widths, model.dropout + (0.0,))]
        self.loss = be.zeros((1,), dtype)
        self.correct = be.zeros((1,), dtype)


class MLP:
    """A multilayer perceptron: ``sizes`` like ``[64, 128, 10]``; hidden layers use
    ``activation`` (one name, or one per hidden layer); the output layer is linear (logits).
    ``dropout``: each hidden layer's output is dropped in training (fit) with this probability
    (one number in [0, 1), or one per hidden layer), as torch.nn.Dropout after the
    activation; forward, predict and evaluate never drop. ``norm="layer"``: every hidden
    layer is Linear -> torch.nn.LayerNorm(width) -> activation (its gamma and beta are
    parameters like W and b)."""

    def __init__(self, sizes: Sequence[int], activation: str | Sequence[str] = "relu",
                 backend: str = "numpy", dtype: str = "float32", seed: int = 0,
                 dropout: float | Sequence[float] = 0.0, norm: str | None = None) -> None:
        self.sizes = _check_sizes(sizes)
        self.norm = check_norm(norm)
        self.activations = hidden_activations(activation, len(self.sizes) - 2)
        self.dropout = check_dropout(dropout, len(self.sizes) - 2)
        self.layer_activations = self.activations + ("identity",)
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(backend, bf16=self.dtype is BF16)
        _check_backend_dtype(self.backend, self.dtype)
        _check_backend_kernels(self.backend, self.dropout, self.norm)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {shown(seed)}")
        self.seed = int(seed)
        if any(self.dropout) and self.seed >= philox.SEED_LIMIT:
            raise ValueError(f"a model with dropout needs a seed < 2**64 (the key of its masks' "
                             f"generator), got {self.seed}")
        self.optimizer: Optimizer | None = None  # set by fit() or load()
        # The schedule of the last fit() that had one, and how it stepped: a checkpoint keeps
        # them, and a later fit() without lr_scheduler= continues it.
        self.lr_scheduler: LRScheduler | None = None
        self.lr_scheduler_interval = "epoch"
        self.loss: str | None = None  # of the last fit(): predict_proba's link
        # Taken without waiting by fit() (or a hand-driven EpochLoop), so that of two fits
        # started together exactly one trains; _trainer is who holds it (see bpkernels.train).
        self._training_lock = threading.Lock()
        self._trainer: Any = None
        self.epochs_trained = 0
        self._layout = [(i, o) for i, o in zip(self.sizes[:-1], self.sizes[1:])]
        # which layers have LayerNorm's gamma and beta after W and b: the hidden ones, with norm
        self._normed = [norm is not None and layer < len(self._layout) - 1
                        for layer in range(len(self._layout))]
        self.n_params = memory.n_parameters(self.sizes, norm)
        self._check_memory()
        self.params = self.backend.asarray_resident(self._initial_params(), self.storage)
        self.grads = self.backend.zeros((self.n_params,), self.storage)
        self._weights = self._views(self.params)
        self._gradients = self._views(self.grads)
        self._workspaces: OrderedDict[tuple, Workspace] = OrderedDict()
        self._local = threading.local()

    def _bf16_kwargs(self) -> dict[str, bool]:
        """The dense kernels' ``bf16=True`` where the model is bf16; nothing otherwise, so that
        a backend written before bf16 (a user's, registered) still runs float32 models."""
        return {"bf16": True} if self.dtype is BF16 else {}

    @property
    def storage(self) -> np.dtype:
        """The NumPy dtype of the model's arrays: its dtype, float32 for bf16."""
        return storage_dtype(self.dtype)

    @property
    def training(self) -> bool:
        """True while fit() (or an EpochLoop inside ``with loop:``) trains this model."""
        return self._training_lock.locked()

    # ---------------------------------------------------------------- layout
    def _views(self, flat) -> list[tuple[Any, ...]]:
        """Each layer's views into a flat buffer: W (in, out) row-major, then b (out,), then for
        a normalized layer LayerNorm's gamma and beta (out,) each."""
        views, offset = [], 0
        for (i, o), normed in zip(self._layout, self._normed):
            W = flat[offset:offset + i * o].reshape(i, o)
            offset += i * o
            parts = [W]
            for _ in range(3 if normed else 1):
                parts.append(flat[offset:offset + o])
                offset += o
            views.append(tuple(parts))
        return views

    def _check_memory(self) -> None:
        """InsufficientMemory, before anything is allocated, for a model that cannot fit."""
        n, itemsize = self.n_params, self.dtype.itemsize
        memory.check_on(self.backend, memory.describe(self),
                        {"initial weights drawn in float64": 2 * 8 * n},
                        {"parameters": n * itemsize, "gradients": n * itemsize})

    def _initial_params(self) -> np.ndarray:
        """He (ReLU family) or Glorot initial weights, zero biases, drawn on the host in
        float64 from the seed, so every backend and dtype starts from the same numbers."""
        rng = np.random.default_rng(self.seed)
        parts = []
        for (i, o), act, normed in zip(self._layout, self.layer_activations, self._normed):
            if ACTIVATIONS[act].init == "he":
                W = rng.standard_normal((i, o)) * np.sqrt(2.0 / i)
            else:
                limit = np.sqrt(6.0 / (i + o))
                W = rng.uniform(-limit, limit, (i, o))
            parts += [W.ravel(), np.zeros(o)]
            if normed:  # gamma 1, beta 0, as torch.nn.LayerNorm
                parts += [np.ones(o), np.zeros(o)]
        return np.concatenate(parts)

    def workspace(self, rows: int, target_shape: tuple | None = None,
                  target_dtype: Any = None) -> Workspace:
        """The workspace of training (fit, loss_and_grads): one set per model, as training is
        exclusive."""
        return self._cached(self._workspaces, rows, target_shape, target_dtype)

    def _scratch(self, rows: int, target_shape: tuple | None = None,
                 target_dtype: Any = None) -> Workspace:
        """The calling thread's own workspace, for forward, predict and evaluate: threads that
        call them at once on one model never share buffers. A threading.local holds them, so
        the buffers of a thread that ended go with it instead of piling up."""
        cache = getattr(self._local, "workspaces", None)
        if cache is None:
            cache = self._local.workspaces = OrderedDict()
        return self._cached(cache, rows, target_shape, target_dtype)

    def _cached(self, cache: OrderedDict, rows: int, target_shape: tuple | None,
                target_dtype: Any) -> Workspace:
        key = (rows, target_shape, None if target_dtype is None else np.dtype(target_dtype))
        ws = cache.get(key)
        if ws is None:
            target = 0 if target_shape is None else \
                int(np.prod(target_shape, dtype=np.int64)) * np.dtype(target_dtype).itemsize
            memory.check_on(self.backend, memory.describe(self), {}, {
                f"a workspace for {rows} rows": self.workspace_bytes(rows, target)})
            ws = Workspace(self, rows, target_shape, target_dtype)
            cache[key] = ws
            while len(cache) > _MAX_WORKSPACES:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return ws

    def workspace_bytes(self, rows: int, target_bytes_per_row: int = 0) -> int:
        """The bytes of the Workspace for ``rows`` rows (targets of the given size per row)."""
        # Z (kept for gelu and silu, but by a normalized layer), D (dropout), H (LayerNorm)
        keeps = [int(not ACTIVATIONS[a].grad_from_output and not n) + int(p > 0) + int(n)
                 for a, p, n in zip(self.layer_activations, self.dropout + (0.0,), self._normed)]
        rstd = sum(self._normed) * rows * self.dtype.itemsize
        return memory.workspace_bytes(self.sizes, keeps, rows, self.dtype.itemsize,
                                      target_bytes_per_row) + rstd

    # ---------------------------------------------------------------- passes
    def _forward(self, ws: Workspace, X, drops: Sequence[Any] = ()) -> Any:
        """The outputs of X; with ``drops`` (:meth:`dropouts`), as trained: dropped."""
        be, bf16 = self.backend, self._bf16_kwargs()
        for layer, (params, act, A, Z) in enumerate(zip(self._weights, self.layer_activations,
                                                        ws.A, ws.Z)):
            if self._normed[layer]:
                W, b, gamma, beta = params
                be.dense_forward(X, W, b, "identity", ws.H[layer], **bf16)
                be.layer_norm_forward(ws.H[layer], gamma, beta, act, A, ws.rstd[layer],
                                      NORM_EPS)
            else:
                be.dense_forward(X, params[0], params[1], act, A, Z, **bf16)
            X = A
            if layer < len(drops) and drops[layer] is not None:
                be.dropout_forward(A, ws.D[layer], drops[layer])
                X = ws.D[layer]
        return X

    def _backward(self, ws: Workspace, drops: Sequence[Any] = ()) -> None:
        """Gradients into ``self.grads`` from ``ws.dA[-1]`` (the loss gradient of the output)."""
        be, bf16 = self.backend, self._bf16_kwargs()
        for layer in reversed(range(len(self._layout))):
            W = self._weights[layer][0]
            dW, db = self._gradients[layer][:2]
            dropped = layer > 0 and layer - 1 < len(drops) and drops[layer - 1] is not None
            X = ws.X if layer == 0 else ws.D[layer - 1] if dropped else ws.A[layer - 1]
            dX = None if layer == 0 else ws.dA[layer - 1]
            act, A, Z = self.layer_activations[layer], ws.A[layer], ws.Z[layer]
            if self._normed[layer]:  # through the activation and LayerNorm to the product's
                _, _, gamma, beta = self._weights[layer]
                be.layer_norm_backward(ws.dA[layer], act, A, ws.H[layer], gamma, beta,
                                       ws.rstd[layer], *self._gradients[layer][2:])
                act, A, Z = "identity", ws.H[layer], None
            be.dense_backward(X, W, ws.dA[layer], act, A, Z, dW, db, dX, **bf16)
            if dropped:  # dX is the gradient of the dropout's output: now of its input
                be.dropout_backward(dX, drops[layer - 1])

    def dropouts(self, rows: Any, step: int) -> tuple[Any, ...]:
        """The kernels' Dropout of every hidden layer (None where p is 0) for optimizer step
        ``step`` (1-based) of a batch whose data-set row indices are the device vector
        ``rows``; () for a model without dropout."""
        if not any(self.dropout):
            return ()
        return tuple(philox.layer_dropout(self.seed, step, layer, rows, p) if p > 0 else None
                     for layer, p in enumerate(self.dropout))

    def forward_backward(self, ws: Workspace, loss: str, loss_out: Any, W: Any = None,
                         drops: Sequence[Any] = ()) -> None:
        """One training pass on the batch already in ``ws.X`` / ``ws.T``: the mean loss
        (weighted by the rows' weights ``W`` on the device, if given) into ``loss_out`` (on the
        device) and its gradient into ``self.grads``; with ``drops`` (:meth:`dropouts`), as
        trained, through dropout."""
        Y = self._forward(ws, ws.X, drops)
        self.backend.loss(loss, Y, ws.T, ws.dA[-1], loss_out, W)
        self._backward(ws, drops)

    def _upload(self, host: np.ndarray, out) -> None:
        """``out[...] = host`` for a host array (a copy to the device on a GPU backend)."""
        be = self.backend
        be.copy(host if interop.host_backend(be) else be.asarray(host), out)

    def _chunks(self, X: interop.Array, T: np.ndarray | None = None):
        """Yield (workspace, rows, X rows): the chunk of X in place where the backend can read
        it (else copied into the workspace), its targets copied into the workspace."""
        for start in range(0, X.rows, CHUNK_ROWS):
            rows = slice(start, min(start + CHUNK_ROWS, X.rows))
            n = rows.stop - rows.start
            ws = self._scratch(n) if T is None else self._scratch(n, T.shape[1:], T.dtype)
            chunk = X.data[rows]  # rows of a C-contiguous array: C-contiguous
            if not X.resident:
                self._upload(chunk, ws.X)
                chunk = ws.X
            if T is not None:
                self._upload(T[rows], ws.T)
            yield ws, rows, chunk

    def _outputs(self, X: interop.Array) -> Any:
        """The outputs for the rows of X: a NumPy array, or a device array for device X."""
        be = self.backend
        shape = (X.rows, self.sizes[-1])
        out = be.empty(shape, self.storage) if X.device else np.empty(shape, self.storage)
        direct = X.device or interop.host_backend(be)  # ``out`` is the backend's own array
        for ws, rows, chunk in self._chunks(X):
            Y = self._forward(ws, chunk)
            if direct:
                be.copy(Y, out[rows])
            else:
                out[rows] = be.to_host(Y)
        return out

    def evaluate_prepared(self, X: interop.Array, T: np.ndarray, loss: str,
                          weights: np.ndarray | DeviceWeights | None = None,
                          metrics: MetricPlan | None = None) -> dict[str, float]:
        """:meth:`evaluate` on inputs already checked by :meth:`prepare` (validation in fit());
        ``weights``: each row's, from bpkernels.weights.row_weights (uploaded chunk by chunk),
        or the same as bpkernels.weights.DeviceWeights (copied on the device), or None;
        ``metrics``: a plan of bpkernels.metrics.check_metrics, or None."""
        be, total, correct = self.backend, 0.0, 0.0
        metric = has_accuracy(loss, self.sizes[-1])
        stats = None if metrics is None else be.zeros((metrics.size(self.sizes[-1]),),
                                                      np.float64)
        weights, resident = weights if isinstance(weights, DeviceWeights) else (weights, None)
        for ws, rows, chunk in self._chunks(X, T):
            W, count = None, ws.rows
            if weights is not None:  # the chunk's weights, in a buffer of its workspace
                if getattr(ws, "W", None) is None:
                    ws.W = be.empty((ws.rows,), self.storage)
                W, count = ws.W, float(weights[rows].sum(dtype=np.float64))
                if resident is None:
                    self._upload(weights[rows], W)
                else:  # the kernels see the same buffer as evaluate()'s: equal numbers
                    be.copy(resident[rows], W)
            Y = self._forward(ws, chunk)
            be.loss(loss, Y, ws.T, ws.dA[-1], ws.loss, W)
            total += float(be.to_host(ws.loss)[0]) * count
            if metric:
                be.count_correct(Y, ws.T, ws.correct, W)
                correct += float(be.to_host(ws.correct)[0])
            if stats is not None:
                be.accumulate_stats(metrics.kind, Y, ws.T, W, metrics.ks, stats)
        rows_weight = X.rows if weights is None else float(weights.sum(dtype=np.float64))
        result = {"loss": total / rows_weight}
        if metric:
            result["accuracy"] = correct / rows_weight
        if stats is not None:
            found = metric_values(metrics, be.to_host(stats), self.sizes[-1])
            result.update((k, v) for k, v in found.items() if k not in result)
        return result

    def prepare(self, X: ArrayLike, y: ArrayLike, loss: str) -> tuple[interop.Array, np.ndarray]:
        """Checked inputs and host targets for ``loss`` (see bpkernels.interop): what
        :meth:`evaluate_prepared` and :class:`bpkernels.train.EpochLoop` take."""
        check_loss(loss)
        X = interop.features(X, self.backend, self.storage, self.sizes[0])
        y = interop.targets(y, self.backend)
        return X, prepare_targets(loss, y, X.rows, self.sizes[-1], self.storage)

    # ---------------------------------------------------------------- public API
    # Inputs: NumPy arrays or any array of another library (see bpkernels.interop for the rules:
    # in place where possible, one conversion otherwise, never a hidden device-to-host copy).
    def forward(self, X: ArrayLike) -> Any:
        """Outputs (logits for classifiers) for the rows of X: a NumPy array for host X, a
        device array of the backend (CuPy on "cupy") for device X."""
        return self._outputs(interop.features(X, self.backend, self.storage, self.sizes[0]))

    def predict(self, X: ArrayLike) -> Any:
        """Class ids (int64): the argmax of the outputs, or ``output > 0`` for a single output;
        a NumPy array for host X, a device array for device X."""
        X = interop.features(X, self.backend, self.storage, self.sizes[0])
        Y = self._outputs(X)
        if X.device:  # the contract has no argmax kernel: the (n, outputs) logits come back
            # (resident: an answer to device input is a device array, whatever its size)
            return self.backend.asarray_resident(_class_ids(self.backend.to_host(Y)))
        return _class_ids(Y)

    def predict_proba(self, X: ArrayLike, loss: str | None = None) -> Any:
        """Probabilities through the link of the loss the model was trained with (``loss``,
        default the last fit's): the softmax of each row for cross-entropy, the sigmoid of each
        output for binary cross-entropy. An MSE model has no link and is refused. In the
        model's dtype; a NumPy array for host X, a device array for device X."""
        loss = self.loss if loss is None else check_loss(loss)
        if loss is None:
            raise ValueError("predict_proba needs the loss the model is trained with: fit it "
                             "first, or pass loss='cross_entropy' or 'binary_cross_entropy'")
        if loss == "mse":
            raise ValueError("predict_proba: this model is trained with mse, which has no link "
                             "to probabilities; use forward() for its outputs")
        X = interop.features(X, self.backend, self.storage, self.sizes[0])
        Y = self._outputs(X)
        host = self.backend.to_host(Y).copy() if X.device else Y
        P = _softmax(host) if loss == "cross_entropy" else _sigmoid(host)
        return self.backend.asarray_resident(P) if X.device else P

    def evaluate(self, X: ArrayLike, y: ArrayLike, loss: str,
                 sample_weight: ArrayLike | None = None,
                 metrics: Sequence[str] | None = None) -> dict[str, float]:
        """Mean loss (and accuracy where it applies) over the whole of X, y; with
        ``sample_weight`` (one number >= 0 per row) the weighted means, ``sum(w_i l_i) /
        sum(w_i)`` and the weight of the rows classified right over the total weight.
        ``metrics``: names of bpkernels.metrics (``"f1_macro"``, ``"top5"``, ``"r2"``, ...),
        each added to the dict (weighted alike), from statistics summed on the device."""
        plan = check_metrics(metrics, check_loss(loss), self.sizes[-1])
        X, T = self.prepare(X, y, loss)
        if sample_weight is not None:  # from any library, as y (bpkernels.interop)
            sample_weight = interop.targets(sample_weight, self.backend, "sample_weight")
        weights = row_weights(sample_weight, None, T, loss, self.sizes[-1], self.storage,
                              "evaluate")
        return self.evaluate_prepared(X, T, loss, weights, plan)

    def loss_and_grads(self, X: ArrayLike, y: ArrayLike,
                       loss: str) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """The mean loss over the rows of X, y and its gradients ``[(dW, db), ...]`` (NumPy)."""
        X, T = self.prepare(X, y, loss)
        be = self.backend
        ws = self.workspace(X.rows, T.shape[1:], T.dtype)
        if X.resident:
            be.copy(X.data, ws.X)
        else:
            self._upload(X.data, ws.X)
        self._upload(T, ws.T)
        self.forward_backward(ws, loss, ws.loss)
        value = float(be.to_host(ws.loss)[0])
        grads = [tuple(be.to_host(g) for g in layer) for layer in self._gradients]
        return value, grads

    def get_weights(self) -> list[tuple[np.ndarray, ...]]:
        """A copy of every layer's ``(W, b)`` as NumPy arrays, W shaped (in, out); ``(W, b,
        gamma, beta)`` for a hidden layer with LayerNorm."""
        host = self.backend.to_host(self.params)
        return [tuple(part.copy() for part in layer) for layer in self._views(host)]

    def set_weights(self, weights: Sequence[tuple[Any, Any]]) -> None:
        """Replace every layer's ``(W, b)`` (``(W, b, gamma, beta)`` for a hidden layer with
        LayerNorm, as get_weights gives them): float arrays of any library (see
        bpkernels.interop), converted to the model's dtype. All are checked before any is
        written, so a bad list leaves the model untouched."""
        if not isinstance(weights, (list, tuple)) or len(weights) != len(self._layout):
            got = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
            raise ValueError(f"set_weights needs a list of {len(self._layout)} layers' "
                             f"parameters, got {got}")
        sources = []
        for layer, ((i, o), normed, given) in enumerate(zip(self._layout, self._normed, weights)):
            names = ("W", "b", "gamma", "beta") if normed else ("W", "b")
            if not isinstance(given, (list, tuple)) or len(given) != len(names):
                raise ValueError(f"layer {layer}: expected a ({', '.join(names)}) "
                                 f"{'pair' if len(names) == 2 else 'tuple'}, got "
                                 f"{len(given) if isinstance(given, (list, tuple)) else type(given).__name__}"
                                 f"{' values' if isinstance(given, (list, tuple)) else ''}")
            for name, value in zip(names, given):
                shape = (i, o) if name == "W" else (o,)
                sources.append(interop.parameter(value, self.backend, self.storage, shape,
                                                 f"layer {layer} {name}"))
        destinations = [view for layer in self._weights for view in layer]
        for src, dst in zip(sources, destinations):
            self.backend.copy(src, dst)

    def to(self, backend: str | Backend, dtype: Any = None) -> "MLP":
        """Move the model to ``backend`` and/or ``dtype`` (default: keep it), in place, and
        return it (as torch.nn.Module.to does): weights, gradients, the optimizer's state and
        step count, and the epochs trained. The numbers are the same: bit for bit where the
        dtype stays, rounded by the cast from float64 to float32, exact from float32 to
        float64; training on continues as it would have where it was, up to the backends' own
        rounding. Everything is checked first (the backend's name and availability, the dtype,
        that every value fits the new dtype): on error the model is as it was. The old
        backend's workspaces are dropped."""
        if self.training:
            raise RuntimeError("model.to() cannot move a model while fit() trains it (the "
                               "training loop holds its buffers); call it after fit() returns, "
                               "or stop training from the callback by returning True")
        new_dtype = self.dtype if dtype is None else resolve_dtype(dtype)
        target = get_backend(backend, bf16=new_dtype is BF16)
        _check_backend_dtype(target, new_dtype)
        _check_backend_kernels(target, self.dropout, self.norm)
        if target is self.backend and new_dtype == self.dtype:
            return self
        state: dict[str, Any] = self.optimizer.state if self.optimizer is not None else {}
        buffers = {"params": self.params, "grads": self.grads,
                   **{f"optimizer state {name}": buf for name, buf in state.items()}}
        # Both copies live at once where the backend stays (a dtype change); a host copy of
        # one buffer at a time passes through the host.
        size = self.n_params * new_dtype.itemsize
        memory.check_on(target, f"moving {memory.describe(self)} to {new_dtype.name} on "
                        f"backend '{target.name}'",
                        {"one buffer on the host": self.n_params * self.dtype.itemsize + size},
                        {name.replace("params", "parameters").replace("grads", "gradients"): size
                         for name in buffers})
        moved = {}
        for name, buf in buffers.items():
            host = self.backend.to_host(buf)
            with np.errstate(over="ignore"):  # overflow is reported below
                cast = host.astype(storage_dtype(new_dtype))
            if name != "grads" and not np.isfinite(cast).all():  # grads: rewritten every step
                i = int(np.argmin(np.isfinite(cast)))
                raise ValueError(f"cannot move the model to {new_dtype}: its {name}[{i}] = "
                                 f"{host[i]} does not fit in {new_dtype}")
            moved[name] = target.asarray_resident(cast, cast.dtype)
        # Nothing below can fail: the model changes all at once.
        self.backend, self.dtype = target, new_dtype
        self.params, self.grads = moved.pop("params"), moved.pop("grads")
        self._weights = self._views(self.params)
        self._gradients = self._views(self.grads)
        self._workspaces = OrderedDict()
        self._local = threading.local()  # every thread's scratch is of the old backend
        if self.optimizer is not None:
            self.optimizer.state = {name: moved[f"optimizer state {name}"] for name in state}
        return self

    # ---------------------------------------------------------------- saved state
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The model as host data, ``(meta, arrays)``: what a checkpoint stores and
        :meth:`from_state` rebuilds. ``meta`` (JSON-able) holds the architecture, dtype, seed,
        backend name, epochs trained and the optimizer's configuration, state names and step
        count (None without an optimizer), and the learning-rate schedule (its config, state
        and interval; the key is absent without one); ``arrays`` the flat parameters ("params") and each
        optimizer state buffer ("state.<name>"), as NumPy arrays."""
        be, opt = self.backend, self.optimizer
        meta: dict[str, Any] = {
            "sizes": list(self.sizes), "activations": list(self.activations),
            "dtype": self.dtype.name, "seed": self.seed, "backend": be.name,
            "dropout": list(self.dropout), "norm": self.norm,
            "epochs_trained": self.epochs_trained, "optimizer": None}
        arrays = {"params": be.to_host(self.params)}
        if opt is not None:
            meta["optimizer"] = {"config": opt.config(), "step_count": opt.step_count,
                                 "state": sorted(opt.state)}
            arrays.update({f"state.{name}": be.to_host(buf) for name, buf in opt.state.items()})
        if self.loss is not None:
            meta["loss"] = self.loss
        sched = self.lr_scheduler
        if sched is not None and sched.started:
            meta["lr_scheduler"] = {"config": sched.config(), "state": sched.state_dict(),
                                    "interval": self.lr_scheduler_interval}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                   backend: str | None = None, optimizer: Optimizer | None = None) -> "MLP":
        """The model that :meth:`state` described, with its optimizer if it had one, on
        ``backend`` (default: the one it was on if available here, else "auto"). The one way
        a model is rebuilt from saved state: checkpoints (:func:`load`) and the scikit-learn
        estimators' pickles use it. ``optimizer``: an unbound optimizer to take the saved
        state and step count, instead of one made from the saved configuration (the
        estimators keep their own object, a user's subclass included)."""
        if backend is None:
            # Only the saved backend is tried, so loading never imports every backend there is.
            try:
                saved_on = get_backend(meta["backend"])
                runs = meta["dtype"] != "bf16" or saved_on.bf16_unavailable() is None
                backend = saved_on.name if runs else "auto"
            except (BackendUnavailable, ValueError):
                backend = "auto"
        model = cls(meta["sizes"], meta["activations"], backend=backend, dtype=meta["dtype"],
                    seed=meta["seed"], dropout=meta.get("dropout", 0.0), norm=meta.get("norm"))
        be = model.backend
        be.copy(be.asarray(arrays["params"]), model.params)
        model.epochs_trained = int(meta["epochs_trained"])
        saved = meta["optimizer"]
        if saved is not None:
            opt = optimizer if optimizer is not None else optimizer_from_config(saved["config"])
            opt.bind(model)
            for name in opt.state:
                key = f"state.{name}"
                if key not in arrays:
                    raise ValueError(f"the saved state lacks the optimizer state {name!r}")
                be.copy(be.asarray(arrays[key]), opt.state[name])
            opt.step_count = int(saved["step_count"])
            model.optimizer = opt
        model.loss = meta.get("loss")
        schedule = meta.get("lr_scheduler")
        if schedule is not None:
            model.lr_scheduler = scheduler_from_config(schedule["config"])
            model.lr_scheduler.load_state_dict(schedule["state"])
            model.lr_scheduler_interval = schedule["interval"]
        return model

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (and its optimizer state) to one portable file, atomically."""
        checkpoint.write(path, *self.state())

    def __repr__(self) -> str:
        dropout = f", dropout={list(self.dropout)}" if any(self.dropout) else ""
        dropout += f", norm={self.norm!r}" if self.norm is not None else ""
        return (f"MLP(sizes={list(self.sizes)}, activation={list(self.activations)}, "
                f"backend={self.backend.name!r}, dtype={self.dtype.name!r}, seed={self.seed}"
                f"{dropout})")


def load(path: str | os.PathLike, backend: str | None = None) -> MLP:
    """A model (with its optimizer, if one was saved) from a checkpoint, on ``backend``
    (default: the backend it was saved from if available here, else "auto")."""
    return MLP.from_state(*checkpoint.read(path), backend=backend)


def _check_backend_kernels(backend: Backend, dropout: tuple[float, ...], norm: Any) -> None:
    if any(dropout) and type(backend).dropout_forward is Backend.dropout_forward:
        raise ValueError(f"backend {backend.name!r} has no dropout kernels: a model with "
                         "dropout trains on numpy, numba or cupy")
    if norm is not None and type(backend).layer_norm_forward is Backend.layer_norm_forward:
        raise ValueError(f"backend {backend.name!r} has no LayerNorm kernels: a model with "
                         "norm='layer' trains on numpy, numba or cupy")


def _check_backend_dtype(backend: Backend, dtype: np.dtype | MixedPrecision) -> None:
    if dtype is BF16:
        why = backend.bf16_unavailable()
        if why is not None:
            raise ValueError(f"backend {backend.name!r} cannot run bf16: {why}")
        return
    if dtype.name not in backend.dtypes:
        raise ValueError(f"backend {backend.name!r} does not support {dtype.name}; "
                         f"it supports {', '.join(backend.dtypes)}")


def _softmax(Y: np.ndarray) -> np.ndarray:
    """Softmax of each row, in place: the row's max subtracted first, so exp stays finite."""
    Y -= Y.max(axis=1, keepdims=True)
    np.exp(Y, out=Y)
    Y /= Y.sum(axis=1, keepdims=True)
    return Y


def _sigmoid(Y: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-y)), in place, from exp(-|y|) <= 1 so that it never overflows."""
    e = np.exp(-np.abs(Y))
    np.divide(np.where(Y >= 0, 1.0, e), 1.0 + e, out=Y, casting="unsafe")
    return Y


def _class_ids(Y: np.ndarray) -> np.ndarray:
    """The argmax of each row of outputs, or ``output > 0`` for a single output, as int64."""
    if Y.shape[1] == 1:
        return (Y[:, 0] > 0).astype(np.int64)
    return np.argmax(Y, axis=1).astype(np.int64)


def check_norm(norm: Any) -> str | None:
    if norm is not None and not (isinstance(norm, str) and norm == "layer"):
        raise ValueError(f"norm must be None or 'layer' (LayerNorm in every hidden layer), "
                         f"got {shown(norm)}")
    return norm


def check_dropout(dropout: Any, hidden: int) -> tuple[float, ...]:
    """Each hidden layer's dropout probability, from one number or one per hidden layer."""
    if isinstance(dropout, (list, tuple, np.ndarray)):
        values = list(np.asarray(dropout, dtype=object).ravel()) if \
            isinstance(dropout, np.ndarray) else list(dropout)
        if len(values) != hidden:
            raise ValueError(f"dropout must be one probability or one per hidden layer "
                             f"({hidden}), got {len(values)} values")
    else:
        values = [dropout] * hidden
    return tuple(check_real(p, "dropout", 0.0, 1.0, high_open=True) for p in values)


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    widths = check_ordered(sizes, "sizes", "a list or tuple of layer widths like [64, 128, 10]")
    if len(widths) < 2:
        raise ValueError(f"sizes needs at least an input and an output width, got {shown(widths)}")
    for s in widths:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"layer widths must be positive integers, got {shown(widths)}")
    return tuple(int(s) for s in widths)
