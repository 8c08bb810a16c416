"""The optimizer kernels (sgd_step, adam_step, rmsprop_step) on every backend and dtype, against
torch.optim's rules written out in tests/reference.py; steps worked by hand; the halted no-op;
the optimizer objects' validation; and, where torch is installed, torch.optim itself.
"""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels
import reference as ref
from bpkernels.optim import SGD, Adam, AdamW, RMSprop

# Every rule and option, alone and combined. Hyper-parameters are all explicit (AdamW's
# weight_decay included) so the reference never relies on a package default.
CASES = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9)),
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.3)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (SGD, dict(lr=0.1, weight_decay=0.05)),
    (SGD, dict(lr=0.1, momentum=0.8, dampening=0.1, weight_decay=0.05)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    (Adam, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    (Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (AdamW, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
    (AdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, alpha=0.99, eps=1e-8)),
    (RMSprop, dict(lr=0.01, alpha=0.99, eps=1e-8, momentum=0.9)),
    (RMSprop, dict(lr=0.01, alpha=0.99, eps=1e-8, centered=True)),
    (RMSprop, dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True)),
]
CASE_IDS = [cls.__name__ + "(" + ",".join(f"{k}={v}" for k, v in kw.items()) + ")"
            for cls, kw in CASES]
SIZE = 37  # odd, so no vector width divides it
STEPS = 5


def reference_step(cls, kwargs, p, g, state):
    """One step of the reference rule for an optimizer class and its keyword arguments."""
    kw = dict(kwargs)
    if cls is SGD:
        return ref.sgd(p, g, state, **kw)
    if cls in (Adam, AdamW):
        kw["beta1"], kw["beta2"] = kw.pop("betas")
        return ref.adam(p, g, state, decoupled=cls is AdamW, **kw)
    return ref.rmsprop(p, g, state, **kw)


def kernel_step(be, hp, params, grads, state, step, halted):
    """One step of the backend kernel, returning what it returns (None by the contract); buffers
    are named as in the contract, and one the configuration does not use is None, as Optimizer
    passes it."""
    if isinstance(hp, SGD):
        return be.sgd_step(params, grads, state.get("momentum_buffer"), hp, step, halted)
    if isinstance(hp, Adam):  # AdamW too
        return be.adam_step(params, grads, state["exp_avg"], state["exp_avg_sq"], hp, step, halted)
    return be.rmsprop_step(params, grads, state["square_avg"], state.get("momentum_buffer"),
                           state.get("grad_avg"), hp, step, halted)


def zero_state(be, hp, dtype, size=SIZE):
    """The state buffers the optimizer declares it needs, zeroed, as Optimizer.bind makes them."""
    return {name: be.zeros((size,), dtype) for name in hp.needed_states()}


def draws(dtype, seed=0):
    """Initial params and STEPS gradients, unit scale, rounded to dtype (held in float64)."""
    rng = np.random.default_rng(seed)
    rnd = lambda a: a.astype(dtype).astype(np.float64)  # noqa: E731
    return rnd(rng.standard_normal(SIZE)), [rnd(rng.standard_normal(SIZE)) for _ in range(STEPS)]


# ====================================================================== against the reference
@pytest.mark.parametrize("cls, kwargs", CASES, ids=CASE_IDS)
def test_steps_match_reference(be, dtype, to_device, to_host, assert_close, cls, kwargs):
    hp = cls(**kwargs)
    p0, grads = draws(dtype)
    params = to_device(p0)
    state = zero_state(be, hp, dtype)
    halted = be.zeros((1,), np.int64)
    p_ref, state_ref = p0, {}
    for step, g in enumerate(grads, start=1):
        g_dev = to_device(g)
        assert kernel_step(be, hp, params, g_dev, state, step, halted) is None
        p_ref = reference_step(cls, kwargs, p_ref, g, state_ref)
        assert_close(to_host(params), p_ref, err_msg=f"params after step {step}")
        np.testing.assert_array_equal(to_host(g_dev), g, err_msg="grads are read only")
    for name, buf in state.items():
        assert_close(to_host(buf), state_ref[name], err_msg=name)


@pytest.mark.parametrize("cls, kwargs", CASES, ids=CASE_IDS)
def test_halted_step_is_a_no_op(be, dtype, to_device, to_host, cls, kwargs):
    """With halted[0] != 0 nothing moves: not the params, not any state buffer, whatever the
    step number (the first step, which initialises SGD's momentum buffer, included)."""
    hp = cls(**kwargs)
    p0, grads = draws(dtype, seed=1)
    params = to_device(p0)
    state = zero_state(be, hp, dtype)
    kernel_step(be, hp, params, to_device(grads[0]), state, 1, be.zeros((1,), np.int64))
    before = {"params": to_host(params), **{k: to_host(v) for k, v in state.items()}}

    halted = to_device(np.array([2]), np.int64)
    for step in (1, 2, 3):
        kernel_step(be, hp, params, to_device(grads[step]), state, step, halted)

    after = {"params": to_host(params), **{k: to_host(v) for k, v in state.items()}}
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert to_host(halted)[0] == 2


# ====================================================================== worked by hand
# p = 1, g = 0.5 (twice where the rule has memory). Every expected number is derived in its
# comment; eps = 1e-8 contributes at the 1e-9 level, so it is kept in the float64 values.
HAND = [
    # p - lr g = 1 - 0.1 * 0.5
    ("sgd", SGD(lr=0.1), 1, 0.95, {}),
    # g' = g + wd p = 0.6; 1 - 0.1 * 0.6
    ("sgd-weight_decay", SGD(lr=0.1, weight_decay=0.1), 1, 0.94, {}),
    # step 1: buf = g = 0.5, p = 0.95; step 2: buf = 0.9 * 0.5 + 0.5 = 0.95, p = 0.95 - 0.095
    ("sgd-momentum", SGD(lr=0.1, momentum=0.9), 2, 0.855, {"momentum_buffer": 0.95}),
    # step 1 is not dampened: buf = 0.5; step 2: buf = 0.9 * 0.5 + (1 - 0.5) * 0.5 = 0.7,
    # p = 0.95 - 0.07
    ("sgd-dampening", SGD(lr=0.1, momentum=0.9, dampening=0.5), 2, 0.88, {"momentum_buffer": 0.7}),
    # step 1: buf = 0.5, d = g + 0.9 buf = 0.95, p = 0.905;
    # step 2: buf = 0.95, d = 0.5 + 0.855 = 1.355, p = 0.905 - 0.1355
    ("sgd-nesterov", SGD(lr=0.1, momentum=0.9, nesterov=True), 2, 0.7695,
     {"momentum_buffer": 0.95}),
    # m = 0.1 * 0.5 = 0.05, v = 0.001 * 0.25 = 0.00025; m_hat = 0.05 / 0.1 = 0.5,
    # sqrt(v) / sqrt(1 - 0.999) = 0.5; p = 1 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.9 + 2e-9
    ("adam", Adam(lr=0.1), 1, 0.900000002, {"exp_avg": 0.05, "exp_avg_sq": 0.00025}),
    # L2: g' = 0.6, m = 0.06, v = 0.00036, m_hat = sqrt(v_hat) = 0.6;
    # p = 1 - 0.1 * 0.6 / (0.6 + 1e-8) = 0.9 + 1.6667e-9
    ("adam-weight_decay", Adam(lr=0.1, weight_decay=0.1), 1, 0.9000000016666666,
     {"exp_avg": 0.06, "exp_avg_sq": 0.00036}),
    # decoupled: p = 1 * (1 - 0.1 * 0.1) = 0.99 first, g stays 0.5 (m, v as in adam);
    # p = 0.99 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.89 + 2e-9
    ("adamw", AdamW(lr=0.1, weight_decay=0.1), 1, 0.890000002,
     {"exp_avg": 0.05, "exp_avg_sq": 0.00025}),
    # square_avg = 0.01 * 0.25 = 0.0025, sqrt = 0.05; p = 1 - 0.01 * 0.5 / (0.05 + 1e-8)
    #   = 1 - 0.1 / (1 + 2e-7) = 0.9 + 2e-8 - 4e-15
    ("rmsprop", RMSprop(lr=0.01), 1, 0.900000019999996, {"square_avg": 0.0025}),
    # g' = 0.6, square_avg = 0.0036, sqrt = 0.06; p = 1 - 0.01 * 0.6 / (0.06 + 1e-8)
    #   = 1 - 0.1 / (1 + 1.6667e-7) = 0.9 + 1.6667e-8 - 2.8e-15
    ("rmsprop-weight_decay", RMSprop(lr=0.01, weight_decay=0.1), 1, 0.9000000166666638,
     {"square_avg": 0.0036}),
    # grad_avg = 0.01 * 0.5 = 0.005; sqrt(0.0025 - 0.005^2) = sqrt(0.002475) = 0.0497493718553;
    # p = 1 - 0.01 * 0.5 / (0.0497493718553 + 1e-8)
    ("rmsprop-centered", RMSprop(lr=0.01, centered=True), 1, 0.899496238676095,
     {"square_avg": 0.0025, "grad_avg": 0.005}),
    # step 1: buf = 0.5 / (0.05 + 1e-8) = 9.999998, p = 1 - 0.09999998 = 0.90000002;
    # step 2: square_avg = 0.99 * 0.0025 + 0.0025 = 0.004975, sqrt = 0.0705336798983,
    #   buf = 0.9 * 9.999998 + 0.5 / (0.0705336798983 + 1e-8) = 16.0888092450587,
    #   p = 0.90000002 - 0.160888092450587
    ("rmsprop-momentum", RMSprop(lr=0.01, momentum=0.9), 2, 0.7391119275494087,
     {"square_avg": 0.004975, "momentum_buffer": 16.088809245058734}),
]


@pytest.mark.parametrize("name, hp, steps, expected, expected_state", HAND,
                         ids=[h[0] for h in HAND])
def test_steps_by_hand(be, dtype, to_device, to_host, assert_close, name, hp, steps, expected,
                       expected_state):
    params = to_device(np.ones(3))
    state = zero_state(be, hp, dtype, size=3)
    halted = be.zeros((1,), np.int64)
    for step in range(1, steps + 1):
        kernel_step(be, hp, params, to_device(np.full(3, 0.5)), state, step, halted)
    assert_close(to_host(params), np.full(3, expected))
    for buf, value in expected_state.items():
        assert_close(to_host(state[buf]), np.full(3, value), err_msg=buf)


# ====================================================================== through Optimizer.step
@pytest.mark.parametrize("cls, kwargs", CASES, ids=CASE_IDS)
def test_optimizer_object_drives_its_kernel(backend_name, cls, kwargs):
    """Optimizer.bind / step hand the model's flat params and grads, and the right state
    buffers in the right order, to the kernel, counting steps from 1."""
    model = bpkernels.MLP([3, 4, 2], activation="tanh", dtype="float64", backend=backend_name)
    be = model.backend
    opt = cls(**kwargs)
    opt.bind(model)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 3)), np.arange(6) % 2
    halted = be.zeros((1,), np.int64)
    p_ref, state_ref = be.to_host(model.params), {}
    for step in range(1, 4):
        model.loss_and_grads(X, y, "cross_entropy")  # fills model.grads
        g = be.to_host(model.grads)
        opt.step(model, halted)
        p_ref = reference_step(cls, kwargs, p_ref, g, state_ref)
        np.testing.assert_allclose(be.to_host(model.params), p_ref, rtol=1e-12, atol=1e-12,
                                   err_msg=f"step {step}")
    assert opt.step_count == 3


