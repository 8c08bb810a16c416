"""dtype="bf16": mixed precision (torch.autocast's definition). The rounding against ml_dtypes
and PyTorch; every backend's bf16 dense kernels against float64 products of the rounded
inputs; training against a PyTorch float32 network whose matrix products take bf16-rounded
inputs; the API around it (dtype, storage, checkpoints, to(), the CLI)."""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels.backends import get_backend
from bpkernels.backends.base import BF16
from bpkernels.backends.bf16 import bf16_round, to_bf16_bits, widen_bf16_bits

U24 = 2.0 ** -24  # float32's unit roundoff


@pytest.fixture
def bf16_backend(bpk_backend):
    """A backend name that runs bf16 here; skipped with the backend's reason elsewhere."""
    why = get_backend(bpk_backend).bf16_unavailable()
    if why is not None:
        pytest.skip(why)
    return bpk_backend


@pytest.fixture
def numba_bf16():
    """The Numba backend where it runs bf16 here; skipped with its reason elsewhere."""
    try:
        be = get_backend("numba")
    except bpk.BackendUnavailable as why:
        pytest.skip(str(why))
    why = be.bf16_unavailable()
    if why is not None:
        pytest.skip(why)
    return be


def _special_bits() -> np.ndarray:
    """Every sign, the exponent's ends and middle, and mantissas at and around the rounding
    point of the cut half (ties, just below, just above, with the kept bit odd and even),
    plus the NaNs whose rounding carries into the exponent."""
    exps = np.array([0, 1, 2, 126, 127, 128, 253, 254, 255], np.uint32)
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    kept = np.array([0, 1, 2, 0x7E, 0x7F], np.uint32)
    sign = np.array([0, 1], np.uint32)
    s, e, k, lo = np.meshgrid(sign, exps, kept, lows, indexing="ij")
    return ((s << 31) | (e << 23) | (k << 16) | lo).ravel()


def _random_bits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2 ** 32, n, dtype=np.uint32)


@pytest.mark.parametrize("bits", [_special_bits(), _random_bits(1 << 20)],
                         ids=["special", "random"])
def test_rounding_equals_ml_dtypes(bits):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = bits.view(np.float32)
    with np.errstate(invalid="ignore"):  # the NaNs
        expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = bf16_round(x)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    np.testing.assert_array_equal(widen_bf16_bits(to_bf16_bits(x))[~nan].view(np.uint32),
                                  expected[~nan].view(np.uint32))


def test_rounding_equals_pytorch():
    torch = pytest.importorskip("torch")
    x = np.concatenate([_special_bits(), _random_bits(1 << 16, 1)]).view(np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    got = bf16_round(x)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan], expected[~nan])


def test_rounding_is_to_nearest_even_by_hand():
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7 (the next bfloat16): ties to the even 1;
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even 1 + 2^-6
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 3.4e38, -np.inf],
                 np.float32)
    assert bf16_round(x).tolist() == [1.0, 1 + 2 ** -6, 1 + 2 ** -7, np.inf, -np.inf]
    with pytest.raises(ValueError, match="output apart"):
        bf16_round(x, out=x)


def _r64(a: np.ndarray) -> np.ndarray:
    return bf16_round(a).astype(np.float64)


