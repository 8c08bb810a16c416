"""The benchmark: epochs per second and numerical agreement of every backend and peer, side by
side, in one run, with the GEMM floor timed in the same run.

The floor, every backend and every peer of one (config, dtype) take turns epoch by epoch: after
one warm-up epoch each (which gives the compile time), each *round* times one epoch of every
entry at every thread count. A ratio ("x floor": epoch time over the floor's; "x torch": epochs/s
over PyTorch's) is computed per round, from epochs timed seconds apart, and summarised by its
median over the rounds, so load that comes and goes on a shared machine weighs on both sides of
a ratio alike. The seconds per epoch are still the median over the rounds of each entry alone.

``BenchOptions.training`` adds training variants (workload.TRAININGS): each backend then also
trains each variant, as an entry ``backend+variant`` of the same block, so that its epochs/s
over plain SGD's (``training_ratios``) is a per-round ratio too. Peers train plain SGD only.

The workload (configs, synthetic data, initial weights, batch order) is workload.py's, shared
with the peers and the pytest-benchmark suites in ``benchmarks/``. ``bpk bench --ranks`` runs
``python -m bpkernels.bench bench-worker`` under mpiexec (``scaling_benchmark``).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

import numpy as np

from .backends import available_backends, get_backend
from .backends.host import cpu_name
from .backends.numpy_backend import blas_info
from .floor import floor_unavailable, gemm_floor_epoch
from .model import MLP, resolve_dtype
from . import atomic, peers
from .optim import SGD
from .threads import get_num_threads, limit_threads
from .train import EpochLoop, fit
# CONFIGS and parse_config too: ``bench.X`` is where the CLI and benchmarks/ read the workload.
from .workload import CONFIGS, LEARNING_RATE, SEED, Config, Trajectory  # noqa: F401
from .workload import backend_trajectory, check_memory, parse_config, workload  # noqa: F401
from .workload import TRAININGS, check_training, training_options  # noqa: F401

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
    # The config's layers beside Linear and ReLU, so that a record says what was trained.
    dropout: float = 0.0
    norm: str | None = None

    @classmethod
    def from_times(cls, name: str, kind: str, config: Config, dtype: str, times: Sequence[float],
                   **kwargs: Any) -> "Result":
        median = statistics.median(times)
        return cls(name=name, kind=kind, config=config.name, dtype=dtype,
                   seconds_per_epoch=median, epochs_per_sec=1.0 / median,
                   samples_per_sec=config.samples / median,
                   gflops=config.flops_per_epoch() / median / 1e9,
                   min_seconds=min(times), max_seconds=max(times), repeats=len(times),
                   dropout=config.dropout, norm=config.norm, **kwargs)


# --------------------------------------------------------------------------- timing
def time_backend(backend: str, config: Config, dtype: str, repeats: int,
                 threads: int | None, comm: Any = None) -> Result:
    """``comm``: train data-parallel over its ranks (``bpk bench --ranks``, distributed.py)."""
    X, y = workload(config, dtype)
    model = config.model(backend, dtype)
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
                   data: tuple[np.ndarray, np.ndarray], training: str = "sgd") -> EpochFactory:
    """For ``_interleaved``: makes a model of ``backend`` and gives a function that trains its
    next epoch on ``data`` (X, y) the ``training`` way (workload.training_options) and returns
    the epoch's seconds, as ``fit`` times it."""
    X, y = data

    def make_epoch() -> Callable[[], float]:
        return _open_fit(config.model(backend, dtype), X, y, SGD(lr=LEARNING_RATE), config.batch,
                         training)

    return make_epoch


