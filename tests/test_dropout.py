"""Dropout (MLP(dropout=...)): the kernels against the NumPy reference noise on every backend,
training against PyTorch (its network multiplied by the same Philox noise, in float64), the
backends and the fused epochs against each other, resumed runs, the kept fraction's statistics,
inference without dropout, checkpoints and bad input."""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import philox
from bpkernels.backends.base import Backend

ROWS = np.array([0, 5, 2**33 + 7, 3, 2**40 + 1, 9, 11])
SEED = 2**40 + 123


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("units", [1, 3, 4, 7, 33])
def test_dropout_kernels_multiply_by_the_reference_noise(be, dtype, to_device, units, p):
    A = np.random.default_rng(units).standard_normal((ROWS.size, units)).astype(dtype)
    host = philox.layer_dropout(SEED, 7, 2, ROWS, p)
    drop = philox.layer_dropout(SEED, 7, 2, to_device(ROWS, np.int64), p)
    expected = A * philox.dropout_noise(host, units, dtype)
    D = be.zeros(A.shape, dtype)
    be.dropout_forward(to_device(A), D, drop)
    np.testing.assert_array_equal(be.to_host(D), expected)
    dD = to_device(A)
    be.dropout_backward(dD, drop)  # the same noise, in place
    np.testing.assert_array_equal(be.to_host(dD), expected)
    assert 0 < np.count_nonzero(expected) < expected.size or units < 4


def test_a_dropped_inf_is_nan_as_in_pytorch(be, dtype, to_device):
    host = philox.layer_dropout(SEED, 3, 0, ROWS, 0.5)
    noise = philox.dropout_noise(host, 8, dtype)
    A = np.where(noise == 0, np.inf, 1.0).astype(dtype)
    D = be.zeros(A.shape, dtype)
    with np.errstate(invalid="ignore"):
        be.dropout_forward(to_device(A), D,
                           philox.layer_dropout(SEED, 3, 0, to_device(ROWS, np.int64), 0.5))
    out = be.to_host(D)
    assert np.isnan(out[noise == 0]).all() and (out[noise > 0] == noise[noise > 0]).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_has_the_mean_and_variance_of_bernoulli_draws(p):
    keep = philox.dropout_keep(5, 11, 1, np.arange(400), 1000, p)
    q = 1 - p
    n = keep.size
    assert abs(keep.mean() - q) < 5 * np.sqrt(q * p / n)
    per_row = keep.sum(axis=1)  # binomial(1000, q) each, independent rows
    assert 0.7 < per_row.var(ddof=1) / (1000 * q * p) < 1.3
    per_unit = keep.sum(axis=0)  # across rows for a unit: binomial(400, q)
    assert 0.7 < per_unit.var(ddof=1) / (400 * q * p) < 1.3
    # masks of different steps and layers are not the same draw
    assert (keep != philox.dropout_keep(5, 12, 1, np.arange(400), 1000, p)).mean() > 0.1
    assert (keep != philox.dropout_keep(5, 11, 2, np.arange(400), 1000, p)).mean() > 0.1


# ---------------------------------------------------------------------------- training
X = np.random.default_rng(0).standard_normal((50, 6))
Y = np.random.default_rng(1).integers(0, 3, 50)
SIZES, PS = [6, 16, 12, 3], (0.3, 0.5)


