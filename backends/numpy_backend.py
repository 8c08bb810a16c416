"""The reference backend: NumPy on the CPU, float32, float64 and bf16 (emulated roundings).

Every kernel writes into the buffers it is given (``out=``) and into scratch arrays cached by
shape, so after the first step of a given batch size no array is allocated.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable

import numpy as np

from .base import KEEPS_Z, Backend, clip_coefficient, rated
from .bf16 import bf16_round
from .host import cpu_name
from .numpy_activations import DERIVATIVE, FORWARD, sigmoid


class HostMemory:
    """The plumbing of a backend whose device arrays are NumPy arrays in host memory (NumPy,
    Numba): put first among the bases, it implements the contract's plumbing methods."""

    def asarray(self, host, dtype=None):
        return np.array(host, dtype=dtype, order="C", copy=True)

    def to_host(self, array):
        return np.array(array, copy=True)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def copy(self, src, out):
        np.copyto(out, src, casting="unsafe")

    def take_rows(self, src, index, out):
        np.take(src, index, axis=0, out=out)

    def synchronize(self):
        pass


class NumpyBackend(HostMemory, Backend):
    name = "numpy"

    def __init__(self) -> None:
        # Scratch buffers per thread: the backend is one object per process, and models
        # trained at once in several threads would write each other's scratch (NumPy releases
        # the GIL inside its kernels). Keyed by thread id (a threading.local cannot be copied).
        self._scratch_caches: dict[int, dict[tuple, np.ndarray]] = {}

    @property
    def _scratch_cache(self) -> dict[tuple, np.ndarray]:
        """The calling thread's scratch buffers."""
        cache = self._scratch_caches.get(threading.get_ident())
        if cache is None:
            cache = self._scratch_caches.setdefault(threading.get_ident(), {})
        return cache

    def _scratch(self, tag: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        key = (tag, shape, np.dtype(dtype))
        buf = self._scratch_cache.get(key)
        if buf is None:
            buf = self._scratch_cache[key] = np.empty(shape, dtype)
        return buf

    def device_info(self):
        return {"device": "cpu", "name": cpu_name(),
                "cores": os.cpu_count(), "numpy": np.__version__, "blas": blas_info()}

    # ------------------------------------------------------------------ dense layer
    def bf16_unavailable(self):
        return None

    def _rounded(self, tag: str, a: np.ndarray) -> np.ndarray:
        """``a`` rounded to bfloat16 (as float32) in a scratch array: a product's input."""
        return bf16_round(a, out=self._scratch(tag, a.shape, np.float32))

    def dense_forward(self, X, W, b, activation, A, Z=None, bf16=False):
        pre = A if Z is None else Z
        if bf16:
            X, W = self._rounded("bf16 X", X), self._rounded("bf16 W", W)
        np.matmul(X, W, out=pre)
        pre += b
        FORWARD[activation](self, pre, A)

    def dense_backward(self, X, W, dA, activation, A, Z, dW, db, dX=None, bf16=False):
        if activation != "identity":
            if activation in KEEPS_Z and Z is None:
                raise ValueError(f"dense_backward of {activation} needs the pre-activation Z")
            factor = self._scratch("act_grad", dA.shape, dA.dtype)
            DERIVATIVE[activation](self, A, Z, factor)
            dA *= factor
        dZ = dA
        if bf16:
            X, W, dZ = (self._rounded("bf16 X", X), self._rounded("bf16 W", W),
                        self._rounded("bf16 dZ", dA))
        np.matmul(X.T, dZ, out=dW)
        np.add.reduce(dA, axis=0, out=db)
        if dX is not None:
            np.matmul(dZ, W.T, out=dX)

    # ------------------------------------------------------------------ dropout
    # (The reference: the mask drawn in NumPy for the step, an array per call. The compiled
    # backends draw it inside their loops.)
    def dropout_forward(self, A, D, drop):
        from ..philox import dropout_noise
        np.multiply(A, dropout_noise(drop, A.shape[1], A.dtype), out=D)

    def dropout_backward(self, dD, drop):
        from ..philox import dropout_noise
        dD *= dropout_noise(drop, dD.shape[1], dD.dtype)

    # ------------------------------------------------------------------ layer norm
    def layer_norm_forward(self, H, gamma, beta, activation, A, rstd, eps):
        h = H.astype(np.float64)
        h -= h.mean(axis=1, keepdims=True)
        inv = 1.0 / np.sqrt(np.mean(h * h, axis=1) + eps)
        rstd[...] = inv
        np.multiply(h, inv[:, None], out=H, casting="unsafe")
        N = self._scratch("norm_out", H.shape, H.dtype)
        np.multiply(H, gamma, out=N)
        N += beta
        FORWARD[activation](self, N, A)

    def layer_norm_backward(self, dA, activation, A, H, gamma, beta, rstd, dgamma, dbeta):
        if activation != "identity":
            N = None
            if activation in KEEPS_Z:
                N = self._scratch("norm_out", H.shape, H.dtype)
                np.multiply(H, gamma, out=N)
                N += beta
            factor = self._scratch("act_grad", dA.shape, dA.dtype)
            DERIVATIVE[activation](self, A, N, factor)
            dA *= factor
        factor = self._scratch("act_grad", dA.shape, dA.dtype)
        np.multiply(dA, H, out=factor)
        np.add.reduce(factor, axis=0, out=dgamma)
        np.add.reduce(dA, axis=0, out=dbeta)
        # the rest in float64, rounded once: d = g * gamma is exact there for float32
        d = dA.astype(np.float64) * gamma.astype(np.float64)
        x = H.astype(np.float64)
        out = d - d.mean(axis=1, keepdims=True) - x * np.mean(d * x, axis=1, keepdims=True)
        out *= rstd.astype(np.float64)[:, None]
        np.copyto(dA, out, casting="unsafe")

    # ------------------------------------------------------------------ loss
    def loss(self, kind, Y, T, dY, out, W=None):
        _LOSSES[kind](self, Y, T, dY, out, W)

    def count_correct(self, Y, T, out, W=None):
        labels = T
        n, o = Y.shape
        hits = self._scratch("hits", (n,), np.bool_)
        if o == 1:
            predicted = self._scratch("pred_bool", (n,), np.bool_)
            truth = self._scratch("truth_bool", (n,), np.bool_)
            np.greater(Y[:, 0], 0, out=predicted)
            np.greater_equal(labels.reshape(n), 0.5, out=truth)
            np.equal(predicted, truth, out=hits)
        else:
            predicted = self._scratch("pred_ids", (n,), np.intp)
            np.argmax(Y, axis=1, out=predicted)
            if labels.ndim == 2:
                truth = self._scratch("truth_ids", (n,), np.intp)
                np.argmax(labels, axis=1, out=truth)
                labels = truth
            np.equal(predicted, labels, out=hits)
        out[0] = np.count_nonzero(hits) if W is None else float(np.vdot(W, hits))

    def accumulate_stats(self, kind, Y, T, W, ks, out):
        # Summed in float64 within the batch (scratch buffers), then added to ``out``.
        n, o = Y.shape
        w = self._scratch("stats_w", (n,), np.float64)
        w[...] = 1.0 if W is None else W
        sums = self._scratch("stats_sums", (o,), np.float64)
        if kind == "regression":
            E = self._scratch("stats_e", (n, o), np.float64)
            A = self._scratch("stats_a", (n, o), np.float64)
            np.subtract(Y, T, out=E, dtype=np.float64)
            out[0] += np.add.reduce(w)
            for part, values in enumerate((np.abs(E, out=A), np.multiply(E, E, out=E))):
                np.matmul(w, values, out=sums)
                out[1 + part * o:1 + (part + 1) * o] += sums
            np.copyto(A, T)
            np.matmul(w, A, out=sums)
            out[1 + 2 * o:1 + 3 * o] += sums
            np.multiply(A, A, out=A)
            np.matmul(w, A, out=sums)
            out[1 + 3 * o:] += sums
            return
        C = max(o, 2)
        true = self._scratch("stats_true", (n,), np.intp)
        pred = self._scratch("stats_pred", (n,), np.intp)
        if o == 1:
            np.greater(Y[:, 0], 0, out=pred, casting="unsafe")
            np.greater_equal(T.reshape(n, -1)[:, 0], 0.5, out=true, casting="unsafe")
        else:
            np.argmax(Y, axis=1, out=pred)
            if T.ndim == 2:
                np.argmax(T, axis=1, out=true)
            else:
                np.copyto(true, T, casting="unsafe")
        table = self._scratch("stats_table", (C * C + 2 * C,), np.float64)
        table.fill(0.0)
        cell = self._scratch("stats_cell", (n,), np.intp)
        np.multiply(true, C, out=cell)
        cell += pred
        np.add.at(table, cell, w)
        np.add(true, C * C, out=cell)
        np.add.at(table, cell, 1.0)
        np.add(pred, C * C + C, out=cell)
        np.add.at(table, cell, 1.0)
        out[:C * C + 2 * C] += table
        if ks:  # a label's rank: outputs above it, and equal ones of a larger index
            score = self._scratch("stats_score", (n, 1), Y.dtype)
            _label_positions(self, true, o, cell)
            np.take(Y.reshape(-1), cell, out=score[:, 0])
            above = self._scratch("stats_above", (n, o), np.bool_)
            tied = self._scratch("stats_tied", (n, o), np.bool_)
            rank = self._scratch("stats_rank", (n,), np.intp)
            hit = self._scratch("stats_hit", (n,), np.bool_)
            np.greater(Y, score, out=above)
            np.equal(Y, score, out=tied)
            np.greater(_columns(self, o), true[:, None], out=tied, where=tied)
            above |= tied
            np.add.reduce(above, axis=1, out=rank)
            for i, k in enumerate(ks):
                np.less(rank, k, out=hit)
                out[C * C + 2 * C + i] += np.vdot(w, hit)

    def check_step(self, loss, grads, step, halted, clip=None):
        # (not a sum: one could overflow on large finite gradients)
        if halted[0] == 0 and not (math.isfinite(loss[0]) and _all_finite(grads)):
            halted[0] = step
        if clip is not None and halted[0] == 0:
            # float64 squares (float32's would overflow from |g| ~ 1e19); an overflowing sum
            # is divergence, as torch's norm would be inf
            wide = grads if grads.dtype == np.float64 else \
                self._scratch("clip_wide", grads.shape, np.float64)
            if wide is not grads:
                np.copyto(wide, grads)
            clip[0] = np.dot(wide, wide)
            if not math.isfinite(clip[0]):
                halted[0] = step

    # ------------------------------------------------------------------ optimizers
    # The latch covers the update too: each rule runs on scratch copies of the parameters and
    # of the state it changes, and they are copied back only when every new value is finite
    # (the reference spends two copies per step on it; the arithmetic stays the one rule).
    def sgd_step(self, params, grads, momentum_buf, hp, step, halted, clip=None, rate=None):
        hp = rated("sgd", hp, rate)
        self._latched(self._sgd, params, grads, (momentum_buf if hp.momentum else None,), hp,
                      step, halted, clip)

    def adam_step(self, params, grads, m, v, hp, step, halted, clip=None, rate=None):
        self._latched(self._adam, params, grads, (m, v), rated("adam", hp, rate), step, halted,
                      clip)

    def rmsprop_step(self, params, grads, square_avg, momentum_buf, grad_avg, hp, step, halted,
                     clip=None, rate=None):
        hp = rated("rmsprop", hp, rate)
        self._latched(self._rmsprop, params, grads,
                      (square_avg, momentum_buf if hp.momentum > 0 else None,
                       grad_avg if hp.centered else None), hp, step, halted, clip)

    def _latched(self, rule, params, grads, states, hp, step, halted, clip=None) -> None:
        if halted[0]:
            return
        if clip is not None:  # torch's grads.mul_(coefficient), into scratch: grads stay as is
            clipped = self._scratch("clipped", grads.shape, grads.dtype)
            np.multiply(grads, grads.dtype.type(clip_coefficient(clip[0], clip[1])), out=clipped)
            grads = clipped
        new_params = self._scratch("new_params", params.shape, params.dtype)
        np.copyto(new_params, params)
        new_states = []
        for slot, state in enumerate(states):
            new = None
            if state is not None:
                new = self._scratch(f"new_state{slot}", state.shape, state.dtype)
                np.copyto(new, state)
            new_states.append(new)
        rule(new_params, grads, *new_states, hp, step)
        if not all(_all_finite(a) for a in (new_params, *new_states) if a is not None):
            halted[0] = step
            return
        np.copyto(params, new_params)
        for state, new in zip(states, new_states):
            if state is not None:
                np.copyto(state, new)

    def _sgd(self, params, grads, momentum_buf, hp, step):
        tmp = self._scratch("opt_a", params.shape, params.dtype)
        d = grads
        if hp.weight_decay:
            np.multiply(params, hp.weight_decay, out=tmp)
            tmp += grads
            d = tmp
        if hp.momentum:
            if step == 1:
                np.copyto(momentum_buf, d)
            else:
                momentum_buf *= hp.momentum
                if hp.dampening:
                    scaled = self._scratch("opt_b", params.shape, params.dtype)
                    np.multiply(d, 1.0 - hp.dampening, out=scaled)
                    momentum_buf += scaled
                else:
                    momentum_buf += d
            if hp.nesterov:
                scaled = self._scratch("opt_b", params.shape, params.dtype)
                np.multiply(momentum_buf, hp.momentum, out=scaled)
                np.add(d, scaled, out=tmp)
                d = tmp
            else:
                d = momentum_buf
        _subtract_scaled(params, d, hp.lr, self._scratch("opt_b", params.shape, params.dtype))

    def _adam(self, params, grads, m, v, hp, step):
        g = grads
        tmp = self._scratch("opt_a", params.shape, params.dtype)
        if hp.weight_decay and hp.decoupled:
            params *= 1.0 - hp.lr * hp.weight_decay
        elif hp.weight_decay:
            np.multiply(params, hp.weight_decay, out=tmp)
            tmp += grads
            g = tmp
        scratch = self._scratch("opt_b", params.shape, params.dtype)
        m *= hp.beta1
        np.multiply(g, 1.0 - hp.beta1, out=scratch)
        m += scratch
        v *= hp.beta2
        np.multiply(g, g, out=scratch)
        scratch *= 1.0 - hp.beta2
        v += scratch
        step_size = hp.lr / (1.0 - hp.beta1 ** step)
        # torch divides sqrt(v) by sqrt(bias correction) before adding eps: kept for parity.
        np.sqrt(v, out=scratch)
        scratch /= math.sqrt(1.0 - hp.beta2 ** step)
        scratch += hp.eps
        np.divide(m, scratch, out=scratch)
        _subtract_scaled(params, scratch, step_size, scratch)

    def _rmsprop(self, params, grads, square_avg, momentum_buf, grad_avg, hp, step):
        g = grads
        tmp = self._scratch("opt_a", params.shape, params.dtype)
        if hp.weight_decay:
            np.multiply(params, hp.weight_decay, out=tmp)
            tmp += grads
            g = tmp
        avg = self._scratch("opt_b", params.shape, params.dtype)
        square_avg *= hp.alpha
        np.multiply(g, g, out=avg)
        avg *= 1.0 - hp.alpha
        square_avg += avg
        if hp.centered:
            grad_avg *= hp.alpha
            np.multiply(g, 1.0 - hp.alpha, out=avg)
            grad_avg += avg
            np.multiply(grad_avg, grad_avg, out=avg)
            np.subtract(square_avg, avg, out=avg)
            np.sqrt(avg, out=avg)
        else:
            np.sqrt(square_avg, out=avg)
        avg += hp.eps
        np.divide(g, avg, out=avg)
        if hp.momentum > 0:
            momentum_buf *= hp.momentum
            momentum_buf += avg
            _subtract_scaled(params, momentum_buf, hp.lr, avg)
        else:
            _subtract_scaled(params, avg, hp.lr, avg)


def _all_finite(a: np.ndarray) -> bool:
    # max and min propagate NaN and see every inf, without a temporary array
    return math.isfinite(np.max(a)) and math.isfinite(np.min(a))


def _subtract_scaled(params: np.ndarray, d: np.ndarray, lr: float, scratch: np.ndarray) -> None:
    """params -= lr * d; ``scratch`` may be ``d`` itself."""
    np.multiply(d, lr, out=scratch)
    params -= scratch


# ---------------------------------------------------------------------- losses

def _softmax_rows(be, Y, P):
    """P = softmax(Y) by rows; returns the row max and the row sum of exp(Y - max)."""
    n = Y.shape[0]
    row_max = be._scratch("row_max", (n,), Y.dtype)
    row_sum = be._scratch("row_sum", (n,), Y.dtype)
    np.max(Y, axis=1, out=row_max)
    np.subtract(Y, row_max[:, None], out=P)  # max-subtraction keeps exp finite
    np.exp(P, out=P)
    np.add.reduce(P, axis=1, out=row_sum)
    P /= row_sum[:, None]
    return row_max, row_sum


def _cross_entropy(be, Y, T, dY, out, W=None):
    # Each row's loss is formed before any summing: differences of large sums would cancel and
    # could even make a tiny loss negative.
    n, o = Y.shape
    row_max, row_sum = _softmax_rows(be, Y, dY)
    np.log(row_sum, out=row_sum)
    log_norm = row_sum  # log sum exp(y - max)
    if T.ndim == 1:
        flat = be._scratch("flat_index", (n,), np.intp)
        _label_positions(be, T, o, flat)
        picked = be._scratch("picked", (n,), Y.dtype)
        np.take(Y.reshape(-1), flat, out=picked)
        np.subtract(row_max, picked, out=picked)
        picked += log_norm  # -log softmax of the true class
        if W is not None:
            row_loss = be._scratch("row_loss", (n,), Y.dtype)
            np.copyto(row_loss, picked)
        value = float(np.add.reduce(picked)) / n
        np.take(dY.reshape(-1), flat, out=picked)
        picked -= 1
        np.put(dY.reshape(-1), flat, picked)
    else:
        log_p = be._scratch("log_softmax", Y.shape, Y.dtype)
        np.subtract(Y, row_max[:, None], out=log_p)
        log_p -= log_norm[:, None]
        if W is not None:
            row_loss = be._scratch("row_loss", (n,), Y.dtype)
            np.multiply(log_p, T, out=log_p)
            np.add.reduce(log_p, axis=1, out=row_loss)
            np.negative(row_loss, out=row_loss)
        else:
            value = -float(np.vdot(T, log_p)) / n
        t_sum = be._scratch("t_sum", (n,), Y.dtype)
        np.add.reduce(T, axis=1, out=t_sum)
        dY *= t_sum[:, None]
        dY -= T
    if W is not None:
        _weighted_mean(be, W, row_loss, dY, out, 1, 1.0)
        return
    dY *= 1.0 / n
    out[0] = value


def _weighted_mean(be, W, row_loss, dY, out, per_row, grad_factor):
    """The weighted mean loss sum(w_i l_i) / (sum(w_i) per_row) into out[0], and its gradient:
    dY comes holding, per row, the gradient of that row's own summed loss over
    ``grad_factor`` (MSE's y - t, whose factor is 2), and each row is scaled by
    w_i grad_factor / (sum(w_i) per_row). ``per_row``: the elements per row that the mean
    counts (1 for cross-entropy; o for the element-wise losses, whose every element takes its
    row's weight). A batch of zero total weight contributes nothing: loss 0, gradient 0 (not
    0 / 0)."""
    total = float(np.add.reduce(W))
    if total == 0.0:
        out[0] = 0.0
        dY.fill(0.0)
        return
    denominator = total * per_row
    out[0] = float(np.vdot(W, row_loss)) / denominator
    scale = be._scratch("row_scale", W.shape, dY.dtype)
    np.multiply(W, grad_factor / denominator, out=scale)
    dY *= scale[:, None]


def _columns(be, o):
    """(1, o): the column indices 0..o-1, made once."""
    key = ("columns", (1, o), np.dtype(np.intp))
    cols = be._scratch_cache.get(key)
    if cols is None:
        cols = be._scratch_cache[key] = np.arange(o, dtype=np.intp).reshape(1, o)
    return cols


def _label_positions(be, labels, o, flat):
    """flat = arange(n) * o + labels: the flat index of each row's true logit."""
    n = labels.shape[0]
    key = ("row_starts", (n, o), np.dtype(np.intp))
    starts = be._scratch_cache.get(key)
    if starts is None:
        starts = be._scratch_cache[key] = np.arange(n, dtype=np.intp) * o
    np.add(starts, labels, out=flat)


def _binary_cross_entropy(be, Y, T, dY, out, W=None):
    # per element: max(y, 0) - y t + log(1 + exp(-|y|)), stable for any logit, summed only
    # once complete so that large terms cancel element by element, not in the totals.
    size = Y.size
    elementwise = be._scratch("bce_loss", Y.shape, Y.dtype)
    np.abs(Y, out=elementwise)
    np.negative(elementwise, out=elementwise)
    np.exp(elementwise, out=elementwise)
    np.log1p(elementwise, out=elementwise)
    np.maximum(Y, 0, out=dY)
    elementwise += dY
    np.multiply(Y, T, out=dY)
    elementwise -= dY
    sigmoid(be, Y, dY)
    dY -= T
    if W is not None:
        row_loss = be._scratch("row_loss", W.shape, Y.dtype)
        np.add.reduce(elementwise, axis=1, out=row_loss)
        _weighted_mean(be, W, row_loss, dY, out, Y.shape[1], 1.0)
        return
    out[0] = float(np.add.reduce(elementwise, axis=None)) / size
    dY *= 1.0 / size


def _mse(be, Y, T, dY, out, W=None):
    size = Y.size
    np.subtract(Y, T, out=dY)
    if W is not None:
        row_loss = be._scratch("row_loss", W.shape, Y.dtype)
        np.einsum("ij,ij->i", dY, dY, out=row_loss)
        _weighted_mean(be, W, row_loss, dY, out, Y.shape[1], 2.0)
        return
    out[0] = float(np.vdot(dY, dY)) / size
    dY *= 2.0 / size


_LOSSES: dict[str, Callable] = {"mse": _mse, "cross_entropy": _cross_entropy,
                                "binary_cross_entropy": _binary_cross_entropy}


def blas_info() -> dict[str, Any]:
    """Which BLAS NumPy uses and with how many threads (threadpoolctl when installed)."""
    info: dict[str, Any] = {}
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})
        blas = deps.get("blas", {})
        info = {"name": blas.get("name"), "version": blas.get("version")}
    except Exception:  # older NumPy: no dict mode; the name is a nicety, not a contract
        pass
    try:
        from threadpoolctl import threadpool_info
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            info["threads"] = pools[0].get("num_threads")
            info.setdefault("name", pools[0].get("internal_api"))
    except ImportError:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var):
                info["threads"] = int(os.environ[var])
                break
    return info
