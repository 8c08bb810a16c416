"""The CuPy backend's host code, run on the CPU through tests/cudasim: whole epochs as captured
graphs (one replay per step, no host wait, no allocation), divergence, changing
hyper-parameters, resumed fits, data sets streamed from host memory through pinned buffers and
a side stream, the TF32 option, and how the registry reports a missing CuPy or GPU.

The rest of the suite also runs on this backend ("cupy-cudasim"): every kernel-contract,
gradient, optimizer and training test. Tests here check what only this backend does.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

import bpkernels as bpk
import cudasim
from bpkernels.backends import BackendUnavailable
from cudasim import cublas as sim_cublas
from cudasim import shim

pytestmark = pytest.mark.skipif(cudasim.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA: {cudasim.unavailable_reason()}")

TOL = {"float32": dict(rtol=2e-4, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


def make(**options):
    return cudasim.make_backend(**options)


def data(n=43, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.standard_normal((n, features)) + 2.0 * np.eye(classes, features)[y]
    return X, y


def targets_for(loss, y, outputs, rng):
    if loss == "cross_entropy":
        return y
    if loss == "binary_cross_entropy":
        return (y % 2).astype(float)
    return rng.standard_normal((len(y), outputs))


class Recorder:
    """Wraps a backend's train_epoch and records what each call did on the (simulated) device."""

    def __init__(self, backend) -> None:
        self.calls: list[collections.Counter] = []
        inner = backend.train_epoch

        def train_epoch(plan):
            before = collections.Counter(shim.STATS)
            done = inner(plan)
            self.calls.append(collections.Counter(shim.STATS) - before)
            self.calls[-1]["done"] = int(done)
            self.calls[-1]["steps"] = plan.steps
            return done
        backend.train_epoch = train_epoch


def train(backend, sizes, X, y, epochs=2, dtype="float64", activation="relu", **fit_options):
    model = bpk.MLP(sizes, activation=activation, backend=backend, dtype=dtype, seed=1)
    history = bpk.fit(model, X, y, epochs=epochs, **fit_options)
    return model, history


# ---------------------------------------------------------------------- graphs
OPTIMIZERS = [lambda: bpk.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
              lambda: bpk.Adam(lr=0.01, weight_decay=0.1), lambda: bpk.AdamW(lr=0.01),
              lambda: bpk.RMSprop(lr=0.01, momentum=0.5, centered=True)]