# ====================================================================== validation
@pytest.mark.parametrize("make", [
    lambda: SGD(lr=-0.1), lambda: Adam(lr=-1e-3), lambda: AdamW(lr=-1e-3),
    lambda: RMSprop(lr=-0.01), lambda: SGD(lr=float("nan")), lambda: Adam(lr=float("inf")),
    lambda: Adam(betas=(1.0, 0.999)), lambda: Adam(betas=(0.9, 1.0)),
    lambda: Adam(betas=(-0.1, 0.999)), lambda: AdamW(betas=(0.9, 1.5)),
    lambda: Adam(eps=-1e-8), lambda: Adam(weight_decay=-0.1),
    lambda: SGD(lr=0.1, nesterov=True),  # nesterov needs momentum
    lambda: SGD(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),  # ... and no dampening
    lambda: SGD(lr=0.1, momentum=-0.9), lambda: SGD(lr=0.1, weight_decay=-1.0),
    lambda: RMSprop(alpha=-0.5), lambda: RMSprop(momentum=-0.1), lambda: RMSprop(eps=-1.0),
], ids=["sgd-lr", "adam-lr", "adamw-lr", "rmsprop-lr", "lr-nan", "lr-inf", "beta1=1",
        "beta2=1", "beta1<0", "adamw-beta2>1", "adam-eps", "adam-wd", "nesterov-no-momentum",
        "nesterov-dampening", "sgd-momentum", "sgd-wd", "rmsprop-alpha", "rmsprop-momentum",
        "rmsprop-eps"])
