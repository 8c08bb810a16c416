"""The CuPy backend's LayerNorm (cuda/norm.cu), run on the CPU through tests/cudasim: forward and
backward against a float64 reference written here from the formulas (and against PyTorch's
layer_norm and autograd where torch is installed), for every activation, widths from 1 to past
the point where a row gets more than 32 threads, rows below and above the one-launch column
sums, constant rows (variance 0), two eps; the parameter gradients are the same bits on every
run and under any launch configuration; and captured epochs with LayerNorm equal the kernels
launched one by one as EpochPlan describes.
"""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk
import cudasim
import reference as ref
from bpkernels import philox
from bpkernels.backends.base import ACTIVATIONS, EpochPlan
from cudasim import shim

pytestmark = pytest.mark.skipif(cudasim.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA: {cudasim.unavailable_reason()}")

DTYPES = ["float32", "float64"]
WIDTHS = [1, 3, 32, 1000]
ROWS = [1, 37, 100]  # 100: past ONE_PASS_ROWS, dgamma and dbeta summed in two launches
EPS = [1e-5, 1e-3]
RTOL = {"float32": 1e-5, "float64": 1e-12}


@pytest.fixture(scope="module")
def be():
    return cudasim.make_backend()


# ====================================================================== the reference
def reference_forward(H, gamma, beta, activation, eps, dtype):
    """(xhat, rstd, N, A) in float64 from the formulas, rounding only where the contract does:
    xhat to the dtype once, and N = xhat * gamma + beta formed in the dtype."""
    H = np.asarray(H, np.float64)
    o = H.shape[1]
    mean = H.sum(axis=1, keepdims=True) / o
    var = ((H - mean) ** 2).sum(axis=1, keepdims=True) / o  # biased, as torch
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = ((H - mean) * rstd).astype(dtype)
    N = xhat * gamma.astype(dtype) + beta.astype(dtype)
    return xhat.astype(np.float64), rstd[:, 0], N.astype(np.float64), ref.activation(activation, N)


def reference_backward(dA, activation, xhat, N, gamma, rstd):
    """(dH, dgamma, dbeta, scales) in float64; scales: the magnitudes each result is a
    difference of, what its rounding error is relative to (xhat's, like xhat's own, to 1: a
    constant row's is 0 here but not in torch). The kernels take act' from the
    rounded output A where the contract says so (1 - a^2 for tanh, where a is near 1, is a
    difference): an error relative to |dA|, not to |g|."""
    dA = np.asarray(dA, np.float64)
    slope = ref.activation_derivative(activation, N)
    g = dA * slope
    d = g * gamma
    mean_d = d.mean(axis=1, keepdims=True)
    mean_dx = (d * xhat).mean(axis=1, keepdims=True)
    dH = rstd[:, None] * (d - mean_d - xhat * mean_dx)
    g_scale = np.abs(dA) * (np.abs(slope) + 1.0)
    row = rstd[:, None] * (np.abs(g_scale * gamma).max(axis=1, keepdims=True) *
                           (1.0 + np.abs(xhat).max(axis=1, keepdims=True) ** 2))
    return dH, (g * xhat).sum(axis=0), g.sum(axis=0), \
        (row, (g_scale * (np.abs(xhat) + 1.0)).sum(axis=0), g_scale.sum(axis=0))


def problem(rows, width, dtype, seed=0, constant_rows=()):
    """H off zero (the mean matters), gamma near 1, beta and dA: rounded to ``dtype``, as float64.
    Rows listed in ``constant_rows`` hold one exact value each (variance 0)."""
    rng = np.random.default_rng(seed + 1000 * width + rows)
    H = 3.0 + 2.0 * rng.standard_normal((rows, width))
    for r, value in zip(constant_rows, (2.5, -7.0, 0.0)):
        H[r] = value
    gamma = 1.0 + 0.3 * rng.standard_normal(width)
    beta = 0.5 * rng.standard_normal(width)
    dA = rng.standard_normal((rows, width))
    return tuple(x.astype(dtype).astype(np.float64) for x in (H, gamma, beta, dA))


def run(be, H, gamma, beta, dA, activation, eps, dtype):
    """Both kernels on the device: (xhat, rstd, A, dH, dgamma, dbeta) on the host."""
    Hd, dAd = be.asarray(H, dtype), be.asarray(dA, dtype)
    gd, bd = be.asarray(gamma, dtype), be.asarray(beta, dtype)
    n, o = H.shape
    A, rstd = be.empty((n, o), dtype), be.empty((n,), dtype)
    dgamma, dbeta = be.empty((o,), dtype), be.empty((o,), dtype)
    be.layer_norm_forward(Hd, gd, bd, activation, A, rstd, eps)
    be.layer_norm_backward(dAd, activation, A, Hd, gd, bd, rstd, dgamma, dbeta)
    return tuple(be.to_host(x) for x in (Hd, rstd, A, dAd, dgamma, dbeta))


def assert_close(actual, expected, rtol, scale=0.0, what=""):
    """|actual - expected| <= rtol * (|expected| + scale), elementwise (scale broadcasts)."""
    actual = np.asarray(actual, np.float64)
    error = np.abs(actual - expected)
    bound = rtol * (np.abs(expected) + scale)
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else ()
    assert np.all(error <= bound), (what, worst, actual[worst], expected[worst])


# ====================================================================== the kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("eps", EPS)
def test_forward_and_backward_follow_the_formulas(be, dtype, activation, width, rows, eps):
    H, gamma, beta, dA = problem(rows, width, dtype, constant_rows=(5,) if rows > 5 else ())
    xhat, rstd, A, dH, dgamma, dbeta = run(be, H, gamma, beta, dA, activation, eps, dtype)
    for got in (xhat, rstd, A, dH, dgamma, dbeta):
        assert got.dtype == np.dtype(dtype)
    r_xhat, r_rstd, N, r_A = reference_forward(H, gamma, beta, activation, eps, dtype)
    rtol = RTOL[dtype]
    assert_close(xhat, r_xhat, rtol, 1.0, "xhat")
    assert_close(rstd, r_rstd, rtol, 0.0, "rstd")
    assert_close(A, r_A, rtol, 1.0, "A")
    r_dH, r_dgamma, r_dbeta, (row, sgx, sg) = reference_backward(dA, activation, xhat, N,
                                                                 gamma, rstd.astype(np.float64))
    assert_close(dH, r_dH, rtol, row, "dH")
    assert_close(dgamma, r_dgamma, rtol, sgx, "dgamma")
    assert_close(dbeta, r_dbeta, rtol, sg, "dbeta")
    if width == 1:  # every row is constant: xhat 0, so its gradient is 0 too
        assert (xhat == 0).all() and (dH == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width", [3, 32, 1000])
@pytest.mark.parametrize("eps", EPS)
def test_constant_rows_have_rstd_one_over_sqrt_eps(be, dtype, activation, width, eps):
    """Variance 0 exactly (an exact mean, every deviation 0): rstd = 1 / sqrt(eps) rounded once,
    xhat = 0 exactly, A = act(beta), and the gradient of H is rstd * (d - mean(d))."""
    H, gamma, beta, dA = problem(37, width, dtype, constant_rows=(0, 17, 36))
    xhat, rstd, A, dH, _, _ = run(be, H, gamma, beta, dA, activation, eps, dtype)
    expected = np.dtype(dtype).type(1.0 / np.sqrt(eps))
    for r in (0, 17, 36):
        assert rstd[r] == expected
        assert (xhat[r] == 0).all()
        assert_close(A[r], ref.activation(activation, beta), RTOL[dtype], 1.0, "A")
        d = dA[r] * ref.activation_derivative(activation, beta) * gamma
        assert_close(dH[r], float(expected) * (d - d.mean()), RTOL[dtype],
                     float(expected) * np.abs(d).max(), "dH")
    assert (rstd[1:17] != expected).all()  # the other rows do vary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width, rows", [(1, 1), (3, 37), (32, 1), (1000, 37), (2500, 3),
                                         (40, 100)])