CASES = [("cross_entropy", 3, "relu"), ("binary_cross_entropy", 1, "gelu"),
         ("mse", 2, "tanh"), ("cross_entropy", 3, "leaky_relu"), ("mse", 2, "silu")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss, outputs, activation", CASES, ids=[c[0] + "-" + c[2] for c in CASES])
@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam", "adamw", "rmsprop"])
def test_graph_epochs_equal_kernel_by_kernel_epochs_and_numpy(dtype, loss, outputs, activation,
                                                            make_opt):
    """43 rows in batches of 8: five full steps and a partial one, so both graphs replay. The
    replayed graphs give exactly the numbers of the same kernels launched one by one, and agree
    with the NumPy backend to the dtype's tolerance."""
    X, y = data()
    T = targets_for(loss, y, outputs, np.random.default_rng(3))
    sizes = [5, 7, outputs]
    runs = {}
    for name, backend in (("graphs", make()), ("kernels", make(graphs=False)), ("numpy", "numpy")):
        model, history = train(backend, sizes, X, T, dtype=dtype, activation=activation,
                               loss=loss, optimizer=make_opt(), batch_size=8)
        runs[name] = (history["loss"], [a for pair in model.get_weights() for a in pair])
    assert runs["graphs"][0] == runs["kernels"][0]
    for a, b in zip(runs["graphs"][1], runs["kernels"][1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(runs["graphs"][0], runs["numpy"][0], **TOL[dtype])
    for a, b in zip(runs["graphs"][1], runs["numpy"][1]):
        np.testing.assert_allclose(a, b, **TOL[dtype])


@pytest.mark.parametrize("n, variants", [(40, 1), (43, 2)], ids=["even", "partial"])
def test_one_replay_per_step_no_host_wait_no_allocation(n, variants):
    backend = make()
    recorder = Recorder(backend)
    X, y = data(n)
    train(backend, [5, 6, 3], X, y, epochs=3, optimizer="adam", batch_size=8)
    assert [c["done"] for c in recorder.calls] == [1, 1, 1]
    first, *later = recorder.calls
    assert first["captures"] == variants  # one graph per batch shape, once per fit
    for call in recorder.calls:
        assert call["graph_launches"] == call["steps"] == -(-n // 8)
        assert call["host_waits"] == 0, "an epoch on device-resident data never waits"
    for call in later:
        assert call["captures"] == 0 and call["allocations"] == 0 and call["module_builds"] == 0


def test_divergence_inside_a_graph_keeps_the_last_finite_weights():
    X, y = data(40)
    results = {}
    for name, backend in (("graphs", make()), ("numpy", "numpy")):
        model = bpk.MLP([5, 6, 3], backend=backend, dtype="float64", seed=0)
        with pytest.raises(bpk.TrainingDiverged) as err:
            bpk.fit(model, X, X[:, :3] * 1e3, loss="mse", optimizer=bpk.SGD(lr=10.0),
                    epochs=3, batch_size=8)
        results[name] = (err.value.global_step, model.optimizer.step_count,
                         [a for pair in model.get_weights() for a in pair])
    assert results["graphs"][:2] == results["numpy"][:2]
    for a, b in zip(results["graphs"][2], results["numpy"][2]):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, **TOL["float64"])


def test_a_learning_rate_schedule_replays_the_same_graph():
    """The hyper-parameters live on the device: a callback that halves lr changes the numbers
    and needs no new capture."""
    X, y = data()

    def fit_with_schedule(backend):
        opt = bpk.SGD(lr=0.2, momentum=0.9)

        def halve(epoch, record):
            opt.lr /= 2
        model, history = train(backend, [5, 6, 3], X, y, epochs=3, optimizer=opt, batch_size=8,
                               callbacks=[halve])
        return history["loss"], model.get_weights()

    backend = make()
    recorder = Recorder(backend)
    graphs, reference = fit_with_schedule(backend), fit_with_schedule("numpy")
    np.testing.assert_allclose(graphs[0], reference[0], **TOL["float64"])
    for (W, b), (W2, b2) in zip(graphs[1], reference[1]):
        np.testing.assert_allclose(W, W2, **TOL["float64"])
    assert [c["captures"] for c in recorder.calls] == [2, 0, 0]


def test_a_resumed_fit_continues_the_step_count():
    """Adam's bias corrections use the optimizer step, read from the device counter that each
    epoch starts at the step the host says."""
    X, y = data()
    weights = {}
    for name, backend in (("graphs", make()), ("numpy", "numpy")):
        model = bpk.MLP([5, 6, 3], backend=backend, dtype="float64", seed=0)
        opt = bpk.Adam(lr=0.05)
        bpk.fit(model, X, y, optimizer=opt, epochs=1, batch_size=16)
        bpk.fit(model, X, y, optimizer=opt, epochs=2, batch_size=8)  # a new fit, new graphs
        assert opt.step_count == 3 + 2 * 6
        weights[name] = model.get_weights()
    for (W, b), (W2, b2) in zip(weights["graphs"], weights["numpy"]):
        np.testing.assert_allclose(W, W2, **TOL["float64"])
        np.testing.assert_allclose(b, b2, **TOL["float64"])


def test_an_unknown_optimizer_is_declined():
    backend = make()

    class Plan:
        optimizer = "lbfgs"
    assert backend.train_epoch(Plan()) is False


# ---------------------------------------------------------------------- streamed data
def test_a_data_set_too_large_for_the_device_streams_through_pinned_buffers():
    """With room for the parameters only, the data set, labels and row order stay in host
    memory: each batch is gathered into a pinned buffer and copied on a side stream while the
    previous step computes. The simulated streams run work only as far as the declared
    dependencies force, so a missing wait would feed a step stale rows and change the numbers.
    The host waits for copies (to refill a pinned buffer), never for a computation."""
    X, y = data(100)
    reference_model, reference = train(make(), [5, 6, 3], X, y, epochs=3, optimizer="adam",
                                       batch_size=8)
    backend = make(max_resident_bytes=500)
    recorder = Recorder(backend)
    model, history = train(backend, [5, 6, 3], X, y, epochs=3, optimizer="adam", batch_size=8)
    assert isinstance(backend.asarray(X), cudasim.backend_module().HostArray)
    assert history["loss"] == reference["loss"]
    assert history["accuracy"] == reference["accuracy"]
    for (W, b), (W2, b2) in zip(model.get_weights(), reference_model.get_weights()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    steps = -(-100 // 8)
    for call in recorder.calls:
        assert call["graph_launches"] == steps
        assert call["h2d_async"] == 2 * steps  # rows and labels, every step
        assert call["host_waits"] == call["event_waits"] == steps  # copy events only


def test_streamed_row_weights_and_metrics_match_resident_ones():
    """Row weights kept in host memory stream beside the rows and labels (a third pinned
    buffer per step), and the graphs' metric statistics start from zero after capture: the
    streamed graphs equal the resident kernels launched one by one, exactly."""
    X, y = data(100)
    w = np.random.default_rng(3).uniform(0, 2, 100)
    options = dict(epochs=3, optimizer="adam", batch_size=8, sample_weight=w,
                   metrics=["f1_macro", "top2"])
    reference_model, reference = train(make(graphs=False), [5, 6, 3], X, y, **options)
    backend = make(max_resident_bytes=500)
    recorder = Recorder(backend)
    model, history = train(backend, [5, 6, 3], X, y, **options)
    for name in ("loss", "accuracy", "f1_macro", "top2"):
        assert history[name] == reference[name], name
    for (W, b), (W2, b2) in zip(model.get_weights(), reference_model.get_weights()):
        np.testing.assert_array_equal(W, W2)
    steps = -(-100 // 8)
    for call in recorder.calls:
        assert call["h2d_async"] == 3 * steps  # rows, labels and weights, every step


def test_streamed_data_without_graphs_takes_rows_on_the_host():
    X, y = data(30)
    runs = []
    for backend in (make(graphs=False, max_resident_bytes=500), make()):
        model, history = train(backend, [5, 4, 3], X, y, epochs=2, optimizer="sgd", batch_size=8)
        runs.append((history["loss"], model.get_weights()[0][0]))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "kernels"])
def test_a_model_larger_than_the_resident_limit_stays_on_the_device(graphs):
    """max_resident_bytes is the largest data set kept on the device: a model's parameters,
    gradients and optimizer state, the clipping and schedule buffers over it are still
    device arrays (the kernels read and write them in place), whether the model is built
    there, moved there or loaded there; only the data streams. Training matches NumPy."""
    X, y = data(43)
    HostArray = cudasim.backend_module().HostArray

    def options():
        return dict(epochs=2, optimizer="adam", batch_size=8, clip_grad_norm=0.5,
                    lr_scheduler=bpk.lr_scheduler.OneCycleLR(max_lr=0.05, total_steps=12),
                    lr_scheduler_interval="step")

    backend = make(graphs=graphs, max_resident_bytes=64)  # [5, 6, 3] float64: 456 bytes
    assert isinstance(backend.asarray(X), HostArray)
    model, history = train(backend, [5, 6, 3], X, y, **options())
    reference_model, reference = train("numpy", [5, 6, 3], X, y, **options())
    buffers = [model.params, model.grads, *model.optimizer.state.values()]
    assert not any(isinstance(a, HostArray) for a in buffers)
    np.testing.assert_allclose(history["loss"], reference["loss"], **TOL["float64"])
    for got, expected in zip(model.get_weights(), reference_model.get_weights()):
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, **TOL["float64"])
    # answers to device input are device arrays, however far over the limit
    device_X = backend.asarray_resident(X)
    for answer, expected in ((model.predict_proba(device_X), reference_model.predict_proba(X)),
                             (model.predict(device_X), reference_model.predict(X))):
        assert not isinstance(answer, (HostArray, np.ndarray))
        np.testing.assert_allclose(backend.to_host(answer), expected, **TOL["float64"])

    moved = train("numpy", [5, 6, 3], X, y, optimizer="adam", batch_size=8)[0]
    state = moved.state()
    loaded = bpk.MLP.from_state(*state, backend=backend)
    moved.to(backend)
    reference_model = bpk.MLP.from_state(*state, backend="numpy")
    for model in (moved, loaded, reference_model):
        bpk.fit(model, X, y, epochs=1, optimizer=model.optimizer, batch_size=8)
    for model in (moved, loaded):
        buffers = [model.params, model.grads, *model.optimizer.state.values()]
        assert not any(isinstance(a, HostArray) for a in buffers)
        for got, expected in zip(model.get_weights(), reference_model.get_weights()):
            for a, b in zip(got, expected):
                np.testing.assert_allclose(a, b, **TOL["float64"])


def test_the_simulated_streams_catch_a_missing_wait():
    """What makes the streaming test above able to fail: work on another stream that was not
    waited for has not run, so a consumer reads the old contents."""
    pinned = shim.empty_pinned((4,), np.float64)
    side, main = shim.Stream(non_blocking=True), shim.Stream(non_blocking=True)
    with main:
        staging, result = shim.zeros((4,), np.float64), shim.zeros((4,), np.float64)
    main.synchronize()
    pinned[:] = 1.0
    staging.set(pinned, stream=side)
    copied = side.record()
    with main:
        result[...] = staging  # no main.wait_event(copied): reads the zeros
    assert shim.asnumpy(result, stream=main).tolist() == [0.0] * 4
    main.wait_event(copied)
    with main:
        result[...] = staging
    assert shim.asnumpy(result, stream=main).tolist() == [1.0] * 4


# ---------------------------------------------------------------------- options, registry
def test_tf32_is_off_by_default_and_on_by_option(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 64)).astype(np.float32)
    W = rng.standard_normal((64, 3)).astype(np.float32)
    exact = X.astype(np.float64) @ W

    def forward(backend):
        A = backend.empty((4, 3), np.float32)
        backend.dense_forward(backend.asarray(X), backend.asarray(W),
                              backend.zeros((3,), np.float32), "identity", A)
        return backend.to_host(A)

    default, tf32 = make(), make(tf32=True)
    assert not default.tf32 and tf32.device_info()["tf32"]
    np.testing.assert_allclose(forward(default), exact, rtol=1e-5, atol=1e-5)
    rounded = shim._tf32(X).astype(np.float64) @ shim._tf32(W)
    np.testing.assert_allclose(forward(tf32), rounded, rtol=1e-5, atol=1e-5)
    assert np.abs(forward(tf32) - exact).max() > 1e-4  # really TF32 (10-bit mantissa)
    np.testing.assert_allclose(forward(default), exact, rtol=1e-5, atol=1e-5)  # still off
    monkeypatch.setenv("BPK_CUDA_TF32", "1")
    assert make().tf32


def test_without_cupys_private_compute_type_setter_products_still_run(monkeypatch):
    # The one CuPy internal the backend uses, moved away: products run as CUPY_TF32 says
    # (full float32 here) and device_info says why TF32 is not the backend's to choose.
    monkeypatch.delattr(cudasim.backend_module().cupy._core, "_routines_linalg")
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 33)).astype(np.float32)
    W = rng.standard_normal((33, 4)).astype(np.float32)
    backend = make(tf32=True)
    A = backend.empty((5, 4), np.float32)
    backend.dense_forward(backend.asarray(X), backend.asarray(W),
                          backend.zeros((4,), np.float32), "identity", A)
    np.testing.assert_allclose(backend.to_host(A), X.astype(np.float64) @ W, rtol=1e-5,
                               atol=1e-5)
    assert "CuPy's setter moved" in backend.device_info()["tf32"]


