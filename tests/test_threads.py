"""The thread budget (bpkernels.threads): one count for BLAS and Numba, set for the process or
for a block and restored after it, honored by the Numba backend in the thread that trains, by
the scikit-learn estimators, `bpk train` and `bpk bench`. Counts only; no timing here (speed is
the benchmark's to show)."""
import json
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import backends as registry
from bpkernels import bench, cli, threads
from bpkernels.backends.numpy_backend import NumpyBackend
from bpkernels.threads import get_num_threads, limit_threads, set_num_threads


@pytest.fixture(autouse=True)
def restore_counts():
    """Whatever a test sets, the suite after it runs on the counts it had before."""
    with limit_threads(get_num_threads()):
        yield


def blas_counts() -> set[int]:
    """The thread count of every BLAS in the process, as the libraries report it."""
    try:
        import threadpoolctl
    except ImportError:
        get, _ = threads._numpy_openblas()
        return {get()}
    return {p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"}


def numba_or_skip():
    if "numba" not in bpk.available_backends():
        pytest.skip("the Numba backend is not available here")
    import numba
    return numba


# ------------------------------------------------------------------------ set, get, restore
def test_set_and_get_round_trip():
    for n in (1, 2, 1):
        set_num_threads(n)
        assert get_num_threads() == n
        assert blas_counts() == {n}
    set_num_threads(np.int64(2))  # any integer type
    assert get_num_threads() == 2 and isinstance(get_num_threads(), int)


def test_exported_from_the_package():
    assert bpk.set_num_threads is set_num_threads and bpk.get_num_threads is get_num_threads
    assert {"set_num_threads", "get_num_threads"} <= set(bpk.__all__)


def test_limit_threads_restores_on_exit_and_on_exception():
    set_num_threads(2)
    with limit_threads(1):
        assert get_num_threads() == 1 and blas_counts() == {1}
        with limit_threads(2):  # nested blocks unwind in order
            assert get_num_threads() == 2 and blas_counts() == {2}
        assert get_num_threads() == 1 and blas_counts() == {1}
    assert get_num_threads() == 2 and blas_counts() == {2}
    with pytest.raises(RuntimeError, match="inside"):
        with limit_threads(1):
            assert blas_counts() == {1}
            raise RuntimeError("inside the block")
    assert get_num_threads() == 2 and blas_counts() == {2}


def test_limit_threads_none_changes_nothing():
    before = (threads.requested_num_threads(), blas_counts())
    with limit_threads(None):
        assert (threads.requested_num_threads(), blas_counts()) == before
    assert (threads.requested_num_threads(), blas_counts()) == before


def test_a_block_in_another_thread_limits_blas():
    # threadpoolctl >= 3.8 lets one thread (the first to set a count: here the main one) set a
    # process-wide OpenBLAS count and silently ignores every other thread. A fit(threads=1)
    # in a worker thread must still put BLAS on 1 thread, and restore it after.
    set_num_threads(2)
    seen = {}

    def worker():
        with limit_threads(1):
            seen["inside"] = (get_num_threads(), blas_counts())
        seen["after"] = blas_counts()
        set_num_threads(1)
        seen["set"] = blas_counts()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"inside": (1, {1}), "after": {2}, "set": {1}}
    set_num_threads(2)  # and the main thread still can
    assert blas_counts() == {2}