def _product_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 accumulation of k exact products: each partial sum rounds once, so the error is
    at most k * u * sum |a_i b_i| (first order; the factor 2 covers the output's rounding and
    any blocked order)."""
    k = a.shape[1]
    return 2 * (k + 1) * U24 * (np.abs(a) @ np.abs(b)) + 1e-30


def _data(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("n,i,o", [(1, 1, 1), (3, 5, 7), (33, 127, 65)])
def test_dense_forward_rounds_both_inputs(bf16_backend, n, i, o):
    be = get_backend(bf16_backend)
    rng = np.random.default_rng(n + i + o)
    X, W, b = _data(rng, n, i), _data(rng, i, o), _data(rng, o)
    A = be.empty((n, o), np.float32)
    be.dense_forward(be.asarray(X), be.asarray(W), be.asarray(b), "identity", A, bf16=True)
    got = be.to_host(A).astype(np.float64)
    exact = _r64(X) @ _r64(W)
    bound = _product_bound(_r64(X), _r64(W)) + 2 * U24 * np.abs(exact + b)
    assert np.all(np.abs(got - (exact + b)) <= bound)
    # the rounding is there: the float32 product is further away than the bound
    assert np.abs(X.astype(np.float64) @ W - exact).max() > 10 * bound.max()


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_dense_forward_activation_in_float32(bf16_backend, activation):
    """The product (bf16 inputs) is the only change: the float32 kernel on the rounded inputs
    gives the same activations up to the products' own summation order."""
    be = get_backend(bf16_backend)
    rng = np.random.default_rng(1)
    X, W, b = _data(rng, 16, 40), _data(rng, 40, 24, scale=0.2), _data(rng, 24)
    outs = []
    for inputs, bf16 in (((X, W), True), ((bf16_round(X), bf16_round(W)), False)):
        A, Z = be.empty((16, 24), np.float32), be.empty((16, 24), np.float32)
        be.dense_forward(*map(be.asarray, inputs), be.asarray(b), activation, A, Z, bf16=bf16)
        outs.append(be.to_host(A))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [False, True], ids=["hidden", "first"])
def test_dense_backward_rounds_inputs_of_both_products(bf16_backend, first):
    be = get_backend(bf16_backend)
    rng = np.random.default_rng(7)
    n, i, o = 29, 70, 45
    X, W, dA = _data(rng, n, i), _data(rng, i, o), _data(rng, n, o)
    dev_dA = be.asarray(dA)
    dW, db = be.empty((i, o), np.float32), be.empty((o,), np.float32)
    dX = None if first else be.empty((n, i), np.float32)
    A = be.empty((n, o), np.float32)
    be.dense_backward(be.asarray(X), be.asarray(W), dev_dA, "identity", A, None, dW, db, dX,
                      bf16=True)
    dW_exact = _r64(X).T @ _r64(dA)
    assert np.all(np.abs(be.to_host(dW) - dW_exact)
                  <= _product_bound(_r64(X).T, _r64(dA)) + 2 * U24 * np.abs(dW_exact))
    # the bias gradient sums the unrounded gradient (autocast's float32 bias gradient)
    db_exact = dA.astype(np.float64).sum(0)
    assert np.all(np.abs(be.to_host(db) - db_exact) <= 2 * n * U24 * np.abs(dA).sum(0))
    if not first:
        dX_exact = _r64(dA) @ _r64(W).T
        assert np.all(np.abs(be.to_host(dX) - dX_exact)
                      <= _product_bound(_r64(dA), _r64(W).T) + 2 * U24 * np.abs(dX_exact))
    np.testing.assert_array_equal(be.to_host(dev_dA), dA)  # identity: dZ is dA