def test_cupy_is_preferred_and_names_its_extra():
    from bpkernels.backends import _REGISTRY
    assert next(iter(_REGISTRY)) == "cupy"
    assert _REGISTRY["cupy"][2] == "cuda12"


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as a new process sees it, restored afterwards."""
    import bpkernels.backends as registry
    monkeypatch.setattr(registry, "_instances", {k: v for k, v in registry._instances.items()
                                                 if k != "cupy"})
    monkeypatch.setattr(registry, "_unavailable", {})
    monkeypatch.delitem(sys.modules, "bpkernels.backends.cupy_backend", raising=False)
    return registry


def test_without_cupy_the_reason_names_the_extra(fresh_registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if not installed
    reason = fresh_registry.unavailable_reasons()["cupy"]
    assert reason == "backend 'cupy' needs the package 'cupy': pip install \"bpkernels[cuda12]\""
    assert "cupy" not in fresh_registry.available_backends()
    with pytest.raises(BackendUnavailable, match="cuda12"):
        bpk.MLP([2, 2], backend="cupy")


def test_cupy_without_a_gpu_says_why(fresh_registry, monkeypatch, capsys):
    """CuPy installed on a machine without a GPU or driver: importing works, the device query
    fails, and both the registry and `bpk info` carry CUDA's own message."""
    fake = shim.modules()

    def no_device():
        raise fake["cupy.cuda.runtime"].CUDARuntimeError(
            "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime "
            "version")
    fake["cupy.cuda.runtime"].getDeviceCount = no_device
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    reason = fresh_registry.unavailable_reasons()["cupy"]
    assert reason.startswith("backend 'cupy' cannot use a GPU here: cudaErrorInsufficientDriver")
    driverless = os.path.isdir("/proc") and not os.path.exists("/proc/driver/nvidia/version")
    assert reason.endswith(" (no NVIDIA driver is loaded: no GPU here)") == driverless
    from bpkernels import cli
    assert cli.main(["info"]) == 0
    assert "cupy: unavailable: backend 'cupy' cannot use a GPU here" in capsys.readouterr().out


