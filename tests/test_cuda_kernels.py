"""The logic of every custom CUDA kernel (backends/cuda/*.cu), executed on the CPU against the
float64 reference of tests/reference.py.

The kernels are the production sources, built by tests/cudasim for the CPU and launched here
directly (not through the backend) with deliberately awkward launch configurations: a single
thread, a grid smaller than the data (so each thread's grid-stride loop runs many times), blocks
that are not a power of two, and the backend's own configuration. Shapes are odd on purpose: one
row, sizes that no block size divides, rows much longer than a block, more rows than threads.
The backend-level behaviour (the same kernels inside fit, graphs, streams) is tested by the whole
suite under the backend name "cupy-cudasim" and by test_cuda_backend.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import cudasim
import reference as ref
from bpkernels.backends import cuda_sources as sources
from bpkernels.backends.base import ACTIVATION_CODES as ACT
from bpkernels.backends.base import CLIP_GROUPS, CLIP_SLOTS, CLIP_THREADS, KEEPS_Z
from cudasim import shim

pytestmark = pytest.mark.skipif(cudasim.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA: {cudasim.unavailable_reason()}")

# (grid, block): one thread; fewer threads than elements, odd block; the backend's launch.
LAUNCHES = [((1,), (1,)), ((3,), (7,)), (None, (256,))]
LAUNCH_IDS = ["1x1", "3x7", "full"]
# (n, o): one row, one column, a long row (more columns than a block's threads), many rows.
SHAPES = [(1, 1), (1, 3), (5, 1), (7, 13), (1, 1000), (301, 3)]
SHAPE_IDS = [f"{n}x{o}" for n, o in SHAPES]
TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-12)}
# The kernels switch on the codes of backends/base.py's table (ACT), which reach them as the
# generated defines of sources.options().


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(params=LAUNCHES, ids=LAUNCH_IDS)
def launch(request):
    return request.param


class Kernels:
    """Every kernel of every source for one dtype, launched as ``k.name(threads, *args)``."""

    _cache: dict = {}

    def __init__(self, dtype, launch) -> None:
        self.dtype, self.launch_config = np.dtype(dtype), launch
        if self.dtype not in Kernels._cache:
            table = {}
            for source in sources.SOURCES:
                module = shim.RawModule(code=sources.source(source),
                                        options=sources.options(self.dtype))
                for name in sources.kernel_names(source):
                    table[name] = module.get_function(name)
            Kernels._cache[self.dtype] = table
        self.table = Kernels._cache[self.dtype]

    def __getattr__(self, name):
        kernel = self.table[name]

        def call(threads, *args):
            grid, block = self.launch_config
            if grid is None:
                grid = (max(1, math.ceil(threads / block[0])),)
            kernel(grid, block, args)
        return call

    def real(self, x):
        return self.dtype.type(x)


@pytest.fixture
def k(dtype, launch):
    return Kernels(dtype, launch)


def dev(host, dtype=None):
    return shim.asarray(np.ascontiguousarray(host, dtype=dtype))


def host(array):
    return shim.asnumpy(array)


def rounded(a, dtype):
    return np.asarray(a).astype(dtype).astype(np.float64)


def close(actual, expected, dtype, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, err_msg=err_msg,
                               **TOL[np.dtype(dtype).name])


I64 = np.int64


# ====================================================================== dense.cu
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("act", list(ACT))
def test_bias_act_forward(k, dtype, act, shape):
    n, o = shape
    rng = np.random.default_rng([n, o])
    pre = rounded(rng.uniform(-4, 4, (n, o)), dtype)
    b = rounded(rng.uniform(-1, 1, o), dtype)
    Z_ref = pre + b
    A, Z = shim.empty((n, o), dtype), shim.empty((n, o), dtype)
    k.bias_act_forward(n * o, dev(pre, dtype), dev(b, dtype), I64(n), I64(o), np.int32(ACT[act]),
                       Z, A)
    close(host(Z), Z_ref, dtype, "Z")
    close(host(A), ref.activation(act, rounded(Z_ref, dtype)), dtype, "A")


def test_bias_act_forward_in_place_without_z(k, dtype):
    """pre is A itself when Z is not kept (a null pointer): A = act(A + b)."""
    n, o = 9, 5
    pre = rounded(np.random.default_rng(1).uniform(-2, 2, (n, o)), dtype)
    A = dev(pre, dtype)
    k.bias_act_forward(n * o, A, dev(np.full(o, 0.5), dtype), I64(n), I64(o), np.int32(ACT["tanh"]),
                       None, A)
    close(host(A), np.tanh(pre + 0.5), dtype)


@pytest.mark.parametrize("act", list(ACT))
def test_act_grad(k, dtype, act):
    """dA *= act'(z) over a range of z with every activation's kinks and both tails."""
    z = rounded(np.concatenate([np.linspace(-9, 9, 181), [0.0, 1e-3, -1e-3]]), dtype)
    A = rounded(ref.activation(act, z), dtype)
    dA = rounded(np.random.default_rng(0).standard_normal(z.size), dtype)
    out = dev(dA, dtype)
    k.act_grad(z.size, dev(A, dtype), dev(z, dtype) if act in KEEPS_Z else None, I64(z.size),
               np.int32(ACT[act]), out)
    expected = dA * ref.activation_derivative(act, z)
    if act in ("relu", "leaky_relu"):  # at z == 0 the kernel sees A == 0: torch's choice
        expected[z == 0] = dA[z == 0] * (0.0 if act == "relu" else ref.LEAKY_RELU_SLOPE)
    close(host(out), expected, dtype)


@pytest.mark.parametrize("n, o", [(1, 1), (1, 300), (16, 3), (17, 3), (33, 257), (1000, 2)])
def test_column_sums_two_pass(k, dtype, n, o):
    """colsum_chunks then colsum_store: row counts below, at and above a chunk (16 rows), a
    column count above a block; stored at slot 2 of a larger vector, scaled."""
    M = rounded(np.random.default_rng([n, o]).standard_normal((n, o)), dtype)
    chunks = -(-n // 16)
    partial = shim.empty((chunks, o), np.float64)
    out = dev(np.full(4 * o, 7.0), dtype)
    slot = dev(np.array([2]), I64)
    k.colsum_chunks(chunks * o, dev(M, dtype), I64(n), I64(o), partial)
    k.colsum_store(o, partial, I64(chunks), I64(o), np.float64(0.5), out, slot)
    result = host(out).reshape(4, o)
    close(result[2], 0.5 * M.sum(0), dtype)
    np.testing.assert_array_equal(result[[0, 1, 3]], 7.0)  # nothing else written


@pytest.mark.parametrize("n, o", [(1, 1), (64, 3), (5, 700)])
def test_column_sums_one_pass(k, dtype, n, o):
    M = rounded(np.random.default_rng([n, o, 1]).standard_normal((n, o)), dtype)
    out = shim.empty((o,), dtype)
    k.colsum_rows(o, dev(M, dtype), I64(n), I64(o), np.float64(1.0), out, None)
    close(host(out), M.sum(0), dtype)


@pytest.mark.parametrize("width", [1, 5, 300])
def test_gather_rows_at_a_device_slot(k, dtype, width):
    """Rows order[slot * stride:][:n] of src: a captured step reads its offset on the device."""
    N, n, stride = 50, 7, 9
    src = rounded(np.random.default_rng(width).standard_normal((N, width)), dtype)
    order = np.random.default_rng(1).permutation(N).astype(I64)
    out = shim.empty((n, width), dtype)
    k.gather_rows(n * width, dev(src, dtype), I64(width), dev(order), dev(np.array([3]), I64),
                  I64(stride), I64(n), out)
    np.testing.assert_array_equal(host(out), src[order[27:34]])
    labels = np.arange(N, dtype=I64) * 3
    out_labels = shim.empty((n,), I64)
    k.gather_rows_i64(n, dev(labels), I64(1), dev(order[5:]), None, I64(0), I64(n), out_labels)
    np.testing.assert_array_equal(host(out_labels), labels[order[5:12]])


# ====================================================================== loss.cu
LOSS_SHAPES = [(1, 2), (1, 1000), (7, 3), (300, 10), (5, 1)]


def _loss_inputs(kind, n, o, dtype, rng, scale=3.0):
    Y = rounded(scale * rng.standard_normal((n, o)), dtype)
    if kind == "labels":
        return Y, rng.integers(0, o, n).astype(I64)
    if kind == "probs":
        return Y, rounded(rng.dirichlet(np.ones(o), n), dtype)
    if kind == "bce":
        return Y, rounded(rng.uniform(0, 1, (n, o)), dtype)
    return Y, rounded(rng.standard_normal((n, o)), dtype)


LOSS_PARAMS = [(kind, shape) for kind in ("labels", "probs", "bce", "mse") for shape in LOSS_SHAPES
               if shape[1] > 1 or kind in ("bce", "mse")]  # cross-entropy needs two outputs


@pytest.mark.parametrize("kind, shape", LOSS_PARAMS,
                         ids=[f"{kind}-{n}x{o}" for kind, (n, o) in LOSS_PARAMS])
def test_loss_rows(k, dtype, kind, shape):
    """Each loss kernel writes every row's loss and the gradient; the row losses then sum
    (colsum) to the mean the reference gives."""
    n, o = shape
    rng = np.random.default_rng([n, o, len(kind)])
    Y, T = _loss_inputs(kind, n, o, dtype, rng)
    name, loss, count = {"labels": ("xent_labels", "cross_entropy", n),
                         "probs": ("xent_probs", "cross_entropy", n),
                         "bce": ("bce", "binary_cross_entropy", n * o),
                         "mse": ("mse", "mse", n * o)}[kind]
    value_ref, grad_ref = ref.loss(loss, Y, T)
    dY, rows = shim.empty((n, o), dtype), shim.empty((n, 1), dtype)
    grad_scale = (2.0 if kind == "mse" else 1.0) / count
    k.__getattr__(name)(n, dev(Y, dtype), dev(T, T.dtype if kind == "labels" else dtype), I64(n),
                        I64(o), k.real(grad_scale), dY, rows)
    close(host(dY), grad_ref, dtype, "dY")
    close(host(rows).sum() / count, value_ref, dtype, "loss")


def test_softmax_of_extreme_logits_is_finite(k, dtype):
    """exp(1e3) overflows both dtypes: the kernel never forms it."""
    Y = np.array([[1e3, -1e3, 0.0], [-1e3, -1e3, 1e3]])
    labels = np.array([1, 2], I64)
    dY, rows = shim.empty((2, 3), dtype), shim.empty((2, 1), dtype)
    k.xent_labels(2, dev(Y, dtype), dev(labels), I64(2), I64(3), k.real(0.5), dY, rows)
    value_ref, grad_ref = ref.cross_entropy(Y, labels)
    close(host(rows).sum() / 2, value_ref, dtype)
    close(host(dY), grad_ref, dtype)


def test_nan_logit_gives_nan_loss(k, dtype):
    """A diverged output must reach check_step as NaN, not be hidden by the row max."""
    Y = np.array([[0.5, np.nan, 0.1]])
    rows = shim.empty((1, 1), dtype)
    k.xent_labels(1, dev(Y, dtype), dev(np.array([0], I64)), I64(1), I64(3), k.real(1.0),
                  shim.empty((1, 3), dtype), rows)
    assert np.isnan(host(rows)[0, 0])


@pytest.mark.parametrize("n, o", [(1, 4), (7, 5), (301, 10), (9, 1)])
def test_weigh_rows(k, dtype, n, o):
    """Row weights after a loss kernel: each row of dY and its row loss times w_i / sum(w);
    a batch of zero total weight becomes 0 (an inf gradient too: never 0 * inf); the hits
    (total null) times w_i alone."""
    rng = np.random.default_rng([n, o, 19])
    M, rows, w = rng.standard_normal((n, o)), rng.standard_normal(n), rng.uniform(0, 2, n)
    w[1::3] = 0.0  # (row 0 keeps a weight: a batch of one row)
    total = rounded(w, dtype).sum()
    dM, drows = dev(M, dtype), dev(rows, dtype)
    k.weigh_rows(n, dev(w, dtype), dev(np.array([total]), dtype), I64(n), I64(o), dM, drows)
    f = rounded(w, dtype) / total
    close(host(dM), rounded(M, dtype) * f[:, None], dtype, "M")
    close(host(drows), rounded(rows, dtype) * f, dtype, "row")
    M[0, 0] = np.inf
    dM, drows = dev(M, dtype), dev(rows, dtype)
    k.weigh_rows(n, dev(w, dtype), dev(np.zeros(1), dtype), I64(n), I64(o), dM, drows)
    assert not host(dM).any() and not host(drows).any()
    hits = dev(np.ones((n, 1)), dtype)
    k.weigh_rows(n, dev(w, dtype), None, I64(n), I64(1), hits, None)
    close(host(hits)[:, 0], rounded(w, dtype), dtype, "hits")


@pytest.mark.parametrize("n, o", [(1, 4), (7, 5), (301, 10), (9, 1)])
def test_metric_statistics(k, dtype, n, o):
    """class_rows_* then class_stats_add, and regression_stats_add: each adds its statistics to
    what ``out`` holds (the epoch's sums), as Backend.accumulate_stats defines them."""
    rng = np.random.default_rng([n, o, 20])
    Y = rounded(rng.standard_normal((n, o)), dtype)
    Y[0, :] = Y[0, 0]  # a row of ties: top-k ranks a larger index first
    C, w = max(o, 2), rounded(rng.uniform(0, 2, n), dtype)
    labels = rng.integers(0, C, n).astype(I64)
    ks = np.array([1, 3] if o > 1 else [], I64)
    width = 2 + ks.size
    pred = (Y[:, 0] > 0).astype(I64) if o == 1 else Y.argmax(1)
    expected = np.full(C * C + 2 * C + ks.size, 0.5)
    np.add.at(expected, labels * C + pred, w)
    np.add.at(expected, C * C + labels, 1.0)
    np.add.at(expected, C * C + C + pred, 1.0)
    if ks.size:
        score = Y[np.arange(n), labels][:, None]
        rank = ((Y > score) | ((Y == score) & (np.arange(o) > labels[:, None]))).sum(1)
        for i, kk in enumerate(ks):
            expected[C * C + 2 * C + i] += w @ (rank < kk)
    rowstat = shim.empty((n, width), dtype)
    k.class_rows_labels(n, dev(Y, dtype), dev(labels), I64(n), I64(o), dev(np.r_[ks, 0]),
                        I64(ks.size), rowstat)
    out = dev(np.full(expected.size, 0.5), np.float64)  # float64 whatever the model's dtype
    k.class_stats_add(expected.size, rowstat, dev(w, dtype), I64(n), I64(width), I64(C), out)
    close(host(out), expected, dtype, "class statistics")
    T = rounded(rng.standard_normal((n, o)), dtype)
    E = Y - T
    expected = np.r_[w.sum(), w @ np.abs(E), w @ E ** 2, w @ T, w @ T ** 2] + 0.5
    out = dev(np.full(1 + 4 * o, 0.5), np.float64)
    k.regression_stats_add(1 + 4 * o, dev(Y, dtype), dev(T, dtype), dev(w, dtype), I64(n),
                           I64(o), out)
    close(host(out), expected, dtype, "regression statistics")


@pytest.mark.parametrize("n, o", [(1, 4), (7, 5), (301, 10), (9, 1)])
def test_correct_labels_and_rows(k, dtype, n, o):
    rng = np.random.default_rng([n, o])
    Y = rounded(rng.standard_normal((n, o)), dtype)
    if o == 1:
        Y[::3] = 0.0  # Y == 0 predicts class 0
        labels = rng.integers(0, 2, n).astype(I64)
        rows = labels.astype(float).reshape(n, 1)
    else:
        Y[0, :2] = 1.0  # a tie: the first maximum wins
        labels = rng.integers(0, o, n).astype(I64)
        rows = ref.one_hot(labels, o)
    hits = shim.empty((n,), dtype)
    k.correct_labels(n, dev(Y, dtype), dev(labels), I64(n), I64(o), hits)
    np.testing.assert_array_equal(host(hits), _hits(Y, labels))
    k.correct_rows(n, dev(Y, dtype), dev(rows, dtype), I64(n), I64(o), hits)
    np.testing.assert_array_equal(host(hits), _hits(Y, labels))


def _hits(Y, labels):
    if Y.shape[1] == 1:
        return ((Y[:, 0] > 0) == (labels >= 0.5)).astype(float)
    return (Y.argmax(1) == labels).astype(float)


# ====================================================================== optim.cu
def _halted(value=0):
    return dev(np.array([value]), I64)


@pytest.mark.parametrize("size", [1, 255, 257, 3000])
@pytest.mark.parametrize("bad", [None, "inf", "nan", "loss"])
def test_check_step(k, dtype, size, bad):
    grads = np.linspace(-1, 1, size)
    loss = np.array([0.0, 0.3, 0.0])  # the step's value sits in slot 1
    if bad in ("inf", "nan"):
        grads[size - 1] = np.inf if bad == "inf" else np.nan
    if bad == "loss":
        loss[1] = np.nan
    halted = _halted()
    counter = dev(np.array([1, 41]), I64)  # {slot, step}
    k.check_step(size, dev(loss, dtype), counter[0:1], dev(grads, dtype), I64(size), I64(0),
                 counter[1:2], halted, None)
    assert host(halted)[0] == (0 if bad is None else 41)
    # never cleared, never overwritten by a later bad step
    k.check_step(size, dev(loss, dtype), counter[0:1], dev(grads, dtype), I64(size), I64(99),
                 None, halted, None)
    assert host(halted)[0] == (0 if bad is None else 41)


@pytest.mark.parametrize("size", [1, 255, 5000, 70000])
def test_check_step_sums_the_squares_for_clipping(k, dtype, size):
    """check_step on its grid of CLIP_THREADS threads, then norm_groups and norm_total:
    clip[0] = sum(g^2) in float64 (against NumPy's), twice in a row (nothing accumulates from
    the step before), the max norm untouched; an overflowing sum is inf (the updates latch on
    it)."""
    g = rounded(np.random.default_rng(size).standard_normal(size), dtype)
    clip = dev(np.r_[0.0, 1.0, np.full(CLIP_SLOTS, 7.0)])  # scratch need not start at zero

    def norm():
        k.table["check_step"]((CLIP_THREADS // 256,), (256,),
                              (dev(np.zeros(1), dtype), None, dev(g, dtype), I64(size), I64(1),
                               None, _halted(), clip))
        k.norm_groups(CLIP_GROUPS, clip)
        k.norm_total(1, clip)
        return host(clip)
    for _ in range(2):
        got = norm()
        np.testing.assert_allclose(got[0], g @ g, rtol=1e-13)
        assert got[1] == 1.0
    if dtype == np.float64:
        g[0] = 1e160  # finite, its square not
        assert norm()[0] == np.inf


OPT_CASES = [
    ("sgd", (0.1, 0.0, 0.0, 0.0, 0.0)),
    ("sgd", (0.1, 0.9, 0.3, 0.0, 0.05)),
    ("sgd", (0.1, 0.9, 0.0, 1.0, 0.05)),
    ("adam", (0.01, 0.9, 0.999, 1e-8, 0.0, 0.0)),
    ("adam", (0.01, 0.8, 0.99, 1e-6, 0.1, 0.0)),
    ("adam", (0.01, 0.8, 0.99, 1e-6, 0.1, 1.0)),
    ("rmsprop", (0.01, 0.99, 1e-8, 0.0, 0.0, 0.0)),
    ("rmsprop", (0.01, 0.9, 1e-6, 0.1, 0.5, 1.0)),
]


def _reference_update(kind, hp, p, g, state):
    if kind == "sgd":
        lr, momentum, dampening, nesterov, wd = hp
        return ref.sgd(p, g, state, lr, momentum, dampening, bool(nesterov), wd)
    if kind == "adam":
        lr, b1, b2, eps, wd, decoupled = hp
        return ref.adam(p, g, state, lr, b1, b2, eps, wd, bool(decoupled))
    lr, alpha, eps, wd, momentum, centered = hp
    return ref.rmsprop(p, g, state, lr, alpha, eps, wd, momentum, bool(centered))


@pytest.mark.parametrize("size", [1, 300])
@pytest.mark.parametrize("kind, hp", OPT_CASES,
                         ids=[f"{c}-{i}" for i, (c, _) in enumerate(OPT_CASES)])
def test_optimizer_steps_read_the_step_on_the_device(k, dtype, kind, hp, size):
    """Four updates whose step number comes from a device counter, advanced by advance_step as
    in a captured graph; then a halted update changes nothing."""
    rng = np.random.default_rng(size)
    p = rounded(rng.standard_normal(size), dtype)
    params, state = dev(p, dtype), {}
    buffers = [shim.zeros((size,), dtype) for _ in range(3)]
    counter = dev(np.array([0, 1]), I64)
    hp_dev = dev(np.array(hp, np.float64))
    halted = _halted()
    for _ in range(4):
        g = rounded(rng.standard_normal(size), dtype)
        p = rounded(_reference_update(kind, hp, p, g, state), dtype)
        _update(k, kind, hp, params, dev(g, dtype), buffers, hp_dev, counter, halted, size)
        k.advance_step(1, counter)
        close(host(params), p, dtype)
    np.testing.assert_array_equal(host(counter), [4, 5])
    before = host(params)
    _update(k, kind, hp, params, dev(np.ones(size), dtype), buffers, hp_dev, counter,
            _halted(3), size)
    np.testing.assert_array_equal(host(params), before)


def _update(k, kind, hp, params, grads, buffers, hp_dev, counter, halted, size):
    m, v, w = buffers
    if kind == "sgd":
        k.sgd_step(size, params, grads, m if hp[1] else None, I64(size), hp_dev, None, None,
                   None, I64(0), counter[1:2], halted)
    elif kind == "adam":
        k.adam_step(size, params, grads, m, v, I64(size), hp_dev, None, None, None, I64(0),
                    counter[1:2], halted)
    else:
        k.rmsprop_step(size, params, grads, m, v if hp[4] else None, w if hp[5] else None,
                       I64(size), hp_dev, None, None, None, halted)


@pytest.mark.parametrize("size", [1, 300])
@pytest.mark.parametrize("kind, hp", OPT_CASES,
                         ids=[f"{c}-{i}" for i, (c, _) in enumerate(OPT_CASES)])
def test_an_update_that_would_overflow_is_latched_and_not_written(k, dtype, kind, hp, size):
    """<rule>_check then <rule>_step, as the backend launches them: a finite update leaves the
    latch at 0 and is written; one whose last element's new weight or state overflows (a
    finite gradient of 1e200, 1e30 in float32: its square overflows the state, its product
    with a huge finite lr the weight) sets halted to the step read on the device and writes
    nothing."""
    rng = np.random.default_rng(size)
    p = rounded(rng.standard_normal(size), dtype)
    params, buffers = dev(p, dtype), [dev(np.full(size, 0.5), dtype) for _ in range(3)]
    counter, hp_dev, halted = dev(np.array([0, 7]), I64), dev(np.array(hp, np.float64)), _halted()
    g = rounded(rng.standard_normal(size), dtype)
    _checked_update(k, kind, hp, params, dev(g, dtype), buffers, hp_dev, counter, halted, size)
    assert host(halted)[0] == 0
    assert not np.array_equal(host(params), p)
    before = [host(a) for a in (params, *buffers)]
    huge = (1e300 if dtype == np.float64 else 1e38,) + hp[1:]  # a learning rate, finite
    g[-1] = 1e200 if dtype == np.float64 else 1e30
    _checked_update(k, kind, hp, params, dev(g, dtype), buffers, dev(np.array(huge, np.float64)),
                    counter, halted, size)
    assert host(halted)[0] == 7
    for after, old in zip([host(a) for a in (params, *buffers)], before):
        np.testing.assert_array_equal(after, old)


def _checked_update(k, kind, hp, params, grads, buffers, hp_dev, counter, halted, size):
    m, v, w = buffers
    if kind == "sgd":
        args = (params, grads, m if hp[1] else None, I64(size), hp_dev, None, None, None, I64(0),
                counter[1:2])
        k.sgd_check(size, *args, halted)
        k.sgd_step(size, *args, halted)
    elif kind == "adam":
        args = (params, grads, m, v, I64(size), hp_dev, None, None, None, I64(0), counter[1:2])
        k.adam_check(size, *args, halted)
        k.adam_step(size, *args, halted)
    else:
        args = (params, grads, m, v if hp[4] else None, w if hp[5] else None, I64(size), hp_dev,
                None, None, None)
        k.rmsprop_check(size, *args, I64(0), counter[1:2], halted)
        k.rmsprop_step(size, *args, halted)


@pytest.mark.parametrize("size", [1, 300])
def test_weigh_grads_before_a_data_parallel_all_reduce(k, dtype, size):
    """grads *= weight exactly as NumPy's in-place multiply by a Python float rounds it (the
    host ranks' reducer); NaN everywhere when the rank's loss is not finite, so the summed
    gradient halts every rank; zeros for weight 0, even over stale NaN."""
    g = np.random.default_rng(size).standard_normal(size).astype(dtype)
    for weight in (0.3, 1.0, 5 / 16):
        grads = dev(g)
        k.weigh_grads(size, grads, I64(size), dev([0.7], dtype), np.float64(weight))
        expected = g.copy()
        expected *= weight
        np.testing.assert_array_equal(host(grads), expected)
    for bad in (np.inf, -np.inf, np.nan):
        grads = dev(g)
        k.weigh_grads(size, grads, I64(size), dev([bad], dtype), np.float64(0.5))
        assert np.isnan(host(grads)).all()
    stale = dev(np.full(size, np.nan, dtype))
    k.weigh_grads(size, stale, I64(size), dev([np.nan], dtype), np.float64(0.0))
    np.testing.assert_array_equal(host(stale), np.zeros(size, dtype))


# ====================================================================== the emulation itself
def test_launch_arguments_are_checked_against_the_kernel_types(dtype):
    """A float64 value for a float parameter, a Python float where a float32 is expected, an
    array of the wrong element type: each would read garbage on a GPU; the emulation refuses."""
    k = Kernels(dtype, ((1,), (32,)))
    n = 4
    good = (dev(np.zeros((1, n)), dtype), dev(np.zeros(n), dtype), I64(1), I64(n), np.int32(0),
            None, shim.empty((1, n), dtype))
    k.bias_act_forward(n, *good)
    wrong_array = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(TypeError, match="array passed for a pointer"):
        k.bias_act_forward(n, dev(np.zeros((1, n)), wrong_array), *good[1:])
    with pytest.raises(TypeError, match="value passed"):
        k.bias_act_forward(n, *good[:2], 1.0, *good[3:])  # a Python float is a double
    with pytest.raises(TypeError, match="value passed"):
        k.bias_act_forward(n, *good[:4], I64(0), *good[5:])  # act is an int
    with pytest.raises(TypeError, match="takes 7 arguments"):
        k.bias_act_forward(n, *good[:6])


def test_an_out_of_bounds_write_fails_the_launch(dtype):
    k = Kernels(dtype, ((1,), (32,)))
    short = shim.empty((3, 1), dtype)  # the kernel is told 5 rows
    with pytest.raises(shim.SimError, match="outside a device allocation"):
        k.colsum_rows(1, dev(np.ones((5, 1)), dtype), I64(5), I64(1), np.float64(1.0), short,
                      dev(np.array([4]), I64))
        host(short)


# ====================================================================== dense.cu: bf16
def _bf16_inputs() -> np.ndarray:
    """float32 bit patterns: test_bf16.py's special values (every sign, the exponent's ends,
    mantissas at and around each rounding point, NaNs whose rounding would carry) and random
    ones."""
    from test_bf16 import _random_bits, _special_bits
    return np.concatenate([_special_bits(), _random_bits(1 << 16, 5)])


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCH_IDS)
def test_round_bf16_equals_the_reference_bit_for_bit(launch):
    """cuda/dense.cu's round_bf16 against backends/bf16.py's to_bf16_bits on every pattern,
    NaN's sign and quiet bits included: the same uint16 bits, not just the same value."""
    from bpkernels.backends.bf16 import to_bf16_bits
    bits = _bf16_inputs()
    x = bits.view(np.float32)
    out = shim.empty(x.shape, np.uint16)
    Kernels(np.float32, launch).round_bf16(x.size, dev(x), I64(x.size), out)
    got, expected = host(out), to_bf16_bits(x)
    assert expected[np.isnan(x)].tolist().count(0x7FC0) > 0  # quiet NaNs are among them
    np.testing.assert_array_equal(got, expected)