@pytest.mark.parametrize("eps", EPS)
def test_agrees_with_torch_layer_norm_and_autograd(be, dtype, activation, width, rows, eps):
    """torch.nn.functional.layer_norm, the activation and autograd in float64, from the same
    (dtype-rounded) inputs: 1e-12 relative in float64, float32's tolerance in float32. Width
    2500 gives a row more than 32 threads."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    acts = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
            "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}
    H, gamma, beta, dA = problem(rows, width, dtype, seed=7, constant_rows=(1,) if rows > 1
                                 else ())
    xhat, rstd, A, dH, dgamma, dbeta = run(be, H, gamma, beta, dA, activation, eps, dtype)
    t = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (H, gamma, beta)]
    out = acts[activation](F.layer_norm(t[0], (width,), t[1], t[2], eps))
    out.backward(torch.tensor(dA, dtype=torch.float64))
    rtol = RTOL[dtype]
    assert_close(A, out.detach().numpy(), rtol, 1.0, "A")
    _, r_rstd, N, _ = reference_forward(H, gamma, beta, activation, eps, dtype)
    _, _, _, (row, sgx, sg) = reference_backward(dA, activation, xhat, N, gamma, r_rstd)
    assert_close(dH, t[0].grad.numpy(), rtol, row, "dH")
    assert_close(dgamma, t[1].grad.numpy(), rtol, sgx, "dgamma")
    assert_close(dbeta, t[2].grad.numpy(), rtol, sg, "dbeta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width, rows", [(1000, 37), (33, 100), (2500, 70)])
def test_results_are_the_same_bits_every_run_and_under_any_launch(be, monkeypatch, dtype,
                                                                  width, rows):
    """No atomics, every sum in an order fixed by the shape alone: a second run, and a run whose
    launches have 7-thread blocks and at most 3 blocks (each thread's grid-stride loop visiting
    many rows, lanes or columns), give the same bits, dgamma and dbeta included."""
    H, gamma, beta, dA = problem(rows, width, dtype, seed=3)
    first = run(be, H, gamma, beta, dA, "gelu", 1e-5, dtype)
    again = run(be, H, gamma, beta, dA, "gelu", 1e-5, dtype)
    odd = cudasim.make_backend()
    odd._max_blocks = 3
    monkeypatch.setattr(cudasim.backend_module(), "BLOCK", 7)
    squeezed = run(odd, H, gamma, beta, dA, "gelu", 1e-5, dtype)
    for a, b, c in zip(first, again, squeezed):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_the_backward_pass_overwrites_only_its_outputs(be):
    """H (xhat), A, gamma, beta and rstd are read, not written, by the backward pass; the
    forward pass leaves gamma and beta alone."""
    H, gamma, beta, dA = problem(37, 32, "float64")
    Hd, gd, bd = be.asarray(H), be.asarray(gamma), be.asarray(beta)
    A, rstd = be.empty(H.shape, np.float64), be.empty((37,), np.float64)
    be.layer_norm_forward(Hd, gd, bd, "silu", A, rstd, 1e-5)
    kept = [be.to_host(x) for x in (Hd, gd, bd, A, rstd)]
    np.testing.assert_array_equal(kept[1:3], [gamma, beta])
    dgamma, dbeta = be.empty((32,), np.float64), be.empty((32,), np.float64)
    be.layer_norm_backward(be.asarray(dA), "silu", A, Hd, gd, bd, rstd, dgamma, dbeta)
    for before, x in zip(kept, (Hd, gd, bd, A, rstd)):
        np.testing.assert_array_equal(be.to_host(x), before)


# ====================================================================== captured epochs
SIZES = (5, 9, 7, 6, 3)
HIDDEN = ("relu", "gelu", "tanh")
DROPOUT = (0.3, 0.0, 0.6)
SEED = 0x9E3779B97F4A7C15


def _device(be, host):
    out = be.empty(host.shape, host.dtype)
    out.set(np.ascontiguousarray(host))
    return out


def _workspaces(be, y, full, last, dtype):
    """The workspaces of a full batch and of the last one, allocated on ``be`` as fit()
    allocates them (EpochLoop: model.workspace for each batch size) for a model with
    norm="layer" and dropout, so that the buffers the epoch is given here cannot drift from
    fit()'s."""
    model = bpk.MLP(SIZES, HIDDEN, backend=be, dtype=dtype, dropout=DROPOUT, norm="layer")
    ws = model.workspace(full, y.shape[1:], y.dtype)
    return ws, ws if last == full else model.workspace(last, y.shape[1:], y.dtype)