def test_nccl_is_offered_where_cupy_has_it_and_its_calls_join_the_kernels_stream():
    """bpkernels.distributed sums gradients with NCCL where the backend offers it (a CuPy built
    without NCCL has no cupy.cuda.nccl: the staged path); the all-reduce is queued on the
    stream the backend's kernels use. The NCCL stand-in itself runs under mpiexec
    (tests/test_mpi.py)."""
    with_nccl, without = make(), make(nccl=False)
    assert with_nccl.nccl.NCCL_FLOAT64 == 8 and without.nccl is None
    assert with_nccl.stream_ptr() == shim.Stream.null.ptr
    side = shim.Stream(non_blocking=True)
    with side:
        assert with_nccl.stream_ptr() == side.ptr


def test_the_stand_in_never_takes_a_real_cupys_modules(monkeypatch):
    """CuPy installed on a runner without a GPU: the registry's probe imports the real CuPy
    (cupy.cuda.nccl included) before the stand-in's backend is loaded. None of its modules may
    reach that backend: a CuPy without NCCL must stay without one. Here marked modules play
    the real CuPy, so the check runs with or without CuPy installed."""
    real = {name: types.ModuleType(name) for name in
            ("cupy", "cupy.cuda", "cupy.cuda.nccl", "cupy.cuda.runtime", "cupyx", "cupy._core",
             "cupy.cuda.cublas")}
    real["cupy"].cuda, real["cupy.cuda"].nccl = real["cupy.cuda"], real["cupy.cuda.nccl"]
    real["cupy.cuda.nccl"].NCCL_FLOAT64 = "the real one"
    for name, module in real.items():
        monkeypatch.setitem(sys.modules, name, module)
    without, with_nccl = (cudasim.load_backend_module(nccl=flag) for flag in (False, True))
    assert without._nccl is None and without.cupy is not real["cupy"]
    assert with_nccl._nccl.NCCL_FLOAT64 == shim.NCCL_FLOAT64 == 8
    assert with_nccl.cupy.__version__ == "cudasim"
    graphs = with_nccl.GraphRunner.__init__.__globals__  # the copy of cupy_graphs it imported
    assert graphs["cupy"] is with_nccl.cupy and graphs["cupyx"] is not real["cupyx"]
    mixed = with_nccl.gemm_bf16.__globals__  # the copy of cupy_mixed: the stand-in's cuBLAS
    assert mixed["cupy"] is with_nccl.cupy and mixed["cublas"] is not real["cupy.cuda.cublas"]
    assert mixed["cublas"].gemmEx is sim_cublas.gemm_ex
    assert all(sys.modules[name] is module for name, module in real.items())  # put back


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed")
def test_a_real_cupy_without_a_gpu_is_reported_not_used(fresh_registry):
    """On a CPU-only runner with cupy-cuda12x installed (CI's last stage), the registry says
    why the real backend cannot run, "auto" passes over it and `bpk info` still works."""
    import cupy
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        count = 0
    if count:
        pytest.skip("a GPU is here: tests/test_cuda_gpu.py covers it")
    reason = fresh_registry.unavailable_reasons()["cupy"]
    assert reason.startswith("backend 'cupy' cannot use a GPU here: ")
    if not os.path.exists("/proc/driver/nvidia/version"):
        assert reason.endswith(" (no NVIDIA driver is loaded: no GPU here)")
    assert "cupy" not in fresh_registry.available_backends()
    assert fresh_registry.get_backend("auto").name != "cupy"
    with pytest.raises(BackendUnavailable, match="cannot use a GPU here"):
        bpk.MLP([2, 2], backend="cupy")


