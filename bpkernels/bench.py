"""The benchmark: epochs per second and numerical agreement of every backend and peer, side by
side, in one run, with the GEMM floor timed in the same run.

The floor, every backend and every peer of one (config, dtype) take turns epoch by epoch: after
one warm-up epoch each (which gives the compile time), each *round* times one epoch of every
entry at every thread count. A ratio ("x floor": epoch time over the floor's; "x torch": epochs/s
over PyTorch's) is computed per round, from epochs timed seconds apart, and summarised by its
median over the rounds, so load that comes and goes on a shared machine weighs on both sides of
a ratio alike. The seconds per epoch are still the median over the rounds of each entry alone.

One workload definition (configs, synthetic data, initial weights, batch order) serves
``bpk bench`` and the pytest-benchmark suites in ``benchmarks/``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

import numpy as np

from .backends import available_backends, get_backend
from .model import MLP, resolve_dtype
from .optim import SGD
from .threads import get_num_threads, limit_threads
from .train import _EpochLoop, fit

LEARNING_RATE = 0.01
PARITY_STEPS = 20  # steps compared with the float64 NumPy reference (5 epochs of 4 batches)
SEED = 0


@dataclass(frozen=True)
class Config:
    """One benchmark workload: ReLU MLP of ``sizes``, softmax-CE, plain SGD, synthetic data."""

    name: str
    sizes: tuple[int, ...]
    batch: int
    samples: int

    @property
    def steps(self) -> int:
        return -(-self.samples // self.batch)

    def batch_rows(self) -> list[int]:
        rows = [self.batch] * (self.samples // self.batch)
        if self.samples % self.batch:
            rows.append(self.samples % self.batch)
        return rows

    def flops_per_epoch(self) -> float:
        """Multiply-adds x 2 of the GEMMs: forward, dW and dX (none for the first layer)."""
        per_row = sum(2 * i * o * (3 if layer else 2)
                      for layer, (i, o) in enumerate(zip(self.sizes[:-1], self.sizes[1:])))
        return float(per_row) * self.samples

    def quick(self) -> "Config":
        """The same layers on a few batches: for smoke tests, not for numbers."""
        return Config(self.name, self.sizes, self.batch, min(self.samples, 3 * self.batch + 1))


CONFIGS = {
    "S": Config("S", (64, 64, 10), 32, 16384),
    "M": Config("M", (784, 256, 128, 10), 128, 60000),
    "L": Config("L", (1024, 2048, 2048, 10), 512, 16384),
}


def parse_config(spec: str) -> Config:
    """"S", "M", "L", or a custom ``layers:batch:samples`` like ``784-256-10:128:60000``."""
    if spec in CONFIGS:
        return CONFIGS[spec]
    try:
        layers, batch, samples = spec.split(":")
        sizes = tuple(int(s) for s in layers.split("-"))
        config = Config(spec, sizes, int(batch), int(samples))
    except ValueError:
        raise ValueError(f"unknown config {spec!r}; valid: {', '.join(CONFIGS)} or "
                         "layers:batch:samples like 784-256-10:128:60000") from None
    if len(sizes) < 2 or min(sizes) < 1 or config.batch < 1 or config.samples < 1:
        raise ValueError(f"config {spec!r} needs at least two positive layer widths and a "
                         "positive batch and sample count")
    return config


def workload(config: Config, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Synthetic inputs and labels, the same for every backend and peer."""
    rng = np.random.default_rng(SEED)
    X = rng.standard_normal((config.samples, config.sizes[0])).astype(resolve_dtype(dtype))
    y = rng.integers(0, config.sizes[-1], config.samples)
    return X, y


