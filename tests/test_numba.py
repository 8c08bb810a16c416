"""What is specific to the Numba backend and holds in both of its modes, native and plain (the
rest of the suite runs on it like on any backend): the whole-epoch kernel against the
per-kernel loop, the parallel kernels against the serial ones, threads, the compile flags, the
GEMM of the kernels (``jit.gemm_t``), and that "auto" picks it on a CPU. Native mode's own
tricks (the BLAS pool, helpers called by symbol, the gather by address, NumPy's BLAS from
compiled code) are tested in test_numba_native.py, the choice of mode in test_numba_modes.py."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import bpkernels as bpk
from reference import GEMM_SHAPES, padded
from bpkernels.backends.base import ACTIVATION_CODES, OPTIMIZER_RULES, Backend

pytest.importorskip("numba")
pytest.importorskip("scipy")
from bpkernels.backends.numba import backend as numba_backend  # noqa: E402
from bpkernels.backends.numba import epoch, jit, layers, losses, optim  # noqa: E402
from bpkernels.backends.numba.backend import NumbaBackend  # noqa: E402
from bpkernels.backends.numba.layers import activation_kinds  # noqa: E402

JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")
NATIVE = jit.MODE == "native"
# The large models' bound on the weight gradients and the BLAS pool are native mode's: in plain
# mode the epoch kernel runs every model as a small one (it scans), and there is no pool.
NATIVE_ONLY = pytest.mark.skipif(not NATIVE, reason=f"the bound and the pool are native mode's; "
                                                    f"here {jit.MODE_REASON}")
EPOCH_MODES = ["scan", pytest.param("bound", marks=NATIVE_ONLY),
               pytest.param("pool", marks=NATIVE_ONLY)]

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
           epochs=3, activation=("tanh", "relu"), bound=False, pool=False):
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
    _native/pool.py (which then runs BLAS's parallel jobs for the rest of the process), whatever
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


# Every optimizer with every target kind; CI's run on the oldest Numba, which compiles each
# case's epoch kernel afresh and slowly (no native mode, so no cache of ours to share), takes
# one case per optimizer rule and per target kind (BPK_NUMBA_TEST_SUBSET=1).
CASES = [(o, loss) for o in OPTIMIZERS for loss in LOSSES]
if os.environ.get("BPK_NUMBA_TEST_SUBSET"):
    CASES = [("sgd", "cross_entropy-labels"), ("sgd-nesterov", "cross_entropy-probs"),
             ("adamw", "mse"), ("rmsprop-centered-momentum-wd", "binary_cross_entropy")]


# Each case in each mode is a kernel compiled afresh (~10 s on a CI runner), but for the cases
# that share an optimizer rule and a target kind (labels, or rows of targets). Every case runs
# the small models' scan; the bound and the pool (large models') run for one target kind per
# rule, each kind met: labels with SGD (its update fused into dW's GEMM) and RMSprop, rows with
# Adam. (The bound's gather and backward do not read the targets; the loss pass, which does,
# is the scan's. The scan's kernels are those of the rest of the suite's float64 training of
# ReLU and tanh networks, hence _train's activations; GELU, which keeps Z, is the parallel
# passes' case and the float32 one's.)
BOUND_TARGETS = {"sgd": "labels", "rmsprop": "labels", "adam": "rows"}


def _case_modes():
    for opt_case, loss_case in CASES:
        rule = OPTIMIZER_RULES[OPTIMIZERS[opt_case]().name]
        targets = "labels" if LOSSES[loss_case][2] == "labels" else "rows"
        for mode in EPOCH_MODES:
            name, marks = (mode, ()) if isinstance(mode, str) else (mode.values[0], mode.marks)
            if name == "scan" or BOUND_TARGETS[rule] == targets:
                yield pytest.param(opt_case, loss_case, name, marks=marks,
                                   id=f"{opt_case}-{loss_case}-{name}")


@pytest.mark.parametrize("opt_case, loss_case, mode", list(_case_modes()))
def test_epoch_kernel_matches_the_per_kernel_loop(monkeypatch, opt_case, loss_case, mode):
    """Same weights, gradients, optimizer state, per-epoch loss and accuracy after three epochs
    (shuffled, a partial last batch), float64 to 1e-12: the two paths run the same kernels
    (with the bound, plain SGD's update inside dW's GEMM rounds dW no more: still 1e-12; with
    the pool, a worker thread gathers part of each batch)."""
    args = (OPTIMIZERS[opt_case], *LOSSES[loss_case])
    fused = _train(False, monkeypatch, *args, bound=mode != "scan", pool=mode == "pool")
    _assert_same_training(fused, _train(True, monkeypatch, *args), rtol=1e-12)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: the parallel passes run serially")
@pytest.mark.parametrize("mode", EPOCH_MODES[:2])
def test_epoch_kernel_with_parallel_passes_matches_the_per_kernel_loop(monkeypatch, mode):
    """Where the work is large enough (here: made so), the epoch kernel runs the parallel
    passes: dZ's per-chunk column sums (the one pass that allocates, a helper of its own: the
    epoch kernel itself is compiled without reference counting) and the chunked update."""
    import numba
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: the kernels run serially")
    monkeypatch.setattr(numba_backend, "PARALLEL_MIN", 8)
    pars, kernel = [], epoch.train_epoch

    def spy(*args):
        pars.append(args[-7])  # (par; clip, rates, drop, norm and mixed come last)
        return kernel(*args)

    monkeypatch.setattr(epoch, "train_epoch", spy)
    args = (OPTIMIZERS["adam-l2"], *LOSSES["cross_entropy-labels"])
    # (GELU: the one activation whose layers keep Z, in the scan and in the bound)
    kw = dict(activation=("tanh", "gelu"))
    fused = _train(False, monkeypatch, *args, bound=mode == "bound", **kw)
    assert pars and set(pars) == {8}
    _assert_same_training(fused, _train(True, monkeypatch, *args, **kw), rtol=1e-12)


@pytest.mark.parametrize("pool", [False, pytest.param(True, marks=NATIVE_ONLY)],
                         ids=["alone", "pool"])
@pytest.mark.parametrize("activation", [("relu", "leaky_relu"), ("sigmoid", "identity"),
                                        ("silu", "gelu")])
def test_epoch_kernel_matches_in_float32(monkeypatch, activation, pool):
    args = (OPTIMIZERS["adamw"], *LOSSES["cross_entropy-labels"])
    kw = dict(dtype="float32", activation=activation, bound=pool, pool=pool)
    _assert_same_training(_train(False, monkeypatch, *args, **kw),
                          _train(True, monkeypatch, *args, **kw), rtol=1e-5)


@pytest.mark.parametrize("mode", EPOCH_MODES)
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
    # The same last finite weights, to float32's rounding: plain SGD's update inside dW's GEMM
    # (bound, pool) rounds once less, by the BLAS kernel's rules; and in the scan, the two
    # paths' float32 products differ in the last bit on some BLAS builds (NumPy 1.26's
    # OpenBLAS on an AVX-512 Xeon: ~3e-6 apart once the weights near 1e11; bit for bit with
    # NumPy 2's, and on the AMD EPYC runners). Equal steps and counts are the latch's claim.
    np.testing.assert_allclose(params, params2, rtol=2e-5)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_bound_on_weight_gradients_sees_every_column_and_every_inf_or_nan(dtype):
    """The epoch kernel skips check_step's scan of dW (and fuses plain SGD's update into its
    GEMM) when max column sum |X| * max column sum |dZ| is small: each must be an upper bound,
    and inf wherever an inf or a NaN could reach dW."""
    import numba

    @numba.njit
    def largest(M, sums):
        return epoch._abs_column_sums_max(M, sums)

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
    layers, a_size, *_ = epoch.layer_table(sizes, ("relu", "tanh", "identity"), rows)
    params = rng.standard_normal(int(layers[-1, 3] + sizes[-1])).astype(dtype)
    A, dA = np.zeros(a_size, dtype), np.zeros(a_size, dtype)
    views = []
    for i, o, w, _, _, a, _ in layers[:, :7]:
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
    dZ, sure, upstream, largest = [None] * 3, True, top_dA.astype(np.float64), 0.0
    for layer in (2, 1, 0):
        W, A_l, _ = views[layer]
        with np.errstate(invalid="ignore", over="ignore"):
            dZ[layer] = upstream * derivative[layer](A_l.astype(np.float64))
            upstream = dZ[layer] @ W.astype(np.float64).T
            x_sums = input_bound if layer == 0 else \
                np.abs(views[layer - 1][1].astype(np.float64)).sum(axis=0).max()
            bound = x_sums * np.abs(dZ[layer]).sum(axis=0).max()
        sure = sure and bound <= limit * 0.99
        largest = max(largest, bound if bound == bound else np.inf)
    if case == "small":
        assert sure
    elif case in ("nan", "inf"):
        assert not sure
    # the test's scales put each layer's bound far from the limit, on either side
    assert case not in ("first-layer-large", "hidden-large") or not sure

    @numba.njit
    def backward(net, work, rows, sums, input_bound, kinds):
        return epoch._backward(net, work, rows, None, kinds, sums, input_bound, None, None, 0,
                               None, None, 0, None)

    @numba.njit
    def backward_scan(net, work, rows, kinds):
        return epoch._backward_scan(net, work, rows, None, kinds, None, None, 0, None, None)

    net = (params, np.zeros_like(params), layers)
    work = (X, A, dA, np.zeros(0, dtype))
    kinds = activation_kinds(ACTIVATION_CODES[a] for a in ("relu", "tanh"))
    dA_before = dA.copy()
    finite, verdict, bound = backward(net, work, rows, np.empty(12, dtype), input_bound, kinds)
    # (an inf in A reaches dW only: relu'(inf) = 1 keeps dZ and db finite; a NaN reaches db)
    assert verdict == sure and finite == (case != "nan")
    # the largest layer's bound, which the fused SGD update's bound on |W| builds on
    if case == "small":
        assert bound == pytest.approx(largest, rel=1e-4)
    elif case in ("nan", "inf"):
        assert bound == np.inf
    if case == "small":  # dZ of every layer formed in place, in the dtype
        for layer in (2, 1, 0):
            np.testing.assert_allclose(views[layer][2], dZ[layer], rtol=1e-4, atol=1e-5)
    # a small model's backward (no bound, so no verdict) forms the same dZ, dX and db
    dA_bound, db_bound = dA.copy(), net[1].copy()
    dA[:] = dA_before
    assert backward_scan(net, work, rows, kinds) == finite
    np.testing.assert_array_equal(dA, dA_bound)
    np.testing.assert_array_equal(net[1], db_bound)


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
        kinds = layers.activation_kinds([layers.GELU])
        layers.dense_forward(X, W, b, layers.GELU, Z, A, True, par, kinds)
        dA, dW, db, dX = dA0.copy(), np.empty((40, 50)), np.empty(50), np.empty((300, 40))
        layers.dense_backward(X, W, dA, layers.GELU, A, Z, dW, db, dX, True, par, kinds)
        results.append((Z, A, dA, dW, db, dX))
    for serial, parallel in zip(*results):
        # db sums each chunk's rows first, then the chunks: rounding may differ a little
        np.testing.assert_allclose(parallel, serial, rtol=1e-13, atol=1e-13)


_COMPILED_LOOPS = """
import numpy as np
from bpkernels.backends.numba import layers as L
X, W, b = np.ones((4, 3)), np.ones((3, 5)), np.zeros(5)
A = np.empty((4, 5))
L.dense_forward(X, W, b, L.RELU, A, A, False, None, L.activation_kinds([L.RELU]))
rows = getattr(L._bias_act_rows_of, "dispatcher", L._bias_act_rows_of)  # (native: unlinked)
for sig, res in rows.overloads.items():
    ir = res.library.get_llvm_str()
    print([str(t) for t in sig[7:]], "erf" in ir, "exp" in ir)  # (the kinds: after r0, r1)