def test_device_info_describes_the_gpu():
    info = make().device_info()
    assert info["device"] == "cuda" and info["name"] and info["total_memory"] > 0
    assert {"cuda", "memory_gb", "compute_capability", "cupy", "tf32"} <= set(info)


# ---------------------------------------------------------------------- benchmark
@pytest.mark.parametrize("floor_dtype", ["float32", "bf16"])
def test_the_benchmark_times_a_cublas_floor_for_the_gpu_backend(floor_dtype):
    """`bpk bench --backends cupy` adds a "gemm-floor-cuda" record: the epoch's products captured
    as one graph, replayed, and timed under CUDA events (here the simulated ones); in bf16 the
    products are cuBLAS's bf16 ones on inputs rounded ahead."""
    from bpkernels import bench
    backend = make()
    before = collections.Counter(shim.STATS)
    seconds = backend.gemm_floor_seconds((6, 5, 3), [8, 8, 3], floor_dtype, 3)
    done = collections.Counter(shim.STATS) - before
    assert len(seconds) == 3 and all(t > 0 for t in seconds)
    assert done["captures"] == 1 and done["graph_launches"] == 4  # a warm replay, then 3 timed
    assert done["gemms"] == 2 * (2 + 2 + 1) * 3  # eager warm-up + capture: fwd, dW, dX per step
    config = bench.Config("tiny", (6, 5, 3), 8, 19)
    record = bench.time_gemm_floor_cuda(cudasim.NAME, config, "float64", 2)
    assert record.name == "gemm-floor-cuda" and record.kind == "floor"
    assert record.extra == {"backend": cudasim.NAME} and record.seconds_per_epoch > 0
    assert bench.ratios([record])[0] == (None, None)