def batch_order(n: int, epoch: int, seed: int = SEED) -> np.ndarray:
    """The row order ``fit`` uses for ``epoch``; peers replay it to see the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def initial_weights(config: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    return MLP(config.sizes, dtype="float64", seed=SEED).get_weights()


# --------------------------------------------------------------------------- results
@dataclass
class Result:
    name: str
    kind: str  # "backend" | "peer" | "floor"
    config: str
    dtype: str
    seconds_per_epoch: float
    epochs_per_sec: float
    samples_per_sec: float
    gflops: float
    compile_seconds: float | None
    parity_rel_err: float | None
    min_seconds: float
    max_seconds: float
    repeats: int
    threads: int | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The seconds of each round's epoch, in round order, where the entry took turns with the
    # floor (``run``); None where it was timed alone (the CUDA floor, ``bpk bench --ranks``).
    round_seconds: list[float] | None = None

    @classmethod
    def from_times(cls, name: str, kind: str, config: Config, dtype: str, times: Sequence[float],
                   **kwargs: Any) -> "Result":
        median = statistics.median(times)
        return cls(name=name, kind=kind, config=config.name, dtype=dtype,
                   seconds_per_epoch=median, epochs_per_sec=1.0 / median,
                   samples_per_sec=config.samples / median,
                   gflops=config.flops_per_epoch() / median / 1e9,
                   min_seconds=min(times), max_seconds=max(times), repeats=len(times), **kwargs)


def relative_error(values: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Largest |a - b| / max|b| over paired arrays: one number for a whole trajectory or model."""
    worst = 0.0
    for a, b in zip(values, reference):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), np.finfo(np.float64).tiny)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


@dataclass
class Trajectory:
    """What parity compares: per-epoch losses and the final weights after PARITY_STEPS steps."""

    losses: list[float]
    weights: list[np.ndarray]

    def error_against(self, reference: "Trajectory") -> float:
        # The weights are judged as one parameter vector: biases start at zero and stay tiny
        # sums of cancelling gradients, so scaling each by its own max|b| would measure noise.
        flat = [np.concatenate([np.ravel(w) for w in t.weights]) for t in (self, reference)]
        return max(relative_error([np.array(self.losses)], [np.array(reference.losses)]),
                   relative_error(flat[:1], flat[1:]))


def parity_workload(config: Config) -> tuple[np.ndarray, np.ndarray, int]:
    """Four batches of the config's data, trained for five epochs: 20 comparable steps."""
    X, y = workload(Config(config.name, config.sizes, config.batch, 4 * config.batch), "float64")
    return X, y, PARITY_STEPS // 4


def backend_trajectory(backend: str, config: Config, dtype: str, comm: Any = None) -> Trajectory:
    X, y, epochs = parity_workload(config)
    model = MLP(config.sizes, backend=backend, dtype=dtype, seed=SEED)
    history = fit(model, X, y, optimizer=SGD(lr=LEARNING_RATE), epochs=epochs,
                  batch_size=config.batch, seed=SEED, comm=comm)
    return Trajectory(history["loss"], [a for W, b in model.get_weights() for a in (W, b)])


# --------------------------------------------------------------------------- timing
def time_backend(backend: str, config: Config, dtype: str, repeats: int,
                 threads: int | None, comm: Any = None) -> Result:
    """``comm``: train data-parallel over its ranks (``bpk bench --ranks``, distributed.py)."""
    X, y = workload(config, dtype)
    model = MLP(config.sizes, backend=backend, dtype=dtype, seed=SEED)
    opt = SGD(lr=LEARNING_RATE)
    # The warm-up epoch absorbs JIT compilation and first-touch allocation.
    warm = fit(model, X, y, optimizer=opt, epochs=1, batch_size=config.batch,
               comm=comm)["seconds"][0]
    times = fit(model, X, y, optimizer=opt, epochs=repeats, batch_size=config.batch,
                comm=comm)["seconds"]
    compile_seconds = max(0.0, warm - statistics.median(times))
    return Result.from_times(backend, "backend", config, dtype, times,
                             compile_seconds=compile_seconds, parity_rel_err=None, threads=threads)


EpochFactory = Callable[[], Callable[[], float]]


def backend_epochs(backend: str, config: Config, dtype: str,
                   data: tuple[np.ndarray, np.ndarray]) -> EpochFactory:
    """For ``_interleaved``: makes a model of ``backend`` and gives a function that trains its
    next epoch on ``data`` (X, y) and returns the epoch's seconds, as ``fit`` times it."""
    X, y = data

    def make_epoch() -> Callable[[], float]:
        model = MLP(config.sizes, backend=backend, dtype=dtype, seed=SEED)
        return _open_fit(model, X, y, SGD(lr=LEARNING_RATE), config.batch)

    return make_epoch


