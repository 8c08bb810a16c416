"""Arrays from anywhere (bpkernels.interop) and model.to(): every protocol on every backend,
data used in place where it already lives, one conversion otherwise, refusals that say what to
do; and models moved between backends and dtypes with their numbers.

The protocols are exercised by small wrappers that expose exactly one of them; PyTorch CPU
tensors are tried where torch is installed. Results are judged against the float64 reference.
"""
import warnings

import numpy as np
import pytest

import bpkernels as bpk
import reference as ref
from bpkernels import interop, train
from bpkernels.backends import register
from bpkernels.backends.numpy_backend import NumpyBackend
from bpkernels.testing import TOLERANCES

SIZES = [5, 7, 3]
BACKENDS = bpk.available_backends()
CUDASIM = "cupy-cudasim"


def _data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return rng.standard_normal((n, 5)) + np.eye(3, 5)[y], y


# ------------------------------------------------------------------ one protocol each
class ArrayOnly:
    """Only ``__array__`` (NumPy 2's signature)."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self._a, dtype=dtype, copy=True)
        return self._a if dtype is None else self._a.astype(dtype, copy=False)


class InterfaceOnly:
    """Only ``__array_interface__``."""

    def __init__(self, a):
        self._a = a

    @property
    def __array_interface__(self):
        return self._a.__array_interface__


class DLPackOnly:
    """Only ``__dlpack__`` and ``__dlpack_device__``, delegating to a NumPy array (CPU)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class FakeCuda:
    """Only ``__cuda_array_interface__``: what a CuPy array or torch CUDA tensor shows. Its
    pointer is never valid: no CPU backend may try to read it."""

    def __init__(self, shape, dtype=np.float64):
        self.shape = shape
        self.__cuda_array_interface__ = {"shape": shape, "typestr": np.dtype(dtype).str,
                                         "data": (0xDEAD0000, False), "version": 3,
                                         "strides": None}


class FakeDLPackDevice:
    """Only DLPack, on a device (kDLCUDA = 2 unless told): exporting it is a test failure."""

    def __init__(self, shape, device_type=2):
        self.shape, self._type = shape, device_type

    def __dlpack_device__(self):
        return (self._type, 0)

    def __dlpack__(self, **kwargs):
        raise AssertionError("a device array was read")


HOST_WRAPPERS = {"ndarray": lambda a: a, "__array__": ArrayOnly,
                 "__array_interface__": InterfaceOnly, "dlpack": DLPackOnly}
WITH_LISTS = {**HOST_WRAPPERS, "nested-list": lambda a: a.tolist()}


# ------------------------------------------------------------------ helpers
@pytest.fixture
def model(backend_dtype):
    name, dtype = backend_dtype
    return bpk.MLP(SIZES, activation="tanh", backend=name, dtype=dtype, seed=3)


def _reference_outputs(model, X):
    return ref.mlp_forward(model.get_weights(), X, model.layer_activations)[-1][1]


def _host(model, array):
    return array if isinstance(array, np.ndarray) else model.backend.to_host(array)


def _needs_host_backend(model):
    if not interop.host_backend(model.backend):
        pytest.skip(f"{model.backend.name!r} computes in device memory")


def _cudasim():
    if CUDASIM not in BACKENDS:
        pytest.skip("the CUDA emulation cannot run here (no host C++ compiler)")
    from cudasim import shim
    return shim


def _spy_training_data(monkeypatch):
    """The X array each fit() trains on (the epoch loop's own)."""
    seen = []
    init = train.EpochLoop.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.X)
    monkeypatch.setattr(train.EpochLoop, "__init__", spy)
    return seen


def _assert_untouched(model, weights, epochs=0):
    for (W, b), (W0, b0) in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)
    assert model.epochs_trained == epochs