def _torch_run(weights, activation, optimizer, epochs, batch, seed=3):
    """PyTorch's float64 training of the same network, each hidden layer's output multiplied
    by the noise bpkernels draws for (seed, step, layer, rows): what torch.nn.Dropout does
    with those masks."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    layers = [torch.nn.Linear(*W.shape, dtype=torch.float64) for W, _ in weights]
    with torch.no_grad():
        for lin, (W, b) in zip(layers, weights):
            lin.weight.copy_(torch.tensor(W.T))
            lin.bias.copy_(torch.tensor(b))
    params = [p for lin in layers for p in lin.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if optimizer == "sgd" else \
        torch.optim.Adam(params, lr=0.01)
    act = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}[activation]
    step = 0
    for epoch in range(epochs):
        order = np.random.default_rng([0, epoch]).permutation(len(X))
        for start in range(0, len(X), batch):
            rows, step = order[start:start + batch], step + 1
            h = torch.tensor(X[rows])
            for layer, lin in enumerate(layers):
                h = lin(h)
                if layer < len(PS):
                    drop = philox.layer_dropout(seed, step, layer, rows, PS[layer])
                    h = act(h) * torch.tensor(philox.dropout_noise(drop, h.shape[1], np.float64))
            loss = F.cross_entropy(h, torch.tensor(Y[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [(lin.weight.detach().numpy().T, lin.bias.detach().numpy()) for lin in layers]


def _fit(backend, activation, optimizer, epochs=2, dtype="float64", fused=False,
         monkeypatch=None):
    """A fit with dropout; ``fused`` False runs Numba's kernels one by one (each epoch-kernel
    specialization costs CI ~10 s to compile: the fused epoch is tested in one, SGD with
    momentum in float64 on labels, which the MPI case shares)."""
    model = bpk.MLP(SIZES, activation=activation, backend=backend, dtype=dtype, seed=3,
                    dropout=PS)
    if not fused and type(model.backend).train_epoch is not Backend.train_epoch:
        monkeypatch.setattr(type(model.backend), "train_epoch", Backend.train_epoch)
    opt = bpk.SGD(lr=0.1, momentum=0.9) if optimizer == "sgd" else bpk.Adam(lr=0.01)
    bpk.fit(model, X, Y, epochs=epochs, batch_size=16, optimizer=opt)
    return model


def _close(got, want, rtol):
    for (W, b), (W_ref, b_ref) in zip(got, want):
        np.testing.assert_allclose(W, W_ref, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(b, b_ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("activation, optimizer, fused", [
    ("tanh", "sgd", True), ("tanh", "sgd", False), ("relu", "adam", False),
    ("gelu", "sgd", False)])
def test_training_with_dropout_equals_pytorch(backend_name, activation, optimizer, fused,
                                              monkeypatch):
    if not fused and backend_name == "numpy":
        pytest.skip("the NumPy backend has no fused epoch")
    initial = bpk.MLP(SIZES, activation=activation, dtype="float64", seed=3).get_weights()
    want = _torch_run(initial, activation, optimizer, epochs=2, batch=16)
    model = _fit(backend_name, activation, optimizer, fused=fused, monkeypatch=monkeypatch)
    _close(model.get_weights(), want, 1e-10)


def test_backends_agree_in_float32(backend_name, monkeypatch):
    want = _fit("numpy", "tanh", "adam", dtype="float32").get_weights()
    _close(_fit(backend_name, "tanh", "adam", dtype="float32", monkeypatch=monkeypatch)
           .get_weights(), want, 2e-5)


def test_a_resumed_run_draws_what_the_whole_run_draws(backend_name, tmp_path):
    whole = _fit(backend_name, "relu", "sgd", epochs=2, fused=True)
    first = _fit(backend_name, "relu", "sgd", epochs=1, fused=True)
    first.save(tmp_path / "m.npz")
    resumed = bpk.load(tmp_path / "m.npz", backend=backend_name)
    assert resumed.dropout == PS
    bpk.fit(resumed, X, Y, epochs=1, batch_size=16)
    for (W, b), (W_ref, b_ref) in zip(resumed.get_weights(), whole.get_weights()):
        np.testing.assert_array_equal(W, W_ref)
        np.testing.assert_array_equal(b, b_ref)


def test_inference_never_drops(backend_name):
    model = _fit(backend_name, "tanh", "sgd", epochs=1, fused=True)
    plain = bpk.MLP(SIZES, activation="tanh", backend=backend_name, dtype="float64")
    plain.set_weights(model.get_weights())
    np.testing.assert_array_equal(model.forward(X), plain.forward(X))
    np.testing.assert_array_equal(model.predict(X), plain.predict(X))
    assert model.evaluate(X, Y, loss="cross_entropy") == plain.evaluate(X, Y, loss="cross_entropy")


def test_a_version_1_checkpoint_loads_without_dropout(tmp_path):
    import json
    import zipfile
    model = bpk.MLP(SIZES, seed=1)
    model.save(tmp_path / "m.npz")
    with zipfile.ZipFile(tmp_path / "m.npz") as z:
        arrays = {name[:-4]: np.load(z.open(name)) for name in z.namelist()}
    meta = json.loads(arrays.pop("meta").item())
    meta["version"] = 1
    del meta["dropout"], meta["norm"]
    np.savez(tmp_path / "v1.npz", meta=np.array(json.dumps(meta)), **arrays)
    old = bpk.load(tmp_path / "v1.npz")
    assert old.dropout == (0.0, 0.0)
    np.testing.assert_array_equal(old.forward(X), model.forward(X))
    meta["dropout"] = [0.1, 0.1]  # a field version 1 never had
    np.savez(tmp_path / "bad.npz", meta=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(bpk.CheckpointError, match="version 1 checkpoint has no field 'dropout'"):
        bpk.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("dropout, error, match", [
    (1.0, ValueError, r"dropout must lie in \[0.0, 1.0\)"),
    (-0.1, ValueError, "dropout must lie in"),
    (float("nan"), ValueError, "dropout must be finite"),
    (True, TypeError, "dropout must be a number"),
    ("0.1", TypeError, "dropout must be a number"),
    ([0.1], ValueError, r"one per hidden layer \(2\), got 1 values"),
])
def test_bad_dropout_is_one_clear_error(dropout, error, match):
    with pytest.raises(error, match=match):
        bpk.MLP(SIZES, dropout=dropout)


def test_a_seed_beyond_the_generators_key_is_refused_with_dropout():
    bpk.MLP(SIZES, seed=2**64)  # no dropout: any seed
    with pytest.raises(ValueError, match=r"needs a seed < 2\*\*64"):
        bpk.MLP(SIZES, seed=2**64, dropout=0.1)


# ---------------------------------------------------------------------------- estimators, CLI
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_the_estimators_train_with_dropout_and_keep_it():
    import pickle
    from bpkernels.sklearn import MLPClassifier
    clf = MLPClassifier((16,), dropout=0.25, max_iter=3, random_state=0, backend="numpy")
    clf.fit(X, Y)
    assert clf.model_.dropout == (0.25,)
    again = pickle.loads(pickle.dumps(clf))
    assert again.model_.dropout == (0.25,)
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    # the same fit without dropout trains other weights: dropout was applied
    plain = MLPClassifier((16,), max_iter=3, random_state=0, backend="numpy").fit(X, Y)
    assert not np.allclose(plain.predict_proba(X), clf.predict_proba(X))
    clf.set_params(dropout=0.5, warm_start=True)
    with pytest.raises(ValueError, match="dropout and norm must stay as they were"):
        clf.fit(X, Y)
    with pytest.raises(ValueError, match="one per hidden layer"):
        MLPClassifier((16, 8), dropout=[0.1]).fit(X, Y)


def test_bpk_train_dropout_is_saved_and_resumed(capsys, tmp_path):
    from test_cli import assert_one_error, run
    fast = ["--backend", "numpy", "--layers", "32,16", "--no-progress", "--epochs", "1"]
    path = tmp_path / "m.npz"
    code, _, _ = run(capsys, "train", *fast, "--dropout", "0.2,0.1", "--save", path)
    assert code == 0 and bpk.load(path).dropout == (0.2, 0.1)
    code, _, _ = run(capsys, "train", "--no-progress", "--epochs", "1", "--resume", path,
                     "--save", path)
    assert code == 0 and bpk.load(path).dropout == (0.2, 0.1)
    code, _, err = run(capsys, "train", "--resume", path, "--dropout", "0.3")
    assert code == 2 and "--dropout 0.3 (checkpoint: 0.2,0.1)" in assert_one_error(err)
    for value, words in (("1", "dropout must lie in [0.0, 1.0)"), ("x", "expected a probability"),
                         ("0.1,0.2,0.3", "one per hidden layer (2), got 3")):
        code, _, err = run(capsys, "train", *fast, "--dropout", value)
        assert code == 2 and words in assert_one_error(err)
