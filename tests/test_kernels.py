"""Every kernel of the contract (backends/base.py) on every available backend and dtype, compared
with the float64 reference in tests/reference.py.

Inputs are drawn on the host, rounded to the test dtype, and the reference is evaluated on the
rounded values widened to float64: the comparison then measures the kernel's own rounding only.
"""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

import reference as ref
from bpkernels.backends.base import ACTIVATIONS, KEEPS_Z, LOSSES, Backend

# (n, i, o): one row with a single output, odd widths, a larger batch with widths that are
# neither powers of two nor multiples of a SIMD width.
SHAPES = [(1, 3, 1), (7, 5, 3), (64, 33, 17)]
SHAPE_IDS = [f"{n}x{i}->{o}" for n, i, o in SHAPES]

# The derivatives of KEEPS_Z (gelu, silu) need the pre-activation, so the contract requires Z
# for them (and only them).
FORWARD_CASES = [(act, with_z) for act in ACTIVATIONS for with_z in (True, False)
                 if with_z or act not in KEEPS_Z]
FORWARD_IDS = [f"{act}-{'Z' if with_z else 'noZ'}" for act, with_z in FORWARD_CASES]


def test_reference_covers_the_contract():
    # A new activation or loss in base.py must get a reference before its kernels are tested.
    for act in ACTIVATIONS:
        ref.activation(act, 0.5), ref.activation_derivative(act, 0.5)
    assert set(LOSSES) == set(ref.LOSSES)


# torch.nn's modules for the activations (torch is a test extra): the reference itself is
# checked against them, values and autograd derivatives, so the kernels' oracle is torch's.
TORCH_ACTIVATIONS = {"identity": lambda nn: nn.Identity(), "relu": lambda nn: nn.ReLU(),
                     "leaky_relu": lambda nn: nn.LeakyReLU(0.01),
                     "sigmoid": lambda nn: nn.Sigmoid(), "tanh": lambda nn: nn.Tanh(),
                     "gelu": lambda nn: nn.GELU(), "silu": lambda nn: nn.SiLU()}


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_reference_activations_match_torch(act):
    torch = pytest.importorskip("torch")
    module = TORCH_ACTIVATIONS[act](torch.nn)
    breaks = np.array([0.46875, 4.0, 6.0]) * np.sqrt(2)
    z = np.concatenate([np.linspace(-30, 30, 601), breaks, -breaks, [1e-3, -1e-3, 0.25]])
    z = z[z != 0]  # the ReLU family's kink: torch's choice there is tested on the kernels
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    module(zt).sum().backward()
    # atol: torch's autograd forms sigmoid' as (1 - s) s, which cancels for large z
    np.testing.assert_allclose(ref.activation(act, z), module(zt).detach().numpy(),
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ref.activation_derivative(act, z), zt.grad.numpy(),
                               rtol=1e-13, atol=1e-15)


def rounded(a, dtype):
    """``a`` rounded to ``dtype`` and held in float64: the exact values a kernel sees."""
    return np.asarray(a).astype(dtype).astype(np.float64)


def make_layer(n, i, o, dtype, seed=0):
    """Unit-scale X (n, i), W (i, o), b (o,), rounded to dtype: Z = X @ W + b is ~N(0, 1/3)."""
    rng = np.random.default_rng([seed, n, i, o])
    X = rng.uniform(-1, 1, (n, i))
    W = rng.standard_normal((i, o)) / np.sqrt(i)
    b = rng.uniform(-0.5, 0.5, o)
    return rounded(X, dtype), rounded(W, dtype), rounded(b, dtype)


# ====================================================================== contract
def test_backend_methods_have_the_contract_signatures(be):
    """Every kernel of a backend takes the base class's parameters, names and defaults alike
    (callers pass some by keyword, e.g. ``Z=None``, ``dX=None``)."""
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert isinstance(be, Backend)
    for name in Backend.__abstractmethods__:
        got = params(getattr(type(be), name))
        if be.keeps_bounds and got and got[-1][0] == "bounds":
            got = got[:-1]  # the contract's documented extra of a backend that keeps bounds
        assert got == params(getattr(Backend, name)), name