# ------------------------------------------------------------------ every protocol, every backend
@pytest.mark.parametrize("wrap", WITH_LISTS.values(), ids=WITH_LISTS.keys())
def test_every_host_protocol_gives_the_reference(model, wrap, assert_close):
    X, y = _data()
    expected = _reference_outputs(model, X)
    out = model.forward(wrap(X))
    assert type(out) is np.ndarray and out.dtype == model.dtype and out.shape == (23, 3)
    assert_close(out, expected)
    predicted = model.predict(wrap(X))
    assert type(predicted) is np.ndarray and predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, np.argmax(out, axis=1))

    value, dY = ref.cross_entropy(expected, y)
    result = model.evaluate(wrap(X), wrap(y), "cross_entropy")
    assert_close(result["loss"], value)
    assert result["accuracy"] == ref.count_correct(expected, y) / len(y)
    loss, grads = model.loss_and_grads(wrap(X), wrap(y), "cross_entropy")
    ref_loss, ref_grads = ref.mlp_loss_and_grads(model.get_weights(), X, y,
                                                 model.layer_activations, "cross_entropy")
    assert_close(loss, ref_loss)
    for (dW, db), (rW, rb) in zip(grads, ref_grads):
        assert_close(dW, rW)
        assert_close(db, rb)


@pytest.mark.parametrize("wrap", WITH_LISTS.values(), ids=WITH_LISTS.keys())
def test_fit_and_set_weights_take_every_host_protocol(backend_dtype, wrap):
    name, dtype = backend_dtype
    X, y = _data()
    X_val, y_val = _data(9, seed=1)
    runs = []
    for convert in (lambda a: a, wrap):
        m = bpk.MLP(SIZES, activation="tanh", backend=name, dtype=dtype, seed=3)
        weights = [(convert(W * 0.5), convert(b + 0.1)) for W, b in m.get_weights()]
        m.set_weights(weights)
        history = bpk.fit(m, convert(X), convert(y), optimizer=bpk.Adam(1e-2), epochs=2,
                          batch_size=8, validation_data=(convert(X_val), convert(y_val)))
        runs.append((m, history))
    (plain, h_plain), (wrapped, h_wrapped) = runs
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert h_wrapped[key] == h_plain[key]  # same arrays once read: the same numbers
    _assert_untouched(wrapped, plain.get_weights(), epochs=2)


@pytest.mark.parametrize("wrap", HOST_WRAPPERS.values(), ids=HOST_WRAPPERS.keys())
def test_host_data_is_used_in_place_on_cpu_backends(model, wrap, monkeypatch):
    _needs_host_backend(model)
    X, y = _data()
    X = np.ascontiguousarray(X, dtype=model.dtype)
    assert np.shares_memory(interop.features(wrap(X), model.backend, model.dtype, 5).data, X)
    chunks = []
    forward = model._forward
    monkeypatch.setattr(model, "_forward", lambda ws, chunk, *drops: chunks.append(chunk) or
                        forward(ws, chunk, *drops))
    model.forward(wrap(X))
    assert np.shares_memory(chunks[0], X)  # the kernels read the caller's rows
    seen = _spy_training_data(monkeypatch)
    bpk.fit(model, wrap(X), y, epochs=1, batch_size=8)
    assert np.shares_memory(seen[0], X)  # fit trains on X itself: no copy of the data set


# ------------------------------------------------------------------ conversions
CONVERSIONS = {
    "other-float": lambda X, dt: X.astype(np.float32 if dt == np.float64 else np.float64),
    "int32": lambda X, dt: np.rint(X * 3).astype(np.int32),
    "bool": lambda X, dt: X > 0.5,
    "fortran": lambda X, dt: np.asfortranarray(X, dtype=dt),
    "strided": lambda X, dt: np.repeat(X.astype(dt), 2, axis=1)[:, ::2],
    "transposed": lambda X, dt: np.ascontiguousarray(X.T, dtype=dt).T,
    "read-only": lambda X, dt: _read_only(X.astype(dt)),
    "read-only-other-dtype": lambda X, dt: _read_only(X.astype(np.float16)),
}