def test_other_threads_allocate_and_read_around_a_graph_capture_never_inside_it():
    """CUDA refuses an allocation or a synchronous copy from any thread while a graph is being
    captured (the stand-in crashed on it, so did a real device's capture): a thread that
    builds models and reads their weights while another fit captures its graphs waits the
    capture out (CupyBackend.capture_lock), and both train as alone."""
    import threading
    be = make()
    X, y = data(n=96, features=8, classes=4)
    stop, errors = threading.Event(), []

    def build_and_read():
        while not stop.is_set():
            try:
                bpk.MLP([8, 16, 4], activation="tanh", backend=be, dtype="float64").get_weights()
            except Exception as err:  # reported below
                errors.append(err)
                return
    other = threading.Thread(target=build_and_read)
    other.start()
    try:
        trained = []
        for seed in range(4):  # a new fit, a new capture, each time
            model = bpk.MLP([8, 16, 4], activation="tanh", backend=be, dtype="float64",
                            seed=seed)
            bpk.fit(model, X, y, optimizer=bpk.Adam(1e-3), epochs=2, batch_size=16, seed=seed)
            trained.append(model.get_weights())
    finally:
        stop.set()
        other.join()
    assert not errors
    alone = bpk.MLP([8, 16, 4], activation="tanh", backend=be, dtype="float64", seed=3)
    bpk.fit(alone, X, y, optimizer=bpk.Adam(1e-3), epochs=2, batch_size=16, seed=3)
    for (W, b), (W0, b0) in zip(trained[3], alone.get_weights()):
        np.testing.assert_array_equal(W, W0)
        np.testing.assert_array_equal(b, b0)


