"""Checkpoints: round trip on every backend, exact resume, atomic saves, bad files."""
import json
import os
import warnings
import zipfile

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels.testing import TOLERANCES

BACKENDS = bpk.available_backends()
OPTIMIZERS = [
    lambda: bpk.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda: bpk.Adam(lr=1e-2, weight_decay=1e-3),
    lambda: bpk.AdamW(lr=1e-2),
    lambda: bpk.RMSprop(lr=1e-2, momentum=0.5, centered=True),
]


def _data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return rng.standard_normal((n, 6)) + np.eye(3, 6)[y], y


def _assert_same_weights(a, b, rtol=0.0):
    for (W, bias), (W2, bias2) in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(W, W2, rtol=rtol, atol=0)
        np.testing.assert_allclose(bias, bias2, rtol=rtol, atol=0)


@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_gives_the_uninterrupted_trajectory(tmp_path, make_opt, dtype):
    X, y = _data()
    straight = bpk.MLP([6, 8, 3], activation="tanh", dtype=dtype, seed=2)
    h_straight = bpk.fit(straight, X, y, optimizer=make_opt(), epochs=4, batch_size=16, seed=5)

    first = bpk.MLP([6, 8, 3], activation="tanh", dtype=dtype, seed=2)
    h1 = bpk.fit(first, X, y, optimizer=make_opt(), epochs=2, batch_size=16, seed=5)
    first.save(tmp_path / "ckpt.npz")
    resumed = bpk.load(tmp_path / "ckpt.npz")
    assert resumed.epochs_trained == 2
    assert resumed.optimizer.step_count == first.optimizer.step_count == 8
    h2 = bpk.fit(resumed, X, y, epochs=2, batch_size=16, seed=5)  # optimizer=None: the restored one

    assert h1["loss"] + h2["loss"] == h_straight["loss"]
    _assert_same_weights(straight, resumed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_keeps_architecture_weights_and_optimizer(tmp_path, backend):
    X, y = _data()
    model = bpk.MLP([6, 5, 4, 3], activation=["relu", "gelu"], dtype="float64", seed=7)
    bpk.fit(model, X, y, optimizer=bpk.Adam(lr=3e-3, betas=(0.8, 0.99)), epochs=1)
    path = tmp_path / "m.bpk"  # any suffix: the format is in the file, not its name
    model.save(path)
    loaded = bpk.load(path, backend=backend)
    assert loaded.sizes == (6, 5, 4, 3)
    assert loaded.activations == ("relu", "gelu")
    assert loaded.dtype == np.float64 and loaded.backend.name == backend
    _assert_same_weights(model, loaded)
    assert loaded.optimizer.betas == (0.8, 0.99) and loaded.optimizer.lr == 3e-3
    for name, buf in model.optimizer.state.items():
        np.testing.assert_array_equal(model.backend.to_host(buf),
                                      loaded.backend.to_host(loaded.optimizer.state[name]))
    # Bit for bit on the backend that saved it; on another, to float64 parity (DESIGN.md):
    # its BLAS and erf may round differently.
    tol = 0.0 if backend == model.backend.name else 1e-12
    np.testing.assert_allclose(loaded.forward(X), model.forward(X), rtol=tol, atol=tol)


@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_on_any_backend_training_goes_on_as_on_the_original(tmp_path, backend, dtype,
                                                                    make_opt):
    if dtype not in bpk.get_backend(backend).dtypes:
        pytest.skip(f"backend {backend!r} does not support {dtype}")
    X, y = _data()
    original = bpk.MLP([6, 8, 3], activation="tanh", dtype=dtype, seed=2)
    bpk.fit(original, X, y, optimizer=make_opt(), epochs=2, batch_size=16, seed=5)
    original.save(tmp_path / "ckpt.npz")
    loaded = bpk.load(tmp_path / "ckpt.npz", backend=backend)
    assert loaded.backend.name == backend
    _assert_same_weights(original, loaded)  # the file's numbers, bit for bit

    h_loaded = bpk.fit(loaded, X, y, epochs=2, batch_size=16, seed=5)
    h_original = bpk.fit(original, X, y, epochs=2, batch_size=16, seed=5)
    tol = TOLERANCES[dtype]  # the backends' own rounding
    np.testing.assert_allclose(h_loaded["loss"], h_original["loss"], rtol=tol.rtol, atol=tol.atol)
    assert loaded.optimizer.step_count == original.optimizer.step_count == 16
    for (W, b), (rW, rb) in zip(loaded.get_weights(), original.get_weights()):
        scale = max(np.abs(rW).max(), np.abs(rb).max())  # as bpkernels.testing judges weights
        assert np.abs(W - rW).max() <= tol.atol + tol.rtol * scale
        assert np.abs(b - rb).max() <= tol.atol + tol.rtol * scale


def test_model_without_optimizer_round_trips(tmp_path):
    model = bpk.MLP([3, 2])
    model.save(tmp_path / "fresh.npz")
    loaded = bpk.load(tmp_path / "fresh.npz")
    assert loaded.optimizer is None
    _assert_same_weights(model, loaded)


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "good.npz"
    model = bpk.MLP([3, 4, 2], seed=1)
    model.save(path)
    before = path.read_bytes()

    other = bpk.MLP([3, 4, 2], seed=2)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["good.npz"]  # no temporary left behind


def test_save_into_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bpk.MLP([2, 2]).save(tmp_path / "nope" / "m.npz")


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        bpk.load(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.npz"
    bpk.MLP([8, 16, 4]).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(bpk.CheckpointError, match="cut.npz"):
        bpk.load(path)


def test_foreign_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(bpk.CheckpointError, match="notes.txt"):
        bpk.load(text)
    other = tmp_path / "other.npz"
    np.savez(other, X=np.zeros(3))
    with pytest.raises(bpk.CheckpointError, match="not a bpkernels checkpoint"):
        bpk.load(other)
    fake = tmp_path / "fake.npz"
    np.savez(fake, meta=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(bpk.CheckpointError, match="foreign"):
        bpk.load(fake)


def _rewrite(path, **changes):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    for key, value in changes.items():
        if key == "meta":
            meta.update(value)
        elif value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def test_inconsistent_checkpoints(tmp_path):
    path = tmp_path / "m.npz"
    model = bpk.MLP([4, 3, 2])
    bpk.fit(model, np.ones((4, 4)), np.array([0, 1, 0, 1]), optimizer="adam", epochs=1)
    model.save(path)
    _rewrite(path, params=np.zeros(5, np.float32))
    with pytest.raises(bpk.CheckpointError, match="params"):
        bpk.load(path)
    model.save(path)
    _rewrite(path, **{"state.exp_avg": None})
    with pytest.raises(bpk.CheckpointError, match="exp_avg"):
        bpk.load(path)
    model.save(path)
    _rewrite(path, meta={"version": 99})
    with pytest.raises(bpk.CheckpointError, match="version 99"):
        bpk.load(path)


def test_checkpoint_holds_no_pickles(tmp_path):
    path = tmp_path / "m.npz"
    model = bpk.MLP([4, 3, 2])
    bpk.fit(model, np.ones((4, 4)), np.array([0, 1, 0, 1]), optimizer="rmsprop", epochs=1)
    model.save(path)
    with zipfile.ZipFile(path) as z:
        assert all(name.endswith(".npy") for name in z.namelist())
    with np.load(path, allow_pickle=False) as f:  # loads without pickle support
        assert {"meta", "params", "state.square_avg"} <= set(f.files)
    assert os.path.getsize(path) > 0


# ------------------------------------------------------------------ one way back from saved state
def test_checkpoints_and_estimators_rebuild_models_through_from_state(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    import pickle
    from bpkernels.sklearn import MLPClassifier
    rebuilt = []
    from_state = bpk.MLP.from_state.__func__

    def spy(cls, meta, arrays, *args, **kwargs):
        model = from_state(cls, meta, arrays, *args, **kwargs)
        rebuilt.append(model)
        return model
    monkeypatch.setattr(bpk.MLP, "from_state", classmethod(spy))

    X, y = _data()
    model = bpk.MLP([6, 5, 3], backend="numpy", seed=2)
    bpk.fit(model, X, y, optimizer=bpk.Adam(lr=1e-2), epochs=2, batch_size=8)
    model.save(tmp_path / "m.npz")
    loaded = bpk.load(tmp_path / "m.npz")
    assert rebuilt == [loaded]
    clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2, backend="numpy", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning after 2 iterations
        clf.fit(X, y)
    copy = pickle.loads(pickle.dumps(clf))
    assert rebuilt == [loaded, copy.model_]


def test_state_round_trip_is_exact():
    X, y = _data()
    model = bpk.MLP([6, 5, 3], activation="tanh", backend="numpy", dtype="float64", seed=2)
    bpk.fit(model, X, y, optimizer=bpk.RMSprop(lr=1e-2, momentum=0.5), epochs=2, batch_size=8)
    meta, arrays = model.state()
    json.dumps(meta)  # plain data: what a checkpoint's metadata holds
    copy = bpk.MLP.from_state(meta, arrays)
    _assert_same_weights(copy, model)
    assert copy.optimizer.config() == model.optimizer.config()
    assert copy.optimizer.step_count == model.optimizer.step_count
    assert copy.epochs_trained == model.epochs_trained == 2
    for name, buf in model.optimizer.state.items():
        np.testing.assert_array_equal(copy.optimizer.state[name], buf)
