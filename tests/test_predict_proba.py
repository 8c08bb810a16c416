"""MLP.predict_proba: the link of the loss the model was trained with, against PyTorch's
softmax and sigmoid (a test-only reference), on every backend; kept in checkpoints."""
import numpy as np
import pytest

import bpkernels as bpk


def _trained(backend_name, loss, outputs, dtype="float64"):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 5))
    y = rng.integers(0, outputs, 64) if loss == "cross_entropy" else \
        rng.integers(0, 2, (64, outputs)).astype(float)
    model = bpk.MLP([5, 16, outputs], backend=backend_name, dtype=dtype, seed=1)
    bpk.fit(model, X, y, loss=loss, epochs=2, batch_size=16)
    return model, X * 30  # large inputs: confident rows test the links' stability


@pytest.mark.parametrize("loss,outputs", [("cross_entropy", 4), ("binary_cross_entropy", 3),
                                          ("binary_cross_entropy", 1)])
def test_probabilities_are_the_links_of_the_logits(backend_name, loss, outputs):
    torch = pytest.importorskip("torch")
    model, X = _trained(backend_name, loss, outputs)
    P = model.predict_proba(X)
    logits = torch.tensor(model.forward(X))
    want = torch.softmax(logits, 1) if loss == "cross_entropy" else torch.sigmoid(logits)
    assert isinstance(P, np.ndarray) and P.dtype == np.float64 and P.shape == (64, outputs)
    np.testing.assert_allclose(P, want.numpy(), rtol=1e-13, atol=1e-300)
    assert np.isfinite(P).all() and (P >= 0).all() and (P <= 1).all()


def test_float32_and_extreme_logits_stay_finite(backend_name):
    model, X = _trained(backend_name, "cross_entropy", 3, dtype="float32")
    P = model.predict_proba(X * 1e6)
    assert P.dtype == np.float32 and np.isfinite(P).all()
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-6)


def test_device_input_gives_device_output(backend_name):
    model, X = _trained(backend_name, "cross_entropy", 3)
    be = model.backend
    if isinstance(be.asarray(X[:1]), np.ndarray):
        pytest.skip(f"{backend_name} keeps arrays on the host")
    P = model.predict_proba(be.asarray(X, np.float64))
    assert not isinstance(P, np.ndarray)
    np.testing.assert_allclose(be.to_host(P), model.predict_proba(X), rtol=1e-15)


def test_the_loss_is_kept_and_can_be_named(tmp_path):
    model, X = _trained("numpy", "binary_cross_entropy", 2)
    model.save(tmp_path / "m.npz")
    again = bpk.load(tmp_path / "m.npz")
    assert again.loss == "binary_cross_entropy"
    np.testing.assert_array_equal(again.predict_proba(X), model.predict_proba(X))
    fresh = bpk.MLP([5, 16, 2], dtype="float64")
    with pytest.raises(ValueError, match="needs the loss the model is trained with"):
        fresh.predict_proba(X)
    np.testing.assert_allclose(fresh.predict_proba(X, loss="cross_entropy").sum(1), 1.0)
    regressor, _ = _trained("numpy", "binary_cross_entropy", 2)
    regressor.loss = "mse"
    with pytest.raises(ValueError, match="trained with mse, which has no link"):
        regressor.predict_proba(X)
    with pytest.raises(ValueError, match="unknown loss 'softmax'"):
        fresh.predict_proba(X, loss="softmax")