def _torch_bf16_net(torch, model):
    """PyTorch float32 layers whose products take bf16-rounded inputs, forward and backward
    (the definition of dtype="bf16"), from the model's weights."""

    class Bf16Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return _round(x) @ _round(w) + b

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            g = _round(grad)
            return g @ _round(w).T, _round(x).T @ g, grad.sum(0)

    def _round(t):
        return t.to(torch.bfloat16).to(torch.float32)

    params = [torch.tensor(np.asarray(a), requires_grad=True)
              for layer in model.get_weights() for a in layer]
    acts = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda t: t}

    def forward(x):
        for layer, act in enumerate(model.layer_activations):
            x = acts[act](Bf16Linear.apply(x, params[2 * layer], params[2 * layer + 1]))
        return x
    return params, forward


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_training_equals_pytorch_with_bf16_products(bf16_backend, activation):
    """Ten SGD steps with momentum against PyTorch float32 with bf16-rounded product inputs:
    the same up to float32 summation order. The float32 run of the same model is ~100 times
    further away: the test sees the roundings."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    X = rng.standard_normal((96, 20)).astype(np.float32)
    y = rng.integers(0, 5, 96)
    trained = {}
    for dtype in ("bf16", "float32"):
        model = bpk.MLP([20, 48, 32, 5], activation=activation, backend=bf16_backend,
                        dtype=dtype, seed=4)
        if dtype == "bf16":
            params, forward = _torch_bf16_net(torch, model)
        bpk.fit(model, X, y, loss="cross_entropy", epochs=1, batch_size=12, shuffle=False,
                optimizer=bpk.SGD(lr=0.05, momentum=0.9))
        trained[dtype] = np.concatenate([a.ravel() for l in model.get_weights() for a in l])
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for s in range(0, 96, 12):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(torch.from_numpy(X[s:s + 12])),
                                                 torch.from_numpy(y[s:s + 12]))
        loss.backward()
        opt.step()
    ref = torch.cat([p.detach().ravel() for p in params]).numpy().astype(np.float64)
    start = np.concatenate([a.ravel() for l in bpk.MLP(
        [20, 48, 32, 5], activation=activation, dtype="float32", seed=4).get_weights()
        for a in l])
    moved = np.linalg.norm(ref - start)
    err_bf16 = np.linalg.norm(trained["bf16"] - ref) / moved
    err_f32 = np.linalg.norm(trained["float32"] - ref) / moved
    assert err_bf16 < 1e-5, err_bf16
    assert err_f32 > 30 * err_bf16, (err_f32, err_bf16)


def test_model_api(tmp_path):
    model = bpk.MLP([6, 9, 3], dtype="bf16", seed=2)
    assert model.dtype == "bf16" and model.dtype is BF16 and str(model.dtype) == "bf16"
    assert model.storage == np.float32 and model.params.dtype == np.float32
    assert all(a.dtype == np.float32 for layer in model.get_weights() for a in layer)
    assert "dtype='bf16'" in repr(model)
    assert bpk.MLP([6, 3], dtype="bfloat16").dtype is BF16
    X = np.random.default_rng(0).standard_normal((40, 6))
    y = np.arange(40) % 3
    bpk.fit(model, X, y, epochs=2, batch_size=8, optimizer=bpk.Adam(lr=1e-2))
    assert model.optimizer.state["exp_avg"].dtype == np.float32
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = bpk.load(path)
    assert loaded.dtype is BF16
    np.testing.assert_array_equal(loaded.params, model.params)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    # predictions use bf16 products: float32 ones differ
    as_f32 = bpk.load(path).to("numpy", "float32")
    assert not np.array_equal(as_f32.forward(X), model.forward(X))
    as_f32.to("numpy", "bf16")
    np.testing.assert_array_equal(as_f32.forward(X), model.forward(X))


def test_unavailable_is_one_clear_error():
    for name in ("numba", "cupy"):
        try:
            be = get_backend(name)
        except bpk.BackendUnavailable:
            continue
        why = be.bf16_unavailable()
        if why is None:
            continue
        with pytest.raises(ValueError, match=f"backend '{name}' cannot run bf16: "):
            bpk.MLP([3, 2], backend=name, dtype="bf16")
    with pytest.raises(ValueError, match="valid dtypes: float32, float64, bf16"):
        bpk.MLP([3, 2], dtype="float16")


def test_auto_picks_a_backend_that_runs_bf16():
    model = bpk.MLP([4, 3], backend="auto", dtype="bf16")
    assert model.backend.bf16_unavailable() is None
    assert model.to("auto", "float32").backend is get_backend("auto")


def test_cli_trains_and_resumes_in_bf16(tmp_path, capsys):
    from bpkernels import cli
    path = tmp_path / "m.npz"
    argv = ["train", "--data", "digits", "--backend", "numpy", "--dtype", "bf16", "--epochs",
            "2", "--layers", "32", "--no-progress", "--save", str(path)]
    assert cli.main(argv) == 0
    assert "dtype: bf16" in capsys.readouterr().out or bpk.load(path).dtype is BF16
    assert bpk.load(path).dtype is BF16
    assert cli.main(["train", "--data", "digits", "--resume", str(path), "--dtype", "float32",
                     "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dtype float32 (checkpoint: bf16)" in err[0], err
    assert cli.main(["info"]) == 0
    assert "numpy bf16: available" in capsys.readouterr().out


def test_estimators_take_bf16():
    pytest.importorskip("sklearn")
    from bpkernels.sklearn import MLPClassifier
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 8))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    clf, f32 = (MLPClassifier(hidden_layer_sizes=(16,), dtype=dtype, max_iter=30,
                              random_state=0, backend="numpy").fit(X, y)
                for dtype in ("bf16", "float32"))
    assert clf.model_.dtype is BF16 and abs(clf.score(X, y) - f32.score(X, y)) < 0.03
    import pickle
    again = pickle.loads(pickle.dumps(clf))
    assert again.model_.dtype is BF16
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))


_CACHED_RUN = """
import sys, numpy as np, bpkernels as bpk
from bpkernels.backends.numba.backend import NumbaBackend
NumbaBackend.train_epoch = lambda self, plan: False  # the layer kernels (the epoch's: above)
model = bpk.MLP([30, 20, 4], backend="numba", dtype=sys.argv[1], seed=0)
X = np.random.default_rng(0).standard_normal((64, 30))
bpk.fit(model, X, np.arange(64) % 4, epochs=1, batch_size=16, optimizer=bpk.SGD(lr=0.1))
print(repr(model.forward(X[:2]).tolist()))
"""


def test_numba_bf16_kernels_load_from_the_cache(tmp_path, numba_bf16):
    """A second process loads the first one's compiled bf16 kernels (MKL's symbol and the
    helpers they call by symbol registered before their code loads) and computes the same."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    outputs = [subprocess.run([sys.executable, "-c", _CACHED_RUN, dtype], env=env,
                              capture_output=True, text=True, timeout=600)
               for dtype in ("bf16", "bf16")]
    for done in outputs:
        assert done.returncode == 0, done.stderr[-2000:]
    assert outputs[0].stdout == outputs[1].stdout


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel-passes"])
def test_numba_fused_epoch_equals_its_kernel_loop(monkeypatch, numba_bf16, parallel):
    """The epoch kernel in bf16 (rounding passes and MKL's products inside it) trains exactly
    as the per-kernel loop: the same roundings of the same values, the same products; also
    with bf16's passes in parallel chunks (its own, lower threshold), db's column sums in the
    same chunks in both."""
    if parallel:
        import numba
        from bpkernels.backends.numba import backend as numba_backend
        if numba.get_num_threads() < 2:
            pytest.skip("one Numba thread: no parallel pass")
        monkeypatch.setattr(numba_backend, "PARALLEL_MIN_BF16", 40)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((150, 20)), rng.integers(0, 5, 150)
    trained = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(type(numba_bf16), "train_epoch", lambda self, plan: False)
        model = bpk.MLP([20, 48, 32, 5], activation="gelu", backend="numba", dtype="bf16",
                        seed=4, norm="layer", dropout=0.1)
        bpk.fit(model, X, y, epochs=2, batch_size=32, optimizer=bpk.SGD(lr=0.05, momentum=0.9))
        trained.append(model.params.copy())
    np.testing.assert_array_equal(trained[0], trained[1])


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd-fused-into-dW", "momentum"])
def test_numba_large_model_epoch_equals_its_kernel_loop(monkeypatch, momentum, numba_bf16):
    """A model large enough for the epoch kernel's bound on |dW| (and, with plain SGD, the
    update inside dW's bf16 GEMM) trains as the per-kernel loop: bit for bit with momentum,
    to float32 rounding where the update is fused (dW itself is never rounded there)."""
    from bpkernels.backends.numba import backend as numba_backend
    sizes = [64, 256, 200, 10]
    assert sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:])) >= \
        numba_backend.BOUND_MIN_PARAMS
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((200, 64)), rng.integers(0, 10, 200)
    trained = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(type(numba_bf16), "train_epoch", lambda self, plan: False)
        model = bpk.MLP(sizes, backend="numba", dtype="bf16", seed=2)
        bpk.fit(model, X, y, epochs=2, batch_size=50, shuffle=False,
                optimizer=bpk.SGD(lr=0.05, momentum=momentum))
        trained.append(model.params.copy())
    if momentum:
        np.testing.assert_array_equal(trained[0], trained[1])
    else:
        np.testing.assert_allclose(trained[0], trained[1], rtol=1e-5, atol=1e-6)
        # (and not equal: the fused update ran, rounding W's update once instead of twice)
        assert not np.array_equal(trained[0], trained[1])


