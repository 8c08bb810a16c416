"""Native mode's tricks (backends/numba/_native/), which plain mode does without: the BLAS
pool's workers, helpers called by a symbol of our own, the large models' gather by address,
NumPy's BLAS called from compiled code, the garbage collector paused while a kernel compiles.
What holds in both modes is in test_numba.py. Every test here compiles what it reads the LLVM IR
of in a fresh dispatcher or in a process with a fresh cache: a kernel loaded from Numba's cache
carries none, and the suite must pass with a cold cache and a warm one alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bpkernels as bpk
from reference import GEMM_SHAPES, padded

pytest.importorskip("numba")
pytest.importorskip("scipy")
from bpkernels.backends.numba import epoch, jit, optim  # noqa: E402

JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")
pytestmark = pytest.mark.skipif(jit.MODE != "native",
                                reason=f"native mode's tricks; here {jit.MODE_REASON}")
if jit.MODE == "native":  # (plain mode imports none of _native's internals: nor does this file)
    from bpkernels.backends.numba._native import blas, pool  # noqa: E402
    from bpkernels.backends.numba._native.gather import gather_shared, pool_worker  # noqa: E402
    from bpkernels.backends.numba._native import passes  # noqa: E402
    from bpkernels.backends.numba._native.unlinked import _Reload, unlinked  # noqa: E402

NO_POOL = "no BLAS thread callback here (NumPy's OpenBLAS < 0.3.28 or not Linux)"


def _fresh_process(code: str, cache, *args: str, threads: str = "1") -> str:
    """What ``code`` prints, run by another Python with the Numba cache ``cache`` (a fresh
    folder: so that what the code inspects really compiles, whatever the user's cache holds)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), OPENBLAS_NUM_THREADS=threads)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ====================================================================== the gather and the pool
@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_gather_finds_the_largest_magnitude_and_every_inf_or_nan(dtype):
    """The first layer's bound is rows * the largest |x| of the batch, found by the gather on
    the floats' bits: it must copy every bit and see negative values, infs and NaNs."""
    import numba

    @numba.njit
    def gather(src, index, dst, scratch):  # no worker: this thread alone
        return gather_shared(0, src, index, 0, index.size, dst, scratch)

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
    """The epoch kernel's gather split between this thread and a worker of the pool: the
    worker's rows are copied bit for bit, and its largest |x| (an inf, a NaN) reaches the
    bound."""
    import numba

    if not pool.available():
        pytest.skip(NO_POOL)
    workers = pool.ensure(pool_worker, 1)

    @numba.njit(nogil=True)  # (a caller holding the GIL could wait on a worker starting up)
    def gather(workers, X, order, first, rows, dst, scratch):
        return gather_shared(workers, X, order, first, rows, dst, scratch)

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


# (rule, hyper-parameters as the kernels take them, the state buffers it uses)
SHARED_UPDATES = [
    ("sgd", (0.1, 0.0, 0.0, 0.0, 0.0), ()),
    ("sgd", (0.05, 0.9, 0.1, 1.0, 1e-2), (0,)),
    ("adam", (1e-3, 0.9, 0.999, 1e-8, 1e-2, 1.0), (0, 1)),
    ("adam", (1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0), (0, 1)),
    ("rmsprop", (1e-2, 0.99, 1e-8, 1e-3, 0.9, 1.0), (0, 1, 2)),
    ("rmsprop", (1e-2, 0.99, 1e-8, 0.0, 0.0, 0.0), (0,)),
]


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rule, hp, used", SHARED_UPDATES,
                         ids=["sgd", "sgd-nesterov-wd", "adamw", "adam",
                              "rmsprop-centered-momentum", "rmsprop"])
