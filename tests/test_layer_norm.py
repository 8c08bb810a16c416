"""LayerNorm (MLP(norm="layer")): the kernels against a float64 reference written from
torch.nn.LayerNorm's definition and against PyTorch autograd, on every backend; model
gradients and training against PyTorch in float64 (with dropout too); the parameters' layout
in get/set_weights, checkpoints, the estimators and the CLI."""
from __future__ import annotations

import numpy as np
import pytest

import bpkernels as bpk
from bpkernels import philox
from bpkernels.backends.base import ACTIVATIONS, Backend

EPS = 1e-5


def _reference(Z, gamma, beta, eps):
    """LayerNorm's forward in float64 from its definition: (xhat, rstd)."""
    mean = Z.mean(axis=1, keepdims=True)
    var = ((Z - mean) ** 2).mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    return (Z - mean) * rstd, rstd[:, 0]


def _torch_layer(Z, gamma, beta, activation, dA, eps):
    """PyTorch's A = act(layer_norm(Z)) and, by autograd, the gradients of sum(A * dA) with
    respect to Z, gamma and beta."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    z, g, b = (torch.tensor(a, requires_grad=True) for a in (Z, gamma, beta))
    act = {"identity": lambda x: x, "relu": torch.relu, "sigmoid": torch.sigmoid,
           "tanh": torch.tanh, "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
           "gelu": F.gelu, "silu": F.silu}[activation]
    A = act(F.layer_norm(z, (Z.shape[1],), g, b, eps))
    (A * torch.tensor(dA)).sum().backward()
    return A.detach().numpy(), z.grad.numpy(), g.grad.numpy(), b.grad.numpy()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 3), (37, 1), (37, 32), (5, 300)])
def test_layer_norm_kernels_equal_pytorch(be, dtype, to_device, tol, activation, shape):
    rng = np.random.default_rng(shape[1])
    Z = rng.standard_normal(shape) * 3 + 1
    gamma, beta = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    dA = rng.standard_normal(shape)
    Z, gamma, beta, dA = (a.astype(dtype).astype(np.float64) for a in (Z, gamma, beta, dA))
    A_ref, dZ_ref, dg_ref, db_ref = _torch_layer(Z, gamma, beta, activation, dA, EPS)
    xhat_ref, rstd_ref = _reference(Z, gamma, beta, EPS)

    H, A, rstd = to_device(Z), be.zeros(shape, dtype), be.zeros((shape[0],), dtype)
    g, b = to_device(gamma), to_device(beta)
    be.layer_norm_forward(H, g, b, activation, A, rstd, EPS)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(be.to_host(H), xhat_ref, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(be.to_host(rstd), rstd_ref, rtol=rtol)
    np.testing.assert_allclose(be.to_host(A), A_ref, rtol=rtol, atol=rtol)

    grad, dgamma, dbeta = to_device(dA), be.zeros((shape[1],), dtype), be.zeros((shape[1],), dtype)
    be.layer_norm_backward(grad, activation, A, H, g, b, rstd, dgamma, dbeta)
    scale = max(1.0, np.abs(dZ_ref).max())
    atol = (1e-11 if dtype == np.float64 else 1e-3) * scale
    np.testing.assert_allclose(be.to_host(grad), dZ_ref, rtol=rtol * 10, atol=atol)
    np.testing.assert_allclose(be.to_host(dgamma), dg_ref, rtol=rtol * 10, atol=atol)
    np.testing.assert_allclose(be.to_host(dbeta), db_ref, rtol=rtol * 10, atol=atol)


def test_a_constant_row_normalizes_to_beta(be, dtype, to_device):
    Z = np.full((2, 5), 3.25)
    H, A, rstd = to_device(Z), be.zeros((2, 5), dtype), be.zeros((2,), dtype)
    beta = np.arange(5.0)
    be.layer_norm_forward(H, to_device(np.ones(5)), to_device(beta), "identity", A, rstd, 1e-3)
    assert (be.to_host(H) == 0).all()
    np.testing.assert_allclose(be.to_host(rstd), 1 / np.sqrt(1e-3), rtol=1e-6)
    np.testing.assert_array_equal(be.to_host(A), np.broadcast_to(beta, (2, 5)))


# ---------------------------------------------------------------------------- the model
X = np.random.default_rng(0).standard_normal((50, 6)) * 2
Y = np.random.default_rng(1).integers(0, 3, 50)
SIZES = [6, 16, 12, 3]


def _torch_net(weights, activation):
    torch = pytest.importorskip("torch")
    params = [[torch.tensor(a.T if a.ndim == 2 else a, requires_grad=True) for a in layer]
              for layer in weights]
    F = torch.nn.functional
    act = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
           "sigmoid": torch.sigmoid, "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
           "identity": lambda x: x}[activation]

    def forward(x, noises=None):
        h = torch.tensor(x)
        for k, layer in enumerate(params):
            h = h @ layer[0].T + layer[1]
            if k < len(params) - 1:
                h = act(F.layer_norm(h, (h.shape[1],), layer[2], layer[3], EPS))
                if noises is not None:
                    h = h * torch.tensor(noises[k])
        return h
    return params, forward


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_model_gradients_equal_pytorch_autograd(backend_name, activation):
    torch = pytest.importorskip("torch")
    model = bpk.MLP(SIZES, activation=activation, backend=backend_name, dtype="float64",
                    seed=4, norm="layer")
    weights = model.get_weights()
    assert [len(layer) for layer in weights] == [4, 4, 2]
    np.testing.assert_array_equal(weights[0][2], np.ones(16))  # gamma 1, beta 0, as torch's
    np.testing.assert_array_equal(weights[1][3], np.zeros(12))
    rng = np.random.default_rng(2)  # gamma and beta away from their initial values
    weights = [layer[:2] + tuple(rng.standard_normal(layer[1].shape) for _ in layer[2:])
               for layer in weights]
    model.set_weights(weights)
    loss, grads = model.loss_and_grads(X, Y, "cross_entropy")
    params, forward = _torch_net(weights, activation)
    ref = torch.nn.functional.cross_entropy(forward(X), torch.tensor(Y))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    for layer, ref_layer in zip(grads, params):
        for got, p in zip(layer, ref_layer):
            want = p.grad.numpy().T if p.grad.ndim == 2 else p.grad.numpy()
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def _fit(backend, dtype="float64", dropout=0.0, optimizer=None, epochs=2, monkeypatch=None):
    """A fit with LayerNorm, kernel by kernel (``monkeypatch`` given): the fused epochs are
    tested against their kernel loops below, in one specialization (each costs CI ~10 s)."""
    model = bpk.MLP(SIZES, activation="tanh", backend=backend, dtype=dtype, seed=4,
                    norm="layer", dropout=dropout)
    if monkeypatch is not None and type(model.backend).train_epoch is not Backend.train_epoch:
        monkeypatch.setattr(type(model.backend), "train_epoch", Backend.train_epoch)
    bpk.fit(model, X, Y, epochs=epochs, batch_size=16,
            optimizer=optimizer or bpk.AdamW(lr=0.01, weight_decay=0.1))
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_with_layer_norm_equals_pytorch(backend_name, dropout, monkeypatch):
    torch = pytest.importorskip("torch")
    initial = bpk.MLP(SIZES, activation="tanh", dtype="float64", seed=4,
                      norm="layer").get_weights()
    params, forward = _torch_net(initial, "tanh")
    # AdamW decays gamma and beta too: torch.optim's default for every parameter
    opt = torch.optim.AdamW([p for layer in params for p in layer], lr=0.01, weight_decay=0.1)
    step = 0
    for epoch in range(2):
        order = np.random.default_rng([0, epoch]).permutation(len(X))
        for start in range(0, len(X), 16):
            rows, step = order[start:start + 16], step + 1
            noises = None
            if dropout:
                noises = [philox.dropout_noise(philox.layer_dropout(4, step, k, rows, dropout),
                                               w, np.float64) for k, w in enumerate(SIZES[1:-1])]
            loss = torch.nn.functional.cross_entropy(forward(X[rows], noises),
                                                     torch.tensor(Y[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = _fit(backend_name, dropout=dropout, monkeypatch=monkeypatch)
    for layer, ref_layer in zip(model.get_weights(), params):
        for got, p in zip(layer, ref_layer):
            want = p.detach().numpy()
            np.testing.assert_allclose(got, want.T if want.ndim == 2 else want, rtol=1e-10,
                                       atol=1e-12)


def test_backends_agree_in_float32(backend_name, monkeypatch):
    want = _fit("numpy", "float32", dropout=0.1).get_weights()
    for layer, ref in zip(_fit(backend_name, "float32", dropout=0.1, monkeypatch=monkeypatch)
                          .get_weights(), want):
        for got, expected in zip(layer, ref):
            np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def test_checkpoints_and_moves_keep_the_norm(tmp_path):
    model = _fit("numpy", epochs=1)
    model.save(tmp_path / "m.npz")
    loaded = bpk.load(tmp_path / "m.npz")
    assert loaded.norm == "layer" and "norm='layer'" in repr(loaded)
    np.testing.assert_array_equal(loaded.forward(X), model.forward(X))
    moved = bpk.load(tmp_path / "m.npz").to("numba", "float32")
    np.testing.assert_allclose(moved.forward(X), model.forward(X), rtol=1e-4, atol=1e-5)


def test_bad_norm_and_weights_are_clear_errors():
    with pytest.raises(ValueError, match="norm must be None or 'layer'"):
        bpk.MLP(SIZES, norm="batch")
    model = bpk.MLP(SIZES, norm="layer")
    weights = model.get_weights()
    with pytest.raises(ValueError, match=r"layer 0: expected a \(W, b, gamma, beta\) tuple, got 2 values"):
        model.set_weights([weights[0][:2], *weights[1:]])
    bad = [list(layer) for layer in weights]
    bad[1][2] = np.ones(5)
    with pytest.raises(ValueError, match="layer 1 gamma"):
        model.set_weights(bad)
    np.testing.assert_array_equal(model.get_weights()[1][2], weights[1][2])  # untouched


def test_layer_norm_needs_backend_kernels():
    class NoNorm(type(bpk.get_backend("numpy"))):
        name = "no-norm"
        layer_norm_forward = Backend.layer_norm_forward
    with pytest.raises(ValueError, match="has no LayerNorm kernels"):
        bpk.MLP(SIZES, norm="layer", backend=NoNorm())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_the_estimators_and_the_cli_take_norm(capsys, tmp_path):
    from bpkernels.sklearn import MLPRegressor
    from test_cli import assert_one_error, run
    reg = MLPRegressor((8,), norm="layer", max_iter=2, random_state=0, backend="numpy")
    reg.fit(X, X[:, 0])
    assert reg.model_.norm == "layer"
    with pytest.raises(ValueError, match="norm must be None or 'layer'"):
        MLPRegressor(norm="batch").fit(X, X[:, 0])
    path = tmp_path / "m.npz"
    fast = ["--backend", "numpy", "--layers", "16", "--no-progress", "--epochs", "1"]
    code, _, _ = run(capsys, "train", *fast, "--norm", "layer", "--save", path)
    assert code == 0 and bpk.load(path).norm == "layer"
    code, _, err = run(capsys, "train", *fast, "--norm", "batch")
    assert code == 2 and "--norm" in assert_one_error(err)


def test_check_gradients_covers_gamma_and_beta(backend_name):
    from bpkernels.testing import check_gradients
    model = bpk.MLP([4, 6, 5, 3], activation="tanh", backend=backend_name, dtype="float64",
                    seed=2, norm="layer")
    rng = np.random.default_rng(3)
    model.set_weights([layer[:2] + tuple(rng.standard_normal(layer[1].shape) for _ in layer[2:])
                       for layer in model.get_weights()])
    check_gradients(model, X[:7, :4], Y[:7], "cross_entropy")
    wrong = type(model.backend).layer_norm_backward

    def dropped_dgamma(self, *args):  # a kernel that forgets dgamma must be caught
        wrong(self, *args)
        args[-2][...] = 0
    try:
        type(model.backend).layer_norm_backward = dropped_dgamma
        with pytest.raises(AssertionError, match="dgamma"):
            check_gradients(model, X[:7, :4], Y[:7], "cross_entropy")
    finally:
        type(model.backend).layer_norm_backward = wrong


def test_numba_fused_epoch_equals_its_kernel_loop(monkeypatch):
    """The epoch kernel with LayerNorm and dropout (GELU: its input recomputed into Z) against
    the per-kernel loop, bit for bit."""
    pytest.importorskip("numba")
    from bpkernels.backends.numba.backend import NumbaBackend
    got = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(NumbaBackend, "train_epoch", Backend.train_epoch)
        model = bpk.MLP(SIZES, activation="gelu", backend="numba", dtype="float64",
                        seed=4, norm="layer", dropout=0.2)
        bpk.fit(model, X, Y, epochs=2, batch_size=16,
                optimizer=bpk.SGD(lr=0.1, momentum=0.9, weight_decay=0.01))
        got.append(model.get_weights())
    for layer, ref in zip(*got):
        for a, b in zip(layer, ref):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["bound", "pool"])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_numba_bound_epoch_with_norm_and_dropout_equals_its_kernel_loop(monkeypatch, mode,
                                                                        momentum, dtype,
                                                                        numba_large_path):
    """The large models' epoch kernel (the bound on dW, the shared gather, plain SGD fused into
    dW's GEMM with gamma and beta updated beside the biases; with the pool, dropout's and
    LayerNorm's rows shared with its worker) with LayerNorm and dropout, against the per-kernel
    loop: bit for bit where no update is fused, else to the dtype's rounding (the GEMM rounds
    dW no more)."""
    pytest.importorskip("numba")
    from bpkernels.backends.numba import backend as numba_backend
    if numba_backend.jit.NATIVE is None:
        pytest.skip("the bound is native mode's")
    got = []
    for fused in (True, False):
        with monkeypatch.context() as patch:
            numba_large_path(patch, mode)
            if not fused:
                patch.setattr(numba_backend.NumbaBackend, "train_epoch", Backend.train_epoch)
            model = bpk.MLP(SIZES, activation="gelu", backend="numba", dtype=dtype,
                            seed=4, norm="layer", dropout=0.2)
            bpk.fit(model, X, Y, epochs=2, batch_size=16,
                    optimizer=bpk.SGD(lr=0.1, momentum=momentum, weight_decay=0.01))
            got.append(model.get_weights())
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    for layer, ref in zip(*got):
        for a, b in zip(layer, ref):
            if momentum:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, **tol)
