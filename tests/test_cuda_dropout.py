"""The CuPy backend's dropout (cuda/dropout.cu), run on the CPU through tests/cudasim: its
noise is bpkernels.philox.dropout_noise bit for bit (both dtypes, any width, data-set rows
past 2**32, every p), backward multiplies by forward's noise, a dropped inf gives NaN as in
PyTorch, and a whole epoch of captured steps with dropout (the step and the batch's rows read
on the device) equals the kernels launched one by one as EpochPlan describes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bpkernels as bpk
import cudasim
from bpkernels import philox
from bpkernels.backends.base import EpochPlan
from cudasim import shim

pytestmark = pytest.mark.skipif(cudasim.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA: {cudasim.unavailable_reason()}")

SEED = 0x9E3779B97F4A7C15  # both key words non-zero
# data-set rows around the counter's word boundary and up to its limit: the high bits go
# into the counter's last word, beside the layer
ROWS = np.array([0, 1, 5, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, philox.ROW_LIMIT - 1,
                 17], np.int64)
UNITS = [1, 3, 4, 7, 33]
PS = [0.0, 0.1, 0.5, 0.9]
DTYPES = ["float32", "float64"]


@pytest.fixture(scope="module")
def be():
    return cudasim.make_backend()


def _drop(be, rows, p, step=2**31 + 5, layer=3):
    """The kernels' Dropout for host ``rows`` (uploaded) and the reference's (on the host)."""
    drop = philox.layer_dropout(SEED, step, layer, be.asarray(rows), p)
    return drop, dataclasses.replace(drop, rows=rows)


def _same_bits(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes(), np.argwhere(
        got.view(np.uint8).reshape(got.shape + (-1,)) !=
        expected.view(np.uint8).reshape(expected.shape + (-1,)))[:5]


# ====================================================================== the kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("units", UNITS)
@pytest.mark.parametrize("p", PS)
def test_forward_and_backward_multiply_by_the_reference_noise(be, dtype, units, p):
    rng = np.random.default_rng(units)
    A = rng.standard_normal((ROWS.size, units)).astype(dtype)
    dD = rng.standard_normal((ROWS.size, units)).astype(dtype)
    drop, host = _drop(be, ROWS, p)
    noise = philox.dropout_noise(host, units, dtype)
    D, grad = be.empty(A.shape, dtype), be.asarray(dD)
    be.dropout_forward(be.asarray(A), D, drop)
    be.dropout_backward(grad, drop)
    _same_bits(be.to_host(D), A * noise)
    _same_bits(be.to_host(grad), dD * noise)
    kept = noise != 0
    assert (noise[kept] == np.dtype(dtype).type(1 / (1 - p))).all()
    if p == 0:
        assert kept.all()
    elif units == 33:  # the reference really drops, and not every unit
        assert 0 < kept.mean() < 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_applies_forwards_mask(be, dtype):
    """Ones through both kernels give the noise itself: backward drops exactly the units
    forward dropped, with the same factor, for every row and unit."""
    n, units = ROWS.size, 33
    drop, host = _drop(be, ROWS, 0.5)
    ones = np.ones((n, units), dtype)
    D, grad = be.empty((n, units), dtype), be.asarray(ones)
    be.dropout_forward(be.asarray(ones), D, drop)
    be.dropout_backward(grad, drop)
    forward, backward = be.to_host(D), be.to_host(grad)
    _same_bits(forward, backward)
    _same_bits(forward, philox.dropout_noise(host, units, dtype))
    # another step, layer or seed draws another mask
    for other in (dataclasses.replace(drop, step=drop.step + 1),
                  dataclasses.replace(drop, layer=drop.layer + 1),
                  dataclasses.replace(drop, key1=drop.key1 ^ 1)):
        grad = be.asarray(ones)
        be.dropout_backward(grad, other)
        assert (be.to_host(grad) != forward).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_dropped_inf_gives_nan_as_in_pytorch(be, dtype):
    """A product, not a select: inf * 0 is NaN (PyTorch's ``input * noise``), so that the
    divergence latch sees a step whose activations overflowed; a kept inf stays inf."""
    n, units = ROWS.size, 7
    A = np.full((n, units), np.inf, dtype)
    A[::2] = -np.inf
    A[1, 2] = np.nan
    drop, host = _drop(be, ROWS, 0.5)
    noise = philox.dropout_noise(host, units, dtype)
    D, grad = be.empty(A.shape, dtype), be.asarray(A)
    be.dropout_forward(be.asarray(A), D, drop)
    be.dropout_backward(grad, drop)
    for got in (be.to_host(D), be.to_host(grad)):
        dropped = noise == 0
        assert dropped.any() and (~dropped).any()
        assert np.isnan(got[dropped]).all()
        np.testing.assert_array_equal(got[~dropped], A[~dropped])  # +-inf (and the NaN)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_rows_and_units_in_a_grid_stride_launch(be, dtype):
    """More (row, block of four) pairs than the launch has threads: every thread loops over
    several, rows and blocks crossing thread boundaries; and the same kernel launched with odd
    grids gives the same bits."""
    n, units = 613, 301
    rng = np.random.default_rng(7)
    rows = rng.choice(2**33, size=n, replace=False).astype(np.int64)
    A = rng.standard_normal((n, units)).astype(dtype)
    drop, host = _drop(be, rows, 0.3, step=12, layer=1)
    expected = A * philox.dropout_noise(host, units, dtype)
    D = be.empty(A.shape, dtype)
    be.dropout_forward(be.asarray(A), D, drop)
    _same_bits(be.to_host(D), expected)
    kernel = be._kernels(dtype)["dropout_mul"]
    for grid, block in (((1,), (1,)), ((3,), (37,)), ((1000,), (256,))):
        D = be.zeros(A.shape, dtype)
        kernel(grid, block, (be.asarray(A), np.int64(n), np.int64(units), drop.rows, None,
                             np.int64(0), np.uint32(drop.key0), np.uint32(drop.key1),
                             np.int64(drop.step), None, np.uint32(drop.layer),
                             np.uint32(drop.threshold), np.float64(drop.scale), D))
        _same_bits(be.to_host(D), expected)


def test_rows_kept_in_host_memory(be):
    """An epoch's order too large for the device stays a HostArray: its batch's rows reach
    the kernel all the same."""
    streaming = cudasim.make_backend(max_resident_bytes=16)
    rows_host = streaming.asarray(ROWS)
    assert isinstance(rows_host, cudasim.backend_module().HostArray)
    A = np.random.default_rng(1).standard_normal((ROWS.size, 9))
    drop = philox.layer_dropout(SEED, 3, 0, rows_host, 0.5)
    D = streaming.empty(A.shape, A.dtype)
    A_dev = streaming.empty(A.shape, A.dtype)
    A_dev.set(A)
    streaming.dropout_forward(A_dev, D, drop)
    _same_bits(streaming.to_host(D),
               A * philox.dropout_noise(dataclasses.replace(drop, rows=ROWS), 9, A.dtype))


# ====================================================================== captured epochs
SIZES = (5, 9, 7, 6, 3)
ACTIVATIONS = ("relu", "gelu", "tanh", "identity")
DROPOUT = (0.3, 0.0, 0.6)  # a layer without dropout between two with


def _device(be, host):
    """``host`` on the device whatever the backend's resident limit (parameters, buffers)."""
    out = be.empty(host.shape, host.dtype)
    out.set(np.ascontiguousarray(host))
    return out


def _workspaces(y, full, last, dtype):
    """The workspaces of a full batch and of the last one, allocated as fit() allocates them
    (EpochLoop: model.workspace for each batch size), so that the buffers the epoch is given
    here cannot drift from fit()'s. The model has a backend of its own: the workspace's
    buffers come from empty(), which no resident limit touches, the same on every
    instance."""
    model = bpk.MLP(SIZES, ACTIVATIONS[:-1], backend=cudasim.make_backend(), dtype=dtype,
                    dropout=DROPOUT)
    assert model.layer_activations == ACTIVATIONS  # the plan's, output layer included
    ws = model.workspace(full, y.shape[1:], y.dtype)
    return ws, ws if last == full else model.workspace(last, y.shape[1:], y.dtype)


class Run:
    """One model's buffers and data on ``be``: parameters, gradients, SGD's momentum, the
    divergence latch, the per-step losses, and the workspaces of full and last batches."""

    def __init__(self, be, X, y, batch, dtype, params):
        self.be, self.batch, self.dtype = be, batch, np.dtype(dtype)
        self.X, self.T = be.asarray(X.astype(dtype)), be.asarray(y)
        self.n, self.steps = len(X), -(-len(X) // batch)
        self.params = _device(be, params.astype(dtype))
        self.grads = be.zeros(params.shape, dtype)
        self.buf = be.zeros(params.shape, dtype)
        self.halted = be.zeros((1,), np.int64)
        self.step_loss = be.zeros((self.steps,), dtype)
        rest = self.n - (self.steps - 1) * batch
        self.workspaces = _workspaces(y, batch, rest, dtype)
        self.opt = bpk.SGD(lr=0.05, momentum=0.9)
        self.cache: dict = {}

    def layers(self):
        views, offset = [], 0
        for i, o in zip(SIZES[:-1], SIZES[1:]):
            w = slice(offset, offset + i * o)
            b = slice(offset + i * o, offset + i * o + o)
            views.append((self.params[w].reshape(i, o), self.params[b],
                          self.grads[w].reshape(i, o), self.grads[b]))
            offset += i * o + o
        return views

    def plan(self, order, first_step, dropout):
        return EpochPlan(
            sizes=SIZES, activations=ACTIVATIONS, params=self.params, grads=self.grads,
            X=self.X, T=self.T, order=order, batch=self.batch, steps=self.steps,
            workspaces=self.workspaces, loss="cross_entropy", metric=False,
            step_loss=self.step_loss, step_correct=None, halted=self.halted, optimizer="sgd",
            hp=self.opt, state={"momentum_buffer": self.buf}, first_step=first_step,
            cache=self.cache, dropout=dropout)

    def kernel_by_kernel(self, order, first_step, dropout):
        """EpochPlan's loop of kernel calls, with dropout as its docstring says."""
        be, seed, ps = self.be, dropout[0], dropout[1] + (0.0,)
        views = self.layers()
        for s in range(self.steps):
            ws = self.workspaces[1 if s == self.steps - 1 else 0]
            index = order[s * self.batch:s * self.batch + ws.rows]
            be.take_rows(self.X, index, ws.X)
            be.take_rows(self.T, index, ws.T)
            step = first_step + s
            drops = [philox.layer_dropout(seed, step, layer, index, p) if p > 0 else None
                     for layer, p in enumerate(ps)]
            X = ws.X
            for layer, (W, b, _, _) in enumerate(views):
                be.dense_forward(X, W, b, ACTIVATIONS[layer], ws.A[layer], ws.Z[layer])
                X = ws.A[layer]
                if drops[layer] is not None:
                    be.dropout_forward(X, ws.D[layer], drops[layer])
                    X = ws.D[layer]
            be.loss("cross_entropy", ws.A[-1], ws.T, ws.dA[-1], self.step_loss[s:s + 1])
            for layer in reversed(range(len(views))):
                W, _, dW, db = views[layer]
                below = drops[layer - 1] if layer else None
                X = ws.X if layer == 0 else ws.A[layer - 1] if below is None else ws.D[layer - 1]
                dX = None if layer == 0 else ws.dA[layer - 1]
                be.dense_backward(X, W, ws.dA[layer], ACTIVATIONS[layer], ws.A[layer],
                                  ws.Z[layer], dW, db, dX)
                if below is not None:
                    be.dropout_backward(dX, below)
            be.check_step(self.step_loss[s:s + 1], self.grads, step, self.halted)
            be.sgd_step(self.params, self.grads, self.buf, self.opt, step, self.halted)

    def results(self):
        return [self.be.to_host(a) for a in (self.params, self.buf, self.step_loss, self.halted)]


def _problem(n=23, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, SIZES[0]))
    y = rng.integers(0, SIZES[-1], n).astype(np.int64)
    count = sum(i * o + o for i, o in zip(SIZES[:-1], SIZES[1:]))
    return X, y, rng.standard_normal(count) * 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_captured_epochs_with_dropout_equal_the_kernel_loop(dtype, resident):
    """23 rows in batches of 8 (two full steps and a partial one), two epochs of a resumed fit
    (its first step is 11, so the step in the epoch and the optimizer step differ): the
    replayed graphs read each step's number and batch rows on the device and give exactly the
    numbers of the kernels launched one by one. Streamed, the data and order stay in host
    memory. The second epoch replays without a capture, an allocation or a host wait."""
    X, y, params = _problem()
    dropout = (SEED, DROPOUT)
    options = {} if resident else {"max_resident_bytes": 64}
    graphs, kernels = cudasim.make_backend(**options), cudasim.make_backend(graphs=False)
    runs = {"graphs": Run(graphs, X, y, 8, dtype, params),
            "kernels": Run(kernels, X, y, 8, dtype, params)}
    assert isinstance(runs["graphs"].X, cudasim.backend_module().HostArray) != resident
    orders = [np.random.default_rng(epoch).permutation(len(X)).astype(np.int64)
              for epoch in range(2)]
    first_step, after = 11, []
    for epoch, order in enumerate(orders):
        plan = runs["graphs"].plan(graphs.asarray(order), first_step, dropout)
        before = shim.STATS.copy()
        assert graphs.train_epoch(plan) is True
        spent = shim.STATS - before
        assert spent["graph_launches"] == runs["graphs"].steps
        if epoch and resident:
            assert spent["captures"] == spent["allocations"] == spent["host_waits"] == 0
        runs["kernels"].kernel_by_kernel(kernels.asarray(order), first_step, dropout)
        after.append(runs["graphs"].results())
        for got, expected in zip(after[-1], runs["kernels"].results()):
            _same_bits(got, expected)
        first_step += runs["graphs"].steps
    assert after[-1][3][0] == 0  # never halted
    # dropout changed the numbers: the first epoch without it ends elsewhere
    plain = Run(cudasim.make_backend(), X, y, 8, dtype, params)
    assert plain.be.train_epoch(plain.plan(plain.be.asarray(orders[0]), 11, None))
    assert not np.array_equal(plain.results()[0], after[0][0])


def test_a_graph_replays_only_the_dropout_it_was_captured_with():
    """A new seed or p makes a new capture (both are baked into the graph)."""
    X, y, params = _problem()
    be = cudasim.make_backend()
    run = Run(be, X, y, 8, "float64", params)
    order = be.asarray(np.arange(len(X)))
    captures = []
    for dropout in ((SEED, DROPOUT), (SEED, DROPOUT), (SEED + 1, DROPOUT),
                    (SEED + 1, (0.3, 0.0, 0.5)), None):
        before = shim.STATS["captures"]
        assert be.train_epoch(run.plan(order, 1, dropout))
        captures.append(shim.STATS["captures"] - before)
        run.results()  # the epoch done before its graphs (and their scratch) are dropped
    assert captures == [2, 0, 2, 2, 2]


def test_steps_past_the_counters_limit_are_declined_before_any_work():
    """Dropout's counter holds steps below 2**32: an epoch that would reach that step is left
    to the kernel loop (which raises philox.layer_dropout's error at the step) and nothing is
    launched or written here."""
    X, y, params = _problem()
    be = cudasim.make_backend()
    run = Run(be, X, y, 8, "float64", params)
    order = be.asarray(np.arange(len(X)))
    last = philox.STEP_LIMIT - run.steps  # the epoch's last step would be 2**32
    before = shim.STATS.copy()
    assert be.train_epoch(run.plan(order, last + 1, (SEED, DROPOUT))) is False
    assert (shim.STATS - before)["kernels"] == 0 and (shim.STATS - before)["captures"] == 0
    np.testing.assert_array_equal(be.to_host(run.params), params)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        run.kernel_by_kernel(order, last + 1, (SEED, DROPOUT))
    assert be.train_epoch(run.plan(order, last, (SEED, DROPOUT))) is True  # up to 2**32 - 1
    run.results()
    assert be.train_epoch(run.plan(order, last + 1, None)) is True  # no dropout, no limit
    assert run.results()[3][0] == 0