def _open_fit(model: MLP, X: np.ndarray, y: np.ndarray, opt: SGD, batch: int,
              training: str = "sgd") -> Callable[[], float]:
    """``fit``'s epochs one call at a time, on one epoch loop: a ``fit(epochs=1)`` per epoch
    would redo per-fit work inside each timed epoch (CuPy captures its step graphs anew, Numba
    allocates its epoch scratch), which one ``fit(epochs=n)`` pays once. A per-step schedule
    is fed as fit feeds it (train._Schedule): the epoch's rates computed ahead into
    ``loop.step_rates``, which the fused epoch reads on the device."""
    Xp, T = model.prepare(X, y, "cross_entropy")
    options = training_options(training, -(-Xp.rows // batch))
    loop = EpochLoop(model, Xp, T, loss="cross_entropy", optimizer=opt, batch_size=batch,
                     clip_grad_norm=options.get("clip_grad_norm"))
    schedule = options.get("lr_scheduler")
    if schedule is not None:
        schedule.start(opt)

    def epoch() -> float:
        with loop:
            if schedule is None:
                return loop.epoch(shuffle=True, seed=SEED)["seconds"]
            # Timed with the epoch, unlike fit's History seconds: the rates are host work
            # that a schedule adds to every epoch.
            start = time.perf_counter()
            loop.step_rates = schedule.rates(loop.steps)
            ahead = time.perf_counter() - start
            try:
                return ahead + loop.epoch(shuffle=True, seed=SEED)["seconds"]
            finally:
                loop.step_rates = None

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
    # Names of workload.TRAININGS. Plain SGD is always timed, as the baseline of the others.
    training: Sequence[str] = ("sgd",)

    def thread_counts(self) -> list[int | None]:
        if self.threads is None or isinstance(self.threads, int):
            return [self.threads]
        return sorted(set(self.threads))

    def variants(self) -> list[str]:
        """The trainings besides plain SGD, each once, in the order given."""
        return [t for t in dict.fromkeys(map(check_training, self.training)) if t != "sgd"]


def run(options: BenchOptions, log: Callable[[str], None] = lambda s: None,
        notes: list[str] | None = None) -> list[Result]:
    """Every (backend or peer, config, dtype, thread count) once, plus one floor per (config,
    dtype, thread count). The floor, backends and peers of one (config, dtype), at every thread
    count, take turns epoch by epoch (``_interleaved``); each Result keeps its ``round_seconds``
    for the per-round ratios of ``ratios``. The CUDA floor (with cupy) is timed by CUDA events
    before them, apart. Peers that cannot run here are skipped with a line appended to
    ``notes``. The thread counts are limited for the run only, then restored. Each training
    variant's parity is against the float64 reference trained the same way."""
    counts = options.thread_counts()
    variants = options.variants()
    notes = [] if notes is None else notes
    results: list[Result] = []
    models = len(options.backends) * (1 + len(variants)) + len(options.peers) + 1
    for config in options.configs:  # every config before the first is timed
        for dtype in options.dtypes:
            check_memory(config, dtype, models)
    for config in options.configs:
        for dtype in options.dtypes:
            log(f"{config.name} {dtype}: float64 reference trajectory")
            references = {t: backend_trajectory("numpy", config, "float64", training=t)
                          for t in ["sgd", *variants]}
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
                        result.parity_rel_err, result.note = entry.parity(
                            references[entry.extra.get("training", "sgd")])
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
    parity: Callable[[Trajectory], tuple[float | None, str]] | None
    extra: dict[str, Any] = field(default_factory=dict)


def _entries(options: BenchOptions, config: Config, dtype: str, counts: Sequence[int | None],
             notes: list[str]) -> list[_Entry]:
    """The floor, the backends and the peers of one (config, dtype), at every count, in the
    order of their turns: count by count, so that epochs of one count run side by side, and
    each backend's training variants right after it."""
    data = workload(config, dtype)
    variants = options.variants()
    entries = []
    unavailable: set[str] = set()
    no_floor = floor_unavailable(dtype)
    if no_floor is not None and no_floor not in notes:
        notes.append(no_floor)
    for count in counts:
        threads = _threads_in_force(count)
        if no_floor is None:
            entries.append(_Entry("gemm-floor", "floor", count, threads,
                                  floor_epochs(config, dtype), None))
        for backend in options.backends:
            if backend in unavailable or not _builds(backend, config, dtype, notes):
                unavailable.add(backend)
                continue
            entries.append(_Entry(backend, "backend", count, threads,
                                  backend_epochs(backend, config, dtype, data),
                                  _backend_parity(backend, config, dtype)))
            entries += [_Entry(f"{backend}+{training}", "backend", count, threads,
                               backend_epochs(backend, config, dtype, data, training),
                               _backend_parity(backend, config, dtype, training),
                               {"training": training}) for training in variants]
        for peer in options.peers:
            if peer in unavailable:
                continue
            try:
                found = peers.peer_entries(peer, config, dtype, threads, data)
            except peers.PeerUnavailable as why:
                if not why.count_only:
                    unavailable.add(peer)
                if str(why) not in notes:
                    notes.append(str(why))
                continue
            entries += [_Entry(p.name, "peer", count, p.threads, p.make_epoch, p.parity, p.extra)
                        for p in found]
    return entries


def _builds(backend: str, config: Config, dtype: str, notes: list[str]) -> bool:
    """Whether ``backend`` has the kernels of the config's layers (a backend registered by a
    user may lack them) and, in bf16, bfloat16 products; if not, a note says so and the run
    goes on without it."""
    if dtype == "bf16":
        why = get_backend(backend).bf16_unavailable()
        if why is not None:
            note = f"{backend} skipped in bf16: {why}"
            if note not in notes:
                notes.append(note)
            return False
    if config.norm is None and not config.dropout:
        return True  # every backend trains plain layers: nothing to build ahead
    try:
        config.model(backend, dtype)
    except ValueError as why:
        note = f"{backend} skipped on {config.name}: {why}"
        if note not in notes:  # once, not once per dtype
            notes.append(note)
        return False
    return True


def _backend_parity(backend: str, config: Config, dtype: str,
                    training: str = "sgd") -> Callable[[Trajectory], tuple[float, str]]:
    return lambda reference: (backend_trajectory(
        backend, config, dtype, training=training).error_against(reference), "")


def machine_info(threads: int | Sequence[int] | None = None) -> dict[str, Any]:
    """``threads``: the count(s) of the run (a list where several), else the one in force."""
    if threads is not None and not isinstance(threads, int):
        threads = sorted(set(threads))
        threads = threads[0] if len(threads) == 1 else threads
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or get_num_threads(),
        "blas": blas_info(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for package in ("bpkernels", "numpy", "numba", "cupy", "torch", "jax", "scikit-learn"):
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
        on_gpu = r.name.partition("+")[0] in ("cupy", "torch-cuda")
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


def training_ratios(results: Sequence[Result]) -> dict[int, Result]:
    """For each training variant's result, by position, the plain-SGD result of the same
    backend, config, dtype and thread count (its epochs/s over that one's:
    ``paired_ratio(sgd, variant)``)."""
    plain = {(r.name, r.config, r.dtype, r.threads): r for r in results
             if r.kind == "backend" and "training" not in r.extra}
    out = {}
    for i, r in enumerate(results):
        if "training" in r.extra:
            base = plain.get((r.name.partition("+")[0], r.config, r.dtype, r.threads))
            if base is not None:
                out[i] = base
    return out


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
    fewest threads (``x 1 thr``: epochs/s relative to the same entry on 1 thread); with
    training variants, a second table of their epochs/s over plain SGD's."""
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
                     _parity_cell(r)) +
                    (("" if scaling[i] is None else f"{scaling[i]:.2f}",) if scaled else ()))
    notes = [f"note: {r.name} {r.config} {r.dtype}: {r.note}" for r in results if r.note]
    variants = _training_rows(results)
    return "\n".join(_columns(header, rows) + ([""] + variants if variants else []) + notes)


def _parity_cell(r: Result) -> str:
    """The relative error; "n/a" for a trained entry not compared (its note says why)."""
    if r.parity_rel_err is not None:
        return f"{r.parity_rel_err:.1e}"
    return "" if r.kind == "floor" else "n/a"


def _training_rows(results: Sequence[Result]) -> list[str]:
    """The variants' table: ``x sgd`` is epochs/s over plain SGD's of the same backend,
    config, dtype and threads, the median of the per-round ratios (their range beside it)."""
    rows = []
    for i, base in training_ratios(results).items():
        r = results[i]
        paired = base.round_seconds and r.round_seconds and \
            len(base.round_seconds) == len(r.round_seconds)
        per_round = [b / v for b, v in zip(base.round_seconds, r.round_seconds)] if paired else []
        spread = f"{min(per_round):.3f}-{max(per_round):.3f}" if per_round else ""
        rows.append((r.name, r.extra["training"], r.config, r.dtype,
                     "" if r.threads is None else r.threads, f"{r.epochs_per_sec:.3g}",
                     f"{base.epochs_per_sec:.3g}", f"{paired_ratio(base, r):.3f}", spread))
    if not rows:
        return []
    return _columns(("name", "training", "config", "dtype", "threads", "epochs/s",
                     "sgd epochs/s", "x sgd", "(rounds min-max)"), rows)


def _columns(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns, a rule of dashes under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip()
             for line in [header, *rows]]
    return lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]


