"""The divergence latch covers the update itself (issue 18 items 1 and 3): a step whose update
would write a NaN or inf weight or optimizer state value is not applied at all, on every
backend, per kernel and in the fused epoch paths; a checkpoint is never written with weights
that load() refuses; the CLI's exit-3 path saves the last finite weights, under MPI too.

The reference of a diverged run is the same training stopped by hand at the last finite step:
the first epoch at a sane learning rate, then the steps of the second epoch that came before
the one reported, replayed with the huge rate (same backend, same path: bit for bit).
"""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import checkpoint, cli
from bpkernels.backends.base import Backend

BACKENDS = bpk.available_backends()
VARIANTS = {
    "sgd": lambda lr: bpk.SGD(lr=lr),
    "sgd-momentum": lambda lr: bpk.SGD(lr=lr, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": lambda lr: bpk.SGD(lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: bpk.Adam(lr=lr),
    "adamw": lambda lr: bpk.AdamW(lr=lr, weight_decay=0.01),
    "rmsprop": lambda lr: bpk.RMSprop(lr=lr),
    "rmsprop-centered": lambda lr: bpk.RMSprop(lr=lr, centered=True, momentum=0.5),
}
# float32 overflows at lr 1e38 (a gradient above ~3.4) and at 1e300 (lr itself is inf in
# float32); float64 at 1e300 only through the next step's loss, at 1e308 in the update.
RATES = [("float32", 1e38), ("float32", 1e300), ("float64", 1e300), ("float64", 1e308)]
N, BATCH, SANE_LR = 40, 8, 1e-2


def _paths(backend):
    # the NumPy backend has no fused epoch
    return ["kernels"] if backend == "numpy" else ["fused", "kernels"]


CASES = [pytest.param(b, p, id=f"{b}-{p}") for b in BACKENDS for p in _paths(b)]


def _data(zero_column=False):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, N)
    X = rng.standard_normal((N, 5)) + 2.0 * np.eye(3, 5)[y]
    if zero_column:
        X[:, 2] = 0.0
    return X, y


def _per_kernel(monkeypatch, backend, path):
    if path == "kernels":
        monkeypatch.setattr(type(bpk.get_backend(backend)), "train_epoch", Backend.train_epoch)


def _snapshot(model):
    opt = model.optimizer
    state = {name: model.backend.to_host(buf) for name, buf in opt.state.items()
             if buf is not None}
    return model.backend.to_host(model.params), state, opt.step_count


def _assert_same(run, reference):
    (params, state, count), (params2, state2, count2) = run, reference
    assert count == count2
    np.testing.assert_array_equal(params, params2)
    assert state.keys() == state2.keys()
    for name in state:
        np.testing.assert_array_equal(state[name], state2[name], err_msg=name)


def _assert_finite_and_saves(model, tmp_path):
    params, state, _ = _snapshot(model)
    assert np.isfinite(params).all()
    assert all(np.isfinite(buf).all() for buf in state.values())
    model.save(tmp_path / "diverged.npz")
    loaded = bpk.load(tmp_path / "diverged.npz", backend="numpy")
    np.testing.assert_array_equal(loaded.backend.to_host(loaded.params), params)