def _read_only(a):
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("case", CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_any_layout_and_dtype_is_converted_once_and_never_written(model, case, assert_close):
    X, y = _data()
    given = case(X, model.dtype)
    before, writeable = given.copy(), given.flags.writeable
    expected = _reference_outputs(model, given.astype(model.dtype).astype(np.float64))
    assert_close(model.forward(given), expected)
    features = interop.features(given, model.backend, model.dtype, 5)
    host = _host(model, features.data)
    assert host.dtype == model.dtype and host.flags.c_contiguous
    in_place = given.dtype == model.dtype and given.flags.c_contiguous
    if interop.host_backend(model.backend):
        assert np.shares_memory(features.data, given) == in_place
    bpk.fit(model, given, y, epochs=1, batch_size=8, validation_data=(given, y))
    model.evaluate(given, y, "cross_entropy")
    model.loss_and_grads(given, y, "cross_entropy")
    np.testing.assert_array_equal(given, before)
    assert given.flags.writeable == writeable


def test_inputs_are_never_written(model):
    X, y = _data()
    X = np.ascontiguousarray(X, dtype=model.dtype)  # used in place: the kernels see it
    targets = np.eye(3)[y].astype(model.dtype)
    weights = [(W.astype(model.dtype), b.astype(model.dtype)) for W, b in model.get_weights()]
    saved = [a.copy() for a in (X, y, targets)] + [a.copy() for pair in weights for a in pair]
    model.set_weights(weights)
    bpk.fit(model, X, y, epochs=2, batch_size=8, validation_data=(X, y))
    bpk.fit(model, X, targets, loss="mse", optimizer="sgd", epochs=1, batch_size=5)
    model.forward(X), model.predict(X), model.evaluate(X, y, "cross_entropy")
    model.loss_and_grads(X, targets, "binary_cross_entropy")
    for a, b in zip([X, y, targets] + [a for pair in weights for a in pair], saved):
        np.testing.assert_array_equal(a, b)


def test_labels_become_int64_and_float_targets_the_model_dtype(model):
    X, y = _data()
    for labels in (y.astype(np.int8), y.astype(np.uint16), y.astype(np.float32),
                   DLPackOnly(y.astype(np.int32))):
        assert model.evaluate(X, labels, "cross_entropy") == model.evaluate(X, y, "cross_entropy")
    with pytest.raises(ValueError, match=r"labels must be integers .* y\[0\] = 0.5"):
        model.evaluate(X, ArrayOnly(np.full(23, 0.5)), "cross_entropy")
    # A label no int64 holds is named as given, with no cast warning on the way.
    for value, shown in ((1e20, r"1e\+20"), (np.uint64(2**63), "9223372036854775808")):
        labels = y.astype(np.asarray(value).dtype)
        labels[4] = value
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"labels must lie in 0..2 .*; y\[4\] = " + shown):
                model.evaluate(X, labels, "cross_entropy")


# ------------------------------------------------------------------ checks for every kind
@pytest.mark.parametrize("wrap", HOST_WRAPPERS.values(), ids=HOST_WRAPPERS.keys())
def test_checks_hold_for_every_input_kind(model, wrap):
    X, y = _data()
    bad = X.copy()
    bad[4, 2] = np.nan
    cases = [
        (bad, y, ValueError, r"X contains nan at index \[4, 2\]; inputs must be finite"),
        (X, np.where(np.arange(23) == 6, np.inf, y), ValueError, r"y contains inf at index 6"),
        (X[:, :4], y, ValueError, r"X has 4 features per row but the model expects 5"),
        (X[0], y[:1], ValueError, r"X must be 2-D"),
        (X[:0], y[:0], ValueError, r"X is empty"),
        (X, y[:5], ValueError, r"y has 5 rows but X has 23"),
        (X.astype(str), y, TypeError, r"X (must hold numbers|\(.*DLPackOnly\) cannot be read "
                                      r"through DLPack)"),
    ]
    weights = model.get_weights()
    for X_in, y_in, exc, match in cases:
        for call in (lambda: bpk.fit(model, wrap(X_in), wrap(y_in), epochs=1),
                     lambda: model.loss_and_grads(wrap(X_in), wrap(y_in), "cross_entropy"),
                     lambda: bpk.fit(model, X, y, validation_data=(wrap(X_in), wrap(y_in)))):
            with pytest.raises(exc, match=match):
                call()
    with pytest.raises(ValueError, match=r"X contains nan at index \[4, 2\]"):
        model.forward(wrap(bad))
    with pytest.raises(ValueError, match=r"layer 1 b contains NaN or inf: nan at index 2"):
        model.set_weights([weights[0], (weights[1][0], wrap(np.array([0, 0, np.nan])))])
    _assert_untouched(model, weights)