def _open_fit(model: MLP, X: np.ndarray, y: np.ndarray, opt: SGD,
              batch: int) -> Callable[[], float]:
    """``fit``'s epochs one call at a time, on one epoch loop: a ``fit(epochs=1)`` per epoch
    would redo per-fit work inside each timed epoch (CuPy captures its step graphs anew, Numba
    allocates its epoch scratch), which one ``fit(epochs=n)`` pays once."""
    Xp, T = model._prepare(X, y, "cross_entropy")
    opt.bind(model)
    model.optimizer = opt
    loop = _EpochLoop(model, Xp, T, "cross_entropy", batch)

    def epoch() -> float:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return loop.epoch(opt, True, SEED, None)["seconds"]

    return epoch


def floor_epochs(config: Config, dtype: str) -> EpochFactory:
    """For ``_interleaved``: the GEMM floor's epoch (``gemm_floor_epoch``), timed."""
    def make_epoch() -> Callable[[], float]:
        floor = gemm_floor_epoch(config, dtype)

        def timed() -> float:
            start = time.perf_counter()
            floor()
            return time.perf_counter() - start

        return timed

    return make_epoch


def _interleaved(entries: Sequence[tuple[int | None, EpochFactory]],
                 repeats: int) -> list[tuple[float, list[float]]]:
    """For each entry ``(count, make_epoch)``: the seconds of a warm-up epoch and of ``repeats``
    timed ones. ``make_epoch()`` gives a function that runs one epoch and returns its seconds;
    it is made, warmed up and called under the entry's thread count (None: the libraries'
    defaults). The entries take turns epoch by epoch, in the order given, ``repeats`` rounds:
    load coming and going on a shared machine then weighs on every entry alike, and the ratio
    of two entries' epochs of one round holds where their medians, taken minutes apart, would
    not."""
    runs = []
    for count, make_epoch in entries:
        with limit_threads(count):
            epoch = make_epoch()
            runs.append((count, epoch, epoch(), []))
    for _ in range(repeats):
        for count, epoch, _, times in runs:
            with limit_threads(count):
                times.append(epoch())
    return [(warm, times) for _, _, warm, times in runs]


def _threads_in_force(count: int | None) -> int:
    with limit_threads(count):
        return get_num_threads()


def gemm_floor_epoch(config: Config, dtype: str) -> Callable[[], None]:
    """An epoch of the config's matrix products alone (forward, dW, dX for every step, the
    last partial batch included), into preallocated buffers, by NumPy's BLAS: no training
    epoch can be faster."""
    dt = resolve_dtype(dtype)
    rng = np.random.default_rng(SEED)
    layers = list(zip(config.sizes[:-1], config.sizes[1:]))
    Ws = [(rng.standard_normal((i, o)) * 0.05).astype(dt) for i, o in layers]
    plans = {}
    for rows in set(config.batch_rows()):
        acts = [rng.standard_normal((rows, w)).astype(dt) for w in config.sizes]
        grads = [np.empty((rows, w), dt) for w in config.sizes]
        grads[-1][...] = acts[-1]
        plans[rows] = (acts, grads, [np.empty_like(W) for W in Ws])
    schedule = [plans[rows] for rows in config.batch_rows()]

    def epoch() -> None:
        for acts, grads, dWs in schedule:
            for layer, W in enumerate(Ws):
                np.matmul(acts[layer], W, out=acts[layer + 1])
            for layer in reversed(range(len(Ws))):
                np.matmul(acts[layer].T, grads[layer + 1], out=dWs[layer])
                if layer:
                    np.matmul(grads[layer + 1], Ws[layer].T, out=grads[layer])

    return epoch


def time_gemm_floor_cuda(backend: str, config: Config, dtype: str, repeats: int) -> Result:
    """The GEMM floor on the GPU: the same products by cuBLAS, timed under CUDA events (the
    backend's ``gemm_floor_seconds``)."""
    times = get_backend(backend).gemm_floor_seconds(config.sizes, config.batch_rows(), dtype,
                                                    repeats)
    return Result.from_times("gemm-floor-cuda", "floor", config, dtype, times,
                             compile_seconds=None, parity_rel_err=None, threads=None,
                             extra={"backend": backend})


