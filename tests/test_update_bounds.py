"""The Numba updates' bounds (backends/base.py ``bounds``): an update skips its check pass only
where bounds of |W|, of the state and of the gradient prove every new value finite. Against the
same update with its full check pass (no bounds) as the reference: over random hyper-parameters
and magnitudes up to overflow, the two write the same bits and latch the same steps, so the
bounds never let a non-finite value through; and on an ordinary run the check pass is skipped
(the bounds it keeps are propagated, not measured)."""
import math

import numpy as np
import pytest

import bpkernels as bpk

pytest.importorskip("numba")
from bpkernels.backends.base import BOUNDS  # noqa: E402
from bpkernels.backends.numba import optim  # noqa: E402
from bpkernels.backends.numba.backend import _hyper  # noqa: E402

RULES = {
    "sgd": lambda r: bpk.SGD(lr=_big(r), momentum=r.choice([0.0, 0.9]), weight_decay=r.choice(
        [0.0, 0.1]), nesterov=False),
    "sgd-nesterov": lambda r: bpk.SGD(lr=_big(r), momentum=0.5, nesterov=True),
    "adam": lambda r: bpk.Adam(lr=_big(r), eps=r.choice([0.0, 1e-12, 1e-8]),
                               weight_decay=r.choice([0.0, 0.01])),
    "adamw": lambda r: bpk.AdamW(lr=_big(r), eps=r.choice([0.0, 1e-8])),
    "rmsprop": lambda r: bpk.RMSprop(lr=_big(r), momentum=r.choice([0.0, 0.5]),
                                     eps=r.choice([0.0, 1e-8]), weight_decay=r.choice([0.0, 0.1])),
    "rmsprop-centered": lambda r: bpk.RMSprop(lr=_big(r), centered=True),
}


def _big(rng):
    """A learning rate from ordinary to one that overflows float32 or float64 updates."""
    return float(10.0 ** rng.choice([-3, -1, 2, 20, 36, 40, 300, 307]))


def _rule(name):
    return {"sgd": "sgd", "sgd-nesterov": "sgd", "adam": "adam", "adamw": "adam",
            "rmsprop": "rmsprop", "rmsprop-centered": "rmsprop"}[name]


def _run(rule, hp, p, g_steps, states, bounded):
    p, states = p.copy(), tuple(s.copy() for s in states)
    halted = np.zeros(1, np.int64)
    bounds = np.full(BOUNDS, np.inf) if bounded else None
    for step, g in enumerate(g_steps, start=1):
        optim.check_step(np.ones(1, p.dtype), g, step, halted, None, None, bounds)
        optim.optimizer_step(p, g, states, *_hyper(rule, hp), step, halted, None, None, bounds)
    return p, states, halted[0], bounds


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(RULES))
def test_bounded_updates_write_what_checked_updates_write(name, dtype):
    rng = np.random.default_rng(sum(map(ord, name)) + np.dtype(dtype).itemsize)
    huge = 3e38 if dtype == np.float32 else 1.7e308
    for case in range(60):
        hp = RULES[name](rng)
        n = 257
        scale = 10.0 ** rng.choice([-3, 0, 10, 19, 30, 150, 200])
        p = (rng.standard_normal(n) * rng.choice([0.1, 1e3, 1e18, 1e37])).astype(dtype)
        p[rng.integers(n)] = rng.choice([0.0, huge / 3])
        states = [np.abs(rng.standard_normal(n)).astype(dtype) * dtype(rng.choice([0.0, 1.0,
                                                                                  1e30]))
                  for _ in range(3)]
        with np.errstate(over="ignore", invalid="ignore"):
            g_steps = [(rng.standard_normal(n) * scale).astype(dtype) for _ in range(4)]
        for g in g_steps:
            np.nan_to_num(g, copy=False, posinf=huge, neginf=-huge)
        rule = _rule(name)
        want = _run(rule, hp, p, g_steps, states, bounded=False)
        got = _run(rule, hp, p, g_steps, states, bounded=True)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"case {case}: {hp}")
        for a, b in zip(got[1], want[1]):
            np.testing.assert_array_equal(a, b, err_msg=f"case {case}: {hp}")
        assert got[2] == want[2], f"case {case}: {hp}"
        assert np.isfinite(got[0]).all()


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_an_ordinary_run_skips_the_check_pass(name):
    """After the first step (bounds unknown: a full check, then bounds measured, powers of
    two), each step's bound of |W| is the previous one propagated through the rule (no longer a
    power of two): the check pass was skipped; and the bounds hold."""
    hp = {"sgd": bpk.SGD(lr=0.01, momentum=0.9), "adam": bpk.Adam(lr=1e-3),
          "rmsprop": bpk.RMSprop(lr=1e-3, momentum=0.5)}[name]
    rng = np.random.default_rng(0)
    p = (rng.standard_normal(1001) * 0.05).astype(np.float32)
    states = tuple(np.zeros(1001, np.float32) for _ in range(3))
    halted, bounds = np.zeros(1, np.int64), np.full(BOUNDS, np.inf)
    for step in range(1, 6):
        g = (rng.standard_normal(1001) * 0.01).astype(np.float32)
        optim.check_step(np.ones(1, np.float32), g, step, halted, None, None, bounds)
        assert bounds[4] >= np.abs(g).max()
        optim.optimizer_step(p, g, states, *_hyper(name, hp), step, halted, None, None, bounds)
        assert bounds[4] == np.inf  # used once
        assert math.frexp(bounds[0])[0] == 0.5 if step == 1 else math.frexp(bounds[0])[0] != 0.5
        assert np.abs(p).max() <= bounds[0]
        for state, bound in zip(states, bounds[1:4]):
            assert np.abs(state).max() <= bound
    assert halted[0] == 0


