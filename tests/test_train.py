"""fit(): learning, batching, determinism, history, callbacks and divergence."""
import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import datasets

BACKENDS = bpk.available_backends()


@pytest.fixture(scope="module")
def digits_split():
    pytest.importorskip("sklearn")
    X, y = datasets.load_digits()
    X_tr, X_te, y_tr, y_te = datasets.train_test_split(X, y, test_size=0.2, seed=0, stratify=True)
    X_tr, X_te = datasets.standardize(X_tr, X_te)
    return X_tr, X_te, y_tr, y_te


@pytest.mark.parametrize("backend", BACKENDS)
def test_digits_reaches_97_percent(digits_split, backend):
    X_tr, X_te, y_tr, y_te = digits_split
    model = bpk.MLP([64, 256, 10], backend=backend, seed=0)
    history = bpk.fit(model, X_tr, y_tr, loss="cross_entropy", optimizer=bpk.Adam(1e-3),
                      epochs=20, batch_size=32, validation_data=(X_te, y_te))
    accuracy = float(np.mean(model.predict(X_te) == y_te))
    assert accuracy >= 0.97
    assert history["val_accuracy"][-1] == pytest.approx(accuracy)
    assert history["loss"][-1] < history["loss"][0]


def _blobs(n=90, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.standard_normal((n, 4)) + 4.0 * np.eye(3, 4)[y]
    return X, y


def test_final_partial_batch_is_trained():
    # 10 rows, batch 4: steps of 4, 4 and 2 rows. Reproduce them by hand with loss_and_grads.
    X, y = _blobs(10)
    model = bpk.MLP([4, 5, 3], dtype="float64", seed=3)
    manual = bpk.MLP([4, 5, 3], dtype="float64", seed=3)
    bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.1), epochs=1, batch_size=4, shuffle=False)
    for start in (0, 4, 8):
        _, grads = manual.loss_and_grads(X[start:start + 4], y[start:start + 4], "cross_entropy")
        manual.set_weights([(W - 0.1 * dW, b - 0.1 * db)
                            for (W, b), (dW, db) in zip(manual.get_weights(), grads)])
    assert model.optimizer.step_count == 3
    for (W, b), (W2, b2) in zip(model.get_weights(), manual.get_weights()):
        np.testing.assert_allclose(W, W2, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b, b2, rtol=1e-12, atol=1e-14)


def test_epoch_loss_is_the_row_weighted_mean_of_step_losses():
    X, y = _blobs(10)
    model = bpk.MLP([4, 3], dtype="float64", seed=0)
    history = bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.0), epochs=1, batch_size=4, shuffle=False)
    # lr 0: every step sees the initial weights, so the epoch loss is the full-data loss.
    assert history["loss"][0] == pytest.approx(model.evaluate(X, y, "cross_entropy")["loss"], rel=1e-12)
    expected_acc = float(np.mean(model.predict(X) == y))
    assert history["accuracy"][0] == pytest.approx(expected_acc)


def test_same_seed_same_trajectory_and_shuffle_changes_it():
    X, y = _blobs()
    runs = []
    for seed in (0, 0, 1):
        model = bpk.MLP([4, 6, 3], seed=0)
        runs.append(bpk.fit(model, X, y, epochs=3, batch_size=8, seed=seed)["loss"])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_history_records_and_callbacks_stop():
    X, y = _blobs()
    seen = []

    def stop_after_two(epoch, record):
        seen.append((epoch, sorted(record)))
        return epoch == 2

    model = bpk.MLP([4, 6, 3])
    history = bpk.fit(model, X, y, epochs=5, batch_size=16, callbacks=[stop_after_two],
                      validation_data=(X[:20], y[:20]))
    assert len(history) == 2 and model.epochs_trained == 2
    assert [e for e, _ in seen] == [1, 2]
    assert set(history.history) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                                    "seconds", "samples_per_sec"}
    assert all(s > 0 for s in history["samples_per_sec"])
    with pytest.raises(KeyError, match="records"):
        history["nope"]


