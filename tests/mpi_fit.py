"""Run by tests/test_mpi.py under mpiexec: ``python tests/mpi_fit.py TASK OUT_DIR``.

Every rank builds the same data and model from fixed seeds (``case_data``, ``build``, shared
with the single-process reference in the test) and trains with ``comm=MPI.COMM_WORLD``. Each
rank writes what it ended with to ``OUT_DIR/rank<r>.json`` (weights as lists, history, the
errors it raised), so the test can check every rank, not only rank 0.

Tasks: ``parity`` (the CASES below), ``launch-errors`` (bad launches, each expected to raise
DistributedError on every rank), ``raise`` and ``kill`` (rank 1 fails after the first epoch),
``nccl`` (the CPU stand-in of NCCL in tests/cudasim, on its own), ``local-gpu``
(distributed.use_local_gpu where ranks see different GPUs), ``bench-worker`` (one rank of
``bpk bench --ranks`` on the CuPy backend).

The CuPy backend runs on the CPU stand-in of CuPy (tests/cudasim) as "cupy-cudasim" (with NCCL:
distributed's NCCL path) and "cupy-cudasim-nonccl" (a CuPy without NCCL: the staged path).
"""
from __future__ import annotations

import collections
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

import bpkernels as bpk
from bpkernels import bench, distributed
from bpkernels.distributed import DistributedError

# name -> (backend, optimizer, loss, sizes, activation, samples, batch, epochs); samples and
# batch leave a short last batch, which under 3 ranks gives a rank no rows.
CASES = {
    "numpy-sgd-ce": ("numpy", ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                     "cross_entropy", [6, 8, 3], "relu", 50, 16, 3),
    "numpy-adam-mse": ("numpy", ("adam", {"lr": 1e-2, "weight_decay": 1e-3}), "mse",
                       [5, 7, 2], "tanh", 45, 8, 3),
    "numba-adam-ce": ("numba", ("adam", {"lr": 1e-2}), "cross_entropy", [6, 8, 3], "relu",
                      50, 16, 3),
    "numba-sgd-mse": ("numba", ("sgd", {"lr": 0.05}), "mse", [5, 7, 2], "tanh", 45, 8, 3),
    "cupy-nccl-sgd-ce": ("cupy-cudasim", ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
                         "cross_entropy", [6, 8, 3], "relu", 50, 16, 3),
    "cupy-nccl-adam-mse-f32": ("cupy-cudasim", ("adam", {"lr": 1e-2}), "mse", [5, 7, 2],
                               "tanh", 45, 8, 3),
    "cupy-staged-adam-ce": ("cupy-cudasim-nonccl", ("adam", {"lr": 1e-2, "weight_decay": 1e-3}),
                            "cross_entropy", [6, 8, 3], "relu", 50, 16, 3),
    # One target of row 37 is 1e200: its squared error overflows to inf while its gradient
    # stays finite, so only the rank whose shard holds the row sees a bad loss.
    "numpy-diverges": ("numpy", ("sgd", {"lr": 0.01}), "mse", [4, 5, 2], "tanh", 40, 8, 3),
    # The same on the CuPy backend: the loss slot poisons the gradient in the weigh_grads
    # kernel before NCCL sums it.
    "cupy-nccl-diverges": ("cupy-cudasim", ("sgd", {"lr": 0.01}), "mse", [4, 5, 2], "tanh",
                           40, 8, 3),
    # Sample and class weights (issue 19): each rank's gradient weighs its shard's share of
    # the batch's weight, not of its rows. Whole-number weights, about a third of them 0 (so
    # some shards, and the 2-row last batches, weigh 0): the sums are exact, so the weighted
    # accuracy compares exactly.
    "numpy-sgd-ce-weighted": ("numpy", ("sgd", {"lr": 0.1, "momentum": 0.9}), "cross_entropy",
                              [6, 8, 3], "relu", 50, 16, 3),
    "numba-adam-mse-weighted": ("numba", ("adam", {"lr": 1e-2}), "mse", [5, 7, 2], "tanh",
                                45, 8, 3),
    "cupy-nccl-sgd-ce-weighted": ("cupy-cudasim", ("sgd", {"lr": 0.1}), "cross_entropy",
                                  [6, 8, 3], "relu", 50, 16, 3),
    # Gradient clipping: the norm is the all-reduced gradient's (a rank's own shard's would
    # give each rank other weights, and all of them other weights than one process's).
    "numpy-sgd-ce-clip": ("numpy", ("sgd", {"lr": 0.1, "momentum": 0.9}), "cross_entropy",
                          [6, 8, 3], "relu", 50, 16, 3),
    "numba-adam-ce-clip": ("numba", ("adam", {"lr": 1e-2}), "cross_entropy", [6, 8, 3],
                           "relu", 50, 16, 3),
    "cupy-nccl-sgd-ce-clip": ("cupy-cudasim", ("sgd", {"lr": 0.1, "momentum": 0.9}),
                              "cross_entropy", [6, 8, 3], "relu", 50, 16, 3),
    # Dropout (issue 20): a rank draws, for its rows of a batch, the masks one process draws
    # for those rows (the counter holds the row's index in the data set).
    "numpy-sgd-ce-dropout": ("numpy", ("sgd", {"lr": 0.1, "momentum": 0.9}), "cross_entropy",
                             [6, 8, 7, 3], "relu", 50, 16, 3),
    # (the reference's fused epoch shares its compiled specialization with test_dropout.py's)
    "numba-sgd-ce-dropout": ("numba", ("sgd", {"lr": 0.1, "momentum": 0.9}), "cross_entropy",
                             [5, 9, 3], "tanh", 45, 8, 3),
    "cupy-nccl-sgd-ce-dropout": ("cupy-cudasim", ("sgd", {"lr": 0.1, "momentum": 0.9}),
                                 "cross_entropy", [6, 8, 7, 3], "relu", 50, 16, 3),
}
# MLP's dropout of the cases that drop
DROPOUT = {name: 0.3 for name in CASES if name.endswith("-dropout")}
# fit's clip_grad_norm of the cases that clip (small enough to clip every step)
CLIP = {name: 0.2 for name in CASES if name.endswith("-clip")}
DIVERGING = ("numpy-diverges", "cupy-nccl-diverges")
# name -> (sample weights: whole numbers 0..3 from this seed, class_weight)
WEIGHTED = {"numpy-sgd-ce-weighted": (11, {0: 2, 2: 3}),
            "numba-adam-mse-weighted": (12, None),
            "cupy-nccl-sgd-ce-weighted": (13, {1: 4})}
