"""The CuPy backend's whole epochs (``CupyBackend.train_epoch``): one training step captured
as a CUDA graph and replayed once per step, and the data sets kept in host memory that such an
epoch streams in through pinned buffers.

The other half of backends/cupy_backend.py, apart so that each stays a size a reader can hold:
the runner drives that backend's own launch helpers (``_launch``, ``_gather``, ``_loss``...),
with the per-step numbers read on the device (the step counter, the epoch's order), so nothing
waits on the host inside an epoch. cupy_backend imports this module, never the reverse.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

import cupy
import cupyx

from .. import philox
from .base import OPTIMIZER_RULES, RATE_MOMENTUM, RULES, EpochPlan

if TYPE_CHECKING:
    from .cupy_backend import CupyBackend


class HostArray:
    """A data set kept in host memory because it does not fit on the device (see
    ``CupyBackend.asarray``); ``take_rows`` and ``train_epoch`` stream its rows in batches."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    ndim = property(lambda self: self.host.ndim)
    size = property(lambda self: self.host.size)
    nbytes = property(lambda self: self.host.nbytes)

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, key) -> "HostArray":
        return HostArray(self.host[key])


def hp_values(kernel: str, hp, scheduled: bool = False) -> tuple[float, ...]:
    """``hp``'s numbers in the order of RULES[kernel].hyper, the slots cuda/optim.cu reads
    (booleans as 0.0 / 1.0); ``scheduled``: 0.0 for the two that a schedule's rate replaces."""
    skip = ("lr", RATE_MOMENTUM[kernel]) if scheduled else ()
    return tuple(0.0 if name in skip else float(getattr(hp, name, False))
                 for name in RULES[kernel].hyper)


def plan_key(plan: EpochPlan) -> tuple:
    """What a captured graph bakes in: the buffers (by identity), shapes and choices that
    decide which kernels run. Anything else (hyper-parameter values, the step, the order of
    rows) is read on the device, so a new epoch replays the same graphs."""
    full, last = plan.workspaces
    buffers = (plan.params, plan.grads, plan.X, plan.T, plan.W, plan.stats, plan.step_loss,
               plan.step_correct, plan.halted, plan.clip, full, last, *plan.state.values())
    hp = plan.hp
    choices = (bool(getattr(hp, "momentum", 0)), bool(getattr(hp, "centered", False)))
    return (tuple(id(b) for b in buffers), tuple(sorted(plan.state)), plan.sizes,
            plan.activations, plan.loss, plan.metric, plan.metrics, plan.optimizer, plan.batch,
            plan.steps, plan.order.shape, choices, plan.rates is not None,
            None if plan.dropout is None else (plan.dropout[0], tuple(plan.dropout[1])),
            plan.norm, plan.bf16)  # norm: None, or LayerNorm's eps: baked into the launches


def replayable(plan: EpochPlan) -> bool:
    """Whether captured steps can run all of ``plan``: dropout's counter holds steps below
    2**32 (philox.STEP_LIMIT). Past it the caller's kernel loop runs, and raises
    philox.layer_dropout's error at that step."""
    return plan.dropout is None or plan.first_step + plan.steps <= philox.STEP_LIMIT


class _Feed:
    """Double-buffered batches of one data array kept in host memory: rows gathered on the host
    into pinned buffers, copied to device staging buffers on a side stream."""

    def __init__(self, source: HostArray, batch: int) -> None:
        shape = (batch,) + source.shape[1:]
        self.source = source.host
        self.pinned = [cupyx.empty_pinned(shape, source.dtype) for _ in range(2)]
        self.staging = [cupy.empty(shape, source.dtype) for _ in range(2)]

    def gather(self, rows: np.ndarray, k: int) -> None:
        np.take(self.source, rows, axis=0, out=self.pinned[k][:len(rows)])

    def upload(self, rows: int, k: int, stream) -> None:
        self.staging[k][:rows].set(self.pinned[k][:rows], stream=stream)