def test_zero_epochs_trains_nothing():
    X, y = _blobs()
    model = bpk.MLP([4, 3])
    before = model.get_weights()
    assert len(bpk.fit(model, X, y, epochs=0)) == 0
    for (W, b), (W2, b2) in zip(before, model.get_weights()):
        np.testing.assert_array_equal(W, W2)


def test_regression_with_mse_learns():
    X, y = datasets.make_regression(400, 5, seed=0)
    model = bpk.MLP([5, 32, 1], activation="tanh", dtype="float64")
    history = bpk.fit(model, X, y, loss="mse", optimizer="adam", epochs=30, batch_size=32)
    assert history["loss"][-1] < 0.3 * history["loss"][0]
    assert "accuracy" not in history.epochs[0]


def test_binary_cross_entropy_single_output_reports_accuracy():
    X, y = _blobs(120)
    y = (y == 0).astype(float)
    model = bpk.MLP([4, 8, 1])
    history = bpk.fit(model, X, y, loss="binary_cross_entropy", optimizer=bpk.Adam(1e-2),
                      epochs=20, batch_size=16)
    assert history["accuracy"][-1] > 0.9
    assert np.mean(model.predict(X) == y) == pytest.approx(history["accuracy"][-1], abs=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_stops_and_keeps_last_finite_weights(backend):
    X, y = datasets.make_regression(64, 4, seed=0)
    y = y * 1e3
    model = bpk.MLP([4, 16, 1], backend=backend, dtype="float32", seed=0)
    snapshots = []  # weights after every completed epoch
    with pytest.raises(bpk.TrainingDiverged) as info:
        bpk.fit(model, X, y, loss="mse", optimizer=bpk.SGD(lr=10.0), epochs=50, batch_size=8,
                callbacks=[lambda e, r: snapshots.append(model.get_weights())])
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert "epoch" in str(err) and "step" in str(err)
    assert err.epoch == model.epochs_trained + 1
    for W, b in model.get_weights():
        assert np.isfinite(W).all() and np.isfinite(b).all()
    # The optimizer counts only the steps that changed the weights.
    assert model.optimizer.step_count == err.global_step - 1
    # Replaying the finite steps from scratch reproduces the kept weights exactly.
    replay = bpk.MLP([4, 16, 1], backend=backend, dtype="float32", seed=0)
    steps_before = (err.epoch - 1) * 8 + err.step - 1
    opt = bpk.SGD(lr=10.0)
    if steps_before:
        bpk.fit(replay, X, y, loss="mse", optimizer=opt, epochs=err.epoch - 1, batch_size=8)
        partial = err.step - 1
        order = np.random.default_rng([0, err.epoch - 1]).permutation(64)[:partial * 8]
        if partial:
            bpk.fit(replay, X[order], y[order], loss="mse", optimizer=opt, epochs=1,
                    batch_size=8, shuffle=False)
        for (W, b), (W2, b2) in zip(model.get_weights(), replay.get_weights()):
            np.testing.assert_allclose(W, W2, rtol=1e-6)


def test_ctrl_c_takes_effect_between_steps():
    # SIGINT raised from inside a step (here: from the optimizer update) must not interrupt the
    # update half-way: the step completes, then fit() raises KeyboardInterrupt.
    import os
    import signal
    X, y = _blobs(40)
    model = bpk.MLP([4, 6, 3], dtype="float64", seed=0)
    opt = bpk.Adam(lr=1e-2)
    real_update = opt._update
    calls = []

    def update_then_interrupt(*args):
        real_update(*args)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            calls.append("after")  # still inside the step: the signal was deferred

    opt._update = update_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        bpk.fit(model, X, y, optimizer=opt, epochs=2, batch_size=8)
    assert calls[:4] == [1, 1, 1, "after"] and len(calls) == 4
    assert opt.step_count == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # The weights are exactly those of three uninterrupted steps.
    replay = bpk.MLP([4, 6, 3], dtype="float64", seed=0)
    order = np.random.default_rng([0, 0]).permutation(40)[:24]
    bpk.fit(replay, X[order], y[order], optimizer=bpk.Adam(lr=1e-2), epochs=1, batch_size=8,
            shuffle=False)
    for (W, b), (W2, b2) in zip(model.get_weights(), replay.get_weights()):
        np.testing.assert_array_equal(W, W2)


# --------------------------------------------------------------------------- threads=
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_threads_runs_on_that_count_and_restores_the_one_before(backend):
    from bpkernels.threads import get_num_threads, limit_threads
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    seen = []
    with limit_threads(2):
        model = bpk.MLP([5, 8, 3], backend=backend, dtype="float64", seed=1)
        history = bpk.fit(model, X, y, optimizer="sgd", epochs=2, batch_size=16, threads=1,
                          callbacks=[lambda epoch, record: seen.append(get_num_threads())])
        assert get_num_threads() == 2
    assert seen == [1, 1]
    # The count changes where the work runs, never the numbers.
    reference = bpk.MLP([5, 8, 3], backend=backend, dtype="float64", seed=1)
    again = bpk.fit(reference, X, y, optimizer="sgd", epochs=2, batch_size=16)
    np.testing.assert_allclose(history["loss"], again["loss"], rtol=1e-12)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (True, TypeError), (1.5, TypeError)])