# ---------------------------------------------------------------------- bf16
def _weights(model) -> np.ndarray:
    return np.concatenate([a.ravel() for layer in model.get_weights() for a in layer])


def test_bf16_graph_epochs_equal_the_kernel_loop_bit_for_bit():
    """A captured bf16 step (rounding launches and cuBLAS's bf16 products inside the graph)
    trains exactly as the per-kernel loop, and as the NumPy reference up to float32 sums;
    later epochs replay without allocating or waiting."""
    X, y = data(70, features=12, classes=4)
    runs = {}
    for name, backend in (("graphs", make()), ("kernels", make(graphs=False)),
                          ("numpy", "numpy")):
        recorder = Recorder(backend) if name == "graphs" else None
        model = bpk.MLP([12, 24, 16, 4], activation="gelu", backend=backend, dtype="bf16",
                        seed=3, norm="layer", dropout=0.1)
        bpk.fit(model, X, y, epochs=3, batch_size=16, optimizer=bpk.SGD(lr=0.05, momentum=0.9))
        runs[name] = _weights(model), recorder
    np.testing.assert_array_equal(runs["graphs"][0], runs["kernels"][0])
    np.testing.assert_allclose(runs["graphs"][0], runs["numpy"][0], **TOL["float32"])
    calls = runs["graphs"][1].calls
    assert [c["done"] for c in calls] == [1, 1, 1]
    for call in calls[1:]:
        assert call["captures"] == call["allocations"] == call["host_waits"] == 0
        assert call["graph_launches"] == call["steps"]


def test_bf16_products_are_not_float32_products():
    """The stand-in's cuBLAS multiplies the bfloat16 values: a float32 model differs."""
    X, y = data(32, features=12, classes=4)
    trained = [_weights(train(make(), [12, 24, 4], X, y, dtype=dtype, batch_size=8,
                              optimizer=bpk.SGD(lr=0.1))[0]) for dtype in ("bf16", "float32")]
    assert not np.allclose(trained[0], trained[1], rtol=1e-5, atol=1e-6)


def _broken_gemm(*args):
    raise sim_cublas.CUBLASError("CUBLAS_STATUS_NOT_SUPPORTED")


@pytest.mark.parametrize("case", ["old-gpu", "no-binding", "self-test"])
def test_bf16_unavailable_says_why_and_models_refuse(monkeypatch, case):
    cublas = cudasim.backend_module().gemm_bf16.__globals__["cublas"]
    if case == "no-binding":
        monkeypatch.delattr(cublas, "gemmEx")
    elif case == "self-test":
        monkeypatch.setattr(cublas, "gemmEx", _broken_gemm)
    backend = make()
    if case == "old-gpu":
        backend._properties = dict(backend._properties, major=7, minor=5)
    why = backend.bf16_unavailable()
    expected = {"old-gpu": "compute capability is 7.5; bfloat16 products need 8.0",
                "no-binding": "lacks the cuBLAS binding of cublasGemmEx",
                "self-test": "failed its self-test: CUBLASError"}[case]
    assert why is not None and expected in why, why
    with pytest.raises(ValueError, match="cannot run bf16: "):
        bpk.MLP([3, 2], backend=backend, dtype="bf16")
    A = backend.empty((2, 2), np.float32)
    with pytest.raises(ValueError, match="cannot run bf16 products"):
        backend.dense_forward(backend.zeros((2, 3), np.float32), backend.zeros((3, 2), np.float32),
                              backend.zeros((2,), np.float32), "identity", A, bf16=True)