def test_a_value_the_cast_makes_infinite_is_refused(backend_name):
    model = bpk.MLP(SIZES, backend=backend_name, dtype="float32")
    X, y = _data()
    X[3, 1] = 1e300
    with pytest.raises(ValueError, match=r"X\[3, 1\] = 1e\+300 overflows float32, the model's"):
        model.forward(DLPackOnly(X))
    W, b = model.get_weights()[0]
    with pytest.raises(ValueError, match=r"layer 0 W\[0, 0\] = 1e\+40 overflows float32"):
        model.set_weights([(np.full(W.shape, 1e40), b), model.get_weights()[1]])


def test_a_target_the_cast_makes_infinite_is_refused(backend_name):
    # Targets too: an mse target of 1e300 is inf in float32 (evaluate answered inf, fit raised
    # TrainingDiverged and blamed the learning rate).
    model = bpk.MLP(SIZES, backend=backend_name, dtype="float32")
    X, y = _data()
    rows = np.eye(3)[y]
    rows[5, 2] = 1e300
    weights = model.get_weights()
    for call in (lambda: model.evaluate(X, rows, "mse"),
                 lambda: model.loss_and_grads(X, DLPackOnly(rows), "mse"),
                 lambda: bpk.fit(model, X, rows, loss="mse", epochs=1),
                 lambda: bpk.fit(model, X, y, validation_data=(X, rows))):
        with pytest.raises(ValueError, match=r"y\[5, 2\] = 1e\+300 overflows float32, the "
                                             r"model's dtype"):
            call()
    _assert_untouched(model, weights)


# ------------------------------------------------------------------ device data on CPU backends
DEVICE_OBJECTS = {"cuda_array_interface": lambda shape: FakeCuda(shape),
                  "dlpack-kDLCUDA": lambda shape: FakeDLPackDevice(shape)}


@pytest.mark.parametrize("make", DEVICE_OBJECTS.values(), ids=DEVICE_OBJECTS.keys())
def test_cuda_data_is_refused_on_cpu_backends(backend_name, make):
    model = bpk.MLP(SIZES, backend=backend_name)
    _needs_host_backend(model)
    X, y = _data()
    cuda_X, cuda_y = make((23, 5)), make((23,))
    W, b = model.get_weights()[0]
    calls = {
        "X": [lambda: model.forward(cuda_X), lambda: model.predict(cuda_X),
              lambda: model.evaluate(cuda_X, y, "cross_entropy"),
              lambda: model.loss_and_grads(cuda_X, y, "cross_entropy"),
              lambda: bpk.fit(model, cuda_X, y), lambda: bpk.fit(model, X, y,
                                                                 validation_data=(cuda_X, y))],
        "y": [lambda: model.evaluate(X, cuda_y, "cross_entropy"),
              lambda: bpk.fit(model, X, cuda_y), lambda: bpk.fit(model, X, y,
                                                                 validation_data=(X, cuda_y))],
        "layer 0 W": [lambda: model.set_weights([(make(W.shape), b), model.get_weights()[1]])],
    }
    weights = model.get_weights()
    kind = type(cuda_X).__qualname__
    for name, tries in calls.items():
        for call in tries:
            with pytest.raises(ValueError, match=rf"^{name} is a .*{kind} of shape "
                               rf"\(\d+(, \d+)?,?\) on cuda(:0)?, but the model runs on the "
                               rf"'{backend_name}' backend in host memory.* model\.to\('cupy'\), "
                               rf"or copy {name} to the host yourself"):
                call()
    _assert_untouched(model, weights)
    assert model.optimizer is None


