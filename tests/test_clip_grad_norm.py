"""fit(clip_grad_norm=...) against a PyTorch training loop with torch.nn.utils.clip_grad_norm_
(a test-only reference): the same network, weights, batches and optimizer give the same weights
to 1e-12 relative in float64 on every backend, through the fused epoch and kernel by kernel,
with a max norm that clips every step and one that never does; float32 within its tolerance;
an overflowing norm is divergence; bad values are one clear error."""
import numpy as np
import pytest

import bpkernels as bpk

torch = pytest.importorskip("torch")

SIZES = (5, 7, 3)
N, BATCH, EPOCHS = 50, 16, 3   # 4 steps per epoch, the last one short


def _data(sizes=SIZES, n=N):
    rng = np.random.default_rng(7)
    return rng.normal(size=(n, sizes[0])) * 3, rng.integers(0, sizes[-1], n)


def _torch_fit(weights, X, y, make_opt, max_norm, epochs=EPOCHS, batch=BATCH,
               dtype=torch.float64):
    """The reference: torch's loop, clip_grad_norm_ between backward and step. Also returns the
    largest gradient norm met, to show whether the case clips."""
    layers = []
    for i, (W, b) in enumerate(weights):
        lin = torch.nn.Linear(*W.shape, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(W.T))
            lin.bias.copy_(torch.tensor(b))
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    opt = make_opt(net.parameters())
    Xt, yt = torch.tensor(X, dtype=dtype), torch.tensor(y)
    norms = []
    for _ in range(epochs):
        for start in range(0, len(X), batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(Xt[start:start + batch]),
                                                     yt[start:start + batch])
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)))
            opt.step()
    return [(lin.weight.detach().numpy().T, lin.bias.detach().numpy())
            for lin in net if isinstance(lin, torch.nn.Linear)], norms


OPTIMIZERS = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1), lambda: bpk.SGD(lr=0.1)),
    ("sgd-nesterov-wd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                                  weight_decay=0.01),
     lambda: bpk.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam-l2", lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.01),
     lambda: bpk.Adam(lr=0.02, weight_decay=0.01)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.02), lambda: bpk.AdamW(lr=0.02)),
    ("rmsprop-centered-momentum",
     lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.5),
     lambda: bpk.RMSprop(lr=0.01, centered=True, momentum=0.5)),
]


class _Spy:
    """Wraps a backend's train_epoch: records what it answered; ``decline`` makes it decline,
    so that fit runs kernel by kernel."""

    def __init__(self, monkeypatch, backend, decline):
        self.answers, original = [], backend.train_epoch

        def train_epoch(plan):
            answer = False if decline else original(plan)
            self.answers.append(answer)
            return answer
        monkeypatch.setattr(backend, "train_epoch", train_epoch)