# --------------------------------------------------------------------------- the run
@dataclass
class BenchOptions:
    backends: list[str]
    configs: list[Config]
    dtypes: list[str]
    peers: list[str]
    repeats: int = 5
    # A thread count, or several: every entry is then timed with each, its epochs interleaved.
    # None: the libraries' own defaults.
    threads: int | Sequence[int] | None = None

    def thread_counts(self) -> list[int | None]:
        if self.threads is None or isinstance(self.threads, int):
            return [self.threads]
        return sorted(set(self.threads))


def run(options: BenchOptions, log: Callable[[str], None] = lambda s: None,
        notes: list[str] | None = None) -> list[Result]:
    """Every (backend or peer, config, dtype, thread count) once, plus one floor per (config,
    dtype, thread count). The floor, backends and peers of one (config, dtype), at every thread
    count, take turns epoch by epoch (``_interleaved``); each Result keeps its ``round_seconds``
    for the per-round ratios of ``ratios``. The CUDA floor (with cupy) is timed by CUDA events
    before them, apart. Peers that cannot run here are skipped with a line appended to
    ``notes``. The thread counts are limited for the run only, then restored."""
    counts = options.thread_counts()
    notes = [] if notes is None else notes
    results: list[Result] = []
    for config in options.configs:
        for dtype in options.dtypes:
            log(f"{config.name} {dtype}: float64 reference trajectory")
            reference = backend_trajectory("numpy", config, "float64")
            cuda_floor = []
            if "cupy" in options.backends:
                log(f"{config.name} {dtype}: gemm-floor-cuda")
                cuda_floor.append(time_gemm_floor_cuda("cupy", config, dtype, options.repeats))
            entries = _entries(options, config, dtype, counts, notes)
            log(f"{config.name} {dtype}: {', '.join(dict.fromkeys(e.name for e in entries))} "
                f"in turns, {options.repeats} round(s)")
            timed = _interleaved([(e.count, e.make_epoch) for e in entries], options.repeats)
            block = {}
            for entry, (warm, times) in zip(entries, timed):
                block[entry.name, entry.count] = result = Result.from_times(
                    entry.name, entry.kind, config, dtype, times, parity_rel_err=None,
                    # The warm-up epoch absorbs JIT compilation and first-touch allocation.
                    compile_seconds=max(0.0, warm - statistics.median(times))
                    if entry.kind == "backend" else None,
                    threads=entry.threads, extra=dict(entry.extra), round_seconds=list(times))
                if entry.parity is not None:
                    with limit_threads(entry.count):
                        result.parity_rel_err, result.note = entry.parity(reference)
            # Reported as before: floor(s), CUDA floor, then each backend and peer, by count.
            names = list(dict.fromkeys(e.name for e in entries))
            floor = [block[names[0], count] for count in counts]
            rest = [block[name, count] for name in names[1:] for count in counts
                    if (name, count) in block]
            results.extend(floor + cuda_floor + rest)
    return results


@dataclass
class _Entry:
    """One contender of an interleaved block: ``parity(reference)`` gives its relative error
    against the float64 reference and a note (None: the floor, which trains nothing)."""

    name: str
    kind: str
    count: int | None  # the thread count it is built, timed and checked under
    threads: int | None  # the count it reports
    make_epoch: EpochFactory
    parity: Callable[[Trajectory], tuple[float, str]] | None
    extra: dict[str, Any] = field(default_factory=dict)


def _entries(options: BenchOptions, config: Config, dtype: str, counts: Sequence[int | None],
             notes: list[str]) -> list[_Entry]:
    """The floor, the backends and the peers of one (config, dtype), at every count, in the
    order of their turns: count by count, so that epochs of one count run side by side."""
    from . import peers

    data = workload(config, dtype)
    entries = []
    unavailable: set[str] = set()
    for count in counts:
        threads = _threads_in_force(count)
        entries.append(_Entry("gemm-floor", "floor", count, threads,
                              floor_epochs(config, dtype), None))
        for backend in options.backends:
            entries.append(_Entry(backend, "backend", count, threads,
                                  backend_epochs(backend, config, dtype, data),
                                  _backend_parity(backend, config, dtype)))
        for peer in options.peers:
            if peer in unavailable:
                continue
            try:
                found = peers.peer_entries(peer, config, dtype, threads, data)
            except peers.PeerUnavailable as why:
                unavailable.add(peer)
                if str(why) not in notes:
                    notes.append(str(why))
                continue
            entries += [_Entry(p.name, "peer", count, p.threads, p.make_epoch, p.parity, p.extra)
                        for p in found]
    return entries