def test_other_devices_are_refused_with_what_to_do(backend_name):
    model = bpk.MLP(SIZES, backend=backend_name)
    metal = FakeDLPackDevice((23, 5), device_type=8)
    with pytest.raises(ValueError, match=r"X is a .* on metal:0.*copy X to the host yourself"):
        model.forward(metal)


# ------------------------------------------------------------------ device data on the GPU backend
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_device_arrays_are_used_in_place_on_the_gpu_backend(dtype, monkeypatch):
    shim = _cudasim()
    model = bpk.MLP(SIZES, activation="tanh", backend=CUDASIM, dtype=dtype, seed=3)
    be, tol = model.backend, TOLERANCES[dtype]
    X, y = _data()
    X_dev = be.asarray(X, dtype)
    expected = _reference_outputs(model, X)
    model.forward(X_dev)  # compiles the kernels
    before = shim.STATS.copy()
    out = model.forward(X_dev)
    moved = {k: shim.STATS[k] - before[k] for k in ("h2d", "h2d_async", "d2h")}
    assert moved == {"h2d": 0, "h2d_async": 0, "d2h": 1}  # d2h: the one finiteness flag
    assert isinstance(out, shim.ndarray) and out.dtype == dtype
    np.testing.assert_allclose(be.to_host(out), expected, rtol=tol.rtol, atol=tol.atol)
    predicted = model.predict(X_dev)
    assert isinstance(predicted, shim.ndarray) and predicted.dtype == np.int64
    np.testing.assert_array_equal(be.to_host(predicted), np.argmax(be.to_host(out), axis=1))

    seen = _spy_training_data(monkeypatch)
    twin = bpk.MLP(SIZES, activation="tanh", backend=CUDASIM, dtype=dtype, seed=3)
    h_dev = bpk.fit(model, X_dev, be.asarray(y), epochs=2, batch_size=8,
                    validation_data=(X_dev, be.asarray(y)))
    h_host = bpk.fit(twin, X, y, epochs=2, batch_size=8, validation_data=(X, y))
    assert seen[0] is X_dev  # trained on in place
    assert h_dev["loss"] == h_host["loss"] and h_dev["val_loss"] == h_host["val_loss"]
    _assert_untouched(model, twin.get_weights(), epochs=2)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the emulation's
def test_device_conversions_and_checks_on_the_gpu_backend():
    shim = _cudasim()
    model = bpk.MLP(SIZES, activation="tanh", backend=CUDASIM, dtype="float32", seed=3)
    be, tol = model.backend, TOLERANCES["float32"]
    X, y = _data()
    expected = _reference_outputs(model, X.astype(np.float32))
    wide = be.asarray(np.repeat(X, 2, axis=1), np.float64)
    for given in (be.asarray(X, np.float64), wide[:, ::2], be.asarray(X.T, np.float32).T):
        before = shim.STATS.copy()
        out = model.forward(given)  # converted on the device: nothing crosses to the host
        assert shim.STATS["h2d"] - before["h2d"] == 0
        np.testing.assert_allclose(be.to_host(out), expected, rtol=tol.rtol, atol=tol.atol)

    bad = X.copy()
    bad[7, 3] = -np.inf
    with pytest.raises(ValueError, match=r"X contains -inf at index \[7, 3\]"):
        model.forward(be.asarray(bad, np.float32))
    huge = X.copy()
    huge[2, 0] = 1e300
    with pytest.raises(ValueError, match=r"X\[2, 0\] = 1e\+300 overflows float32"):
        model.forward(be.asarray(huge, np.float64))
    with pytest.raises(ValueError, match=r"X has 4 features per row"):
        model.forward(be.asarray(X[:, :4], np.float32))
    with pytest.raises(ValueError, match=r"y has 5 rows but X has 23"):
        bpk.fit(model, be.asarray(X, np.float32), be.asarray(y[:5]))

    weights = [(W * 2, b - 1) for W, b in model.get_weights()]
    model.set_weights([(be.asarray(W, np.float64), be.asarray(b, np.float32))
                       for W, b in weights])
    for (W, b), (W2, b2) in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(W, W2.astype(np.float32))
        np.testing.assert_array_equal(b, b2.astype(np.float32))
    with pytest.raises(TypeError, match="layer 0 W must be a float array, got dtype int64"):
        model.set_weights([(be.asarray(weights[0][0].astype(np.int64)), weights[0][1]),
                           weights[1]])
    # Memory of another library is not modelled by the emulation: a clear error, no guess.
    with pytest.raises(TypeError, match=r"X \(.*FakeCuda of shape \(23, 5\) on cuda\) "
                                        r"cannot be used in place by the 'cupy-cudasim' backend"):
        model.forward(FakeCuda((23, 5)))