"""


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_layer_kernel_compiles_the_loops_of_its_kinds_only(tmp_path):
    # The first compile is what a user waits for; a ReLU network must not pay for the loops of
    # GELU (erf), tanh, sigmoid and SiLU (exp). A fresh cache, so that the helpers really
    # compile (a kernel loaded from the cache carries no LLVM IR to read).
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _COMPILED_LOOPS], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    kinds = ["bool" if k else "none" for k in layers.activation_kinds([layers.RELU])]
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
    epoch_kernels = len(epoch.train_epoch.signatures)
    frozen_model = trained(frozen)
    assert len(epoch.train_epoch.signatures) == epoch_kernels
    for (W, b), (W_frozen, b_frozen) in zip(model.get_weights(), frozen_model.get_weights()):
        np.testing.assert_array_equal(W_frozen, W)
        np.testing.assert_array_equal(b_frozen, b)

    kinds_met = []
    # (plain mode forms the product by NumPy and calls the row pass alone)
    name = "bias_activation" if numba_backend.GEMM_BY_NUMPY else "dense_forward"
    kernel = getattr(layers, name)

    def spy(*args):
        kinds_met.append(args[-1])
        return kernel(*args)

    monkeypatch.setattr(layers, name, spy)
    outputs = model.forward(X)
    forward_kernels = len(kernel.signatures)
    np.testing.assert_array_equal(model.forward(frozen), outputs)
    assert len(kernel.signatures) == forward_kernels
    assert kinds_met and set(kinds_met) == {layers.activation_kinds([ACTIVATION_CODES[activation]])}
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
            optim.check_step(np.ones(1), g, step, halted, par, None, None)
            optim.optimizer_step(p, g, states, *_hyper(rule, hp), step, halted, par, None, None)
        g = grads[0].copy()
        g[777] = np.inf
        optim.check_step(np.ones(1), g, 9, halted, par, None, None)
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
    """Every kernel cached and without fast-math, but the float64 reductions of jit.summing,
    which reassociate their additions and take no other flag (NaN and inf propagate)."""
    from numba.core.caching import FunctionCache
    from numba.core.registry import CPUDispatcher
    from bpkernels.backends.numba import norm
    found = [getattr(obj, "dispatcher", obj) for module in (layers, losses, optim, epoch, norm)
             for obj in vars(module).values()]
    dispatchers = list({id(obj): obj for obj in found if isinstance(obj, CPUDispatcher)}.values())
    assert len(dispatchers) > 30
    summing = {"sum_squares", "_row_sum", "_centered_squares", "_gradient_moments"}
    for kernel in dispatchers:
        assert isinstance(kernel._cache, FunctionCache), kernel  # cache=True
        options = kernel.targetoptions
        if JIT and kernel.py_func.__name__ in summing:
            assert options.get("fastmath") == {"reassoc"}, kernel
        else:
            assert not options.get("fastmath"), kernel
        assert options.get("error_model") == "numpy" and options.get("boundscheck") is False
    assert summing <= {kernel.py_func.__name__ for kernel in dispatchers}


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_second_process_loads_the_compiled_kernel(tmp_path):
    code = ("import numpy as np; from bpkernels.backends.numba import losses as K; "
            "Y = np.ones((2, 3)); K.mse(Y, Y, None, np.empty((2, 3)), np.empty(1)); "
            "print(sum(K.mse.stats.cache_hits.values()), sum(K.mse.stats.cache_misses.values()))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           check=True).stdout.split() for _ in range(2)]
    assert runs == [["0", "1"], ["1", "0"]]  # compiled once, then loaded from the cache


def test_device_info_names_the_mode_and_why():
    info = bpk.get_backend("numba").device_info()
    assert (info["mode"], info["mode_reason"]) == (jit.MODE, jit.MODE_REASON)
    assert info["mode_reason"].startswith(jit.MODE)
    assert info["gemm"] == jit.BLAS_SOURCE
    assert NATIVE or info["blas_pool"].startswith("off")
    if not JIT:
        assert jit.MODE == "plain" and "NUMBA_DISABLE_JIT" in jit.MODE_REASON


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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pad", [0, 3], ids=["contiguous", "padded-rows"])
def test_gemm_t_matches_the_float64_product_for_each_transpose_flag(dtype, shape, pad):
    """``jit.gemm_t`` as the kernels of both modes call it: C = op(A) @ op(B), one operand
    transposed at most, into a C-ordered C, the operands' rows maybe wider apart than their
    length (native mode's every other case: test_numba_native.py)."""
    run = numba_jit_gemm_t() if JIT else jit.gemm_t
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    m, k, n = shape
    rng = np.random.default_rng(3)
    for trans_a, trans_b in ((False, False), (True, False), (False, True)):
        A = padded(rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype), pad)
        B = padded(rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype), pad)
        C = np.full((m, n), np.nan, dtype)
        run(A, trans_a, B, trans_b, C, 1.0, 0.0)
        a64, b64 = A.astype(np.float64), B.astype(np.float64)
        reference = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
        np.testing.assert_allclose(C, reference, rtol=tolerance, atol=tolerance)
    if JIT and not pad:  # the flags are values, not types: one compiled GEMM serves them all
        assert len(run.overloads) == 1


def numba_jit_gemm_t():
    import numba
    gemm_t = jit.gemm_t  # native mode's (NumPy's BLAS) or plain mode's (np.dot)

    @numba.njit
    def run(A, trans_a, B, trans_b, C, alpha, beta):
        gemm_t(A, trans_a, B, trans_b, C, alpha, beta)
    return run


@pytest.mark.parametrize("pad", [0, 3], ids=["contiguous", "padded-rows"])
def test_gemm_t_refuses_mismatched_shapes(pad):
    run = numba_jit_gemm_t() if JIT else jit.gemm_t
    A, B = padded(np.ones((3, 4)), pad), padded(np.ones((5, 2)), pad)
    # (native mode's message; plain mode's np.dot raises a ValueError of Numba's or NumPy's)
    with pytest.raises(ValueError, match="shapes do not match" if JIT and NATIVE else None):
        run(A, False, B, False, np.empty((3, 2)), 1.0, 0.0)