def test_thread_counts_reach_mkl(numba_bf16):
    """MKL keeps a thread pool of its own: bpk.set_num_threads and limit_threads set it too,
    whether MKL was loaded before or after."""
    import numba
    from bpkernels.backends.numba._native import mkl
    from bpkernels.threads import get_num_threads, limit_threads
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread")
    before = get_num_threads()
    try:
        bpk.set_num_threads(1)
        assert mkl.get_threads() == 1
        with limit_threads(2):
            assert mkl.get_threads() == 2
        assert mkl.get_threads() == 1
    finally:
        bpk.set_num_threads(before)


def _boundary_bits() -> np.ndarray:
    """Every bfloat16 value (the upper 16 bits) with each low half that decides its rounding:
    exact, just above exact, just below the tie, the tie, just above it, just below the next
    (393,216 patterns, every special value among them)."""
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    return (upper[:, None] | low[None, :]).ravel()


def _rows(x: np.ndarray, cols: int) -> np.ndarray:
    """x as rows of ``cols``, the last one completed from x's start (no pattern dropped)."""
    return np.resize(x, -(-x.size // cols) * cols).reshape(-1, cols)


@pytest.mark.parametrize("shape", ["rows", "odd rows", "one column", "padded rows", "7 x 13"])
@pytest.mark.parametrize("par", [None, 8], ids=["serial", "row-chunks"])
def test_numba_rounding_pass_equals_the_reference_bit_for_bit(numba_bf16, par, shape):
    """The rounding pass the Numba kernels run (mixed.round_bf16, the epoch kernel's too),
    serial and in parallel row chunks (par 8: as many chunks as MAX_CHUNKS and the rows
    allow), on the special and boundary patterns and 2^20 random bits, against the NumPy
    reference and ml_dtypes; rows padded beyond their width (layout 'A') too."""
    import numba
    from bpkernels.backends.numba import mixed

    @numba.njit
    def run(src, dst, par):
        mixed.round_bf16(src, dst, par)

    bits = np.concatenate([_special_bits(), _boundary_bits(), _random_bits(1 << 20)])
    if numba.config.DISABLE_JIT:  # (plain Python: 1.4M elements would take minutes)
        bits = bits[:1 << 14]
    x = bits.view(np.float32)
    if shape == "rows":
        x = _rows(x, 1024)
    elif shape == "odd rows":
        x = _rows(x, 1021)
    elif shape == "one column":
        x = x.reshape(-1, 1)
    elif shape == "padded rows":  # (NaN padding: a pass that ignored the row stride reads it)
        rows = _rows(x, 1024)[:300]
        wide = np.full((rows.shape[0], rows.shape[1] + 5), np.nan, np.float32)
        wide[:, :rows.shape[1]] = rows
        x = wide[:, :rows.shape[1]]
    else:  # par 8 asks for 11 chunks of 91 elements: more than the 7 rows, one row each
        x = x[:7 * 13].reshape(7, 13)
    out = np.full(x.shape, 0x1234, np.uint16)
    run(x, out, par)
    np.testing.assert_array_equal(out, to_bf16_bits(x))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with np.errstate(invalid="ignore"):  # the NaNs
        np.testing.assert_array_equal(out, x.astype(ml_dtypes.bfloat16).view(np.uint16))