# ------------------------------------------------------------------ PyTorch CPU tensors
def test_torch_cpu_tensors(model, monkeypatch, assert_close):
    torch = pytest.importorskip("torch")
    X, y = _data()
    X = X.astype(model.dtype)
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y)
    out = model.forward(X_t)
    assert type(out) is np.ndarray
    assert_close(out, _reference_outputs(model, X))
    if interop.host_backend(model.backend):
        seen = _spy_training_data(monkeypatch)
        bpk.fit(model, X_t, y_t, epochs=1, batch_size=8)
        assert np.shares_memory(seen[0], X)  # the tensor's memory, through DLPack
    else:
        bpk.fit(model, X_t, y_t, epochs=1, batch_size=8)
    assert_close(model.forward(X_t.T.contiguous().T), model.forward(X))  # strided: converted
    assert_close(model.forward(X_t.double()), model.forward(X.astype(np.float64)))
    weights = model.get_weights()
    model.set_weights([(torch.from_numpy(W), torch.from_numpy(b)) for W, b in weights])
    _assert_untouched(model, weights, epochs=1)
    with pytest.raises(TypeError, match=r"X \(torch\.Tensor of shape \(23, 5\)\) .*detach"):
        model.forward(X_t.clone().requires_grad_())


# ------------------------------------------------------------------ model.to
def _scale_aware_close(actual, expected, tol):
    """Per layer, max |a - r| <= atol + rtol * (the layer's largest |r|): bpkernels.testing's
    rule for weights after training."""
    for (W, b), (rW, rb) in zip(actual, expected):
        bound = tol.atol + tol.rtol * max(np.abs(rW).max(), np.abs(rb).max())
        assert np.abs(W - rW).max() <= bound and np.abs(b - rb).max() <= bound


def _trained(backend, dtype, optimizer):
    X, y = _data(40)
    model = bpk.MLP(SIZES, activation="tanh", backend=backend, dtype=dtype, seed=4)
    bpk.fit(model, X, y, optimizer=optimizer, epochs=2, batch_size=16, seed=1)
    return model, X, y


def _host_state(model):
    return {name: model.backend.to_host(buf) for name, buf in model.optimizer.state.items()}


@pytest.mark.parametrize("target", BACKENDS)
@pytest.mark.parametrize("source", BACKENDS)
def test_to_moves_a_model_bit_for_bit_and_training_goes_on_alike(source, target, bpk_dtype):
    for name in (source, target):
        if bpk_dtype not in bpk.get_backend(name).dtypes:
            pytest.skip(f"backend {name!r} does not support {bpk_dtype}")
    def make_opt():
        return bpk.Adam(lr=1e-2) if bpk_dtype == "float64" else bpk.SGD(lr=0.05, momentum=0.9)
    model, X, y = _trained(source, bpk_dtype, make_opt())
    stay, _, _ = _trained(source, bpk_dtype, make_opt())
    opt, weights, state = model.optimizer, model.get_weights(), _host_state(model)
    steps = opt.step_count
    model.forward(X)  # leaves workspaces of the source behind
    assert model.to(target) is model
    assert model.backend is bpk.get_backend(target) and model.dtype == bpk_dtype
    assert model.optimizer is opt and opt.step_count == steps and model.epochs_trained == 2
    _assert_untouched(model, weights, epochs=2)  # same dtype: bit for bit
    for name, buf in _host_state(model).items():
        np.testing.assert_array_equal(buf, state[name])
    assert not model._workspaces or source == target  # where it was, nothing moved

    h_moved = bpk.fit(model, X, y, epochs=2, batch_size=16, seed=1)
    h_stay = bpk.fit(stay, X, y, epochs=2, batch_size=16, seed=1)
    tol = TOLERANCES[bpk_dtype]
    np.testing.assert_allclose(h_moved["loss"], h_stay["loss"], rtol=tol.rtol, atol=tol.atol)
    _scale_aware_close(model.get_weights(), stay.get_weights(), tol)
    assert opt.step_count == stay.optimizer.step_count == steps + 6


