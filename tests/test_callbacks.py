"""EarlyStopping: Keras's semantics, checked against Keras's own EarlyStopping (a test-only
reference, on its PyTorch backend) over random records; and in fit() on every backend, the
model ends with its best epoch's weights and optimizer state, exactly as a run stopped there."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bpkernels as bpk
from bpkernels.callbacks import EarlyStopping


@pytest.fixture(scope="module")
def keras_early_stopping():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    return keras.callbacks.EarlyStopping


class _KerasModel:
    """What Keras's callback touches of a model: its weights and the stop flag."""
    metrics: list = []
    stop_training = False
    weights = 0

    def get_weights(self):
        return [self.weights]

    def set_weights(self, w):
        self.weights = w[0]


class _Model:
    """What ours touches: the backend, the flat parameters; the epoch's index is the weights."""
    def __init__(self):
        self.backend = bpk.get_backend("numpy")
        self.params = np.zeros(3)


class _Optimizer:
    def __init__(self):
        self.state = {"exp_avg": np.zeros(3)}
        self.step_count = 0


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from([1.0, 2.0, 2.0, 3.0, 2.5, 0.5, 1.5]), min_size=1,
                       max_size=12),
       monitor=st.sampled_from(["val_loss", "val_accuracy"]),
       patience=st.integers(0, 3), min_delta=st.sampled_from([0.0, 0.4, -0.6]),
       mode=st.sampled_from(["auto", "min", "max"]),
       baseline=st.sampled_from([None, 1.8, 2.2]), start=st.integers(0, 3),
       restore=st.booleans())
def test_stops_restores_and_counts_as_keras(keras_early_stopping, values, monitor, patience,
                                            min_delta, mode, baseline, start, restore):
    kw = dict(monitor=monitor, patience=patience, min_delta=min_delta, mode=mode,
              baseline=baseline, start_from_epoch=start, restore_best_weights=restore)
    theirs = keras_early_stopping(**kw)
    if mode == "auto" and monitor == "val_accuracy":
        theirs.mode = "max"  # Keras reads the direction off its compiled metric objects
    km = _KerasModel()
    theirs.set_model(km)
    theirs.on_train_begin()
    ours, model, opt = EarlyStopping(**kw), _Model(), _Optimizer()
    ours.on_fit_start(model, opt)
    history = bpk.History()
    k_stop = o_stop = None
    for i, v in enumerate(values):
        km.weights = i
        model.params[:] = i
        opt.state["exp_avg"][:] = -i
        opt.step_count = 10 * i
        theirs.on_epoch_end(i, {monitor: v})
        stop = ours(i + 1, {monitor: v})
        if km.stop_training and k_stop is None:
            k_stop = i
        if stop and o_stop is None:
            o_stop = i
        if km.stop_training or stop:
            break
    theirs.on_train_end()
    ours.on_fit_end(model, history)
    assert o_stop == k_stop
    assert history.stopped_epoch == (None if k_stop is None else k_stop + 1)
    if restore:
        assert model.params[0] == km.weights
        assert opt.state["exp_avg"][0] == -km.weights and opt.step_count == 10 * km.weights
    if theirs.best is not None:
        assert history.best_epoch == theirs.best_epoch + 1


def test_fit_ends_with_the_best_epochs_weights_and_optimizer_state(backend_name):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 6)), rng.integers(0, 3, 120)
    Xv, yv = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)  # noise: val_loss soon rises
    kw = dict(backend=backend_name, dtype="float64", seed=1)
    model = bpk.MLP((6, 32, 3), **kw)
    stopper = EarlyStopping(patience=2, restore_best_weights=True)
    history = bpk.fit(model, X, y, optimizer=bpk.Adam(lr=0.05), epochs=40, batch_size=16,
                      validation_data=(Xv, yv), callbacks=[stopper])
    best = history.best_epoch
    assert history["val_loss"][best - 1] == min(history["val_loss"])
    assert history.stopped_epoch == len(history) == best + 2 < 40
    again = bpk.MLP((6, 32, 3), **kw)
    bpk.fit(again, X, y, optimizer=bpk.Adam(lr=0.05), epochs=best, batch_size=16)
    for (W, b), (W2, b2) in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    assert model.optimizer.step_count == again.optimizer.step_count
    for name, buf in again.optimizer.state.items():
        np.testing.assert_array_equal(model.backend.to_host(model.optimizer.state[name]),
                                      again.backend.to_host(buf))


def test_without_restoring_the_last_epochs_weights_stay_and_nothing_is_copied():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), rng.integers(0, 2, 60)
    model = bpk.MLP((4, 8, 2), dtype="float64")
    stopper = EarlyStopping(monitor="loss", patience=0, min_delta=10.0)
    history = bpk.fit(model, X, y, epochs=5, callbacks=[stopper])
    assert (history.best_epoch, history.stopped_epoch, len(history)) == (1, 2, 2)
    assert stopper._snapshot is None


@pytest.mark.parametrize("make,error,match", [
    (lambda: EarlyStopping(monitor=""), TypeError, "monitor must name a History record"),
    (lambda: EarlyStopping(mode="up"), ValueError, "mode must be one of 'auto', 'min', 'max'"),
    (lambda: EarlyStopping(patience=-1), ValueError, "patience must be >= 0"),
    (lambda: EarlyStopping(patience=1.5), TypeError, "patience must be an integer, got float"),
    (lambda: EarlyStopping(min_delta=float("nan")), ValueError, "min_delta must be a finite"),
    (lambda: EarlyStopping(baseline="1"), TypeError, "baseline must be a number or None"),
])
def test_bad_arguments_are_one_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_record_the_history_lacks_is_named():
    X, y = np.zeros((8, 2)), np.zeros(8, dtype=np.int64)
    with pytest.raises(KeyError, match="'val_loss', which the History does not record"):
        bpk.fit(bpk.MLP((2, 2)), X, y, epochs=1, callbacks=[EarlyStopping()])
    assert EarlyStopping(patience=np.int64(2)).patience == 2


def test_every_callback_sees_the_epoch_on_which_another_asks_to_stop():
    seen = []
    X, y = np.zeros((8, 2)), np.zeros(8, dtype=np.int64)
    history = bpk.fit(bpk.MLP((2, 2)), X, y, epochs=5,
                      callbacks=[lambda e, r: e == 2, lambda e, r: seen.append(e)])
    assert len(history) == 2 and seen == [1, 2]