@pytest.mark.parametrize("backend, path", CASES)
@pytest.mark.parametrize("dtype, lr", RATES, ids=[f"{d}-{lr:g}" for d, lr in RATES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_diverged_run_keeps_the_last_finite_step(monkeypatch, tmp_path, backend, path, dtype,
                                                   lr, variant):
    _per_kernel(monkeypatch, backend, path)
    X, y = _data()

    def make():
        return bpk.MLP([5, 7, 3], backend=backend, dtype=dtype, seed=0), VARIANTS[variant](SANE_LR)

    model, opt = make()
    with pytest.raises(bpk.TrainingDiverged) as info:
        bpk.fit(model, X, y, optimizer=opt, epochs=4, batch_size=BATCH,
                callbacks=[lambda epoch, record: setattr(opt, "lr", lr)])
    err = info.value
    assert err.epoch == 2 and model.epochs_trained == 1
    assert opt.step_count == err.global_step - 1
    _assert_finite_and_saves(model, tmp_path)

    replay, opt2 = make()
    bpk.fit(replay, X, y, optimizer=opt2, epochs=1, batch_size=BATCH)
    opt2.lr = lr
    rows = (err.step - 1) * BATCH
    if rows:  # the second epoch's steps before the reported one, in that epoch's order
        order = np.random.default_rng([0, 1]).permutation(N)[:rows]
        bpk.fit(replay, X[order], y[order], optimizer=opt2, epochs=1, batch_size=BATCH,
                shuffle=False)
    _assert_same(_snapshot(model), _snapshot(replay))


@pytest.mark.parametrize("backend, path", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_without_eps_on_a_constant_feature_halts_before_writing(monkeypatch, tmp_path,
                                                                      backend, path, dtype):
    """eps = 0 and a feature that is 0 in every row: that column's dW is 0, so m = v = 0 and
    the update is 0 / 0. The first step halts, and nothing was written."""
    _per_kernel(monkeypatch, backend, path)
    X, y = _data(zero_column=True)
    model = bpk.MLP([5, 7, 3], backend=backend, dtype=dtype, seed=0)
    initial = model.backend.to_host(model.params)
    with pytest.raises(bpk.TrainingDiverged) as info:
        bpk.fit(model, X, y, optimizer=bpk.Adam(lr=1e-3, eps=0.0), epochs=2, batch_size=BATCH)
    assert info.value.global_step == 1
    params, state, count = _snapshot(model)
    assert count == 0
    np.testing.assert_array_equal(params, initial)
    for name, buf in state.items():
        np.testing.assert_array_equal(buf, 0.0, err_msg=name)
    _assert_finite_and_saves(model, tmp_path)


@pytest.mark.parametrize("mode", ["bound", "pool"])
@pytest.mark.parametrize("lr", [1e38, 1e300])
def test_the_numba_sgd_update_fused_into_the_gemm_never_writes_an_overflow(monkeypatch, mode,
                                                                           lr, numba_large_path):
    """Large models' plain SGD updates W inside dW's GEMM, before anything could check the
    result: it must only do so where the new weights are sure to be finite. Against the
    per-kernel loop (which the fused GEMM's rounding of dW leaves ~1e-6 apart)."""
    pytest.importorskip("numba")
    from bpkernels.backends.numba.jit import NATIVE
    if NATIVE is None:
        pytest.skip("the bound and the fused update are native mode only")
    X, y = _data()
    results = []
    for path in ("fused", "kernels"):
        with monkeypatch.context() as patch:
            numba_large_path(patch, mode)
            _per_kernel(patch, "numba", path)
            model = bpk.MLP([5, 7, 3], backend="numba", dtype="float32", seed=0)
            opt = bpk.SGD(lr=0.1, weight_decay=0.01)
            with pytest.raises(bpk.TrainingDiverged) as info:
                bpk.fit(model, X, y, optimizer=opt, epochs=4, batch_size=BATCH,
                        callbacks=[lambda epoch, record: setattr(opt, "lr", lr)])
            results.append((info.value.global_step, *_snapshot(model)))
    (step, params, _, count), (step2, params2, _, count2) = results
    assert (step, count) == (step2, count2) == (step, step - 1)
    assert np.isfinite(params).all()
    np.testing.assert_allclose(params, params2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["sgd", "adam", "rmsprop"])
@pytest.mark.parametrize("par", [None, 100], ids=["serial", "parallel"])
def test_the_numba_update_of_one_overflowing_element_writes_nothing(rule, par):
    """One element among 1001 (in the middle of a chunk where the update runs in parallel)
    whose new weight (SGD: 1e30 x 1e10) or new state (Adam's exp_avg_sq and RMSprop's
    square_avg: 1e20 squared; the weight itself stays finite) overflows float32."""
    pytest.importorskip("numba")
    from bpkernels.backends.numba import optim
    from bpkernels.backends.numba.backend import _hyper
    hp = {"sgd": bpk.SGD(lr=1e10, momentum=0.9), "adam": bpk.Adam(lr=0.01),
          "rmsprop": bpk.RMSprop(lr=0.01, momentum=0.5, centered=True)}[rule]
    rng = np.random.default_rng(2)
    p, g = rng.standard_normal((2, 1001)).astype(np.float32) * 1e-3
    states = tuple(np.zeros(1001, np.float32) for _ in range(3))
    halted = np.zeros(1, np.int64)
    optim.optimizer_step(p, g, states, *_hyper(rule, hp), 1, halted, par, None, None)  # finite
    assert halted[0] == 0
    before = [a.copy() for a in (p, *states)]
    g[777] = 1e30 if rule == "sgd" else 1e20
    optim.optimizer_step(p, g, states, *_hyper(rule, hp), 2, halted, par, None, None)
    assert halted[0] == 2
    for a, b in zip((p, *states), before):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_save_refuses_weights_that_load_refuses_and_keeps_the_file(tmp_path, bad):
    model = bpk.MLP([3, 4, 2], dtype="float64", seed=0)
    path = tmp_path / "model.npz"
    with pytest.raises(checkpoint.CheckpointError, match="nothing was written"):
        _spoiled(model, bad).save(path)
    assert list(tmp_path.iterdir()) == []
    model = bpk.MLP([3, 4, 2], dtype="float64", seed=0)
    model.save(path)
    before = path.read_bytes()
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"1 of the 26 weights \('params'\) are NaN or inf, which load\(\) refuses; "
                             r".*model.npz was left as it was"):
        _spoiled(model, bad).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]  # no temporary file


def _spoiled(model, bad):
    params = model.backend.to_host(model.params)
    params[5] = bad
    model.backend.copy(model.backend.asarray(params), model.params)
    return model


# ------------------------------------------------------------------------------ the CLI
def _assert_one_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpk: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_cli_divergence_saves_loadable_last_finite_weights(capsys, tmp_path, monkeypatch,
                                                           optimizer):
    """Issue 18 item 1, its commands as written."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--epochs", "1", "--layers", "16", "--backend", "numpy",
                     "--save", "ck.npz", "--quiet"]) == 0
    good = bpk.load("ck.npz")
    code = cli.main(["train", "--resume", "ck.npz", "--save", "ck.npz", "--optimizer", optimizer,
                     "--lr", "1e300", "--epochs", "2", "--quiet"])
    assert code == cli.EXIT_DIVERGED
    line = _assert_one_error(capsys.readouterr().err)
    assert "the last finite weights were saved to ck.npz" in line
    kept = bpk.load("ck.npz")  # load() refuses non-finite weights
    for (W, b), (W2, b2) in zip(kept.get_weights(), good.get_weights()):
        np.testing.assert_array_equal(W, W2)  # lr 1e300 is inf in float32: the first step
        np.testing.assert_array_equal(b, b2)  # halts, and changed nothing


def test_cli_divergence_with_unsaveable_weights_keeps_the_previous_file(capsys, tmp_path,
                                                                        monkeypatch):
    """Should a backend ever leave non-finite weights, the previous checkpoint stays and the
    one line says so."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--epochs", "1", "--layers", "16", "--backend", "numpy",
                     "--save", "ck.npz", "--quiet"]) == 0
    before = (tmp_path / "ck.npz").read_bytes()
    numpy_backend = type(bpk.get_backend("numpy"))

    def unlatched(self, rule, params, grads, states, hp, step, halted, clip=None):
        rule(params, grads, *states, hp, step)  # the update without its check

    monkeypatch.setattr(numpy_backend, "_latched", unlatched)
    code = cli.main(["train", "--resume", "ck.npz", "--save", "ck.npz", "--optimizer", "sgd",
                     "--lr", "1e300", "--epochs", "2", "--quiet"])
    assert code == cli.EXIT_DIVERGED
    line = _assert_one_error(capsys.readouterr().err)
    assert "training diverged" in line and "ck.npz was left as it was" in line
    assert (tmp_path / "ck.npz").read_bytes() == before


def test_cli_divergence_under_mpiexec_saves_loadable_weights(tmp_path):
    import test_mpi
    ck = tmp_path / "ck.npz"
    done = test_mpi.launch(2, *test_mpi.bpk_command(), "train", "--epochs", "1", "--layers",
                           "16", "--backend", "numpy", "--save", ck, "--quiet")
    assert done.returncode == 0, done.stderr
    good = bpk.load(ck)
    done = test_mpi.launch(2, *test_mpi.bpk_command(), "train", "--resume", ck, "--save", ck,
                           "--optimizer", "adam", "--lr", "1e300", "--epochs", "2", "--quiet")
    assert done.returncode == cli.EXIT_DIVERGED, done.stderr
    line = _assert_one_error(done.stderr)  # rank 0's line alone
    assert f"the last finite weights were saved to {ck}" in line
    kept = bpk.load(ck)
    for (W, b), (W2, b2) in zip(kept.get_weights(), good.get_weights()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
