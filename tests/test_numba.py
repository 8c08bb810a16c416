"""What is specific to the Numba backend (the rest of the suite runs on it like on any backend):
the whole-epoch kernel against the per-kernel loop, the parallel kernels against the serial
ones, threads, the compile flags, and that "auto" picks it on a CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels.backends.base import Backend

pytest.importorskip("numba")
pytest.importorskip("scipy")
from bpkernels.backends.numba import kernels as K  # noqa: E402
from bpkernels.backends.numba import backend as numba_backend  # noqa: E402
from bpkernels.backends.numba.backend import NumbaBackend  # noqa: E402

JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")

OPTIMIZERS = {
    "sgd": lambda: bpk.SGD(lr=0.1),
    # plain SGD: the epoch kernel updates W inside dW's GEMM (W = (1 - lr wd) W - lr dW)
    "sgd-wd": lambda: bpk.SGD(lr=0.1, weight_decay=0.05),
    "sgd-momentum-dampening-wd": lambda: bpk.SGD(lr=0.05, momentum=0.8, dampening=0.1,
                                                 weight_decay=0.01),
    "sgd-nesterov": lambda: bpk.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "adam-l2": lambda: bpk.Adam(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
    "adamw": lambda: bpk.AdamW(lr=0.01),
    "rmsprop": lambda: bpk.RMSprop(lr=0.01),
    "rmsprop-centered-momentum-wd": lambda: bpk.RMSprop(lr=0.005, momentum=0.5, centered=True,
                                                        weight_decay=0.01),
}
# (loss, outputs, targets): every target kind the epoch kernel handles
LOSSES = {
    "cross_entropy-labels": ("cross_entropy", 3, "labels"),
    "cross_entropy-probs": ("cross_entropy", 3, "probs"),
    "binary_cross_entropy": ("binary_cross_entropy", 1, "binary"),
    "mse": ("mse", 2, "values"),
}


def _problem(kind: str, outputs: int, n: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    if kind == "labels":
        y = rng.integers(0, outputs, n)
    elif kind == "probs":
        y = rng.dirichlet(np.ones(outputs), n)
    elif kind == "binary":
        y = (X[:, 0] > 0).astype(float)
    else:
        y = X[:, :outputs] @ rng.standard_normal((outputs, outputs))
    return X, y


def _train(per_kernel: bool, monkeypatch, make_opt, loss, outputs, kind, dtype="float64",
           epochs=3, activation=("tanh", "gelu"), bound=False, pool=False):
    """A 5-7-6-k model trained for a few epochs of batches of 16 (the last one 2 rows), by the
    epoch kernel or, with ``per_kernel``, by train.py's loop of kernel calls. ``bound``: the
    epoch kernel bounds the weight gradients (and fuses plain SGD into their GEMM) as it does
    for large models only."""
    with monkeypatch.context() as patch:
        patch.setattr(numba_backend, "BOUND_MIN_PARAMS", 0 if bound else 1 << 62)
        _use_pool(patch, pool)
        if per_kernel:
            patch.setattr(NumbaBackend, "train_epoch", Backend.train_epoch)
        X, y = _problem(kind, outputs)
        model = bpk.MLP([5, 7, 6, outputs], activation=list(activation), backend="numba",
                        dtype=dtype, seed=1)
        history = bpk.fit(model, X, y, loss=loss, optimizer=make_opt(), epochs=epochs,
                          batch_size=16, seed=4)
    return model, history


def _use_pool(patch, pool):
    """With ``pool``, the epoch kernel shares its gathers with a worker thread of
    _numba_pool (which then runs BLAS's parallel jobs for the rest of the process), whatever
    BLAS's thread count; without, it gathers alone."""
    patch.setattr(numba_backend, "POOL_MIN_PARAMS", 0 if pool else 1 << 62)
    if pool:
        if not numba_backend.pool.available():
            pytest.skip("no BLAS thread callback here (NumPy's OpenBLAS < 0.3.28 or not Linux)")
        patch.setattr(numba_backend.pool, "blas_threads", lambda: 2)


def _assert_same_training(fused, per_kernel, rtol):
    (m1, h1), (m2, h2) = fused, per_kernel
    close = dict(rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(h1["loss"], h2["loss"], **close)
    if "accuracy" in h1.epochs[0]:
        assert h1["accuracy"] == h2["accuracy"]
    np.testing.assert_allclose(m1.params, m2.params, **close, err_msg="weights")
    np.testing.assert_allclose(m1.grads, m2.grads, **close, err_msg="last step's gradients")
    assert m1.optimizer.step_count == m2.optimizer.step_count
    assert set(m1.optimizer.state) == set(m2.optimizer.state)
    for name, buf in m1.optimizer.state.items():
        np.testing.assert_allclose(buf, m2.optimizer.state[name], **close, err_msg=name)


# ====================================================================== the epoch kernel
def test_the_epoch_kernel_runs(monkeypatch):
    """fit() on the Numba backend takes the one-call path (not the per-kernel fallback)."""
    calls = []
    original = NumbaBackend.train_epoch

    def spy(self, plan):
        done = original(self, plan)
        calls.append(done)
        return done

    monkeypatch.setattr(NumbaBackend, "train_epoch", spy)
    _train(False, monkeypatch, OPTIMIZERS["sgd"], *LOSSES["cross_entropy-labels"], epochs=2)
    assert calls == [True, True]


@pytest.mark.parametrize("mode", ["scan", "bound", "pool"])
@pytest.mark.parametrize("loss_case", LOSSES)
@pytest.mark.parametrize("opt_case", OPTIMIZERS)
def test_epoch_kernel_matches_the_per_kernel_loop(monkeypatch, opt_case, loss_case, mode):
    """Same weights, gradients, optimizer state, per-epoch loss and accuracy after three epochs
    (shuffled, a partial last batch), float64 to 1e-12: the two paths run the same kernels
    (with the bound, plain SGD's update inside dW's GEMM rounds dW no more: still 1e-12; with
    the pool, a worker thread gathers part of each batch)."""
    args = (OPTIMIZERS[opt_case], *LOSSES[loss_case])
    fused = _train(False, monkeypatch, *args, bound=mode != "scan", pool=mode == "pool")
    _assert_same_training(fused, _train(True, monkeypatch, *args), rtol=1e-12)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: the parallel passes run serially")
@pytest.mark.parametrize("mode", ["scan", "bound"])
def test_epoch_kernel_with_parallel_passes_matches_the_per_kernel_loop(monkeypatch, mode):
    """Where the work is large enough (here: made so), the epoch kernel runs the parallel
    passes: dZ's per-chunk column sums (the one pass that allocates, a helper of its own: the
    epoch kernel itself is compiled without reference counting) and the chunked update."""
    import numba
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: the kernels run serially")
    monkeypatch.setattr(numba_backend, "PARALLEL_MIN", 8)
    pars, kernel = [], K.train_epoch

    def spy(*args):
        pars.append(args[-2])
        return kernel(*args)

    monkeypatch.setattr(K, "train_epoch", spy)
    args = (OPTIMIZERS["adam-l2"], *LOSSES["cross_entropy-labels"])
    fused = _train(False, monkeypatch, *args, bound=mode == "bound")
    assert pars and set(pars) == {8}
    _assert_same_training(fused, _train(True, monkeypatch, *args), rtol=1e-12)


@pytest.mark.parametrize("pool", [False, True], ids=["alone", "pool"])
@pytest.mark.parametrize("activation", [("relu", "leaky_relu"), ("sigmoid", "identity")])
def test_epoch_kernel_matches_in_float32(monkeypatch, activation, pool):
    args = (OPTIMIZERS["adamw"], *LOSSES["cross_entropy-labels"])
    kw = dict(dtype="float32", activation=activation, bound=pool, pool=pool)
    _assert_same_training(_train(False, monkeypatch, *args, **kw),
                          _train(True, monkeypatch, *args, **kw), rtol=1e-5)


@pytest.mark.parametrize("mode", ["scan", "bound", "pool"])
def test_epoch_kernel_divergence_latches_like_the_per_kernel_loop(monkeypatch, mode):
    """check_step runs before every update: the same step is reported and the same (last
    finite) weights are kept (with ``bound``, no update is fused into a step that diverges)."""
    results = []
    for per_kernel in (False, True):
        with monkeypatch.context() as patch:
            patch.setattr(numba_backend, "BOUND_MIN_PARAMS", 0 if mode != "scan" else 1 << 62)
            _use_pool(patch, mode == "pool")
            if per_kernel:
                patch.setattr(NumbaBackend, "train_epoch", Backend.train_epoch)
            X, y = _problem("values", 1, n=64)
            model = bpk.MLP([5, 16, 1], backend="numba", dtype="float32", seed=0)
            with pytest.raises(bpk.TrainingDiverged) as info:
                bpk.fit(model, X, y * 1e3, loss="mse", optimizer=bpk.SGD(lr=10.0), epochs=50,
                        batch_size=8)
            results.append((info.value.global_step, model.optimizer.step_count,
                            model.backend.to_host(model.params)))
    (step, count, params), (step2, count2, params2) = results
    assert (step, count) == (step2, count2) and count == step - 1
    assert np.isfinite(params).all()
    if mode == "scan":
        np.testing.assert_array_equal(params, params2)
    else:
        # plain SGD's update inside dW's GEMM rounds once less, by the BLAS kernel's rules:
        # bit for bit on some CPUs, ~4e-6 apart here on others once the weights near 1e11
        np.testing.assert_allclose(params, params2, rtol=2e-5)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_bound_on_weight_gradients_sees_every_column_and_every_inf_or_nan(dtype):
    """The epoch kernel skips check_step's scan of dW (and fuses plain SGD's update into its
    GEMM) when max column sum |X| * max column sum |dZ| is small: each must be an upper bound,
    and inf wherever an inf or a NaN could reach dW."""
    import numba

    from bpkernels.backends.numba import kernels as K

    @numba.njit
    def largest(M, sums):
        return K._abs_column_sums_max(M, sums)

    rng = np.random.default_rng(5)
    M = rng.standard_normal((9, 6)).astype(dtype)
    sums = np.empty(8, dtype)
    expected = np.abs(M.astype(np.float64)).sum(axis=0).max()
    assert largest(M, sums) == pytest.approx(expected, rel=1e-6)
    X, dZ = rng.standard_normal((9, 4)), rng.standard_normal((9, 3))
    bound = np.abs(X).sum(axis=0).max() * np.abs(dZ).sum(axis=0).max()
    assert np.abs(X.T @ dZ).max() <= bound
    for bad in (np.nan, np.inf, -np.inf):
        for column in (0, 5):
            spoiled = M.copy()
            spoiled[4, column] = bad
            assert largest(spoiled, sums) == np.inf, (bad, column)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["small", "first-layer-large", "hidden-large", "nan", "inf"])
def test_backward_bounds_the_weight_gradients_layer_by_layer(dtype, case):
    """_backward's verdict that every dW is finite (the sums of |dZ| and |A| come from the pass
    that forms dZ) against the bound computed in float64 NumPy, layer by layer: the first
    layer's |X| sums as rows * the largest |x|, the others' from the layer below's A."""
    import numba

    sizes, rows = (6, 5, 4, 3), 8
    rng = np.random.default_rng(11)
    layers, a_size, _ = K.layer_table(sizes, ("relu", "tanh", "identity"), rows)
    params = rng.standard_normal(int(layers[-1, 3] + sizes[-1])).astype(dtype)
    A, dA = np.zeros(a_size, dtype), np.zeros(a_size, dtype)
    views = []
    for i, o, w, _, _, a, _ in layers:
        views.append((params[w:w + i * o].reshape(i, o), A[a:a + rows * o].reshape(rows, o),
                      dA[a:a + rows * o].reshape(rows, o)))
    big = {"float32": (1e18, 1e22, 1e37), "float64": (1e150, 1e160, 1e306)}[dtype]
    scale = {"first-layer-large": (1.0, big[0]), "hidden-large": (big[2], 1e3)}.get(case, (1, 1))
    top_A, top_dA = views[2][1], views[2][2]
    top_A[:] = rng.standard_normal(top_A.shape)
    top_dA[:] = rng.standard_normal(top_dA.shape) * scale[1]
    views[0][1][:] = np.abs(rng.standard_normal((rows, 5))) * scale[0]  # relu outputs
    views[1][1][:] = np.tanh(rng.standard_normal((rows, 4)))
    if case in ("nan", "inf"):
        views[0][1][3, 2] = np.nan if case == "nan" else np.inf
    X = rng.standard_normal((rows, 6)).astype(dtype)
    input_bound = rows * float(np.abs(X).max()) * (big[1] if case == "first-layer-large" else 1)
    limit = {np.float32: 3.4e38, np.float64: 1.79e308}[np.dtype(dtype).type] / 2

    # float64 reference: dZ top down, then max column sum |X| * max column sum |dZ| per layer
    derivative = (lambda a: (a > 0).astype(float), lambda a: 1 - a * a, lambda a: np.ones_like(a))
    dZ, sure, upstream = [None] * 3, True, top_dA.astype(np.float64)
    for layer in (2, 1, 0):
        W, A_l, _ = views[layer]
        with np.errstate(invalid="ignore", over="ignore"):
            dZ[layer] = upstream * derivative[layer](A_l.astype(np.float64))
            upstream = dZ[layer] @ W.astype(np.float64).T
            x_sums = input_bound if layer == 0 else \
                np.abs(views[layer - 1][1].astype(np.float64)).sum(axis=0).max()
            bound = x_sums * np.abs(dZ[layer]).sum(axis=0).max()
        sure = sure and bound <= limit * 0.99
    if case == "small":
        assert sure
    elif case in ("nan", "inf"):
        assert not sure
    # the test's scales put each layer's bound far from the limit, on either side
    assert case not in ("first-layer-large", "hidden-large") or not sure

    @numba.njit
    def backward(net, work, rows, sums, input_bound, kinds):
        return K._backward(net, work, rows, None, kinds, sums, input_bound)

    @numba.njit
    def backward_scan(net, work, rows, kinds):
        return K._backward_scan(net, work, rows, None, kinds)

    net = (params, np.zeros_like(params), layers)
    work = (X, A, dA, np.zeros(0, dtype))
    kinds = K.activation_kinds(K.ACTIVATION_CODES[a] for a in ("relu", "tanh"))
    dA_before = dA.copy()
    finite, verdict = backward(net, work, rows, np.empty(12, dtype), input_bound, kinds)
    # (an inf in A reaches dW only: relu'(inf) = 1 keeps dZ and db finite; a NaN reaches db)
    assert verdict == sure and finite == (case != "nan")
    if case == "small":  # dZ of every layer formed in place, in the dtype
        for layer in (2, 1, 0):
            np.testing.assert_allclose(views[layer][2], dZ[layer], rtol=1e-4, atol=1e-5)
    # a small model's backward (no bound, so no verdict) forms the same dZ, dX and db
    dA_bound, db_bound = dA.copy(), net[1].copy()
    dA[:] = dA_before
    assert backward_scan(net, work, rows, kinds) == finite
    np.testing.assert_array_equal(dA, dA_bound)
    np.testing.assert_array_equal(net[1], db_bound)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_gather_finds_the_largest_magnitude_and_every_inf_or_nan(dtype):
    """The first layer's bound is rows * the largest |x| of the batch, found by the gather on
    the floats' bits: it must copy every bit and see negative values, infs and NaNs."""
    import numba

    from bpkernels.backends.numba import kernels as K

    @numba.njit
    def gather(src, index, dst, scratch):  # no worker: this thread alone
        return K._gather_shared(0, src, index, 0, index.size, dst, scratch)

    rng = np.random.default_rng(6)
    src = rng.standard_normal((40, 7)).astype(dtype)
    src[3, 2] = -7.5  # the largest magnitude, negative
    src[5, 1] = -0.0
    scratch = np.empty(1, dtype)
    for rows in (9, 8, 1):  # four rows at a time, then the rest
        index = rng.permutation(40)[:rows]
        index[0] = 3
        dst = np.full((rows, 7), 99, dtype)
        assert gather(src, index, dst, scratch) == 7.5
        assert dst.tobytes() == src[index].tobytes()
    index = np.array([0, 1, 2, 3, 4])
    assert gather(src, index, np.empty((5, 7), dtype), scratch) == 7.5
    for bad, expected in ((np.inf, np.inf), (-np.inf, np.inf), (np.nan, np.nan)):
        for row in range(5):  # each of the four-row loop's maxima, then the rest
            spoiled = src.copy()
            spoiled[row, 6] = bad
            found = gather(spoiled, index, np.empty((5, 7), dtype), scratch)
            np.testing.assert_equal(found, expected, err_msg=f"{bad} in row {row}")
    # The bound it stands for: rows * largest |x| >= every column sum of |X|.
    assert len(index) * 7.5 >= np.abs(src[index].astype(np.float64)).sum(axis=0).max()


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_gather_shared_with_the_pool_copies_every_row_and_sees_every_nan(dtype):
    """The epoch kernel's gather split between this thread and a worker of _numba_pool: the
    worker's rows are copied bit for bit, and its largest |x| (an inf, a NaN) reaches the
    bound."""
    import numba

    from bpkernels.backends.numba._native import pool

    if not pool.available():
        pytest.skip("no BLAS thread callback here (NumPy's OpenBLAS < 0.3.28 or not Linux)")
    workers = pool.ensure(K.pool_worker, 1)

    @numba.njit(nogil=True)  # (a caller holding the GIL could wait on a worker starting up)
    def gather(workers, X, order, first, rows, dst, scratch):
        return K._gather_shared(workers, X, order, first, rows, dst, scratch)

    rng = np.random.default_rng(7)
    X = rng.standard_normal((60, 9)).astype(dtype)
    order = rng.permutation(60)
    scratch = np.empty(1, dtype)
    for first, rows in ((0, 16), (16, 7), (59, 1)):
        dst = np.full((16, 9), 99, dtype)
        largest = gather(workers, X, order, first, rows, dst, scratch)
        batch = X[order[first:first + rows]]
        assert dst[:rows].tobytes() == batch.tobytes() and (dst[rows:] == 99).all()
        assert largest == np.abs(batch).max()
    for bad, expected in ((np.inf, np.inf), (np.nan, np.nan)):
        for row in (1, 14):  # in this thread's share, in the worker's
            spoiled = X.copy()
            spoiled[order[row], 4] = bad
            found = gather(workers, spoiled, order, 0, 16, np.empty((16, 9), dtype), scratch)
            np.testing.assert_equal(found, expected, err_msg=f"{bad} in row {row}")


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_blas_on_the_pool_computes_what_numpy_computes_from_any_thread():
    """Once the pool runs BLAS's parallel jobs, every product in the process goes through it:
    from other threads at once (they take turns), and with more BLAS threads than workers
    (OpenBLAS's own threads then take the call)."""
    import threading

    from bpkernels.backends.numba._native import pool

    if not pool.available():
        pytest.skip("no BLAS thread callback here (NumPy's OpenBLAS < 0.3.28 or not Linux)")
    pool.ensure(K.pool_worker, 1)
    rng = np.random.default_rng(8)
    A, B = rng.standard_normal((300, 500)), rng.standard_normal((500, 400))
    expected = np.einsum("ik,kj->ij", A, B)  # no BLAS
    results, errors = [], []

    def products():
        try:
            for _ in range(20):
                results.append(np.abs(A @ B - expected).max())
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=products) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads) and not errors
    assert len(results) == 60 and max(results) < 1e-9
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(4, user_api="blas"):
        assert np.abs(A @ B - expected).max() < 1e-9  # 4 jobs, 1 worker: OpenBLAS's threads
    assert pool.ensure(K.pool_worker, 1) >= 1  # and the pool takes them back
    assert np.abs(A @ B - expected).max() < 1e-9


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_the_pool_wakes_its_sleeping_workers_and_a_forked_child_has_blas():
    """Workers idle for a few milliseconds sleep (futex) and wake for the next product; a
    forked child, which has none of the threads, gets OpenBLAS's own threads back."""
    import time

    from bpkernels.backends.numba._native import pool

    if not pool.available() or not hasattr(os, "fork"):
        pytest.skip("no BLAS thread callback here (NumPy's OpenBLAS < 0.3.28 or not Linux)")
    pool.ensure(K.pool_worker, 1)
    rng = np.random.default_rng(9)
    A, B = rng.standard_normal((400, 400)), rng.standard_normal((400, 400))
    expected = np.einsum("ik,kj->ij", A, B)
    time.sleep(0.2)
    assert np.abs(A @ B - expected).max() < 1e-9
    slept = [pool._CONTROL[pool.HEADER + pool.SLEEPING]]
    child = os.fork()
    if child == 0:  # the child: a product, then out without running the parent's tests
        os._exit(0 if np.abs(A @ B - expected).max() < 1e-9 else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the forked child hung on a BLAS call")
    assert os.waitstatus_to_exitcode(status) == 0
    time.sleep(0.2)
    slept.append(pool._CONTROL[pool.HEADER + pool.SLEEPING])
    assert 1 in slept  # a worker was asleep (the wake path above then ran)


def test_an_optimizer_it_does_not_know_falls_back_to_the_kernels():
    class Renamed(bpk.SGD):
        name = "renamed-sgd"

    X, y = _problem("labels", 3)
    models = [bpk.MLP([5, 4, 3], backend="numba", dtype="float64", seed=2) for _ in range(2)]
    bpk.fit(models[0], X, y, optimizer=Renamed(lr=0.1), epochs=2, batch_size=16)
    bpk.fit(models[1], X, y, optimizer=bpk.SGD(lr=0.1), epochs=2, batch_size=16)
    np.testing.assert_allclose(models[0].params, models[1].params, rtol=1e-12, atol=1e-14)


# ====================================================================== parallel kernels
# The backend runs a pass in parallel only above millions of elements; ``par`` (the fewest
# elements per chunk) set low here runs the same drivers on small arrays.
PAR = 64


def test_parallel_dense_kernels_match_serial():
    rng = np.random.default_rng(0)
    X, W = rng.standard_normal((300, 40)), rng.standard_normal((40, 50)) / 7
    b, dA0 = rng.standard_normal(50), rng.standard_normal((300, 50))
    results = []
    for par in (None, PAR):
        Z, A = np.empty((300, 50)), np.empty((300, 50))
        kinds = K.activation_kinds([K.GELU])
        K.dense_forward(X, W, b, K.GELU, Z, A, True, par, kinds)
        dA, dW, db, dX = dA0.copy(), np.empty((40, 50)), np.empty(50), np.empty((300, 40))
        K.dense_backward(X, W, dA, K.GELU, A, Z, dW, db, dX, True, par, kinds)
        results.append((Z, A, dA, dW, db, dX))
    for serial, parallel in zip(*results):
        # db sums each chunk's rows first, then the chunks: rounding may differ a little
        np.testing.assert_allclose(parallel, serial, rtol=1e-13, atol=1e-13)


_COMPILED_LOOPS = """
import numpy as np
from bpkernels.backends.numba import kernels as K
X, W, b = np.ones((4, 3)), np.ones((3, 5)), np.zeros(5)
A = np.empty((4, 5))
K.dense_forward(X, W, b, K.RELU, A, A, False, None, K.activation_kinds([K.RELU]))
for sig, res in K._bias_act_rows_of.dispatcher.overloads.items():
    ir = res.library.get_llvm_str()
    print([str(t) for t in sig[-6:]], "erf" in ir, "exp" in ir)
"""


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_layer_kernel_compiles_the_loops_of_its_kinds_only(tmp_path):
    # The first compile is what a user waits for; a ReLU network must not pay for the loops of
    # GELU (erf), tanh and sigmoid (exp). A fresh cache, so that the helpers really compile.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _COMPILED_LOOPS], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    kinds = ["bool" if k else "none" for k in K.activation_kinds([K.RELU])]
    assert done.stdout.splitlines() == [f"{kinds} False False"]


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_read_only_inputs_and_output_layers_reuse_the_compiled_kernels(activation, monkeypatch):
    """A read-only X (a memory map, a frozen array) trains and predicts through the kernels
    compiled for writeable arrays, with the same numbers: each is seconds of first compile.
    And a network's identity output layer runs the forward kernel compiled for its hidden
    layers (and the epoch kernel's row pass), not one of its own."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((96, 7)).astype(np.float32)
    y = rng.integers(0, 3, 96)
    frozen = X.copy()
    frozen.flags.writeable = False

    def trained(features):
        model = bpk.MLP([7, 6, 5, 3], activation=activation, backend="numba", dtype="float32",
                        seed=2)
        bpk.fit(model, features, y, optimizer=bpk.SGD(lr=0.1), epochs=2, batch_size=32)
        return model

    model = trained(X)
    epoch_kernels = len(K.train_epoch.signatures)
    frozen_model = trained(frozen)
    assert len(K.train_epoch.signatures) == epoch_kernels
    for (W, b), (W_frozen, b_frozen) in zip(model.get_weights(), frozen_model.get_weights()):
        np.testing.assert_array_equal(W_frozen, W)
        np.testing.assert_array_equal(b_frozen, b)

    kinds_met = []
    kernel = K.dense_forward

    def spy(*args):
        kinds_met.append(args[-1])
        return kernel(*args)

    monkeypatch.setattr(K, "dense_forward", spy)
    outputs = model.forward(X)
    forward_kernels = len(kernel.signatures)
    np.testing.assert_array_equal(model.forward(frozen), outputs)
    assert len(kernel.signatures) == forward_kernels
    assert kinds_met and set(kinds_met) == {K.activation_kinds([K.ACTIVATION_CODES[activation]])}
    assert np.all(np.isfinite(outputs))

@pytest.mark.parametrize("rule", ["sgd", "adam", "rmsprop"])
def test_parallel_optimizer_and_check_match_serial(rule):
    from bpkernels.backends.numba.backend import _hyper
    hp = {"sgd": bpk.SGD(lr=0.1, momentum=0.9, weight_decay=0.1),
          "adam": bpk.AdamW(lr=0.01), "rmsprop": bpk.RMSprop(momentum=0.5, centered=True)}[rule]
    rng = np.random.default_rng(1)
    p0, grads = rng.standard_normal(1001), [rng.standard_normal(1001) for _ in range(3)]
    results = []
    for par in (None, PAR):
        p, states = p0.copy(), tuple(np.zeros(1001) for _ in range(3))
        halted = np.zeros(1, np.int64)
        for step, g in enumerate(grads, start=1):
            K.check_step(np.ones(1), g, step, halted, par)
            K.optimizer_step(p, g, states, *_hyper(rule, hp), step, halted, par)
        g = grads[0].copy()
        g[777] = np.inf
        K.check_step(np.ones(1), g, 9, halted, par)
        results.append((p, *states, halted))
    for serial, parallel in zip(*results):
        np.testing.assert_array_equal(parallel, serial)
    assert results[1][-1][0] == 9


# ====================================================================== threads and flags
def test_threads_option_sets_numba_and_blas_threads():
    import numba
    threadpoolctl = pytest.importorskip("threadpoolctl")
    be = bpk.get_backend("numba")
    before = be.threads
    try:
        be.set_threads(1)
        assert be.threads == numba.get_num_threads() == 1
        pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert pools and all(p["num_threads"] == 1 for p in pools)
        assert be.device_info()["threads"] == 1
    finally:
        be.set_threads(before)
    with pytest.raises(ValueError, match="threads"):
        be.set_threads(0)
    with pytest.raises(ValueError, match="threads"):
        be.set_threads(numba.config.NUMBA_NUM_THREADS + 1)
    with pytest.raises(TypeError):
        be.set_threads(1.5)


def test_numba_num_threads_is_the_default():
    pytest.importorskip("threadpoolctl")
    code = ("import bpkernels as bpk, threadpoolctl; b = bpk.get_backend('numba'); "
            "blas = threadpoolctl.threadpool_info(); print(type(b).__name__, b.threads, "
            "*[p['num_threads'] for p in blas if p['user_api'] == 'blas'])")
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    name, *threads = out.stdout.split()
    assert name == "NumbaBackend" and threads and set(threads) == {"1"}  # Numba's and BLAS's


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_kernels_are_cached_and_compiled_without_fastmath():
    from numba.core.caching import FunctionCache
    from numba.core.registry import CPUDispatcher
    dispatchers = [getattr(obj, "dispatcher", obj) for obj in vars(K).values()]
    dispatchers = [obj for obj in dispatchers if isinstance(obj, CPUDispatcher)]
    assert len(dispatchers) > 30
    for kernel in dispatchers:
        assert isinstance(kernel._cache, FunctionCache), kernel  # cache=True
        options = kernel.targetoptions
        assert not options.get("fastmath"), kernel
        assert options.get("error_model") == "numpy" and options.get("boundscheck") is False


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_second_process_loads_the_compiled_kernel(tmp_path):
    code = ("import numpy as np; from bpkernels.backends.numba import kernels as K; "
            "Y = np.ones((2, 3)); K.mse(Y, Y, np.empty((2, 3)), np.empty(1)); "
            "print(sum(K.mse.stats.cache_hits.values()), sum(K.mse.stats.cache_misses.values()))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           check=True).stdout.split() for _ in range(2)]
    assert runs == [["0", "1"], ["1", "0"]]  # compiled once, then loaded from the cache


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_helper_is_called_by_symbol_not_copied_into_its_caller():
    """``unlinked`` helpers: the caller's module declares the helper and defines none of its
    code, and the call still computes what the helper does, for each type it is called with;
    an error the helper raises reaches the caller's caller."""
    import numba

    from bpkernels.backends.numba._native.unlinked import unlinked

    @numba.njit
    def largest(M, sums):
        return K._abs_column_sums_max(M, sums)

    @numba.njit
    def overflowing(x):
        return K._finite_par(x, 2)

    for dtype in ("float32", "float64"):
        M = np.arange(-6.0, 6.0).reshape(4, 3).astype(dtype)
        assert largest(M, np.empty(3, dtype)) == np.abs(M).sum(axis=0).max()
    helper = K._abs_column_sums_max.dispatcher
    for sig, caller in largest.overloads.items():
        module = caller.library._final_module
        defined = {f.name for f in module.functions if not f.is_declaration}
        declared = {f.name for f in module.functions if f.is_declaration}
        assert not any(h.fndesc.mangled_name in defined for h in helper.overloads.values())
        assert any(name.startswith("bpkernels__abs_column_sums_max_") for name in declared)
    assert len(largest.overloads) == 2 and len(helper.overloads) == 2
    x = np.array([1.0, np.inf, 3.0, 4.0])  # a parallel helper too
    assert overflowing(x) is False and overflowing(np.ones(4)) is True

    def checked_sqrt(x):
        if x < 0:
            raise ValueError("negative")
        return np.sqrt(x)
    helper = unlinked(numba.njit(no_cpython_wrapper=True)(checked_sqrt))

    @numba.njit
    def root(x):
        return helper(x) + 1.0

    assert root(9.0) == 4.0
    with pytest.raises(ValueError, match="negative"):
        root(-1.0)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_scalar_functions_called_per_element_are_linked_into_the_loop_not_called_by_symbol():
    # GELU's erf and exp, called by symbol once per element, ran its layers 20-35% slower:
    # the row pass must hold their code, for LLVM to inline it into the loop.
    X, W, b = np.ones((4, 3)), np.ones((3, 5)), np.zeros(5)
    Z, A = np.empty((4, 5)), np.empty((4, 5))
    K.dense_forward(X, W, b, K.GELU, Z, A, True, None, K.activation_kinds([K.GELU]))
    gelu_passes = [result.library.get_llvm_str()
                   for result in K._bias_act_rows_of.dispatcher.overloads.values()]
    gelu_passes = [ir for ir in gelu_passes if "erf" in ir]
    assert gelu_passes
    for ir in gelu_passes:
        assert "bpkernels__gelu" not in ir and "bpkernels__normal_cdf" not in ir


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_an_unlinked_helper_returns_optionals_and_refuses_what_it_cannot_name():
    import numba
    from numba.core import types

    from bpkernels.backends.numba._native.unlinked import _Reload, unlinked

    def positive(x):
        return x if x > 0 else None
    maybe = unlinked(numba.njit(no_cpython_wrapper=True)(positive))

    @numba.njit
    def or_minus_one(x):
        y = maybe(x)
        return -1.0 if y is None else y

    assert (or_minus_one(3.0), or_minus_one(-3.0)) == (3.0, -1.0)

    def with_default(x, y=2.0):
        return x * y
    with pytest.raises(TypeError, match="plain positional parameters only"):
        unlinked(numba.njit(no_cpython_wrapper=True)(with_default))

    def scaled_by(factor):  # two closures: one name and qualname, other code
        def scale(x):
            return x * factor
        return unlinked(numba.njit(no_cpython_wrapper=True)(scale))
    double, triple = scaled_by(2.0), scaled_by(3.0)

    @numba.njit
    def doubled(x):
        return double(x)

    @numba.njit
    def tripled(x):
        return triple(x)

    assert doubled(1.5) == 3.0
    with pytest.raises(Exception, match="would share the symbol"):
        tripled(1.5)

    # A cached kernel compiled against a helper that returned another type: refused on load
    matrix, vector = types.float64[:, ::1], types.float64[::1]
    stale = _Reload(K.__name__, "_abs_column_sums_max", (matrix, vector), "bpkernels_stale",
                    types.int64)
    with pytest.raises(RuntimeError, match="another version of .*_abs_column_sums_max"):
        stale()
    with pytest.raises(RuntimeError, match="another version of .*_no_such_helper"):
        _Reload(K.__name__, "_no_such_helper", (vector,), "bpkernels_stale", types.int64)()


_ONE_GATHER = """
import numba, numpy as np
from bpkernels.backends.numba import kernels as K

@numba.njit
def gather(X, order, dst, scratch):
    return K._gather_shared(0, X, order, 0, order.size, dst, scratch)

X = np.arange(-6, 6, dtype=np.float32).reshape(4, 3)
dst = np.empty((2, 3), np.float32)
largest = gather(X, np.array([3, 0]), dst, np.empty(1, np.float32))
print(largest, dst.tolist(), len(K._gather_rows_32.dispatcher.overloads),
      len(K._gather_rows_64.dispatcher.overloads))
"""


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_large_models_gather_is_called_by_address_and_compiled_for_its_dtype_only(tmp_path):
    # The pool's workers call the gather by its address, which the epoch kernel hands them:
    # so nothing compiles the other dtype's gather. A fresh cache and process, so that
    # nothing else compiled it first.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _ONE_GATHER], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "6.0 [[3.0, 4.0, 5.0], [-6.0, -5.0, -4.0]] 1 0"


_CACHED_EPOCH = """
import sys, numpy as np, bpkernels as bpk
from bpkernels.backends.numba import kernels as K
sizes = [int(size) for size in sys.argv[1].split(",")]
rng = np.random.default_rng(0)
X, y = rng.standard_normal((96, sizes[0])).astype(np.float32), rng.integers(0, 3, 96)
model = bpk.MLP(sizes, backend="numba", dtype="float32", seed=0)
bpk.fit(model, X, y, optimizer=bpk.Adam(lr=0.01), epochs=2, batch_size=16, seed=0)
stats = K.train_epoch.stats
print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()),
      model.params.tobytes().hex())
"""


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("sizes", ["5,8,3", "64,512,128,3"], ids=["small", "large"])
def test_a_second_process_loads_the_epoch_kernel_with_the_helpers_it_calls_by_symbol(
        tmp_path, sizes):
    # The cached epoch kernel names its helpers by symbols that only exist once the helpers
    # are compiled (or loaded) in this process: loading it must name them first, and train
    # bit for bit as the process that compiled it. The large model's kernel (over 64k
    # parameters) also takes the address of its gather, which the pool's worker calls.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), OPENBLAS_NUM_THREADS="2")
    runs = [subprocess.run([sys.executable, "-c", _CACHED_EPOCH, sizes], capture_output=True,
                           text=True, env=env, timeout=300) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[-1].stderr
    (hits0, misses0, params0), (hits1, misses1, params1) = (r.stdout.split() for r in runs)
    assert (hits0, misses0, hits1, misses1) == ("0", "1", "1", "0")
    assert params1 == params0


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_the_garbage_collector_pauses_while_a_kernel_compiles_and_is_restored(tmp_path):
    code = """if True:
        import gc, json, numba, numpy as np
        from numba.core import event
        from bpkernels.backends.numba import kernels as K
        seen = []
        class Spy(event.Listener):  # registered after the package's own listener
            def on_start(self, e):
                seen.append([e.data["dispatcher"].py_func.__name__, gc.isenabled()])
            def on_end(self, e):
                pass
        event.register("numba:compile", Spy())
        Y = np.ones((2, 3))
        K.mse(Y, Y, np.empty((2, 3)), np.empty(1))
        after = gc.isenabled()
        numba.njit(lambda x: x + 1)(1)  # not the package's: the collector stays on
        gc.disable()
        Y = Y.astype(np.float32)
        K.mse(Y, Y, np.empty((2, 3), np.float32), np.empty(1, np.float32))
        print(json.dumps([seen, after, gc.isenabled()]))
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    seen, after, after_disabled = json.loads(out.stdout)
    # (_mse: the helper mse calls, compiled within mse's compile)
    assert seen == [["mse", False], ["_mse", False], ["<lambda>", True], ["mse", False],
                    ["_mse", False]]
    assert after is True  # enabled again once the compile ended
    assert after_disabled is False  # a collector the caller turned off stays off


def test_auto_picks_numba_on_a_cpu():
    names = bpk.available_backends()
    assert names.index("numba") < names.index("numpy")
    if "cupy" not in names:
        assert bpk.get_backend("auto").name == "numba"


def test_missing_numba_names_the_extra(monkeypatch):
    from bpkernels import backends
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ModuleNotFoundError
    for name in [m for m in sys.modules if m.startswith("bpkernels.backends.numba")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(backends._instances, "numba", raising=False)
    monkeypatch.delitem(backends._unavailable, "numba", raising=False)
    with pytest.raises(bpk.BackendUnavailable, match=r"bpkernels\[numba\]"):
        bpk.get_backend("numba")
    monkeypatch.delitem(backends._unavailable, "numba", raising=False)


# --------------------------------------------------------------------------- the GEMM
GEMM_SHAPES = [(5, 7, 3), (1, 4, 1), (3, 1, 2), (33, 65, 17)]


def _gemm_operands(m, k, n, dtype, rng):
    """Every layout gemm takes: A and B C-ordered, or transposes (views) of C-ordered arrays."""
    A = rng.standard_normal((m, k)).astype(dtype)
    B = rng.standard_normal((k, n)).astype(dtype)
    A_t = np.ascontiguousarray(A.T).T
    B_t = np.ascontiguousarray(B.T).T
    return [(A, B), (A_t, B), (A, B_t), (A_t, B_t)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_the_float64_product_in_every_layout(dtype, shape):
    from bpkernels.backends.numba._native.blas import gemm
    run = numba_jit_gemm() if JIT else gemm
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    for a, b in _gemm_operands(*shape, dtype, np.random.default_rng(1)):
        C = np.full((shape[0], shape[2]), np.nan, dtype)
        run(a, b, C)
        reference = a.astype(np.float64) @ b.astype(np.float64)
        np.testing.assert_allclose(C, reference, rtol=tolerance, atol=tolerance)


def numba_jit_gemm():
    import numba
    from bpkernels.backends.numba._native.blas import gemm

    @numba.njit
    def run(A, B, C):
        gemm(A, B, C)
    return run


def _padded(M, pad):
    """M as the first columns of a wider C-ordered array (rows ``pad`` elements apart beyond
    its own width): to Numba, an array of layout 'A', not 'C'."""
    if not pad:
        return M
    wide = np.full((M.shape[0], M.shape[1] + pad), np.nan, M.dtype)
    wide[:, :M.shape[1]] = M
    return wide[:, :M.shape[1]]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pad", [0, 3], ids=["contiguous", "padded-rows"])
def test_gemm_t_matches_the_float64_product_for_every_transpose_flag(dtype, shape, pad):
    """Both compiled GEMMs: the one for C-typed operands (the epoch kernel's) and the general
    one, for rows wider apart than their length."""
    from bpkernels.backends.numba._native.blas import gemm_t
    run = numba_jit_gemm_t() if JIT else gemm_t
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    m, k, n = shape
    rng = np.random.default_rng(3)
    for trans_a in (False, True):
        for trans_b in (False, True):
            A = _padded(rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype), pad)
            B = _padded(rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype), pad)
            C = _padded(np.full((m, n), np.nan, dtype), pad)
            run(A, trans_a, B, trans_b, C, 1.0, 0.0)
            a64, b64 = A.astype(np.float64), B.astype(np.float64)
            reference = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
            np.testing.assert_allclose(C, reference, rtol=tolerance, atol=tolerance)
    if JIT and not pad:  # the flags are values, not types: one compiled GEMM serves them all
        assert len(run.overloads) == 1  # (a padded array of one row is C-ordered: other types)


def numba_jit_gemm_t():
    import numba
    from bpkernels.backends.numba._native.blas import gemm_t

    @numba.njit
    def run(A, trans_a, B, trans_b, C, alpha, beta):
        gemm_t(A, trans_a, B, trans_b, C, alpha, beta)
    return run


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_t_scales_the_product_and_adds_the_scaled_output(dtype):
    """C = alpha op(A) op(B) + beta C: the fused SGD update of the epoch kernel."""
    from bpkernels.backends.numba._native.blas import gemm_t
    run = numba_jit_gemm_t() if JIT else gemm_t
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    rng = np.random.default_rng(4)
    A, B = rng.standard_normal((7, 5)).astype(dtype), rng.standard_normal((7, 3)).astype(dtype)
    C = rng.standard_normal((5, 3)).astype(dtype)
    expected = -0.25 * (A.astype(np.float64).T @ B) + 0.75 * C.astype(np.float64)
    run(A, True, B, False, C, -0.25, 0.75)
    np.testing.assert_allclose(C, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("pad", [0, 3], ids=["contiguous", "padded-rows"])
def test_gemm_t_refuses_mismatched_shapes(pad):
    from bpkernels.backends.numba._native.blas import gemm_t
    run = numba_jit_gemm_t() if JIT else gemm_t
    A, B = _padded(np.ones((3, 4)), pad), _padded(np.ones((5, 2)), pad)
    with pytest.raises(ValueError, match="shapes do not match" if JIT else ""):
        run(A, False, B, False, _padded(np.empty((3, 2)), pad), 1.0, 0.0)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_gemm_uses_numpys_blas_here():
    """NumPy's wheels ship an OpenBLAS with 64-bit CBLAS entry points; the kernels use it."""
    from bpkernels.backends.numba._native.blas import BLAS_SOURCE
    if "openblas" not in str(np.__config__.CONFIG["Build Dependencies"]["blas"]).lower():
        pytest.skip("this NumPy is not built with OpenBLAS")
    assert BLAS_SOURCE == "numpy"
    assert bpk.get_backend("numba").device_info()["gemm"] == "numpy"


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_fallback_for_a_numpy_without_cblas64(dtype):
    """The fallback that the symbols point to where NumPy's BLAS has no 64-bit CBLAS: called
    through its C address, as compiled kernels call it, in every layout."""
    import ctypes

    from numba import types

    from bpkernels.backends.numba._native import blas
    real = types.float32 if dtype == "float32" else types.float64
    c_real = ctypes.c_float if dtype == "float32" else ctypes.c_double
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    call = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, c_real, ptr, i64, ptr, i64,
                            c_real, ptr, i64)(blas._fallback_gemm(real))
    m, k, n = 6, 5, 4
    for a, b in _gemm_operands(m, k, n, dtype, np.random.default_rng(2)):
        C = np.full((m, n), np.nan, dtype)
        (trans_a, lda), (trans_b, ldb) = blas._storage(a), blas._storage(b)
        call(blas._ROW_MAJOR, blas._TRANS if trans_a else blas._NO_TRANS,
             blas._TRANS if trans_b else blas._NO_TRANS, m, n, k, 1.0, a.ctypes.data, lda,
             b.ctypes.data, ldb, 0.0, C.ctypes.data, n)
        reference = a.astype(np.float64) @ b.astype(np.float64)
        tolerance = 1e-5 if dtype == "float32" else 1e-13
        np.testing.assert_allclose(C, reference, rtol=tolerance, atol=tolerance)