# ====================================================================== plumbing
def test_asarray_and_to_host_copy(be, dtype):
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    dev = be.asarray(host, dtype)
    host[0, 0] = 99.0  # a copy, not a view of the host array
    back = be.to_host(dev)
    assert isinstance(back, np.ndarray) and back.dtype == dtype and back.shape == (2, 3)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, np.arange(6).reshape(2, 3))
    back[0, 1] = -1.0  # to_host is a copy too
    assert be.to_host(dev)[0, 1] == 1.0


def test_asarray_keeps_host_dtype_by_default(be):
    labels = np.array([2, 0, 1], dtype=np.int64)
    assert be.to_host(be.asarray(labels)).dtype == np.int64


def test_empty_and_zeros(be, dtype):
    assert be.to_host(be.empty((3, 4), dtype)).shape == (3, 4)
    assert be.to_host(be.empty((3, 4), dtype)).dtype == dtype
    zeros = be.to_host(be.zeros((5,), dtype))
    assert zeros.dtype == dtype
    np.testing.assert_array_equal(zeros, np.zeros(5))
    assert be.to_host(be.zeros((1,), np.int64)).dtype == np.int64  # the `halted` flag


def test_synchronize_and_device_info(be):
    assert be.synchronize() is None
    info = be.device_info()
    assert isinstance(info, dict) and info
    json.dumps(info)  # must be JSON-able: it goes into benchmark reports


# ====================================================================== dense_forward
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("act, with_z", FORWARD_CASES, ids=FORWARD_IDS)
def test_dense_forward(be, dtype, to_device, to_host, assert_close, act, with_z, shape):
    n, i, o = shape
    X, W, b = make_layer(n, i, o, dtype)
    Z_ref, A_ref = ref.dense_forward(X, W, b, act)
    X_dev, W_dev, b_dev = to_device(X), to_device(W), to_device(b)
    A = be.empty((n, o), dtype)
    Z = be.empty((n, o), dtype) if with_z else None

    assert be.dense_forward(X_dev, W_dev, b_dev, act, A, Z) is None  # outputs are passed in

    assert_close(to_host(A), A_ref, err_msg="A")
    if with_z:
        assert_close(to_host(Z), Z_ref, err_msg="Z")
    # inputs are read only
    np.testing.assert_array_equal(to_host(X_dev), X)
    np.testing.assert_array_equal(to_host(W_dev), W)
    np.testing.assert_array_equal(to_host(b_dev), b)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activations_over_a_wide_range(be, dtype, to_device, to_host, assert_close, act):
    """Each activation on z in [-12, 12] (including 0 and every breakpoint of an erf
    implementation: Cody's 0.46875 and 4 on z / sqrt 2), through dense_forward with W = I."""
    breaks = np.array([0.46875, 4.0, 6.0]) * np.sqrt(2)
    z = np.concatenate([np.linspace(-12, 12, 241), breaks, -breaks, [1e-3, -1e-3]])
    z = rounded(z, dtype)
    n = z.size
    X = z.reshape(n, 1)
    W, b = np.ones((1, 1)), np.zeros(1)
    A, Z = be.empty((n, 1), dtype), be.empty((n, 1), dtype)
    be.dense_forward(to_device(X), to_device(W), to_device(b), act, A, Z)
    assert_close(to_host(A)[:, 0], ref.activation(act, z))

    # and its derivative through dense_backward with dA = 1: dZ = act'(z)
    dA = to_device(np.ones((n, 1)))
    be.dense_backward(to_device(X), to_device(W), dA, act, A, Z,
                      be.empty((1, 1), dtype), be.empty((1,), dtype), None)
    assert_close(to_host(dA)[:, 0], ref.activation_derivative(act, z))


# ====================================================================== dense_backward
def _backward_inputs(act, shape, dtype, seed=1):
    """Host X, W, Z, A, dA as a layer in a model would hold them: A computed from the rounded Z
    and itself rounded to dtype."""
    n, i, o = shape
    X, W, b = make_layer(n, i, o, dtype, seed)
    Z = rounded(X @ W + b, dtype)
    A = rounded(ref.activation(act, Z), dtype)
    dA = rounded(np.random.default_rng([seed, 7, n]).standard_normal((n, o)), dtype)
    return X, W, Z, A, dA