@pytest.mark.parametrize("target", BACKENDS)
def test_to_float32_is_the_cast(target):
    model, X, y = _trained("numpy", "float64", bpk.SGD(lr=0.05, momentum=0.9))
    weights, state = model.get_weights(), _host_state(model)
    reference, _, _ = _trained("numpy", "float64", bpk.SGD(lr=0.05, momentum=0.9))
    model.to(target, dtype="float32")
    assert model.dtype == np.float32 and model.backend.name == target
    for (W, b), (W64, b64) in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(W, W64.astype(np.float32))
        np.testing.assert_array_equal(b, b64.astype(np.float32))
    for name, buf in _host_state(model).items():
        np.testing.assert_array_equal(buf, state[name].astype(np.float32))
    bpk.fit(model, X, y, epochs=1, batch_size=16, seed=1)
    bpk.fit(reference, X, y, epochs=1, batch_size=16, seed=1)
    _scale_aware_close(model.get_weights(), reference.get_weights(), TOLERANCES["float32"])
    model.to("numpy", "float64")  # and back: float32 values are exact in float64
    np.testing.assert_array_equal(model.get_weights()[0][0],
                                  model.get_weights()[0][0].astype(np.float32))


class _Float32Only(NumpyBackend):
    name = "numpy-float32-only"
    dtypes = ("float32",)


def test_to_checks_everything_before_changing_anything(monkeypatch):
    from bpkernels import backends
    register(_Float32Only.name, _Float32Only)
    monkeypatch.setitem(backends._REGISTRY, "gone", ("no_such_package", "X", "goneextra"))
    monkeypatch.delitem(backends._unavailable, "gone", raising=False)
    model, X, y = _trained("numpy", "float64", bpk.Adam(lr=1e-2))
    model.forward(X)
    params, state, workspaces = model.params, dict(model.optimizer.state), dict(model._workspaces)
    weights = model.get_weights()
    cases = [
        (("tpu",), {}, ValueError, r"unknown backend 'tpu'; valid backends: auto"),
        ((3,), {}, TypeError, r"backend must be a name"),
        (("gone",), {}, bpk.BackendUnavailable, r'pip install "bpkernels\[goneextra\]"'),
        (("numpy",), {"dtype": "float16"}, ValueError, r"unsupported dtype 'float16'"),
        ((_Float32Only.name,), {}, ValueError,
         r"backend 'numpy-float32-only' does not support float64; it supports float32"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            model.to(*args, **kwargs)
    huge = [(W, b) for W, b in weights]
    huge[1] = (huge[1][0], np.array([0.0, 1e39, 0.0]))
    model.set_weights(huge)
    with pytest.raises(ValueError, match=r"cannot move the model to float32: its params\[\d+\] "
                                         r"= 1e\+39 does not fit in float32"):
        model.to(_Float32Only.name, "float32")
    assert model.params is params and model.backend.name == "numpy"
    assert model.dtype == np.float64 and model.optimizer.state == state
    assert dict(model._workspaces) == workspaces


def test_to_where_it_is_changes_nothing():
    model, _, _ = _trained("numpy", "float64", bpk.Adam())
    params = model.params
    assert model.to("numpy") is model and model.to(model.backend, "float64") is model
    assert model.params is params