def test_fit_resets_the_bounds_every_epoch(monkeypatch):
    """A callback that scales the weights between epochs: the bounds kept from the epoch
    before would no longer hold; fit makes them unknown at each epoch's start, so the training
    still equals NumPy's (whose updates always check in full)."""
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((48, 6)), rng.integers(0, 3, 48)
    results = []
    for backend in ("numba", "numpy"):
        model = bpk.MLP([6, 9, 3], backend=backend, dtype="float64", seed=2)
        monkeypatch.setattr(model.backend, "train_epoch", lambda plan: False)

        def grow(epoch, record, model=model):
            model.set_weights([(W * 1e3, b) for W, b in model.get_weights()])
        bpk.fit(model, X, y, optimizer=bpk.Adam(lr=0.01), epochs=3, batch_size=16,
                callbacks=[grow])
        results.append(model.get_weights())
    for (W, b), (W2, b2) in zip(*results):
        np.testing.assert_allclose(W, W2, rtol=1e-12)
        np.testing.assert_allclose(b, b2, rtol=1e-12)


def test_the_epoch_kernels_updates_keep_bounds(monkeypatch):
    """The fused epoch's (non-fused) updates use the bounds too: after an Adam epoch its
    bounds hold and were propagated (the last step's check pass skipped), and training equals
    the kernel-by-kernel loop's."""
    from bpkernels.backends.numba import epoch
    kernel, outs = epoch.train_epoch, []

    def spy(*args):
        outs.append(args[3])
        return kernel(*args)
    monkeypatch.setattr(epoch, "train_epoch", spy)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((48, 6)), rng.integers(0, 3, 48)
    weights = []
    for fused in (True, False):
        model = bpk.MLP([6, 9, 3], backend="numba", dtype="float64", seed=2)
        if not fused:
            monkeypatch.setattr(model.backend, "train_epoch", lambda plan: False)
        bpk.fit(model, X, y, optimizer=bpk.Adam(lr=0.01), epochs=2, batch_size=16)
        weights.append(model.get_weights())
        if fused:
            bounds = outs[-1][3]
            assert math.frexp(bounds[0])[0] != 0.5
            assert np.abs(model.params).max() <= bounds[0]
            exp_avg, exp_avg_sq = (model.optimizer.state[k] for k in ("exp_avg", "exp_avg_sq"))
            assert np.abs(exp_avg).max() <= bounds[1] and exp_avg_sq.max() <= bounds[2]
    for (W, b), (W2, b2) in zip(*weights):
        np.testing.assert_allclose(W, W2, rtol=1e-12)
        np.testing.assert_allclose(b, b2, rtol=1e-12)