@pytest.mark.parametrize("path", ["fused", "kernels"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clips", "does-not-clip"])
@pytest.mark.parametrize("name,torch_opt,our_opt", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_clipped_fit_trains_as_pytorch(monkeypatch, backend_name, path, max_norm, name,
                                       torch_opt, our_opt):
    X, y = _data()
    model = bpk.MLP(SIZES, backend=backend_name, dtype="float64", seed=3)
    want, norms = _torch_fit(model.get_weights(), X, y, torch_opt, max_norm)
    assert (min(norms) > max_norm) if max_norm < 1 else (max(norms) < max_norm)
    spy = _Spy(monkeypatch, model.backend, decline=path == "kernels")
    bpk.fit(model, X, y, optimizer=our_opt(), epochs=EPOCHS, batch_size=BATCH, shuffle=False,
            clip_grad_norm=max_norm)
    if path == "fused" and backend_name != "numpy":  # (NumPy has no fused epoch)
        assert spy.answers == [True] * EPOCHS
    else:
        assert not any(spy.answers)
    for (W, b), (Wt, bt) in zip(model.get_weights(), want):
        np.testing.assert_allclose(W, Wt, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, bt, rtol=1e-12, atol=1e-14)


# (not centered RMSprop's sqrt(sq - ga^2), whose cancellation turns the GEMMs' rounding of a
# 300-row sum into 1e-11 differences, clipping or not)
@pytest.mark.parametrize("name,torch_opt,our_opt", OPTIMIZERS[:3], ids=[o[0] for o in
                                                                        OPTIMIZERS[:3]])
def test_clipped_fit_of_a_large_model_trains_as_pytorch(monkeypatch, backend_name, name,
                                                         torch_opt, our_opt):
    """A model past the Numba epoch's BOUND_MIN_PARAMS (bounded weight gradients, SGD fused
    into the GEMM where not clipping): clipping needs the scan's sum of squares. On Numba with
    the BLAS pool whatever the cores, whose worker sums half the squares and writes a share
    of the update."""
    if backend_name == "numba":
        from bpkernels.backends.numba import backend as numba_backend
        if numba_backend.pool is not None and numba_backend.pool.available():
            monkeypatch.setattr(numba_backend.pool, "blas_threads", lambda: 2)
    sizes = (300, 220, 10)
    X, y = _data(sizes, 40)
    model = bpk.MLP(sizes, backend=backend_name, dtype="float64", seed=3)
    want, norms = _torch_fit(model.get_weights(), X, y, torch_opt, 0.5, epochs=2, batch=16)
    assert sum(n > 0.5 for n in norms) >= 3  # most steps clip
    bpk.fit(model, X, y, optimizer=our_opt(), epochs=2, batch_size=16, shuffle=False,
            clip_grad_norm=0.5)
    for (W, b), (Wt, bt) in zip(model.get_weights(), want):
        np.testing.assert_allclose(W, Wt, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, bt, rtol=1e-12, atol=1e-14)


def test_clipped_fit_in_float32_is_within_tolerance(backend_name):
    X, y = _data()
    model = bpk.MLP(SIZES, backend=backend_name, dtype="float32", seed=3)
    want, _ = _torch_fit([(W.astype(np.float32), b.astype(np.float32))
                          for W, b in model.get_weights()], X.astype(np.float32), y,
                         OPTIMIZERS[2][1], 0.5, dtype=torch.float32)
    bpk.fit(model, X, y, optimizer=OPTIMIZERS[2][2](), epochs=EPOCHS, batch_size=BATCH,
            shuffle=False, clip_grad_norm=0.5)
    for (W, b), (Wt, bt) in zip(model.get_weights(), want):
        np.testing.assert_allclose(W, Wt, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, bt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "kernels"])
def test_an_overflowing_norm_is_divergence(monkeypatch, backend_name, path):
    """Gradients of ~1e160 are finite, but their sum of squares is not: the step latches, and
    the weights stay those of the step before (not NaN, as a silent inf norm would make them:
    max_norm / inf scales every gradient to 0, then 0 * inf)."""
    X, y = _data()
    X[16:32] *= 1e160  # the second step's batch
    model = bpk.MLP(SIZES, backend=backend_name, dtype="float64", seed=3)
    _Spy(monkeypatch, model.backend, decline=path == "kernels")
    with pytest.raises(bpk.TrainingDiverged) as err:
        bpk.fit(model, X, y, optimizer=bpk.SGD(lr=1e-300), epochs=1, batch_size=BATCH,
                shuffle=False, clip_grad_norm=1.0)
    assert err.value.global_step == 2
    assert model.optimizer.step_count == 1
    assert all(np.isfinite(W).all() and np.isfinite(b).all() for W, b in model.get_weights())


@pytest.mark.parametrize("value,error,match", [
    (0, ValueError, r"clip_grad_norm must lie in \(0.0"),
    (-1.0, ValueError, r"clip_grad_norm must lie in \(0.0"),
    (float("nan"), ValueError, "clip_grad_norm must be finite"),
    (float("inf"), ValueError, "clip_grad_norm must be finite"),
    ("1", TypeError, "clip_grad_norm must be a number"),
    (True, TypeError, "clip_grad_norm must be a number"),
])
def test_bad_clip_values_are_one_clear_error(value, error, match):
    X, y = _data()
    with pytest.raises(error, match=match):
        bpk.fit(bpk.MLP(SIZES), X, y, epochs=1, clip_grad_norm=value)


def _numpy_fit(sizes, X, y, make_opt, max_norm, epochs, batch):
    """The NumPy backend's float64 weights (the tests above tie them to PyTorch's)."""
    model = bpk.MLP(sizes, backend="numpy", dtype="float64", seed=3)
    bpk.fit(model, X, y, optimizer=make_opt(), epochs=epochs, batch_size=batch, shuffle=False,
            clip_grad_norm=max_norm)
    return model.get_weights()


@pytest.mark.parametrize("path", ["fused", "kernels"])
def test_numba_parallel_passes_clip_as_pytorch(monkeypatch, path):
    """The Numba backend's parallel passes (made to run on small buffers): the chunked sum of
    squares and the chunked update, in the epoch kernel and kernel by kernel."""
    numba = pytest.importorskip("numba")
    from bpkernels.backends.numba import backend as numba_backend, epoch
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: the kernels run serially")
    monkeypatch.setattr(numba_backend, "PARALLEL_MIN", 8)
    pars, kernel = [], epoch.train_epoch

    def spy(*args):
        pars.append(args[-7])  # (par; clip, rates, drop, norm and mixed come last)
        return kernel(*args)
    monkeypatch.setattr(epoch, "train_epoch", spy)
    X, y = _data()
    model = bpk.MLP(SIZES, backend="numba", dtype="float64", seed=3)
    _Spy(monkeypatch, model.backend, decline=path == "kernels")
    bpk.fit(model, X, y, optimizer=OPTIMIZERS[1][2](), epochs=EPOCHS, batch_size=BATCH,
            shuffle=False, clip_grad_norm=0.5)
    assert (set(pars) == {8}) if path == "fused" else not pars
    want = _numpy_fit(SIZES, X, y, OPTIMIZERS[1][2], 0.5, EPOCHS, BATCH)
    for (W, b), (Wt, bt) in zip(model.get_weights(), want):
        np.testing.assert_allclose(W, Wt, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, bt, rtol=1e-12, atol=1e-14)


_PLAIN_FIT = """
import json, sys, numpy as np, bpkernels as bpk
from bpkernels.backends.numba import jit
sys.path.insert(0, sys.argv[1])
import test_clip_grad_norm as t
out = {"mode": jit.MODE}
for key, sizes, n in (("small", t.SIZES, t.N), ("large", (300, 220, 10), 40)):
    X, y = t._data(sizes, n)
    model = bpk.MLP(sizes, backend="numba", dtype="float64", seed=3)
    bpk.fit(model, X, y, optimizer=t.OPTIMIZERS[2][2](), epochs=2, batch_size=16, shuffle=False,
            clip_grad_norm=0.5)
    out[key] = [a.tolist() for W, b in model.get_weights() for a in (W, b)]
print(json.dumps(out))
"""


def test_numba_plain_mode_clips_as_pytorch(tmp_path):
    """BPK_NUMBA_NATIVE=0 (chosen at import: a Python of its own): a small model's fused epoch
    and a large model's kernels (plain mode runs no fused epoch for it) clip alike."""
    pytest.importorskip("numba")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, BPK_NUMBA_NATIVE="0", OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _PLAIN_FIT, str(Path(__file__).parent)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["mode"] == "plain"
    for key, sizes, n in (("small", SIZES, N), ("large", (300, 220, 10), 40)):
        X, y = _data(sizes, n)
        want = _numpy_fit(sizes, X, y, OPTIMIZERS[2][2], 0.5, 2, 16)
        for a, b in zip(got[key], [a for W, b in want for a in (W, b)]):
            np.testing.assert_allclose(np.array(a), b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_sum_of_squares_and_the_bound_it_gives_the_update(dtype):
    """check_step's sum of squares on the Numba backend (in vector lanes) against math.fsum of
    the exact squares, and the bound on every |g| it leaves the update under clipping
    (optim.norm_bound: no pass of its own), on vectors where that bound is tightest: one
    non-zero element, equal elements, and random ones of every length up to a few vector
    widths; a norm that overflows leaves the bound unknown (inf)."""
    pytest.importorskip("numba")
    import math
    from bpkernels.backends.numba import optim

    rng = np.random.default_rng(1)
    cases = [np.eye(1, 41, 17, dtype=dtype)[0] * dtype(3.5e18), np.full(64, 0.1, dtype),
             np.array([np.sqrt(np.finfo(dtype).max) / 4], dtype)]
    cases += [rng.standard_normal(n).astype(dtype) * 10.0 ** rng.integers(-5, 5) for n in
              range(1, 70)]
    loss, halted = np.zeros(1, dtype), np.zeros(1, np.int64)
    for g in cases:
        clip, bounds = np.array([0.0, 1.0]), np.full(5, np.inf)
        optim.check_step(loss, g, 1, halted, None, clip, bounds)
        exact = math.fsum(float(v) * float(v) for v in g.astype(np.float64))
        assert abs(clip[0] - exact) <= g.size * 2.0 ** -52 * exact
        assert float(np.abs(g).max()) <= bounds[4] < math.inf
    assert halted[0] == 0
    clip, bounds = np.array([0.0, 1.0]), np.full(5, 2.0)
    optim.check_step(loss, np.array([1e300, 1e300]), 1, halted, None, clip, bounds)
    assert halted[0] == 1 and bounds[4] == math.inf