# name -> metrics= of the weighted cases: each rank sums its shards' statistics, then the ranks'
METRICS = {"numpy-sgd-ce-weighted": ["f1_macro", "top2"],
           "numba-adam-mse-weighted": ["r2", "mae"],
           "cupy-nccl-sgd-ce-weighted": ["precision_macro", "recall_macro"]}
# Cases trained in float32 (the others in float64); the reference stays the float64 run.
FLOAT32 = ("cupy-nccl-adam-mse-f32",)


def runnable_cases() -> list[str]:
    """CASES that can run here: the CuPy ones need the CPU emulation's C++ compiler."""
    import cudasim
    emulated = cudasim.unavailable_reason() is None
    return [name for name in CASES if emulated or not CASES[name][0].startswith("cupy")]


def case_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    _, _, loss, sizes, _, samples, _, _ = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    X = rng.standard_normal((samples, sizes[0]))
    if loss == "cross_entropy":
        return X, rng.integers(0, sizes[-1], samples)
    Y = rng.standard_normal((samples, sizes[-1]))
    if name in DIVERGING:
        Y[37, 1] = 1e200
    return X, Y


def backend_of(name: str):
    """A backend name of the registry, or for "cupy-cudasim..." a CuPy backend on the CPU
    stand-in (made here, not registered: the test process's registry stays as it is)."""
    if not name.startswith("cupy-cudasim"):
        return name
    import cudasim
    return cudasim.make_backend(nccl=name != "cupy-cudasim-nonccl")