def scaling_table(results: Sequence[Result]) -> str:
    """The table of ``bpk bench --ranks``: one row per (backend, config, dtype, ranks)."""
    header = ("name", "config", "dtype", "ranks", "s/epoch", "(min-max)", "samples/s",
              "speedup", "efficiency", "parity")
    rows = [(r.name, r.config, r.dtype, str(r.extra["ranks"]), f"{r.seconds_per_epoch:.4g}",
             f"{r.min_seconds:.3g}-{r.max_seconds:.3g}", f"{r.samples_per_sec:,.0f}",
             f"{r.extra['speedup']:.2f}", f"{r.extra['efficiency']:.0%}",
             "" if r.parity_rel_err is None else f"{r.parity_rel_err:.1e}") for r in results]
    return "\n".join(_columns(header, rows))


def to_json(results: Sequence[Result], machine: dict[str, Any],
            notes: Sequence[str] = ()) -> dict[str, Any]:
    rel, scaling, plain = ratios(results), thread_ratios(results), training_ratios(results)
    out = []
    for i, r in enumerate(results):
        record = asdict(r)
        record.update(record.pop("extra"))
        # Medians of the per-round ratios (see ``ratios``): round_seconds gives them back.
        record["floor_ratio"], record["torch_ratio"] = rel[i]
        record["thread_ratio"] = scaling[i]  # epochs/s over the same entry's at the fewest threads
        if i in plain:  # a training variant: epochs/s over plain SGD's (training_ratios)
            record["training_ratio"] = paired_ratio(plain[i], r)
        out.append(record)
    return {"machine": machine, "results": out, "notes": list(notes)}


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Atomically, like every file bpkernels writes (see bpkernels.atomic)."""
    text = json.dumps(payload, indent=2).encode()
    atomic.write(path, lambda f: f.write(text), what="benchmark JSON")


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
    try:
        atomic.write(path, lambda f: fig.savefig(f, format="png", dpi=110), what="plot")
    finally:
        plt.close(fig)


def default_backends() -> list[str]:
    return available_backends()


def log_to_stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- scaling benchmark
RESULT_MARK = "bpk-bench-result: "


def scaling_benchmark(backends: Sequence[str], configs: Sequence, dtypes: Sequence[str],
                      ranks: Sequence[int], repeats: int, threads: int | None,
                      log: Callable[[str], None] = lambda s: None) -> list:
    """``bpk bench --ranks``: each (backend, config, dtype) timed under mpiexec once per rank
    count, the same workload each time (bench.time_backend with ``comm``, rank 0's epoch
    times), each rank on ``threads`` BLAS/Numba threads (default 1). ``extra`` of each Result
    holds ranks, threads per rank, speedup and efficiency (samples/s per rank relative to the
    smallest rank count's). Parity: the run's 20 SGD steps against the float64 reference."""
    results = []
    for config in configs:
        for dtype in dtypes:
            for backend in backends:
                runs = []
                for count in ranks:
                    log(f"{config.name} {dtype}: {backend} on {count} rank(s)")
                    record = _launch_bench_worker(count, threads or 1, {
                        "backend": backend, "config": [config.name, list(config.sizes),
                                                       config.batch, config.samples,
                                                       config.dropout, config.norm],
                        "dtype": dtype, "repeats": repeats})
                    runs.append(Result(**record))
                base = runs[0]
                for count, result in zip(ranks, runs):
                    speedup = result.samples_per_sec / base.samples_per_sec
                    result.extra = {"ranks": count, "threads_per_rank": threads or 1,
                                    "speedup": speedup,
                                    "efficiency": speedup * ranks[0] / count}
                    results.append(result)
    return results


def _launch_bench_worker(ranks: int, threads: int, task: dict[str, Any]) -> dict[str, Any]:
    from .distributed import mpiexec_command
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "NUMBA_NUM_THREADS"):
        env[name] = str(threads)
    command = mpiexec_command(ranks) + [sys.executable, "-m", "bpkernels.bench",
                                        "bench-worker", json.dumps(task)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line[len(RESULT_MARK):] for line in done.stdout.splitlines()
             if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or len(lines) != 1:
        tail = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise RuntimeError(f"{' '.join(command[:3])} ... bench-worker exited with "
                           f"{done.returncode}: {tail}")
    record = json.loads(lines[0])
    record["threads"] = threads
    return record


def bench_worker(task: dict[str, Any]) -> None:
    """One rank of a scaling run (``mpiexec -n N python -m bpkernels.bench bench-worker
    TASK_JSON``): time the epochs, replay the parity steps; rank 0 prints the Result as one
    JSON line."""
    from .distributed import abort, import_mpi, use_local_gpu
    MPI = import_mpi("the bench worker")
    comm = MPI.COMM_WORLD
    try:
        config = Config(task["config"][0], tuple(task["config"][1]), *task["config"][2:])
        backend, dtype = task["backend"], task["dtype"]
        use_local_gpu(comm, backend)  # as bpk train does: else every rank runs on GPU 0
        result = time_backend(backend, config, dtype, task["repeats"], None, comm=comm)
        trajectory = backend_trajectory(backend, config, dtype, comm=comm)
        if comm.Get_rank() == 0:
            reference = backend_trajectory("numpy", config, "float64")
            result.parity_rel_err = trajectory.error_against(reference)
            print(RESULT_MARK + json.dumps(asdict(result)), flush=True)
        comm.Barrier()
    except BaseException as err:
        abort(comm, err)


if __name__ == "__main__":
    if sys.argv[1:2] != ["bench-worker"] or len(sys.argv) != 3:
        sys.exit("usage: mpiexec -n N python -m bpkernels.bench bench-worker TASK_JSON")
    bench_worker(json.loads(sys.argv[2]))