def test_fit_refuses_a_bad_thread_count_before_training(bad, error):
    model = bpk.MLP([3, 2], dtype="float64")
    before = model.get_weights()
    with pytest.raises(error, match="threads"):
        bpk.fit(model, np.ones((4, 3)), np.array([0, 1, 0, 1]), threads=bad)
    for (W0, b0), (W1, b1) in zip(before, model.get_weights()):
        np.testing.assert_array_equal(W0, W1)
        np.testing.assert_array_equal(b0, b1)


def test_a_fit_that_cannot_start_leaves_the_models_optimizer(monkeypatch):
    # fit(optimizer=..., threads=...) where the thread count cannot be applied (no threadpoolctl
    # and no OpenBLAS that bpkernels can reach) fails before any step: the model keeps the
    # optimizer it had, with its state and step count, not a fresh one that never trained.
    from bpkernels import threads
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 3)), rng.integers(0, 2, 20)
    model = bpk.MLP([3, 4, 2], dtype="float64")
    bpk.fit(model, X, y, optimizer=bpk.Adam(lr=1e-2), epochs=1, batch_size=8)
    opt, steps = model.optimizer, model.optimizer.step_count
    state = {name: buf.copy() for name, buf in opt.state.items()}

    def unreachable(n):
        raise ImportError("install threadpoolctl")
    monkeypatch.setattr(threads, "_limit_blas", unreachable)
    with pytest.raises(ImportError, match="threadpoolctl"):
        bpk.fit(model, X, y, optimizer="sgd", epochs=1, threads=1)
    assert model.optimizer is opt and opt.step_count == steps and set(opt.state) == set(state)
    for name, buf in opt.state.items():
        np.testing.assert_array_equal(buf, state[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_models_trained_in_concurrent_threads_train_as_alone(backend):
    # A backend is one object per process: models that train at once in threads (concurrent
    # estimators, a server) must not share its scratch buffers (NumPy releases the GIL). The
    # CuPy backend's scratch, stream and graphs are shared: its fits take turns (its
    # training_lock); before, this case crashed the CPU stand-in or trained wrong.
    import threading

    def train(seed):
        rng = np.random.default_rng(seed)
        X, y = rng.standard_normal((256, 32)), rng.integers(0, 10, 256)
        model = bpk.MLP([32, 64, 10], activation="tanh", backend=backend, dtype="float64",
                        seed=seed)
        bpk.fit(model, X, y, optimizer=bpk.Adam(1e-3), epochs=3, batch_size=32, seed=seed)
        return model.get_weights()

    alone = [train(seed) for seed in range(4)]
    together, errors = {}, []

    def worker(seed):
        try:
            together[seed] = train(seed)
        except Exception as err:  # reported below, with the thread's seed
            errors.append((seed, err))
    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for seed in range(4):
        for (W, b), (W0, b0) in zip(together[seed], alone[seed]):
            np.testing.assert_array_equal(W, W0)
            np.testing.assert_array_equal(b, b0)


# --------------------------------------------------------------------------- during fit()
def test_a_model_is_not_moved_or_refitted_while_fit_trains_it():
    # The epoch loop holds the model's buffers: a move from a callback would leave the rest
    # of training updating arrays the model no longer owns, silently lost.
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((32, 4)), rng.integers(0, 2, 32)
    model = bpk.MLP([4, 6, 2], dtype="float64")
    errors = []

    def meddle(epoch, record):
        for attempt in (lambda: model.to("numpy", "float32"),
                        lambda: bpk.fit(model, X, y, epochs=1)):
            try:
                attempt()
            except RuntimeError as err:
                errors.append(str(err))

    bpk.fit(model, X, y, optimizer="sgd", epochs=2, batch_size=16, callbacks=[meddle])
    assert len(errors) == 4
    assert "model.to() cannot move a model while fit() trains it" in errors[0]
    assert "fit() is already training this model" in errors[1]
    assert model.dtype.name == "float64"
    model.to("numpy", "float32")  # after fit() returns, it moves
    assert model.dtype.name == "float32"
    bpk.fit(model, X, y, epochs=1)


def test_a_failed_fit_leaves_the_model_movable():
    model = bpk.MLP([3, 2], dtype="float64")
    with pytest.raises(RuntimeError, match="callback failed"):
        bpk.fit(model, np.ones((4, 3)), np.array([0, 1, 0, 1]), epochs=2,
                callbacks=[lambda e, r: (_ for _ in ()).throw(RuntimeError("callback failed"))])
    model.to("numpy", "float32")
    assert model.dtype.name == "float32"


# ------------------------------------------------------------------ the epoch loop
def _loop_data():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 23)
    return rng.standard_normal((23, 4)) + np.eye(3, 4)[y], y


def test_an_epoch_loop_driven_by_hand_trains_as_fit():
    X, y = _loop_data()
    fitted = bpk.MLP([4, 8, 3], backend="numpy", dtype="float64", seed=1)
    history = bpk.fit(fitted, X, y, optimizer=bpk.SGD(lr=0.1, momentum=0.9), epochs=3,
                      batch_size=5, seed=2)
    model = bpk.MLP([4, 8, 3], backend="numpy", dtype="float64", seed=1)
    Xp, T = model.prepare(X, y, "cross_entropy")
    opt = bpk.SGD(lr=0.1, momentum=0.9)
    loop = bpk.EpochLoop(model, Xp, T, loss="cross_entropy", optimizer=opt, batch_size=5)
    with loop:
        assert model.training and model.optimizer is opt
        records = [loop.epoch(shuffle=True, seed=2) for _ in range(2)]
    with loop:  # entered again: the next epoch goes on where the last one stopped
        records.append(loop.epoch(shuffle=True, seed=2))
    assert not model.training
    assert [r["loss"] for r in records] == history["loss"]
    assert [r["epoch"] for r in records] == [1, 2, 3] and model.epochs_trained == 3
    assert opt.step_count == fitted.optimizer.step_count == 3 * 5
    for (W, b), (W2, b2) in zip(model.get_weights(), fitted.get_weights()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)


def test_an_epoch_loop_holds_its_model():
    X, y = _loop_data()
    model = bpk.MLP([4, 8, 3], backend="numpy", seed=1)
    Xp, T = model.prepare(X, y, "cross_entropy")
    loop = bpk.EpochLoop(model, Xp, T, loss="cross_entropy", optimizer=bpk.Adam(), batch_size=8)
    with pytest.raises(RuntimeError, match="inside 'with loop:'"):
        loop.epoch()
    with loop:
        with pytest.raises(RuntimeError, match="already training"):
            bpk.fit(model, X, y, epochs=1)
        with pytest.raises(RuntimeError, match="fit\\(\\) trains it"):
            model.to("numpy", "float64")
    assert model.epochs_trained == 0 and not model.training


def test_fit_without_comm_never_imports_distributed():
    import subprocess
    import sys
    code = ("import sys, numpy as np, bpkernels as bpk; "
            "m = bpk.MLP([3, 4, 2], backend='numpy'); "
            "bpk.fit(m, np.ones((6, 3)), np.arange(6) % 2, epochs=1); "
            "print(sorted(n for n in ('bpkernels.distributed', 'mpi4py') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