def _backend_parity(backend: str, config: Config,
                    dtype: str) -> Callable[[Trajectory], tuple[float, str]]:
    return lambda reference: (
        backend_trajectory(backend, config, dtype).error_against(reference), "")


def machine_info(threads: int | Sequence[int] | None = None) -> dict[str, Any]:
    """``threads``: the count(s) of the run (a list where several), else the one in force."""
    from .backends.numpy_backend import blas_info
    if threads is not None and not isinstance(threads, int):
        threads = sorted(set(threads))
        threads = threads[0] if len(threads) == 1 else threads
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": threads or get_num_threads(),
        "blas": blas_info(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for package in ("bpkernels", "numpy", "numba", "cupy", "torch", "scikit-learn"):
        info[package] = _version(package)
    gpu = _gpu_info()
    if gpu:
        info["gpu"] = gpu
    return info


def _version(package: str) -> str | None:
    for dist in (package, f"{package}-cuda12x", f"{package}-cuda13x"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> dict[str, Any] | None:
    if "cupy" not in available_backends():
        return None
    info = get_backend("cupy").device_info()
    return {k: info.get(k) for k in ("name", "memory_gb", "cuda") if k in info}


# --------------------------------------------------------------------------- output
def ratios(results: Sequence[Result]) -> dict[int, tuple[float | None, float | None]]:
    """(epoch time / GEMM floor, epochs/s relative to torch) for each result, by position; both
    at the result's thread count (the GPU floor has none). Each is the median over the rounds
    of the ratio within a round where both sides took turns (``round_seconds``), else the
    ratio of their medians (the CUDA floor is timed apart)."""
    floor = {(r.config, r.dtype, r.name.endswith("cuda"), r.threads): r
             for r in results if r.kind == "floor"}
    torch = {(r.config, r.dtype, r.threads): r for r in results if r.name == "torch"}
    out = {}
    for i, r in enumerate(results):
        on_gpu = r.name in ("cupy", "torch-cuda")
        f = floor.get((r.config, r.dtype, on_gpu, None if on_gpu else r.threads))
        t = torch.get((r.config, r.dtype, r.threads))
        out[i] = (paired_ratio(r, f) if f is not None and r.kind != "floor" else None,
                  paired_ratio(t, r) if t is not None else None)
    return out


def paired_ratio(a: Result, b: Result) -> float:
    """``a``'s seconds per epoch over ``b``'s: the median of the per-round ratios where both
    have ``round_seconds`` of one block, else the ratio of the medians."""
    if a.round_seconds and b.round_seconds and len(a.round_seconds) == len(b.round_seconds):
        return statistics.median(x / y for x, y in zip(a.round_seconds, b.round_seconds))
    return a.seconds_per_epoch / b.seconds_per_epoch


def thread_ratios(results: Sequence[Result]) -> dict[int, float | None]:
    """For each result, by position: its epochs/s over those of the same entry (name, config,
    dtype) at the fewest threads of the run; None where the entry ran at one count only."""
    fewest: dict[tuple, Result] = {}
    counts: dict[tuple, set] = {}
    for r in results:
        key = (r.name, r.kind, r.config, r.dtype)
        counts.setdefault(key, set()).add(r.threads)
        if r.threads is not None and (key not in fewest or r.threads < fewest[key].threads):
            fewest[key] = r
    out = {}
    for i, r in enumerate(results):
        key = (r.name, r.kind, r.config, r.dtype)
        base = fewest.get(key)
        out[i] = r.epochs_per_sec / base.epochs_per_sec \
            if base is not None and r.threads is not None and len(counts[key]) > 1 else None
    return out


def table(results: Sequence[Result]) -> str:
    """One row per result; with several thread counts, a column of the speedup over the
    fewest threads (``x 1 thr``: epochs/s relative to the same entry on 1 thread)."""
    rel, scaling = ratios(results), thread_ratios(results)
    counts = sorted({r.threads for r in results if r.threads is not None})
    scaled = len(counts) > 1
    header = ("name", "kind", "config", "dtype", "threads", "s/epoch", "(min-max)", "epochs/s",
              "samples/s", "GFLOP/s", "x floor", "x torch", "compile s", "parity") + \
        ((f"x {counts[0]} thr",) if scaled else ())
    rows = []
    for i, r in enumerate(results):
        floor_ratio, torch_ratio = rel[i]
        rows.append((r.name, r.kind, r.config, r.dtype, "" if r.threads is None else r.threads,
                     f"{r.seconds_per_epoch:.4g}",
                     f"{r.min_seconds:.3g}-{r.max_seconds:.3g}", f"{r.epochs_per_sec:.3g}",
                     f"{r.samples_per_sec:,.0f}", f"{r.gflops:.3g}",
                     "" if floor_ratio is None else f"{floor_ratio:.2f}",
                     "" if torch_ratio is None else f"{torch_ratio:.2f}",
                     "" if r.compile_seconds is None else f"{r.compile_seconds:.2f}",
                     "" if r.parity_rel_err is None else f"{r.parity_rel_err:.1e}") +
                    (("" if scaling[i] is None else f"{scaling[i]:.2f}",) if scaled else ()))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip()
             for line in [header, *rows]]
    notes = [f"note: {r.name} {r.config} {r.dtype}: {r.note}" for r in results if r.note]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:] + notes)