class GraphRunner:
    """One fit's captured steps: a graph per workspace (full batch, last partial batch) and,
    for streamed data, per staging buffer; the device step counter they read; the epoch's row
    order; the hyper-parameters; scratch buffers of their own (a graph holds their addresses,
    so they live exactly as long as the graphs)."""

    def __init__(self, be: "CupyBackend", plan: EpochPlan) -> None:
        self.be, self.key = be, plan_key(plan)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.counter = cupy.zeros((2,), np.int64)  # {step in the epoch, optimizer step}
        self.order = cupy.zeros(plan.order.shape, np.int64)
        self.kernel = OPTIMIZER_RULES[plan.optimizer]
        self.hp = cupy.zeros((len(RULES[self.kernel].hyper),), np.float64)
        self.hp_values: tuple | None = None
        # a per-step schedule's table, copied in from plan.rates (a new array each epoch) once
        # per epoch on the device; the graphs read the step's row (EpochPlan.rates)
        self.rates = None if plan.rates is None else cupy.zeros((plan.steps, 2), np.float64)
        self.scratch: dict[tuple, Any] = {}
        self.graphs: dict[tuple[int, int], Any] = {}
        self.layers, self.norms = _layer_views(plan.sizes, plan.params, plan.grads, plan.norm)
        self.drops = _layer_drops(plan, self.order)
        self.feeds = {name: _Feed(getattr(plan, name), plan.batch)
                      for name in ("X", "T", "W") if isinstance(getattr(plan, name), HostArray)}
        if self.feeds:
            self.copy_stream = cupy.cuda.Stream(non_blocking=True)
            self.copied = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
            self.consumed = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]

    # ------------------------------------------------------------------ per epoch
    def run(self, plan: EpochPlan) -> None:
        caller = cupy.cuda.get_current_stream()
        order_host = self._host_order(plan) if self.feeds else None
        fence = caller.record()  # everything queued before: weights, order, our own buffers
        self.stream.wait_event(fence)
        if self.feeds:
            self.copy_stream.wait_event(fence)
        with self.stream:
            self._upload_hp(plan.hp)
            if self.rates is not None:
                self.rates[...] = plan.rates
            self.counter.set(np.array([0, plan.first_step], np.int64))
            if isinstance(plan.order, HostArray):
                self.order.set(plan.order.host)
            else:
                self.order[...] = plan.order
            if not self.graphs:
                self._capture(plan)
            if self.feeds:
                self._run_streamed(plan, order_host)
            else:
                for s in range(plan.steps):
                    self.graphs[(self._variant(plan, s), 0)].launch(self.stream)
        caller.wait_event(self.stream.record())  # the caller's reads come after the epoch

    def _variant(self, plan: EpochPlan, s: int) -> int:
        full, last = plan.workspaces
        return 1 if s == plan.steps - 1 and last is not full else 0

    def _host_order(self, plan: EpochPlan) -> np.ndarray:
        return plan.order.host if isinstance(plan.order, HostArray) else cupy.asnumpy(plan.order)

    def _upload_hp(self, hp) -> None:
        values = hp_values(self.kernel, hp, scheduled=self.rates is not None)
        if values != self.hp_values:
            self.hp.set(np.array(values, np.float64))
            self.hp_values = values

    def _run_streamed(self, plan: EpochPlan, order: np.ndarray) -> None:
        """Step s computes from staging buffer s % 2 while the rows of step s + 1 are gathered
        on the host and copied into the other one. The host waits only for copies (before
        refilling a pinned buffer), never for computation."""
        self._feed(plan, order, 0)
        for s in range(plan.steps):
            k = s % 2
            self.stream.wait_event(self.copied[k])
            self.graphs[(self._variant(plan, s), k)].launch(self.stream)
            self.consumed[k].record(self.stream)
            if s + 1 < plan.steps:
                self._feed(plan, order, s + 1)

    def _feed(self, plan: EpochPlan, order: np.ndarray, s: int) -> None:
        k = s % 2
        rows = order[s * plan.batch:(s + 1) * plan.batch]
        self.copied[k].synchronize()  # the pinned buffer's previous copy has finished
        for feed in self.feeds.values():
            feed.gather(rows, k)
        self.copy_stream.wait_event(self.consumed[k])  # its staging buffer is no longer read
        for feed in self.feeds.values():
            feed.upload(len(rows), k, self.copy_stream)
        self.copied[k].record(self.copy_stream)

    # ------------------------------------------------------------------ capture
    def _capture(self, plan: EpochPlan) -> None:
        """Build the graphs. Each variant first runs its forward and backward pass once, not
        captured, which compiles the kernels, creates cuBLAS's handle and allocates every
        scratch buffer: a capture then allocates nothing. That pass writes only what every
        step overwrites (the workspace, grads, the first step's result slots)."""
        be = self.be
        variants = [0] if plan.workspaces[1] is plan.workspaces[0] else [0, 1]
        slots = [0, 1] if self.feeds else [0]
        saved, be._scratch_cache = be._scratch_cache, self.scratch
        try:
            for v in variants:
                for k in slots:
                    self._step(plan, plan.workspaces[v], k, update=False)
                    with be.capture_lock:
                        self.stream.begin_capture()
                        try:
                            self._step(plan, plan.workspaces[v], k, update=True)
                        finally:
                            graph = self.stream.end_capture()
                    self.graphs[(v, k)] = graph
            if plan.stats is not None:  # the first passes added their batches' statistics
                plan.stats[...] = 0
        finally:
            be._scratch_cache = saved

    def _step(self, plan: EpochPlan, ws, k: int, update: bool) -> None:
        """One training step as kernel launches on the current stream, reading the step's slot
        and number from ``self.counter``."""
        be = self.be
        slot, step_dev = self.counter[0:1], self.counter[1:2]
        weights = None
        if plan.W is not None:  # the batch's row weights, gathered like its targets
            weights = be._scratch("batch_weights", (ws.rows,), plan.W.dtype)
        for name, dst in (("X", ws.X), ("T", ws.T), ("W", weights)):
            if dst is None:
                continue
            feed = self.feeds.get(name)
            if feed is not None:
                dst[...] = feed.staging[k][:ws.rows]
            else:
                be._gather(getattr(plan, name), self.order, slot, plan.batch, dst)
        X = ws.X
        for layer, ((W, b, _, _), act, A, Z, D, drop) in enumerate(zip(
                self.layers, plan.activations, ws.A, ws.Z, self._outputs(ws), self.drops)):
            norm = self.norms[layer]
            if norm is None:
                be.dense_forward(X, W, b, act, A, Z, bf16=plan.bf16)
            else:  # the product into H, then LayerNorm and the activation into A
                gamma, beta, _, _ = norm
                be.dense_forward(X, W, b, "identity", ws.H[layer], bf16=plan.bf16)
                be.layer_norm_forward(ws.H[layer], gamma, beta, act, A, ws.rstd[layer],
                                      plan.norm)
            if drop is not None:  # the batch's rows and the step, read on the device
                be._dropout(A, D, drop, slot, plan.batch, step_dev)
            X = D
        Y = ws.A[-1]
        be._loss(plan.loss, Y, ws.T, ws.dA[-1], plan.step_loss, slot, weights)
        if plan.metric:
            be._count_correct(Y, ws.T, plan.step_correct, slot, weights)
        if plan.metrics is not None:
            be.accumulate_stats(plan.metrics[0], Y, ws.T, weights, plan.metrics[1], plan.stats)
        inputs = [ws.X] + self._outputs(ws)[:-1]
        for layer in reversed(range(len(self.layers))):
            W, _, dW, db = self.layers[layer]
            dX = None if layer == 0 else ws.dA[layer - 1]
            norm = self.norms[layer]
            if norm is None:
                be.dense_backward(inputs[layer], W, ws.dA[layer], plan.activations[layer],
                                  ws.A[layer], ws.Z[layer], dW, db, dX, bf16=plan.bf16)
            else:  # dA becomes the product's gradient, then the identity layer's backward
                gamma, beta, dgamma, dbeta = norm
                be.layer_norm_backward(ws.dA[layer], plan.activations[layer], ws.A[layer],
                                       ws.H[layer], gamma, beta, ws.rstd[layer], dgamma, dbeta)
                be.dense_backward(inputs[layer], W, ws.dA[layer], "identity", ws.A[layer],
                                  None, dW, db, dX, bf16=plan.bf16)
            below = self.drops[layer - 1] if layer else None
            if below is not None:  # dX, the gradient of dropout's output, becomes its input's
                be._dropout(dX, dX, below, slot, plan.batch, step_dev)
        if not update:
            return
        be._check_step(plan.step_loss, slot, plan.grads, 0, step_dev, plan.halted, plan.clip)
        self._update(plan, step_dev)
        be._launch(plan.params.dtype, "advance_step", 1, (self.counter,))

    def _outputs(self, ws) -> list:
        """What each layer hands the next: dropout's output ``ws.D[l]`` where it drops, else
        its activation."""
        return [A if drop is None else ws.D[layer]
                for layer, (A, drop) in enumerate(zip(ws.A, self.drops))]

    def _update(self, plan: EpochPlan, step_dev) -> None:
        be, hp = self.be, plan.hp
        p, g, halted, clip = plan.params, plan.grads, plan.halted, plan.clip
        # a schedule's row of this step: the device counter's step in the epoch
        rates = (self.rates, None if self.rates is None else self.counter[0:1])
        # the rule's state buffers in kernel order; one this configuration leaves unused is None
        state = [plan.state.get(name) for name in RULES[self.kernel].state]
        if self.kernel == "sgd":
            be._sgd(p, g, state[0] if hp.momentum else None, self.hp, 0, step_dev, halted, clip,
                    *rates)
        elif self.kernel == "adam":
            be._adam(p, g, *state, self.hp, 0, step_dev, halted, clip, *rates)
        else:
            square_avg, buf, grad_avg = state
            be._rmsprop(p, g, square_avg, buf if hp.momentum > 0 else None,
                        grad_avg if hp.centered else None, self.hp, 0, step_dev, halted, clip,
                        *rates)