def _overlapping(first, second):
    """Run ``with first:`` in one thread and ``with second:`` in another, the second block
    entered after the first and left last (blocks of concurrent fits end in any order).
    Returns what is in force while only the second is open."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def one():
        with first():
            first_in.set()
            second_in.wait()
        first_out.set()

    def two():
        first_in.wait()
        with second():
            second_in.set()
            first_out.wait()
            seen["inside"] = (threads.requested_num_threads(), blas_counts())

    workers = [threading.Thread(target=one), threading.Thread(target=two)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return seen["inside"]


def test_blocks_of_concurrent_threads_that_end_out_of_order_restore_the_counts():
    set_num_threads(2)
    # The same n in two threads (as concurrent estimators with threads=1): the count holds
    # while either block is open and is gone when both are closed.
    assert _overlapping(lambda: limit_threads(1), lambda: limit_threads(1)) == (1, {1})
    assert (threads.requested_num_threads(), blas_counts()) == (2, {2})
    # A fit() with threads=None (limit_threads()) beside a limited block changes no count.
    _overlapping(lambda: limit_threads(1), lambda: limit_threads())
    assert (threads.requested_num_threads(), blas_counts()) == (2, {2})
    assert _overlapping(lambda: limit_threads(), lambda: limit_threads(1)) == (1, {1})
    assert (threads.requested_num_threads(), blas_counts()) == (2, {2})


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                        ("2", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_counts_are_refused_with_what_is_allowed(bad, error):
    before = (get_num_threads(), blas_counts())
    with pytest.raises(error, match="integer >= 1"):
        set_num_threads(bad)
    if bad is not None:  # limit_threads(None) is valid: it keeps the counts
        with pytest.raises(error, match="integer >= 1"):
            with limit_threads(bad):
                pass
    assert (get_num_threads(), blas_counts()) == before


# ------------------------------------------------------------------------ BLAS without threadpoolctl
def test_blas_through_numpys_openblas_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl now fails
    try:
        get, _ = threads._numpy_openblas()
    except ImportError as err:  # a NumPy without a bundled OpenBLAS (MKL, Accelerate)
        assert "pip install threadpoolctl" in str(err)
        with pytest.raises(ImportError, match="pip install threadpoolctl"):
            set_num_threads(1)
        return
    with limit_threads(1):
        assert get() == 1 and get_num_threads() == 1
        with limit_threads(2):
            assert get() == 2
        assert get() == 1
    set_num_threads(2)
    assert get() == 2


def test_no_reachable_blas_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    monkeypatch.setattr(threads, "numpy_blas_libraries", lambda: [])
    threads._numpy_openblas.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install threadpoolctl"):
            set_num_threads(1)
        assert isinstance(get_num_threads(), int)  # asking never fails
    finally:
        threads._numpy_openblas.cache_clear()


# ------------------------------------------------------------------------ Numba
def test_numba_follows_and_is_clamped_to_its_pool():
    numba = numba_or_skip()
    be = bpk.get_backend("numba")
    pool = numba.config.NUMBA_NUM_THREADS
    with limit_threads(1):
        assert numba.get_num_threads() == be.threads == 1
    with limit_threads(pool + 3):  # a budget above the pool: Numba takes the pool, BLAS n
        assert numba.get_num_threads() == pool
        assert get_num_threads() == pool + 3 and blas_counts() == {pool + 3}


def test_numba_in_the_training_thread_honors_the_process_count():
    numba = numba_or_skip()
    set_num_threads(1)
    seen = {}

    def train() -> None:
        # Numba keeps its count per thread: a fresh thread starts on the whole pool, and fit
        # (through limit_threads()) applies the process's count there for the training.
        seen["fresh"] = numba.get_num_threads()
        model = bpk.MLP([4, 8, 3], backend="numba", seed=0)
        X, y = np.ones((16, 4), np.float32), np.arange(16) % 3
        bpk.fit(model, X, y, epochs=1, callbacks=[
            lambda epoch, record: seen.setdefault("training", numba.get_num_threads())])
        seen["after"] = numba.get_num_threads()

    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
    assert seen == {"fresh": numba.config.NUMBA_NUM_THREADS, "training": 1,
                    "after": numba.config.NUMBA_NUM_THREADS}


def test_a_count_set_before_numba_is_imported_rules_the_backend():
    numba_or_skip()
    code = ("import sys, bpkernels as bpk; bpk.set_num_threads(1); "
            "imported = 'numba' in sys.modules; be = bpk.get_backend('numba'); import numba; "
            "print(imported, numba.get_num_threads(), be.threads, bpk.get_num_threads())")
    # NUMBA_NUM_THREADS alone would put BLAS and Numba on 2: the budget set in code wins.
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    env.pop("OPENBLAS_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.split() == ["False", "1", "1", "1"]  # never imports Numba itself


# ------------------------------------------------------------------------ the registry
class _CountingBackend(NumpyBackend):
    """A backend whose own pool holds at most 3 threads; records every set_threads call."""

    name = "counting"
    max_threads = 3
    calls: list = []

    def set_threads(self, n: int) -> None:
        type(self).calls.append(n)


@pytest.fixture
def counting_backend(monkeypatch):
    """The registry knows a "counting" backend, not loaded yet."""
    module = types.ModuleType("bpk_counting_backend")
    module.CountingBackend = _CountingBackend
    monkeypatch.setitem(sys.modules, "bpk_counting_backend", module)
    monkeypatch.setitem(registry._REGISTRY, "counting",
                        ("bpk_counting_backend", "CountingBackend", None))
    monkeypatch.setattr(_CountingBackend, "calls", [])
    yield _CountingBackend
    registry._instances.pop("counting", None)


def test_the_registry_count_reaches_backends_loaded_later(counting_backend):
    set_num_threads(2)
    assert counting_backend.calls == []  # not loaded yet: nothing to tell
    backend = bpk.get_backend("counting")
    assert isinstance(backend, counting_backend) and counting_backend.calls == [2]


def test_the_registry_count_reaches_loaded_backends_within_their_pool(counting_backend):
    bpk.get_backend("counting")
    set_num_threads(2)
    with limit_threads(1):
        pass
    # A budget above the pool: the backend is asked for its whole pool, never more.
    set_num_threads(5)
    assert counting_backend.calls[-4:] == [2, 1, 2, 3]


def test_a_registry_without_a_count_leaves_backends_alone(counting_backend):
    registry.set_num_threads(None)
    bpk.get_backend("counting")
    registry.set_num_threads(None)
    assert counting_backend.calls == []
    with pytest.raises(ValueError, match="integer >= 1 or None"):
        registry.set_num_threads(0)


def test_the_base_backend_has_no_threads_to_set():
    backend = NumpyBackend()
    assert backend.max_threads is None
    backend.set_threads(4)  # nothing to do, and no error
    with pytest.raises(ValueError):
        backend.set_threads(0)


# ------------------------------------------------------------------------ scikit-learn
def test_estimator_threads_parameter():
    pytest.importorskip("sklearn")
    from sklearn.base import clone
    from bpkernels.sklearn import MLPClassifier, MLPRegressor

    for Estimator in (MLPClassifier, MLPRegressor):
        assert Estimator().get_params()["threads"] is None
        est = Estimator(threads=1)
        assert est.get_params()["threads"] == 1 and clone(est).get_params()["threads"] == 1
    X = np.random.default_rng(0).standard_normal((40, 3))
    y = (X[:, 0] > 0).astype(int)
    set_num_threads(2)
    seen = []
    est = MLPClassifier((8,), max_iter=2, backend="numpy", random_state=0, threads=1)
    original = est._fit_checked

    def spy(*args, **kwargs):
        seen.append((get_num_threads(), blas_counts()))
        return original(*args, **kwargs)

    est._fit_checked = spy
    with pytest.warns(Warning):  # ConvergenceWarning: 2 epochs
        est.fit(X, y)
    assert seen == [(1, {1})]
    assert est.predict(X).shape == (40,)
    assert get_num_threads() == 2 and blas_counts() == {2}  # restored after fit and predict
    for bad, error in ((0, ValueError), ("2", TypeError)):
        with pytest.raises(error, match="threads must be None or an integer >= 1"):
            MLPClassifier(threads=bad).fit(X, y)


# ------------------------------------------------------------------------ command line
def test_bpk_train_threads(capsys, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, X=rng.standard_normal((60, 4)), y=rng.integers(0, 2, 60))
    set_num_threads(2)
    code = cli.main(["train", "--data", str(data), "--epochs", "1", "--layers", "8",
                     "--threads", "1", "--backend", "numpy", "--quiet"])
    assert code == 0
    assert get_num_threads() == 2 and blas_counts() == {2}
    assert cli.main(["train", "--data", str(data), "--threads", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0] and ">= 1" in err[0]


def test_bench_times_each_thread_count(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code = cli.main(["bench", "--quick", "--configs", "20-16-4:8:30", "--backends", "numpy",
                     "--threads", "2,1", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "x 1 thr" in out.splitlines()[1]
    records = json.loads(path.read_text())["results"]
    rows = {(r["name"], r["threads"]): r for r in records}
    assert set(rows) == {(name, n) for name in ("gemm-floor", "numpy") for n in (1, 2)}
    for name in ("gemm-floor", "numpy"):
        assert rows[name, 1]["thread_ratio"] == 1.0
        assert rows[name, 2]["thread_ratio"] == pytest.approx(
            rows[name, 2]["epochs_per_sec"] / rows[name, 1]["epochs_per_sec"])
    # x floor is the median of the per-round ratios (2 rounds with --quick: their mean).
    per_round = [t / f for t, f in zip(rows["numpy", 2]["round_seconds"],
                                       rows["gemm-floor", 2]["round_seconds"])]
    assert rows["numpy", 2]["floor_ratio"] == pytest.approx(sum(per_round) / 2)


def test_bench_run_restores_the_counts():
    set_num_threads(2)
    options = bench.BenchOptions(backends=["numpy"], configs=[bench.parse_config("8-4:4:9")],
                                 dtypes=["float32"], peers=[], repeats=1, threads=[1])
    results = bench.run(options)
    assert {r.threads for r in results} == {1}
    assert all(ratio is None for ratio in bench.thread_ratios(results).values())
    assert get_num_threads() == 2 and blas_counts() == {2}
    with pytest.raises(ValueError, match="--ranks takes one --threads count"):
        cli.cmd_bench(cli._build_parser().parse_args(
            ["bench", "--ranks", "1,2", "--threads", "1,2", "--backends", "numpy"]))