def test_an_update_shared_with_the_pool_writes_the_bits_of_the_serial_one(dtype, rule, hp,
                                                                          used):
    """The optimizer's write split in blocks between this thread and a worker of the pool
    (``passes.update_shared``) against optim.update_rule's on the whole vector: every
    parameter and state element bit for bit, at lengths around the blocks' edges, with a clip
    coefficient, and the buffers a rule leaves unused left empty."""
    import numba

    if not pool.available():
        pytest.skip(NO_POOL)
    workers = pool.ensure(pool_worker, 1)
    if workers < 1:
        pytest.skip("the pool started no worker")
    index = {"sgd": 0, "adam": 1, "rmsprop": 2}[rule]

    @numba.njit(nogil=True)
    def shared(workers, tasks, p, g, states, sgd, adam, rmsprop, step, coef):
        passes.update_shared(workers, tasks, p, g, states, sgd, adam, rmsprop, step, coef)

    @numba.njit(nogil=True)
    def serial(p, g, states, sgd, adam, rmsprop, step, coef):
        optim.update_rule(p, g, states, sgd, adam, rmsprop, step, coef, True)

    rng = np.random.default_rng(11)
    tasks = np.zeros((workers + 1) * passes.SLOTS, np.int64)
    for n in (1, passes.BLOCK - 1, passes.BLOCK + 1, 5 * passes.BLOCK + 3, 20_000):
        p = rng.standard_normal(n).astype(dtype)
        g = rng.standard_normal(n).astype(dtype)
        states = tuple(np.abs(rng.standard_normal(n)).astype(dtype) if k in used
                       else np.empty(0, dtype) for k in range(3))
        rules = [None, None, None]
        rules[index] = hp
        for step in (1, 3):
            expected = (p.copy(), *(s.copy() for s in states))
            serial(expected[0], g, expected[1:], *rules, step, 0.75)
            shared(workers, tasks, p, g, states, *rules, step, 0.75)
            for name, a, b in zip(("p", "s1", "s2", "s3"), (p, *states), expected):
                assert a.tobytes() == b.tobytes(), (name, n, step)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clippings_sum_of_squares_shared_with_the_pool_has_the_bits_of_the_serial_one(dtype):
    """The epoch kernel's sum of squares under clipping, its second half summed by a worker of
    the pool (``passes.sum_squares_shared``), against optim.grad_sum_squares on one thread:
    the same float64 bits, within 1e-15 of math.fsum, and inf or NaN where a gradient is."""
    import math

    import numba

    if not pool.available():
        pytest.skip(NO_POOL)
    if pool.ensure(pool_worker, 1) < 1:
        pytest.skip("the pool started no worker")

    @numba.njit(nogil=True)
    def shared(tasks, g):
        return passes.sum_squares_shared(tasks, g)

    @numba.njit(nogil=True)
    def serial(g):
        return optim.grad_sum_squares(g, None)

    rng = np.random.default_rng(12)
    tasks = np.zeros(2 * passes.SLOTS, np.int64)
    for n in (1, 2, 3, 1000, 234_752):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(dtype)
        found = shared(tasks, g)
        assert found == serial(g), n
        exact = math.fsum(float(x) * float(x) for x in g.astype(np.float64))
        assert abs(found - exact) <= 1e-15 * n * exact, n
    for bad in (np.inf, np.nan):
        for where in (0, 900):  # in this thread's half, in the worker's
            g = rng.standard_normal(1000).astype(dtype)
            g[where] = bad
            expected = serial(g)
            assert not math.isfinite(expected)
            np.testing.assert_equal(shared(tasks, g), expected)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_blas_on_the_pool_computes_what_numpy_computes_from_any_thread():
    """Once the pool runs BLAS's parallel jobs, every product in the process goes through it:
    from other threads at once (they take turns), and with more BLAS threads than workers
    (OpenBLAS's own threads then take the call)."""
    import threading

    if not pool.available():
        pytest.skip(NO_POOL)
    pool.ensure(pool_worker, 1)
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
    assert pool.ensure(pool_worker, 1) >= 1  # and the pool takes them back
    assert np.abs(A @ B - expected).max() < 1e-9


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_the_pool_wakes_its_sleeping_workers_and_a_forked_child_has_blas():
    """Workers idle for a few milliseconds sleep (futex) and wake for the next product; a
    forked child, which has none of the threads, gets OpenBLAS's own threads back."""
    import time

    if not pool.available() or not hasattr(os, "fork"):
        pytest.skip(NO_POOL)
    pool.ensure(pool_worker, 1)
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