@pytest.mark.parametrize("with_dx", [True, False], ids=["dX", "no-dX"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("act, with_z", FORWARD_CASES, ids=FORWARD_IDS)
def test_dense_backward(be, dtype, to_device, to_host, assert_close, act, with_z, shape, with_dx):
    n, i, o = shape
    X, W, Z, A, dA = _backward_inputs(act, shape, dtype)
    dZ_ref, dW_ref, db_ref, dX_ref = ref.dense_backward(X, W, Z, dA, act)

    X_dev, W_dev, A_dev = to_device(X), to_device(W), to_device(A)
    Z_dev = to_device(Z) if with_z else None
    dA_dev = to_device(dA)
    dW, db = be.empty((i, o), dtype), be.empty((o,), dtype)
    dX = be.empty((n, i), dtype) if with_dx else None

    assert be.dense_backward(X_dev, W_dev, dA_dev, act, A_dev, Z_dev, dW, db, dX) is None

    assert_close(to_host(dA_dev), dZ_ref, err_msg="dA must be overwritten with dZ")
    assert_close(to_host(dW), dW_ref, err_msg="dW")
    assert_close(to_host(db), db_ref, err_msg="db")
    if with_dx:
        assert_close(to_host(dX), dX_ref, err_msg="dX")
    # everything but dA, dW, db, dX is read only
    for name, dev, host in (("X", X_dev, X), ("W", W_dev, W), ("A", A_dev, A), ("Z", Z_dev, Z)):
        if dev is not None:
            np.testing.assert_array_equal(to_host(dev), host, err_msg=name)


@pytest.mark.parametrize("act", sorted(KEEPS_Z))
def test_dense_backward_needs_z_where_the_table_says(be, dtype, to_device, act):
    """derivative_from == "input": without the pre-activation the gradient cannot be formed,
    and the kernel says so instead of reading a missing array."""
    X, W, Z, A, dA = _backward_inputs(act, (3, 2, 4), dtype)
    with pytest.raises(ValueError, match="pre-activation Z"):
        be.dense_backward(to_device(X), to_device(W), to_device(dA), act, to_device(A), None,
                          be.empty((2, 4), dtype), be.empty((4,), dtype))


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_relu_family_derivative_at_zero_follows_torch(be, dtype, to_device, to_host, act):
    """At z == 0 torch takes relu'(0) = 0 and leaky_relu'(0) = slope."""
    Z = np.array([[0.0, 1.0, -1.0]])
    A = ref.activation(act, Z)
    dA = to_device(np.ones((1, 3)))
    be.dense_backward(to_device(np.ones((1, 1))), to_device(np.ones((1, 3))), dA, act,
                      to_device(A), to_device(Z), be.empty((1, 3), dtype), be.empty((3,), dtype))
    expected = [0.0, 1.0, 0.0] if act == "relu" else [0.01, 1.0, 0.01]
    np.testing.assert_allclose(to_host(dA)[0], expected, rtol=1e-6)


# ====================================================================== loss
LOSS_SHAPES = [(1, 3), (7, 5), (64, 17), (5, 1), (1, 1)]
LOSS_CASES = ["mse", "cross_entropy-labels", "cross_entropy-probs", "binary_cross_entropy"]
# cross_entropy needs at least two outputs
LOSS_PARAMS = [(case, shape) for case in LOSS_CASES for shape in LOSS_SHAPES
               if shape[1] > 1 or not case.startswith("cross_entropy")]
LOSS_PARAM_IDS = [f"{case}-{n}x{o}" for case, (n, o) in LOSS_PARAMS]


def _targets(case, n, o, dtype, rng):
    """Host targets of a loss case: int64 labels, or (n, o) rounded to dtype."""
    if case == "mse":
        return rounded(rng.standard_normal((n, o)), dtype)
    if case == "cross_entropy-labels":
        return rng.integers(0, o, n).astype(np.int64)
    if case == "cross_entropy-probs":
        return rounded(rng.dirichlet(np.ones(o), n), dtype)
    # BCE: soft targets, with some exact 0 and 1 as a classifier's labels would be
    T = rng.uniform(0, 1, (n, o))
    T.ravel()[::3] = np.round(T.ravel()[::3])
    return rounded(T, dtype)


def _run_loss(be, dtype, to_device, case, Y, T):
    """Run the loss kernel; returns (device dY, device out, device Y, device T)."""
    kind = case.split("-")[0]
    Y_dev = to_device(Y)
    T_dev = to_device(T, np.int64) if T.dtype == np.int64 else to_device(T)
    dY = be.empty(Y.shape, dtype)
    out = be.zeros((1,), dtype)
    assert be.loss(kind, Y_dev, T_dev, dY, out) is None
    return dY, out, Y_dev, T_dev


@pytest.mark.parametrize("case, shape", LOSS_PARAMS, ids=LOSS_PARAM_IDS)
def test_loss(be, dtype, to_device, to_host, assert_close, case, shape):
    n, o = shape
    rng = np.random.default_rng([n, o, len(case)])
    Y = rounded(2 * rng.standard_normal((n, o)), dtype)
    T = _targets(case, n, o, dtype, rng)
    value_ref, grad_ref = ref.loss(case.split("-")[0], Y, T)

    dY, out, Y_dev, T_dev = _run_loss(be, dtype, to_device, case, Y, T)

    assert_close(to_host(out)[0], value_ref, err_msg="loss value")
    assert_close(to_host(dY), grad_ref, err_msg="dY")
    np.testing.assert_array_equal(to_host(Y_dev), Y)  # Y and T are read only
    np.testing.assert_array_equal(to_host(T_dev), T)


def test_cross_entropy_labels_equal_one_hot_rows(be, dtype, to_device, to_host, assert_close):
    rng = np.random.default_rng(3)
    Y = rounded(rng.standard_normal((9, 4)), dtype)
    labels = rng.integers(0, 4, 9).astype(np.int64)
    dY_l, out_l, _, _ = _run_loss(be, dtype, to_device, "cross_entropy-labels", Y, labels)
    dY_p, out_p, _, _ = _run_loss(be, dtype, to_device, "cross_entropy-probs", Y,
                                  ref.one_hot(labels, 4))
    assert_close(to_host(out_l), to_host(out_p))
    assert_close(to_host(dY_l), to_host(dY_p))


def _extreme_logits(n, o, rng):
    """Logits of +-1e3 and 0 with random signs: a saturated classifier, right and wrong."""
    return rng.choice([-1e3, 0.0, 1e3], size=(n, o)) + rng.uniform(-1, 1, (n, o))


@pytest.mark.parametrize("case", LOSS_CASES[1:])
def test_loss_extreme_logits_stay_finite_and_correct(be, dtype, to_device, to_host, assert_close,
                                                     case):
    """exp(1e3) overflows both dtypes: a stable kernel never forms it. Values here are of order
    1e2-1e3, so the usual relative tolerance is meaningful."""
    rng = np.random.default_rng(11)
    n, o = 16, 3
    Y = rounded(_extreme_logits(n, o, rng), dtype)
    T = _targets(case, n, o, dtype, rng)
    value_ref, grad_ref = ref.loss(case.split("-")[0], Y, T)
    assert 10 < value_ref < 2e3  # the case really is extreme

    with np.errstate(over="raise", invalid="raise", divide="raise"):  # NumPy-based backends
        dY, out, _, _ = _run_loss(be, dtype, to_device, case, Y, T)

    value, grad = to_host(out)[0], to_host(dY)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert_close(value, value_ref, err_msg="loss value")
    assert_close(grad, grad_ref, err_msg="dY")


@pytest.mark.parametrize("case", ["cross_entropy-labels", "cross_entropy-probs",
                                  "binary_cross_entropy"])
def test_loss_of_confident_right_predictions_is_small_and_not_negative(
        be, dtype, to_device, to_host, assert_close, case):
    """A well-trained classifier: every logit 30 to 60 on the right side, so each row's (each
    element's) loss is >= 0 and below exp(-30) ~ 1e-13; their mean must be too, to the dtype's
    absolute tolerance. Forming the mean as a difference of two large sums (sum max(y, 0) minus
    Y . T for BCE, lse . t_sum minus T . Y for probability rows) does not: its error is
    ~eps * mean|Y|, and its sign is random. Five batches, so a lucky rounding cannot hide it."""
    n, o = 64, 17
    for seed in range(5):
        rng = np.random.default_rng(seed)
        if case == "binary_cross_entropy":
            T = rounded(rng.integers(0, 2, (n, o)), dtype)
            Y = rounded(np.where(T > 0, 1, -1) * rng.uniform(30, 60, (n, o)), dtype)
        else:
            labels = rng.integers(0, o, n).astype(np.int64)
            Y = rng.standard_normal((n, o))
            Y[np.arange(n), labels] += rng.uniform(30, 60, n)
            Y = rounded(Y, dtype)
            T = labels if case.endswith("labels") else ref.one_hot(labels, o)
        value_ref, _ = ref.loss(case.split("-")[0], Y, T)

        _, out, _, _ = _run_loss(be, dtype, to_device, case, Y, T)

        value = to_host(out)[0]
        assert value >= 0, f"batch {seed}: negative mean loss {value!r} (reference {value_ref!r})"
        assert_close(value, value_ref, err_msg=f"batch {seed}: loss value")


# ====================================================================== count_correct
@pytest.mark.parametrize("n, o", [(1, 3), (7, 5), (64, 17)])
def test_count_correct_argmax(be, dtype, to_device, to_host, n, o):
    rng = np.random.default_rng([n, o])
    Y = rounded(rng.standard_normal((n, o)), dtype)  # continuous: no ties, argmax unambiguous
    labels = rng.integers(0, o, n).astype(np.int64)
    labels[: n // 2] = Y[: n // 2].argmax(axis=1)  # make about half of them right
    out = be.zeros((1,), dtype)
    assert be.count_correct(to_device(Y), to_device(labels, np.int64), out) is None
    assert to_host(out)[0] == ref.count_correct(Y, labels)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_count_correct_single_output(be, dtype, to_device, to_host, n):
    """o == 1: the prediction is Y > 0 (so Y == 0 predicts 0)."""
    rng = np.random.default_rng(n)
    Y = rounded(rng.standard_normal((n, 1)), dtype)
    Y[::4] = 0.0
    labels = rng.integers(0, 2, n).astype(np.int64)
    out = be.zeros((1,), dtype)
    be.count_correct(to_device(Y), to_device(labels, np.int64), out)
    assert to_host(out)[0] == ref.count_correct(Y, labels)
    assert to_host(out)[0] == np.sum((Y[:, 0] > 0) == (labels == 1))


def test_count_correct_targets_as_the_model_passes_them(be, dtype, to_device, to_host):
    """MLP.evaluate and fit pass the loss targets themselves: float (n, 1) 0/1 rows for
    binary_cross_entropy with one output, probability rows for cross_entropy. The docstring
    speaks of int64 labels only; these are what the engine relies on."""
    rng = np.random.default_rng(2)
    Y1 = rounded(rng.standard_normal((10, 1)), dtype)
    T1 = rng.integers(0, 2, (10, 1)).astype(float)
    out = be.zeros((1,), dtype)
    be.count_correct(to_device(Y1), to_device(T1), out)
    assert to_host(out)[0] == ref.count_correct(Y1, T1)

    Y = rounded(rng.standard_normal((10, 4)), dtype)
    P = rng.dirichlet(np.ones(4), 10)
    be.count_correct(to_device(Y), to_device(P), out)
    assert to_host(out)[0] == ref.count_correct(Y, P)


# ====================================================================== check_step
def _check(be, dtype, to_device, loss_value, grads, step, halted):
    be.check_step(to_device(np.array([loss_value])), to_device(np.asarray(grads)), step, halted)
    return int(be.to_host(halted)[0])


def test_check_step_finite_stays_zero(be, dtype, to_device):
    halted = be.zeros((1,), np.int64)
    rng = np.random.default_rng(0)
    for step in range(1, 4):
        assert _check(be, dtype, to_device, 0.5, rng.standard_normal(50), step, halted) == 0


@pytest.mark.parametrize("where, bad", [("loss", np.nan), ("loss", np.inf), ("grads", np.inf),
                                        ("grads", -np.inf), ("grads", np.nan)])
def test_check_step_sets_the_step_once_and_never_clears(be, dtype, to_device, where, bad):
    halted = be.zeros((1,), np.int64)
    grads = np.linspace(-1, 1, 33)
    assert _check(be, dtype, to_device, 1.0, grads, 1, halted) == 0
    bad_grads = grads.copy()
    if where == "grads":
        bad_grads[17] = bad
    loss_value = bad if where == "loss" else 1.0
    assert _check(be, dtype, to_device, loss_value, bad_grads, 2, halted) == 2
    # later steps, finite or not, leave the first bad step recorded
    assert _check(be, dtype, to_device, 1.0, grads, 3, halted) == 2
    assert _check(be, dtype, to_device, np.nan, bad_grads, 4, halted) == 2


def test_check_step_huge_but_finite_gradients_are_finite(be, dtype, to_device):
    """Every element finite means not halted, even when their sum would overflow the dtype."""
    big = np.finfo(dtype).max / 2
    halted = be.zeros((1,), np.int64)
    assert _check(be, dtype, to_device, 1.0, np.full(8, big), 1, halted) == 0


# ====================================================================== take_rows, copy
@pytest.mark.parametrize("k", [1, 5])
def test_take_rows(be, dtype, to_device, to_host, k):
    rng = np.random.default_rng(k)
    src = rounded(rng.standard_normal((20, k)), dtype)
    index = np.array([19, 0, 7, 7, 3, 12, 0], dtype=np.int64)  # unordered, with repeats
    out = be.empty((len(index), k), dtype)
    src_dev = to_device(src)
    assert be.take_rows(src_dev, to_device(index, np.int64), out) is None
    np.testing.assert_array_equal(to_host(out), src[index])
    np.testing.assert_array_equal(to_host(src_dev), src)


def test_take_rows_of_int_labels(be, dtype, to_device, to_host):
    """The training loop gathers int64 label vectors (N,) too, not only (N, k) rows."""
    labels = np.arange(10, dtype=np.int64) * 3
    index = np.array([9, 2, 2, 5], dtype=np.int64)
    out = be.empty((4,), np.int64)
    be.take_rows(to_device(labels, np.int64), to_device(index, np.int64), out)
    np.testing.assert_array_equal(to_host(out), labels[index])


def test_take_rows_from_a_slice_of_the_index(be, dtype, to_device, to_host):
    """fit() passes a slice of one permutation vector per batch."""
    src = np.arange(30.0).reshape(10, 3)
    perm = to_device(np.array([4, 1, 8, 0, 9, 3], dtype=np.int64), np.int64)
    out = be.empty((2, 3), dtype)
    be.take_rows(to_device(src), perm[2:4], out)
    np.testing.assert_array_equal(to_host(out), src[[8, 0]])


@pytest.mark.parametrize("src_dtype", ["float32", "float64"])
def test_copy(be, dtype, to_device, to_host, src_dtype):
    host = np.random.default_rng(0).standard_normal((4, 3))
    src = be.asarray(host, src_dtype)
    out = be.zeros((4, 3), dtype)
    assert be.copy(src, out) is None
    result = to_host(out)
    assert result.dtype == dtype
    np.testing.assert_array_equal(result, host.astype(src_dtype).astype(dtype))
    np.testing.assert_array_equal(to_host(src), host.astype(src_dtype))  # src untouched


# ====================================================================== in place, into views
SENTINEL = -777.0


def _views(be, dtype, shapes):
    """One flat device buffer filled with SENTINEL and views into it of the given shapes, with
    one SENTINEL element before, between and after them (the model's flat grads, the loss
    slots of fit(), are such views)."""
    sizes = [int(np.prod(s)) for s in shapes]
    flat = be.asarray(np.full(sum(sizes) + len(sizes) + 1, SENTINEL), dtype)
    views, offset, gaps = [], 1, [0]
    for shape, size in zip(shapes, sizes):
        views.append(flat[offset:offset + size].reshape(shape))
        offset += size + 1
        gaps.append(offset - 1)
    return flat, views, gaps


def _assert_views(be, flat, gaps, expected, assert_close):
    host = be.to_host(flat)
    np.testing.assert_array_equal(host[gaps], SENTINEL, err_msg="wrote outside its output")
    offset = 1
    for exp in expected:
        exp = np.asarray(exp, dtype=np.float64)
        assert_close(host[offset:offset + exp.size].reshape(exp.shape), exp)
        offset += exp.size + 1


def test_kernels_write_into_the_arrays_passed_in(be, dtype, to_device, assert_close):
    """Outputs are written in place: results appear in the very arrays passed (here views of one
    flat buffer, as the model's parameter gradients are), and nothing next to them changes."""
    n, i, o = 7, 5, 3
    act = "gelu"
    X, W, b = make_layer(n, i, o, dtype)
    Z_ref, A_ref = ref.dense_forward(X, W, b, act)
    flat, (A, Z), gaps = _views(be, dtype, [(n, o), (n, o)])
    be.dense_forward(to_device(X), to_device(W), to_device(b), act, A, Z)
    _assert_views(be, flat, gaps, [A_ref, Z_ref], assert_close)

    X, W, Z, A_h, dA = _backward_inputs(act, (n, i, o), dtype)
    dZ_ref, dW_ref, db_ref, dX_ref = ref.dense_backward(X, W, Z, dA, act)
    flat, (dA_v, dW, db, dX), gaps = _views(be, dtype, [(n, o), (i, o), (o,), (n, i)])
    be.copy(to_device(dA), dA_v)
    be.dense_backward(to_device(X), to_device(W), dA_v, act, to_device(A_h), to_device(Z),
                      dW, db, dX)
    _assert_views(be, flat, gaps, [dZ_ref, dW_ref, db_ref, dX_ref], assert_close)

    rng = np.random.default_rng(0)
    Y = rounded(rng.standard_normal((n, o)), dtype)
    labels = rng.integers(0, o, n).astype(np.int64)
    value_ref, grad_ref = ref.cross_entropy(Y, labels)
    flat, (dY, out, correct), gaps = _views(be, dtype, [(n, o), (1,), (1,)])
    be.loss("cross_entropy", to_device(Y), to_device(labels, np.int64), dY, out)
    be.count_correct(to_device(Y), to_device(labels, np.int64), correct)
    _assert_views(be, flat, gaps, [grad_ref, [value_ref], [ref.count_correct(Y, labels)]],
                  assert_close)

    src = rounded(rng.standard_normal((10, 4)), dtype)
    index = np.array([3, 1, 4], dtype=np.int64)
    flat, (rows, copied), gaps = _views(be, dtype, [(3, 4), (10, 4)])
    be.take_rows(to_device(src), to_device(index, np.int64), rows)
    be.copy(to_device(src), copied)
    _assert_views(be, flat, gaps, [src[index], src], assert_close)


# ====================================================================== buffers are reused
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_repeated_calls_give_identical_results(be, dtype, to_device, to_host, act):
    """Kernels keep scratch buffers between calls (per shape): a second call on the same inputs,
    with a call of another shape in between, must give bit-identical results (nothing is
    accumulated into a stale buffer, no cached scratch of the wrong shape is reused)."""
    def layer_pass(shape):
        n, i, o = shape
        X, W, _, _, dA = _backward_inputs(act, shape, dtype)
        X_dev, W_dev, b = to_device(X), to_device(W), to_device(np.full(o, 0.1))
        A_out, Z_out = be.empty((n, o), dtype), be.empty((n, o), dtype)
        be.dense_forward(X_dev, W_dev, b, act, A_out, Z_out)
        dA_dev = to_device(dA)
        dW, db, dX = be.empty((i, o), dtype), be.empty((o,), dtype), be.empty((n, i), dtype)
        be.dense_backward(X_dev, W_dev, dA_dev, act, A_out, Z_out, dW, db, dX)
        Y = to_device(np.asarray(to_host(A_out)))
        labels = to_device(np.arange(n) % o, np.int64)
        results = [A_out, Z_out, dA_dev, dW, db, dX]
        for kind, T in (("mse", to_device(dA)), ("cross_entropy", labels),
                        ("binary_cross_entropy", to_device(np.abs(np.tanh(dA))))):
            if kind == "cross_entropy" and o < 2:
                continue
            dY, out = be.empty((n, o), dtype), be.zeros((1,), dtype)
            be.loss(kind, Y, T, dY, out)
            results += [dY, out]
        return [to_host(r) for r in results]

    first = layer_pass((64, 33, 17))
    layer_pass((7, 5, 3))
    layer_pass((1, 3, 1))
    again = layer_pass((64, 33, 17))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
