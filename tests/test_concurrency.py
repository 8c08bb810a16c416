"""One model shared by threads (docs/api.md, "Thread safety"): forward, predict and evaluate
from many threads at once give each thread the single-threaded numbers; fit is exclusive, so
of two fits started together exactly one trains."""
import gc
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import train

BACKENDS = [name for name in ("numpy", "numba") if name in bpk.available_backends()]


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    """Threads handed the GIL often: the interleavings that expose a race come up more."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _data(rows=64, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    return rng.standard_normal((rows, features)) + np.eye(classes, features)[y], y


def _in_threads(count, work):
    """Run ``work(i)`` in ``count`` threads started together; the errors they raised."""
    barrier, errors = threading.Barrier(count), []

    def run(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as err:  # an assertion in a thread must fail the test
            errors.append(err)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_of_two_fits_started_together_exactly_one_trains(backend, monkeypatch):
    X, y = _data()
    # A fit slow to get going (a busy machine): the steps between its start and its first
    # epoch take a while, so a guard checked early and set late lets the other fit through.
    enter = train._StepBoundaryInterrupt.__enter__

    def slow_enter(self):
        time.sleep(0.005)
        return enter(self)
    monkeypatch.setattr(train._StepBoundaryInterrupt, "__enter__", slow_enter)
    bpk.fit(bpk.MLP([4, 8, 3], backend=backend), X, y, epochs=1)  # compiled before timing races
    for trial in range(30):
        model = bpk.MLP([4, 8, 3], backend=backend, seed=trial)
        outcomes, finished = [], threading.Event()

        def hold(epoch, record):
            # The fit that trains waits for the other to return: the two overlap whatever
            # the scheduling (were both to train, each would wait out the timeout).
            finished.wait(2)

        def fit_once(_):
            try:
                bpk.fit(model, X, y, epochs=10, batch_size=16, callbacks=[hold])
                outcomes.append("trained")
            except RuntimeError as err:
                outcomes.append(str(err))
            finished.set()
        assert _in_threads(2, fit_once) == []
        assert outcomes.count("trained") == 1, (trial, outcomes)
        refused = [o for o in outcomes if o != "trained"]
        assert "fit() is already training this model" in refused[0]
        assert model.epochs_trained == 10 and not model.training
    bpk.fit(model, X, y, epochs=1)  # the refused fit left the model free
    assert model.epochs_trained == 11


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_predict_evaluate_from_many_threads_match_one_thread(backend):
    model = bpk.MLP([16, 64, 32, 5], backend=backend, seed=3)
    rng = np.random.default_rng(4)
    # Several inputs of one row count (they share a workspace size), one over a chunk, float64
    # (converted) and float32 (read in place).
    rows = [1000, 1000, 1000, 1000, 700, 700, 5000, 37]
    inputs = [rng.standard_normal((n, 16)).astype(np.float32 if i % 2 else np.float64)
              for i, n in enumerate(rows)]
    labels = [rng.integers(0, 5, n) for n in rows]
    expected = [(model.forward(X), model.predict(X), model.evaluate(X, y, "cross_entropy"))
                for X, y in zip(inputs, labels)]

    def work(i):
        for call in range(12):
            k = (i + call) % len(inputs)
            X, y = inputs[k], labels[k]
            Y, ids, scores = expected[k]
            np.testing.assert_array_equal(model.forward(X), Y)
            np.testing.assert_array_equal(model.predict(X), ids)
            assert model.evaluate(X, y, "cross_entropy") == scores
    errors = _in_threads(8, work)
    assert errors == [], errors[0]


def test_a_threads_scratch_is_reused_and_freed_with_the_thread():
    model = bpk.MLP([4, 8, 3], backend="numpy")
    X, _ = _data(rows=50)
    seen = []

    def work(_):
        model.forward(X)
        first = model._scratch(50)
        model.forward(X)
        assert model._scratch(50) is first  # no allocation once the thread's buffers exist
        seen.append(weakref.ref(first))
    assert _in_threads(4, work) == []
    gc.collect()
    assert len(seen) == 4 and all(ref() is None for ref in seen)
