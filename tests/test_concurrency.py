"""One model shared by threads (docs/api.md, "Thread safety"): fit is exclusive, so of two
fits started together exactly one trains."""
import sys
import threading
import time

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