# ====================================================================== helpers called by symbol
@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_a_helper_is_called_by_symbol_not_copied_into_its_caller():
    """``unlinked`` helpers: the caller's module declares the helper and defines none of its
    code, and the call still computes what the helper does, for each type it is called with;
    an error the helper raises reaches the caller's caller."""
    import numba

    # (fresh dispatchers, not cached: their LLVM IR is there to read, cache cold or warm)
    @numba.njit
    def largest(M, sums):
        return epoch._abs_column_sums_max(M, sums)

    @numba.njit
    def overflowing(x):
        return optim._finite_par(x, 2)

    for dtype in ("float32", "float64"):
        M = np.arange(-6.0, 6.0).reshape(4, 3).astype(dtype)
        assert largest(M, np.empty(3, dtype)) == np.abs(M).sum(axis=0).max()
    helper = epoch._abs_column_sums_max.dispatcher
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


_GELU_PASSES = """
import numpy as np
from bpkernels.backends.numba import layers as L
X, W, b = np.ones((4, 3)), np.ones((3, 5)), np.zeros(5)
Z, A = np.empty((4, 5)), np.empty((4, 5))
L.dense_forward(X, W, b, L.GELU, Z, A, True, None, L.activation_kinds([L.GELU]))
rows = L._bias_act_rows_of.dispatcher
assert sum(rows.stats.cache_misses.values()) and not sum(rows.stats.cache_hits.values())
for result in rows.overloads.values():
    ir = result.library.get_llvm_str()
    print("erf" in ir, "bpkernels__gelu" in ir, "bpkernels__normal_cdf" in ir)
"""


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_scalar_functions_called_per_element_are_linked_into_the_loop_not_called_by_symbol(
        tmp_path):
    # GELU's erf and exp, called by symbol once per element, ran its layers 20-35% slower:
    # the row pass must hold their code, for LLVM to inline it into the loop. Compiled by a
    # process with a fresh cache: a row pass loaded from the cache carries no LLVM IR.
    passes = [line.split() for line in _fresh_process(_GELU_PASSES, tmp_path).splitlines()]
    gelu_passes = [found for found in passes if found[0] == "True"]
    assert gelu_passes
    for _, gelu_by_symbol, normal_cdf_by_symbol in gelu_passes:
        assert gelu_by_symbol == normal_cdf_by_symbol == "False"


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_an_unlinked_helper_returns_optionals_and_refuses_what_it_cannot_name():
    import numba
    from numba.core import types

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
    stale = _Reload(epoch.__name__, "_abs_column_sums_max", (matrix, vector), "bpkernels_stale",
                    types.int64)
    with pytest.raises(RuntimeError, match="another version of .*_abs_column_sums_max"):
        stale()
    with pytest.raises(RuntimeError, match="another version of .*_no_such_helper"):
        _Reload(epoch.__name__, "_no_such_helper", (vector,), "bpkernels_stale", types.int64)()


_ONE_GATHER = """
import numba, numpy as np
from bpkernels.backends.numba._native import gather as K

@numba.njit
def gather(X, order, dst, scratch):
    return K.gather_shared(0, X, order, 0, order.size, dst, scratch)

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
    out = _fresh_process(_ONE_GATHER, tmp_path)
    assert out.split("\n")[0] == "6.0 [[3.0, 4.0, 5.0], [-6.0, -5.0, -4.0]] 1 0"


_CACHED_EPOCH = """
import sys, numpy as np, bpkernels as bpk
from bpkernels.backends.numba import epoch as K
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
        from bpkernels.backends.numba import losses as K
        seen = []
        class Spy(event.Listener):  # registered after the package's own listener
            def on_start(self, e):
                seen.append([e.data["dispatcher"].py_func.__name__, gc.isenabled()])
            def on_end(self, e):
                pass
        event.register("numba:compile", Spy())
        Y = np.ones((2, 3))
        K.mse(Y, Y, None, np.empty((2, 3)), np.empty(1))
        after = gc.isenabled()
        numba.njit(lambda x: x + 1)(1)  # not the package's: the collector stays on
        gc.disable()
        Y = Y.astype(np.float32)
        K.mse(Y, Y, None, np.empty((2, 3), np.float32), np.empty(1, np.float32))
        print(json.dumps([seen, after, gc.isenabled()]))
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    seen, after, after_disabled = json.loads(out.stdout)
    # (mse_of: the helper mse calls, compiled within mse's compile)
    assert seen == [["mse", False], ["mse_of", False], ["<lambda>", True], ["mse", False],
                    ["mse_of", False]]
    assert after is True  # enabled again once the compile ended
    assert after_disabled is False  # a collector the caller turned off stays off