def scaling_table(results: Sequence[Result]) -> str:
    """The table of ``bpk bench --ranks``: one row per (backend, config, dtype, ranks)."""
    header = ("name", "config", "dtype", "ranks", "s/epoch", "(min-max)", "samples/s",
              "speedup", "efficiency", "parity")
    rows = [(r.name, r.config, r.dtype, str(r.extra["ranks"]), f"{r.seconds_per_epoch:.4g}",
             f"{r.min_seconds:.3g}-{r.max_seconds:.3g}", f"{r.samples_per_sec:,.0f}",
             f"{r.extra['speedup']:.2f}", f"{r.extra['efficiency']:.0%}",
             "" if r.parity_rel_err is None else f"{r.parity_rel_err:.1e}") for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip()
             for line in [header, *rows]]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def to_json(results: Sequence[Result], machine: dict[str, Any],
            notes: Sequence[str] = ()) -> dict[str, Any]:
    rel, scaling = ratios(results), thread_ratios(results)
    out = []
    for i, r in enumerate(results):
        record = asdict(r)
        record.update(record.pop("extra"))
        # Medians of the per-round ratios (see ``ratios``): round_seconds gives them back.
        record["floor_ratio"], record["torch_ratio"] = rel[i]
        record["thread_ratio"] = scaling[i]  # epochs/s over the same entry's at the fewest threads
        out.append(record)
    return {"machine": machine, "results": out, "notes": list(notes)}


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Atomically, like every file bpkernels writes."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot(results: Sequence[Result], path: str) -> None:
    """A PNG bar chart of epochs/s per config (one panel each), the GEMM floor as a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('--plot needs matplotlib: pip install "bpkernels[bench]"') from None
    panels = sorted({(r.config, r.dtype) for r in results})
    several = len({r.threads for r in results if r.kind != "floor"}) > 1

    def label(r: Result) -> str:
        return f"{r.name} ({r.threads} thr)" if several else r.name

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (config, dtype) in zip(axes[0], panels):
        runs = [r for r in results if (r.config, r.dtype) == (config, dtype) and r.kind != "floor"]
        ax.bar([label(r) for r in runs], [r.epochs_per_sec for r in runs], color="tab:blue")
        for r in results:
            if (r.config, r.dtype) == (config, dtype) and r.kind == "floor":
                ax.axhline(r.epochs_per_sec, color="tab:red", linestyle="--", label=label(r))
        ax.set_title(f"{config} {dtype}")
        ax.set_ylabel("epochs/s (higher is better)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def default_backends() -> list[str]:
    return available_backends()


def log_to_stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