def _layer_views(sizes, params, grads, norm=None) -> tuple[list, list]:
    """Views of the flat buffers per layer: (W, b, dW, db), W (in, out) row-major then b; and
    (gamma, beta, dgamma, dbeta) after them on each hidden layer when ``norm`` (EpochPlan.norm)
    is not None, else None."""
    views, norms, offset = [], [], 0
    last = len(sizes) - 2
    for layer, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        w, b = slice(offset, offset + i * o), slice(offset + i * o, offset + i * o + o)
        views.append((params[w].reshape(i, o), params[b], grads[w].reshape(i, o), grads[b]))
        offset += i * o + o
        if norm is None or layer == last:
            norms.append(None)
            continue
        gamma, beta = slice(offset, offset + o), slice(offset + o, offset + 2 * o)
        norms.append((params[gamma], params[beta], grads[gamma], grads[beta]))
        offset += 2 * o
    return views, norms


def _layer_drops(plan: EpochPlan, order) -> list:
    """Each layer's Dropout as a captured step launches it (None: no dropout there, the output
    layer included): the seed's words, threshold and scale are baked into the graph; its rows
    are ``order`` at the device's step slot and its step the device's, so ``step`` here is a
    placeholder."""
    drops = [None] * (len(plan.sizes) - 1)
    if plan.dropout is not None:
        seed, probabilities = plan.dropout
        for layer, p in enumerate(probabilities):
            if p > 0:
                drops[layer] = philox.layer_dropout(seed, 0, layer, order, p)
    return drops