def build(name: str, backend: str | None = None, dtype: str | None = None):
    """(model, fit keyword arguments) of a case; ``backend`` and ``dtype`` override the case's."""
    case_backend, (opt, hp), loss, sizes, activation, _, batch, epochs = CASES[name]
    dtype = dtype or ("float32" if name in FLOAT32 else "float64")
    model = bpk.MLP(sizes, activation=activation, backend=backend_of(backend or case_backend),
                    dtype=dtype, seed=7, dropout=DROPOUT.get(name, 0.0))
    kwargs = {"loss": loss, "optimizer": bpk.optim.make_optimizer(opt, **hp),
              "epochs": epochs, "batch_size": batch, "seed": 3,
              "clip_grad_norm": CLIP.get(name)}
    if name in WEIGHTED:
        seed, class_weight = WEIGHTED[name]
        kwargs["sample_weight"] = np.random.default_rng(seed).integers(0, 4, CASES[name][5])
        kwargs["class_weight"] = class_weight
        kwargs["metrics"] = METRICS[name]
    return model, kwargs


def train(name: str, comm=None, reference: bool = False) -> dict:
    """Train a case; the weights, history and divergence (epoch, step) it ended with. The
    ``reference`` is the same training by the NumPy backend in float64; a CuPy case also
    reports what the simulated device did (``device``)."""
    model, kwargs = build(name, "numpy", "float64") if reference else build(name)
    X, y = case_data(name)
    outcome: dict = {"diverged": None, "history": None}
    samples, batch = CASES[name][5:7]
    watched = CASES[name][0].startswith("cupy") and not reference
    watch = _DeviceWatch(-(-samples // batch)) if watched else None
    try:
        history = bpk.fit(model, X, y, comm=comm, **kwargs)
        outcome["history"] = {k: history[k] for k in ("loss", "accuracy", *METRICS.get(name, ()))
                              if k in history.epochs[0]}
    except bpk.TrainingDiverged as err:
        outcome["diverged"] = [err.epoch, err.step, err.global_step]
    finally:
        if watch is not None:
            outcome["device"] = watch.stop()
    outcome["weights"] = [a.tolist() for W, b in model.get_weights() for a in (W, b)]
    return outcome


class _DeviceWatch:
    """What the simulated device did during one fit (tests/cudasim's STATS): over the whole fit,
    and between consecutive gradient all-reduces of an epoch after the first (whose steps build
    the scratch buffers of each batch shape once), i.e. over one step's host code (check_step,
    update, the next batch's gather, forward and backward, the next all-reduce's weighting),
    where nothing may allocate or wait for the device."""

    KEYS = ("allocations", "host_waits", "captures", "graph_launches", "nccl_allreduces")

    def __init__(self, steps: int) -> None:
        from cudasim import shim
        self.stats, self.steps, self.at_reduce = shim.STATS, steps, []
        self.start = collections.Counter(self.stats)
        self.original = distributed.DataParallel.all_reduce
        watch = self

        def all_reduce(dist, grads, loss, weight):
            watch.at_reduce.append(collections.Counter(watch.stats))
            watch.original(dist, grads, loss, weight)
        distributed.DataParallel.all_reduce = all_reduce

    def stop(self) -> dict:
        distributed.DataParallel.all_reduce = self.original
        whole = collections.Counter(self.stats) - self.start
        between, intervals = collections.Counter(), 0
        for i in range(self.steps + 1, len(self.at_reduce)):
            if i % self.steps:  # not across an epoch's end, where the host reads its results
                between += self.at_reduce[i] - self.at_reduce[i - 1]
                intervals += 1
        return {"steps": len(self.at_reduce), "intervals": intervals,
                "fit": {key: whole[key] for key in self.KEYS},
                "within_epochs": {key: between[key] for key in self.KEYS}}


def launch_errors(comm) -> dict:
    """Bad launches; each must raise DistributedError on every rank (and leave it usable)."""
    rank, X, y = comm.Get_rank(), *case_data("numpy-sgd-ce")
    last = rank == comm.Get_size() - 1
    attempts = {
        "batch_size differs": lambda: _fit(comm, X, y, batch_size=16 if rank == 0 else 8),
        "seed differs": lambda: _fit(comm, X, y, model_seed=rank),
        "data differs": lambda: _fit(comm, X + (rank == comm.Get_size() - 1), y),
        # Rows the old check's 1,024-row sample never read: 3,976 of 5,000 rows on the last
        # rank, one label on ranks 1 and 2.
        "data differs outside a sample": lambda: _fit(comm, *_unsampled_change(rank, last)),
        "too many ranks": lambda: _fit(comm, X[:comm.Get_size() - 1], y[:comm.Get_size() - 1]),
        "batch below ranks": lambda: _fit(comm, X, y, batch_size=comm.Get_size() - 1),
        # One CuPy with NCCL, the others without: NCCL's setup on rank 0 against host MPI
        # collectives elsewhere would hang.
        "NCCL on rank 0 only": lambda: _fit(comm, X, y, backend=_cupy_cudasim(nccl=rank == 0)),
        # A user error before training: raised on every rank (its own error where it happened).
        "bad labels on the last rank": lambda: _fit(comm, X, y + 5 * last, loss="cross_entropy"),
        "bad labels everywhere": lambda: _fit(comm, X, y + 5, loss="cross_entropy"),
        "sample weights differ": lambda: _fit(comm, X, y,
                                              sample_weight=np.full(len(y), 1.0 + last)),
        "metrics differ": lambda: _fit(comm, X, y, metrics=["f1_macro"] if last else None),
    }
    import cudasim
    if cudasim.unavailable_reason() is not None:
        del attempts["NCCL on rank 0 only"]
    messages = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            messages[what] = None
        except DistributedError as err:
            messages[what] = str(err)
        except ValueError as err:  # not a DistributedError: the rank's own error
            messages[what] = f"{type(err).__name__}: {err}"
    return messages


def _unsampled_change(rank: int, last: bool) -> tuple[np.ndarray, np.ndarray]:
    """5,000 rows, changed outside the 1,024 evenly spaced rows that the data check once read:
    X on the last rank, one label on every rank but 0."""
    rng = np.random.default_rng(11)
    X, y = rng.standard_normal((5000, 6)), rng.integers(0, 3, 5000)
    outside = np.setdiff1d(np.arange(5000), np.linspace(0, 4999, 1024).astype(np.int64))
    if last:
        X[outside] += 1.0
    if rank:
        y[outside[-rank]] = (y[outside[-rank]] + 1) % 3
    return X, y


def _cupy_cudasim(nccl: bool):
    import cudasim
    return cudasim.make_backend(nccl=nccl)


def _fit(comm, X, y, batch_size: int = 16, model_seed: int = 7, backend="numpy",
         loss: str = "cross_entropy", **options) -> None:
    model = bpk.MLP([6, 8, 3], backend=backend, dtype="float64", seed=model_seed)
    bpk.fit(model, X, y, loss=loss, optimizer="sgd", epochs=1, batch_size=batch_size,
            comm=comm, **options)


def fail_on_rank_1(comm, how: str) -> None:
    def callback(epoch: int, record: dict) -> None:
        if comm.Get_rank() == 1:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("callback failed on purpose")
    model, kwargs = build("numpy-sgd-ce")
    X, y = case_data("numpy-sgd-ce")
    bpk.fit(model, X, y, comm=comm, callbacks=[callback], **dict(kwargs, epochs=50))


def nccl_stand_in(comm) -> dict:
    """The NCCL stand-in on its own: sums, queueing on a stream, capture and replay, and the
    calls it must refuse. Returns what happened, by check."""
    from cudasim import shim
    nccl = shim.modules()["cupy.cuda.nccl"]
    rank, size = comm.Get_rank(), comm.Get_size()
    unique_id = comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0)
    device_comm = nccl.NcclCommunicator(size, unique_id, rank)
    stream = shim.Stream(non_blocking=True)
    result = {}

    def values(dtype, n=5):
        with stream:  # the copy goes where the all-reduce reads, so no event is needed
            return shim.asarray(np.arange(n, dtype=dtype) + 10.0 * rank)

    for dtype, code in ((np.float32, nccl.NCCL_FLOAT32), (np.float64, nccl.NCCL_FLOAT64)):
        x, out = values(dtype), values(dtype)
        stream.synchronize()
        device_comm.allReduce(x.data.ptr, x.data.ptr, 5, code, nccl.NCCL_SUM, stream.ptr)
        device_comm.allReduce(x.data.ptr, out.data.ptr, 3, code, nccl.NCCL_MAX, stream.ptr)
        queued = x._a.tolist()  # read behind the shim's back: the sum has not run yet
        result[f"sum {np.dtype(dtype).name}"] = {"queued": queued,
                                                 "summed": shim.asnumpy(x, stream).tolist(),
                                                 "max": shim.asnumpy(out, stream).tolist()}
    # A graph holding the all-reduce: each replay sums again.
    x = values(np.float64, 2)
    stream.synchronize()
    stream.begin_capture()
    try:
        device_comm.allReduce(x.data.ptr, x.data.ptr, 2, nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
                              stream.ptr)
    finally:
        graph = stream.end_capture()
    captured = shim.asnumpy(x, stream).tolist()
    graph.launch(stream)
    graph.launch(stream)
    result["graph"] = {"after capture": captured, "after 2 replays": shim.asnumpy(x, stream).tolist()}

    def refused(call):
        try:
            call()
            stream.synchronize()
        except (shim.SimError, TypeError, nccl.NcclError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    x64, x32 = values(np.float64), values(np.float32)
    host = np.zeros(5)
    f64, s = nccl.NCCL_FLOAT64, nccl.NCCL_SUM
    other = shim.Stream(non_blocking=True)

    def on_another_stream_while_capturing():
        stream.begin_capture()
        try:
            device_comm.allReduce(x64.data.ptr, x64.data.ptr, 5, f64, s, other.ptr)
        finally:
            stream.end_capture()

    result["refused"] = {
        "dtype": refused(lambda: device_comm.allReduce(x32.data.ptr, x32.data.ptr, 5, f64, s,
                                                       stream.ptr)),
        "size": refused(lambda: device_comm.allReduce(x64.data.ptr, x64.data.ptr, 6, f64, s,
                                                      stream.ptr)),
        "host pointer": refused(lambda: device_comm.allReduce(
            host.ctypes.data, host.ctypes.data, 5, f64, s, stream.ptr)),
        "array for pointer": refused(lambda: device_comm.allReduce(x64, x64, 5, f64, s,
                                                                   stream.ptr)),
        "counts differ": refused(lambda: device_comm.allReduce(
            x64.data.ptr, x64.data.ptr, 5 - (rank == 0), f64, s, stream.ptr)),
        "another stream in capture": refused(on_another_stream_while_capturing),
    }
    device_comm.destroy()
    result["refused"]["destroyed"] = refused(lambda: device_comm.allReduce(
        x64.data.ptr, x64.data.ptr, 5, f64, s, stream.ptr))
    return result


def local_gpu(comm) -> dict:
    """distributed.use_local_gpu on ranks that see different GPUs or use different backends:
    every rank must come back from it (it is collective)."""
    import cudasim
    fake = cudasim.shim.modules()
    if comm.Get_rank() == 1:
        fake["cupy.cuda.runtime"].getDeviceCount = lambda: 0  # a rank on a node without GPUs
    sys.modules.update(fake)
    distributed.use_local_gpu(comm, "cupy")
    distributed.use_local_gpu(comm, "cupy" if comm.Get_rank() == 0 else "numpy")
    return {"ranks back": comm.allgather(comm.Get_rank())}


def bench_worker_on_gpus(comm) -> dict:
    """One rank of `bpk bench --ranks 2 --backends cupy` (bench.bench_worker) on a node
    with two simulated GPUs: the registry's own "cupy" backend, loaded on the CuPy stand-in."""
    import contextlib
    import io
    from cudasim import shim
    shim.DEVICE_COUNT = 2
    sys.modules.update(shim.modules())
    task = {"backend": "cupy", "config": ["tiny", [6, 5, 3], 8, 19], "dtype": "float64",
            "repeats": 1}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.bench_worker(task)
    lines = [line for line in printed.getvalue().splitlines()
             if line.startswith(bench.RESULT_MARK)]
    return {"device": sys.modules["cupy.cuda.runtime"].getDevice(),
            "result": json.loads(lines[0][len(bench.RESULT_MARK):]) if lines else None}


def main(task: str, out: Path) -> None:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if task == "parity":
        result = {name: train(name, comm) for name in runnable_cases()}
    elif task == "launch-errors":
        result = launch_errors(comm)
    elif task == "nccl":
        result = nccl_stand_in(comm)
    elif task == "local-gpu":
        result = local_gpu(comm)
    elif task == "bench-worker":
        result = bench_worker_on_gpus(comm)
    else:
        fail_on_rank_1(comm, task)
        result = {"finished": True}  # must never be reached on any rank
    (out / f"rank{comm.Get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