def _layout():
    """Slices of the flat buffer per layer: W, b, and gamma, beta on the hidden layers."""
    slices, offset = [], 0
    for layer, (i, o) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        names = ("W", "b") if layer == len(SIZES) - 2 else ("W", "b", "gamma", "beta")
        part = {}
        for name in names:
            size = i * o if name == "W" else o
            part[name] = slice(offset, offset + size)
            offset += size
        slices.append(part)
    return slices, offset


class Run:
    def __init__(self, be, X, y, batch, dtype, params):
        self.be, self.batch = be, batch
        self.X, self.T = be.asarray(X.astype(dtype)), be.asarray(y)
        self.n, self.steps = len(X), -(-len(X) // batch)
        self.params = _device(be, params.astype(dtype))
        self.grads, self.buf = be.zeros(params.shape, dtype), be.zeros(params.shape, dtype)
        self.halted = be.zeros((1,), np.int64)
        self.step_loss = be.zeros((self.steps,), dtype)
        rest = self.n - (self.steps - 1) * batch
        self.workspaces = _workspaces(be, y, batch, rest, dtype)
        self.opt = bpk.SGD(lr=0.05, momentum=0.9)
        self.cache: dict = {}

    def plan(self, order, first_step, eps):
        return EpochPlan(
            sizes=SIZES, activations=HIDDEN + ("identity",), params=self.params,
            grads=self.grads, X=self.X, T=self.T, order=order, batch=self.batch,
            steps=self.steps, workspaces=self.workspaces, loss="cross_entropy", metric=False,
            step_loss=self.step_loss, step_correct=None, halted=self.halted, optimizer="sgd",
            hp=self.opt, state={"momentum_buffer": self.buf}, first_step=first_step,
            cache=self.cache, dropout=(SEED, DROPOUT), norm=eps)

    def kernel_by_kernel(self, order, first_step, eps):
        """The per-kernel loop of a model with norm="layer" and dropout."""
        be = self.be
        views = [{name: (p[s], g[s]) for name, s in part.items()}
                 for part in _layout()[0] for p, g in [(self.params, self.grads)]]
        for part, (i, o) in zip(views, zip(SIZES[:-1], SIZES[1:])):
            part["W"] = tuple(x.reshape(i, o) for x in part["W"])
        for s in range(self.steps):
            ws = self.workspaces[1 if s == self.steps - 1 else 0]
            index = order[s * self.batch:s * self.batch + ws.rows]
            be.take_rows(self.X, index, ws.X)
            be.take_rows(self.T, index, ws.T)
            step = first_step + s
            drops = [philox.layer_dropout(SEED, step, layer, index, p) if p > 0 else None
                     for layer, p in enumerate(DROPOUT)] + [None]
            X = ws.X
            for layer, part in enumerate(views):
                W, b = part["W"][0], part["b"][0]
                if layer == len(views) - 1:
                    be.dense_forward(X, W, b, "identity", ws.A[layer])
                    break
                be.dense_forward(X, W, b, "identity", ws.H[layer])
                be.layer_norm_forward(ws.H[layer], part["gamma"][0], part["beta"][0],
                                      HIDDEN[layer], ws.A[layer], ws.rstd[layer], eps)
                X = ws.A[layer]
                if drops[layer] is not None:
                    be.dropout_forward(X, ws.D[layer], drops[layer])
                    X = ws.D[layer]
            be.loss("cross_entropy", ws.A[-1], ws.T, ws.dA[-1], self.step_loss[s:s + 1])
            for layer in reversed(range(len(views))):
                part = views[layer]
                below = drops[layer - 1] if layer else None
                X = ws.X if layer == 0 else ws.A[layer - 1] if below is None else ws.D[layer - 1]
                dX = None if layer == 0 else ws.dA[layer - 1]
                if layer < len(views) - 1:
                    be.layer_norm_backward(ws.dA[layer], HIDDEN[layer], ws.A[layer],
                                           ws.H[layer], part["gamma"][0], part["beta"][0],
                                           ws.rstd[layer], part["gamma"][1], part["beta"][1])
                be.dense_backward(X, part["W"][0], ws.dA[layer], "identity", ws.A[layer], None,
                                  part["W"][1], part["b"][1], dX)
                if below is not None:
                    be.dropout_backward(dX, below)
            be.check_step(self.step_loss[s:s + 1], self.grads, step, self.halted)
            be.sgd_step(self.params, self.grads, self.buf, self.opt, step, self.halted)

    def results(self):
        return [self.be.to_host(a) for a in (self.params, self.grads, self.buf, self.step_loss,
                                             self.halted)]


def _problem(n=23, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, SIZES[0]))
    y = rng.integers(0, SIZES[-1], n).astype(np.int64)
    slices, count = _layout()
    params = rng.standard_normal(count) * 0.5
    for part in slices[:-1]:
        params[part["gamma"]] = 1.0 + 0.2 * rng.standard_normal(part["gamma"].stop -
                                                                part["gamma"].start)
    return X, y, params