# --------------------------------------------------------------------------- the GEMM


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
    run = numba_jit_gemm() if JIT else blas.gemm
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    for a, b in _gemm_operands(*shape, dtype, np.random.default_rng(1)):
        C = np.full((shape[0], shape[2]), np.nan, dtype)
        run(a, b, C)
        reference = a.astype(np.float64) @ b.astype(np.float64)
        np.testing.assert_allclose(C, reference, rtol=tolerance, atol=tolerance)


def numba_jit_gemm():
    import numba
    gemm = blas.gemm

    @numba.njit
    def run(A, B, C):
        gemm(A, B, C)
    return run


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pad", [0, 3], ids=["contiguous", "padded-rows"])
def test_gemm_t_matches_the_float64_product_for_every_transpose_flag(dtype, shape, pad):
    """Both compiled GEMMs of native mode: the one for C-typed operands (the epoch kernel's) and
    the general one, for rows wider apart than their length (C's too: plain mode's np.dot writes
    into a C-ordered C only, see test_numba.py)."""
    run = numba_jit_gemm_t() if JIT else blas.gemm_t
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    m, k, n = shape
    rng = np.random.default_rng(3)
    for trans_a in (False, True):
        for trans_b in (False, True):
            A = padded(rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype), pad)
            B = padded(rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype), pad)
            C = padded(np.full((m, n), np.nan, dtype), pad)
            run(A, trans_a, B, trans_b, C, 1.0, 0.0)
            a64, b64 = A.astype(np.float64), B.astype(np.float64)
            reference = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
            np.testing.assert_allclose(C, reference, rtol=tolerance, atol=tolerance)
    if JIT and not pad:  # the flags are values, not types: one compiled GEMM serves them all
        assert len(run.overloads) == 1  # (a padded array of one row is C-ordered: other types)


def numba_jit_gemm_t():
    import numba
    gemm_t = blas.gemm_t

    @numba.njit
    def run(A, trans_a, B, trans_b, C, alpha, beta):
        gemm_t(A, trans_a, B, trans_b, C, alpha, beta)
    return run


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_t_scales_the_product_and_adds_the_scaled_output(dtype):
    """C = alpha op(A) op(B) + beta C: the fused SGD update of the large models' epoch kernel
    (native mode's: plain mode's gemm_t refuses any alpha but 1 and beta but 0)."""
    run = numba_jit_gemm_t() if JIT else blas.gemm_t
    tolerance = 1e-5 if dtype == "float32" else 1e-13
    rng = np.random.default_rng(4)
    A, B = rng.standard_normal((7, 5)).astype(dtype), rng.standard_normal((7, 3)).astype(dtype)
    C = rng.standard_normal((5, 3)).astype(dtype)
    expected = -0.25 * (A.astype(np.float64).T @ B) + 0.75 * C.astype(np.float64)
    run(A, True, B, False, C, -0.25, 0.75)
    np.testing.assert_allclose(C, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("pad", [0, 3], ids=["contiguous", "padded-rows"])
def test_gemm_t_refuses_mismatched_shapes(pad):
    run = numba_jit_gemm_t() if JIT else blas.gemm_t
    A, B = padded(np.ones((3, 4)), pad), padded(np.ones((5, 2)), pad)
    with pytest.raises(ValueError, match="shapes do not match" if JIT else ""):
        run(A, False, B, False, padded(np.empty((3, 2)), pad), 1.0, 0.0)


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
def test_gemm_uses_numpys_blas_here():
    """NumPy's wheels ship an OpenBLAS with 64-bit CBLAS entry points; the kernels use it."""
    BLAS_SOURCE = blas.BLAS_SOURCE
    if "openblas" not in str(np.__config__.CONFIG["Build Dependencies"]["blas"]).lower():
        pytest.skip("this NumPy is not built with OpenBLAS")
    assert BLAS_SOURCE == jit.BLAS_SOURCE == "numpy"
    assert bpk.get_backend("numba").device_info()["gemm"] == "numpy"


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: no compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_fallback_for_a_numpy_without_cblas64(dtype):
    """The fallback that the symbols point to where NumPy's BLAS has no 64-bit CBLAS: called
    through its C address, as compiled kernels call it, in every layout."""
    import ctypes

    from numba import types

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