def test_invalid_hyperparameters_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("make", [
    lambda: SGD(lr="0.1"), lambda: Adam(lr=None), lambda: AdamW(weight_decay=[0.1]),
    lambda: RMSprop(alpha="0.9"), lambda: SGD(lr=0.1, momentum=object()),
    lambda: Adam(betas=("0.9", 0.999)),
], ids=["sgd-lr-str", "adam-lr-none", "adamw-wd-list", "rmsprop-alpha-str", "sgd-momentum-obj",
        "adam-beta-str"])
def test_non_numbers_raise_type_error(make):
    with pytest.raises(TypeError):
        make()


def test_valid_edges_are_accepted():
    """The closed ends of the ranges torch allows: lr 0, beta 0, eps 0."""
    Adam(lr=0.0, betas=(0.0, 0.0), eps=0.0)
    SGD(lr=0.0, momentum=0.0)
    RMSprop(lr=0.0, alpha=0.0, eps=0.0)


# ====================================================================== torch.optim itself
def _torch_optimizer(torch, cls, kwargs, param):
    kw = dict(kwargs)
    if cls is SGD:
        return torch.optim.SGD([param], **kw)
    if cls is Adam:
        return torch.optim.Adam([param], **kw)
    if cls is AdamW:
        return torch.optim.AdamW([param], **kw)
    return torch.optim.RMSprop([param], **kw)


def test_steps_match_torch_optim(backend_name):
    """Skipped unless torch is installed (it is not a dependency): every case, several steps of
    torch.optim against the float64 kernels, which checks the reference's reading of torch."""
    torch = pytest.importorskip("torch")
    be = bpkernels.get_backend(backend_name)
    p0, grads = draws(np.float64, seed=3)
    for (cls, kwargs), case in zip(CASES, CASE_IDS):
        param = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
        opt_torch = _torch_optimizer(torch, cls, kwargs, param)
        hp = cls(**kwargs)
        params = be.asarray(p0, np.float64)
        state = zero_state(be, hp, np.float64)
        halted = be.zeros((1,), np.int64)
        for step, g in enumerate(grads, start=1):
            param.grad = torch.tensor(g, dtype=torch.float64)
            opt_torch.step()
            kernel_step(be, hp, params, be.asarray(g, np.float64), state, step, halted)
            np.testing.assert_allclose(be.to_host(params), param.detach().numpy(), rtol=1e-12,
                                       atol=1e-12, err_msg=f"{case}, step {step}")