@pytest.mark.parametrize("dtype", DTYPES)
def test_captured_epochs_with_layer_norm_equal_the_kernel_loop(dtype):
    """23 rows in batches of 8 (two full steps and a partial one), two epochs from step 11,
    LayerNorm and dropout on the hidden layers: the replayed graphs give exactly the numbers of
    the kernels launched one by one, every layer's gamma and beta get gradients and move, and
    the second epoch replays without a capture or an allocation."""
    X, y, params = _problem()
    graphs, kernels = cudasim.make_backend(), cudasim.make_backend(graphs=False)
    runs = {"graphs": Run(graphs, X, y, 8, dtype, params),
            "kernels": Run(kernels, X, y, 8, dtype, params)}
    first_step = 11
    for epoch in range(2):
        order = np.random.default_rng(epoch).permutation(len(X)).astype(np.int64)
        plan = runs["graphs"].plan(graphs.asarray(order), first_step, 1e-5)
        before = shim.STATS.copy()
        assert graphs.train_epoch(plan)
        spent = shim.STATS - before
        assert spent["graph_launches"] == runs["graphs"].steps
        if epoch:
            assert spent["captures"] == spent["allocations"] == spent["host_waits"] == 0
        runs["kernels"].kernel_by_kernel(kernels.asarray(order), first_step, 1e-5)
        for got, expected in zip(runs["graphs"].results(), runs["kernels"].results()):
            assert got.tobytes() == expected.tobytes()
        first_step += runs["graphs"].steps
    final, grads, _, _, halted = runs["graphs"].results()
    assert halted[0] == 0
    for part in _layout()[0][:-1]:  # (a unit ReLU or dropout silenced for a batch gets 0)
        for name in ("gamma", "beta"):
            assert (grads[part[name]] != 0).mean() > 0.5
            assert (final[part[name]] != params.astype(dtype)[part[name]]).mean() > 0.5


def test_a_new_eps_is_a_new_capture_and_other_numbers():
    """eps is baked into the graph: the same buffers with another eps capture again, and a
    run with another eps ends elsewhere."""
    X, y, params = _problem()
    be = cudasim.make_backend()
    order = be.asarray(np.arange(len(X)))
    run = Run(be, X, y, 8, "float64", params)
    captures = []
    for first_step, eps in ((1, 1e-5), (4, 1e-5), (7, 1e-1)):
        before = shim.STATS["captures"]
        assert be.train_epoch(run.plan(order, first_step, eps))
        captures.append(shim.STATS["captures"] - before)
        run.results()  # the epoch done before its graphs (and their scratch) are dropped
    assert captures == [2, 0, 2]
    ends = []
    for eps in (1e-5, 1e-1):
        other = Run(be, X, y, 8, "float64", params)
        assert be.train_epoch(other.plan(order, 1, eps))
        ends.append(other.results()[0])
    assert not np.array_equal(*ends)
