"""Data-parallel training on MPI: ``fit(..., comm=MPI.COMM_WORLD)`` and ``mpirun -n N bpk train``.

Every rank holds the whole data set and the same model (same seed, or the same checkpoint:
checked at the start). Each global batch, drawn from ``(seed, epoch)`` as without MPI, is cut
into contiguous shards, one per rank (uneven where the batch does not divide; a short last batch
may leave a rank no rows). A rank computes the mean-loss gradient of its shard, scales it by
``shard rows / batch rows`` (with sample or class weights: ``shard weight / batch weight``,
computed on the host from the weights and the epoch's order), and the flat gradient buffer is
summed over the ranks in one
all-reduce per step: every rank then holds the gradient of the whole batch's mean loss and takes
the same optimizer step, so training equals single-process training up to summation order.

Collectives per epoch besides the step's all-reduce: one to sum the epoch's loss and hits (and
to check that the weights are still identical everywhere), one to agree on stopping (Ctrl-C or a
callback). Host backends reduce in place through MPI; CuPy through NCCL on the device (run in CI
on a CPU stand-in of CuPy and NCCL, tests/cudasim; not yet on GPU hardware); any other backend,
and CuPy without NCCL, through a host copy. Every rank must take the same way: it is one of the
settings checked at the start.

Failures never leave ranks waiting. An error raised before fit()'s first collective (a bad
argument or data, on some ranks or all) is raised on every rank: the failed ranks raise their
own, the others a DistributedError naming the first failed rank. Later, an error raised on only
some ranks prints one line naming the rank and aborts the job (``MPI_Abort``); errors every rank
meets at the same point (:class:`DistributedError`, divergence, an agreed Ctrl-C) are raised
normally on all.
mpi4py is imported only here, and only when a communicator is used.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable, NoReturn, Sequence

import numpy as np

# How MPI launchers tell a process its rank and the job's size (MPICH/Hydra, Intel MPI and
# srun's PMI set PMI_*, Open MPI OMPI_COMM_WORLD_*, MVAPICH MV2_*); read without importing MPI.
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_EXTRA = 'pip install "bpkernels[mpi]"'
# The data check hashes every row of X and y, in blocks of about this many bytes: one read of
# the data per fit() (for config M, 1% of a NumPy epoch, up to 10% of a Numba one: docs/api.md),
# and the blocks' digests tell where two ranks' data part.
_FINGERPRINT_BLOCK_BYTES = 1 << 24
_DATA = "data (a fingerprint of X and y)"


class DistributedError(ValueError):
    """A bad MPI launch (settings or weights differing across ranks, too many ranks), or weights
    that drifted apart; raised alike on every rank."""


class AgreedInterrupt(KeyboardInterrupt):
    """Ctrl-C under MPI, acted on by every rank at the same epoch boundary."""


# --------------------------------------------------------------------------- the launch
def launched_size() -> int | None:
    """How many processes the MPI launcher that started this one started, or None."""
    return _launcher_number(_SIZE_VARIABLES)


def launched_rank() -> int | None:
    """This process's rank when an MPI launcher started 2 or more processes, else None."""
    size = launched_size()
    return _launcher_number(_RANK_VARIABLES) if size is not None and size > 1 else None


def _launcher_number(names: Sequence[str]) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launched_world():
    """``MPI.COMM_WORLD`` when an MPI launcher started 2 or more processes, else None."""
    size = launched_size()
    if size is None or size < 2:
        return None
    MPI = import_mpi(f"mpirun started {size} processes")
    world = MPI.COMM_WORLD
    if world.Get_size() != size:
        raise DistributedError(
            f"the MPI launcher started {size} processes but MPI reports {world.Get_size()}: "
            "mpi4py uses another MPI library than the mpirun that started it; launch with the "
            "mpiexec of the same installation (for the PyPI wheels: the one beside python)")
    return world


def import_mpi(why: str):
    """The module ``mpi4py.MPI``, or ImportError naming the pip extra."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"{why}, which needs mpi4py and an MPI library ({err}): "
                          f"{_MPI_EXTRA}") from None
    return MPI


def use_local_gpu(comm, backend: str | None = None) -> None:
    """Make this rank's current CUDA device the ``local rank``-th of its node, so that the
    ranks of a node train on different GPUs. It is collective: call it on every rank of
    ``comm``, before building the model. It selects nothing where ``backend`` names a CPU
    backend or CuPy or a GPU is missing."""
    count = 0
    if backend in (None, "auto", "cupy"):
        try:
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # no CuPy, no driver: the CPU backends need no device
            count = 0
    # Split_type is collective: every rank joins it, whatever it found. A rank without a GPU
    # (or with another --backend) that skipped it would leave the others waiting in it.
    MPI = import_mpi("use_local_gpu")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        if count:
            cupy.cuda.Device(local.Get_rank() % count).use()
    finally:
        local.Free()


def mpiexec_command(ranks: int) -> list[str]:
    """The command that starts ``ranks`` processes: ``$BPK_MPIEXEC`` (e.g. ``srun``) if set,
    else the mpiexec installed beside this Python (the PyPI MPI wheels put it there) or on the
    PATH; Open MPI's gets ``--oversubscribe`` so that more ranks than cores may run."""
    custom = os.environ.get("BPK_MPIEXEC", "").split()
    if custom:
        return custom + ["-n", str(ranks)]
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else \
        shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError(f"no mpiexec found beside {sys.executable} or on the PATH: "
                                f"{_MPI_EXTRA}, or set BPK_MPIEXEC")
    command = [found, "-n", str(ranks)]
    if _is_open_mpi(found):
        command.append("--oversubscribe")
    return command


@functools.lru_cache(maxsize=None)
def _is_open_mpi(mpiexec: str) -> bool:
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(name in text for name in ("Open MPI", "OpenRTE", "PRRTE"))


# --------------------------------------------------------------------------- failures
class _Launch:
    """One fit() under MPI on this rank: whether it has passed its first collective (the
    settings check in DataParallel)."""

    def __init__(self) -> None:
        self.started = False


class _Failed:
    """What a rank that failed before fit()'s first collective sends there instead of its
    settings, so that the ranks waiting in it learn of the failure and raise too."""

    def __init__(self, err: BaseException) -> None:
        self.text = f"{type(err).__name__}: {' '.join(str(err).split())}"


_launches = threading.local()


def _launch_stack() -> list[_Launch]:
    if not hasattr(_launches, "stack"):
        _launches.stack = []
    return _launches.stack


def abort_job_on_failure(fit: Callable) -> Callable:
    """Wrap ``fit`` so that, when called with ``comm=``, no failure leaves ranks waiting in a
    collective forever: an exception before fit()'s first collective is sent to it and raised
    on every rank; a later exception raised on only some ranks ends the whole MPI job (one
    line on stderr naming the rank, then ``MPI_Abort``)."""

    @functools.wraps(fit)
    def run(*args, **kwargs):
        comm = kwargs.get("comm")
        if comm is None:
            return fit(*args, **kwargs)
        check_comm(comm)
        launch = _Launch()
        _launch_stack().append(launch)
        try:
            return fit(*args, **kwargs)
        except BaseException as err:
            if _raised_on_every_rank(err):
                raise
            if not launch.started and isinstance(err, Exception):
                # Every other rank is failing here too or waits in the first collective:
                # join it with the failure, and every rank raises.
                comm.allgather(_Failed(err))
                raise
            abort(comm, err)
        finally:
            _launch_stack().pop()
    return run


def _raised_on_every_rank(err: BaseException) -> bool:
    # An error class that every rank raises alike says so (train.TrainingDiverged: the
    # divergence latch is agreed, every rank halts at one step).
    return isinstance(err, (DistributedError, AgreedInterrupt)) or \
        getattr(err, "raised_on_every_rank", False) is True


def abort(comm, err: BaseException) -> NoReturn:
    """Print one line naming this rank and ``err``, then end every rank of ``comm``'s job."""
    what = "interrupted" if isinstance(err, KeyboardInterrupt) else \
        f"{type(err).__name__}: {' '.join(str(err).split())}"
    print(f"bpkernels: rank {comm.Get_rank()} of {comm.Get_size()} failed: {what}; aborting "
          "the MPI job", file=sys.stderr, flush=True)
    if os.environ.get("BPK_DEBUG"):
        traceback.print_exception(type(err), err, err.__traceback__)
    comm.Abort(1)
    # MPICH's MPI_Abort can return to the caller while the process manager tears the job
    # down; this rank must not go on to write results as if training had finished.
    os._exit(1)


def check_comm(comm) -> None:
    MPI = import_mpi("fit(comm=...)")
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError("comm must be an mpi4py intracommunicator such as MPI.COMM_WORLD, got "
                        f"{type(comm).__name__}")


def on_every_rank(comm, func: Callable, *args: Any) -> Any:
    """``func(*args)`` run by every rank of ``comm`` (or plainly when ``comm`` is None). If it
    raises on any rank, it raises on every rank: the failed ranks their own error, the others
    a DistributedError naming the first failed rank. For work before training (options, data)
    that one rank could fail while the others go on to wait for it."""
    if comm is None:
        return func(*args)
    try:
        result, failure = func(*args), None
    except Exception as err:
        result, failure = None, err
    failures = comm.allgather(None if failure is None else
                              f"{type(failure).__name__}: {' '.join(str(failure).split())}")
    if failure is not None:
        raise failure
    for rank, text in enumerate(failures):
        if text is not None:
            raise DistributedError(f"rank {rank} of {comm.Get_size()} failed: {text}")
    return result


# --------------------------------------------------------------------------- training
def shard(rows: int, rank: int, ranks: int) -> tuple[int, int]:
    """(start, count) of ``rank``'s contiguous part of a batch of ``rows``: the first
    ``rows % ranks`` ranks take one row more; a rank gets no rows when rows < ranks."""
    base, extra = divmod(rows, ranks)
    return rank * base + min(rank, extra), base + (rank < extra)


class DataParallel:
    """fit()'s side of one data-parallel run on ``comm``: the launch check, the shards, the
    gradient all-reduce and the per-epoch agreement (see the module's docstring)."""

    def __init__(self, comm, model, X: np.ndarray, T: np.ndarray, *, loss: str, optimizer,
                 batch_size: int, epochs: int, shuffle: bool, seed: int,
                 row_weights: np.ndarray | None = None, metrics: Any = None) -> None:
        self.MPI = import_mpi("fit(comm=...)")
        self.comm, self.model = comm, model
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        settings = {
            "sizes": list(model.sizes), "activations": list(model.layer_activations),
            "dtype": model.dtype.name, "backend": model.backend.name, "loss": loss,
            "dropout": list(model.dropout), "norm": model.norm,
            # the key of dropout's masks: ranks with other seeds would drop other units
            "model seed (dropout's key)": model.seed if any(model.dropout) else None,
            "optimizer": optimizer.config(), "batch_size": batch_size, "epochs": epochs,
            "shuffle": bool(shuffle), "seed": seed, "samples": int(X.shape[0]),
            _DATA: _fingerprint(X, T),
            # ranks weighing rows differently would all-reduce inconsistent shares, silently
            "sample and class weights (a digest)":
                None if row_weights is None else _digest([row_weights]),
            "metrics": None if metrics is None else list(metrics.names),
            "weights (a digest)": self.weights_digest(),
            "optimizer state (a digest)": _digest(model.backend.to_host(optimizer.state[name])
                                                  for name in sorted(optimizer.state)),
            "optimizer steps taken": optimizer.step_count,
            "epochs trained": model.epochs_trained,
            # NCCL on some ranks and MPI on others would wait in different collectives.
            "gradient all-reduce": _reducer_kind(model),
        }
        everyone = comm.allgather(settings)
        if _launch_stack():
            _launch_stack()[-1].started = True
        for rank, theirs in enumerate(everyone):
            if isinstance(theirs, _Failed):
                raise DistributedError(f"rank {rank} of {self.size} failed: {theirs.text}")
        _check_same(settings, everyone)
        batch = min(batch_size, X.shape[0])
        if X.shape[0] < self.size:
            raise DistributedError(f"{self.size} ranks but only {X.shape[0]} training samples: "
                                   "every rank needs a row of each batch; launch at most "
                                   f"{X.shape[0]} ranks")
        if batch < self.size:
            raise DistributedError(f"batch_size {batch_size} is smaller than the {self.size} "
                                   "ranks, which each train a shard of every batch; use "
                                   f"batch_size >= {self.size}")
        self.reducer = _make_reducer(settings["gradient all-reduce"], comm, model, self.MPI)

    def shard_rows(self, batch_rows: np.ndarray) -> np.ndarray:
        """This rank's rows of each step, from the rows of each whole batch."""
        return np.array([shard(int(b), self.rank, self.size)[1] for b in batch_rows],
                        dtype=batch_rows.dtype)

    def local_order(self, order: np.ndarray, batch_rows: np.ndarray) -> np.ndarray:
        """The rows this rank trains in an epoch of ``order``: its shard of every batch, in
        step order (all but the last batch have ``batch_rows[0]`` rows)."""
        batch, steps = int(batch_rows[0]), len(batch_rows)
        start, count = shard(batch, self.rank, self.size)
        full = order[:(steps - 1) * batch].reshape(steps - 1, batch)[:, start:start + count]
        base = (steps - 1) * batch
        start, count = shard(int(batch_rows[-1]), self.rank, self.size)
        return np.concatenate([full.ravel(), order[base + start:base + start + count]])

    def all_reduce(self, grads, loss, weight: float) -> None:
        """``grads`` (this rank's shard's mean-loss gradient) becomes the sum over the ranks
        of ``weight * grads``: the whole batch's gradient when ``weight`` is shard rows over
        batch rows (with row weights: the shard's total weight over the batch's, so that the
        ranks' weighted means combine as sum(w l) / sum(w), not as a mean of means; 0 for a
        batch of zero total weight). A rank with no rows passes weight 0. A non-finite
        ``loss`` turns the gradient into NaN on every rank, so that check_step halts all of
        them at this step."""
        self.reducer(grads, loss, weight)

    def end_epoch(self, loss_sum: float, correct: float) -> tuple[float, float]:
        """The epoch's summed loss and hit count over every rank (added in rank order, so
        every rank gets the same numbers). Also checks that the weights are still identical
        on every rank: an MPI library whose all-reduce rounds differently per rank would let
        them drift apart silently."""
        gathered = self.comm.allgather((loss_sum, correct, self.weights_digest()))
        digests = {digest for _, _, digest in gathered}
        if len(digests) > 1:
            raise DistributedError(
                f"after epoch {self.model.epochs_trained + 1} the weights differ across ranks: "
                "this MPI library's all-reduce does not give every rank the same sum")
        return sum(g[0] for g in gathered), sum(g[1] for g in gathered)

    def sum_stats(self, stats: np.ndarray) -> np.ndarray:
        """The epoch's metric statistics (sums over this rank's shards) summed over every rank,
        added in rank order, so every rank gets the same numbers."""
        return np.sum(self.comm.allgather(np.asarray(stats, dtype=np.float64)), axis=0)

    def agree_to_stop(self, stop: bool, interrupted: bool) -> bool:
        """Whether any rank's callbacks asked to stop; raises AgreedInterrupt on every rank
        when any rank saw Ctrl-C."""
        flags = self.comm.allgather((bool(stop), bool(interrupted)))
        if any(interrupt for _, interrupt in flags):
            raise AgreedInterrupt()
        return any(stop for stop, _ in flags)

    def weights_digest(self) -> str:
        return _digest([self.model.backend.to_host(self.model.params)])


def _digest(arrays) -> str:
    # SHA-1 as a checksum, not for security: of hashlib's, the fastest here (1.6 GB/s against
    # blake2b's 0.6 on the machine measured), which matters for the data fingerprint
    h = hashlib.sha1(usedforsecurity=False)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).ravel())
    return h.hexdigest()[:24]


def _fingerprint(X: np.ndarray, T: np.ndarray) -> dict[str, Any]:
    """Digests of every row of X and T, a block of consecutive rows at a time."""
    row_bytes = X[:1].nbytes + T[:1].nbytes
    rows = max(1, _FINGERPRINT_BLOCK_BYTES // max(1, row_bytes))
    blocks = [_digest([X[i:i + rows], T[i:i + rows]]) for i in range(0, X.shape[0], rows)]
    return {"shapes": f"X {X.dtype} {X.shape}, y {T.dtype} {T.shape}", "block": rows,
            "n": X.shape[0], "blocks": blocks}


def _check_same(mine: dict[str, Any], everyone: list[dict[str, Any]]) -> None:
    for name in mine:
        first = everyone[0][name]
        differ = [rank for rank, theirs in enumerate(everyone) if theirs[name] != first]
        if not differ:
            continue
        if name == _DATA:
            what = "; ".join(_where_data_differs(first, everyone[rank][name], rank)
                             for rank in differ)
        else:
            more = differ[1:]
            others = f"; rank{'s' * (len(more) > 1)} {', '.join(map(str, more))} " \
                     f"differ{'s' * (len(more) == 1)} too" if more else ""
            what = f"rank 0 has {first!r}, rank {differ[0]} has {everyone[differ[0]][name]!r}" \
                   f"{others}"
        hint = " (build the model with the same seed on every rank, or load the same " \
               "checkpoint)" if name.startswith("weights") or "optimizer" in name else ""
        raise DistributedError(
            f"fit() under MPI: {name} differs across ranks: {what}; every rank must train the "
            f"same model on the same data with the same options{hint}")


def _where_data_differs(ours: dict[str, Any], theirs: dict[str, Any], rank: int) -> str:
    if ours["shapes"] != theirs["shapes"] or ours["block"] != theirs["block"]:
        return f"rank 0 has {ours['shapes']}, rank {rank} has {theirs['shapes']}"
    block = next(i for i, (a, b) in enumerate(zip(ours["blocks"], theirs["blocks"])) if a != b)
    start = block * ours["block"]
    end = min(start + ours["block"], ours["n"]) - 1
    return f"rank {rank}'s differs from rank 0's within rows {start}..{end}"


# --------------------------------------------------------------------------- all-reduce
_HOST, _NCCL, _STAGED = ("MPI, in place", "NCCL, on the device",
                         "MPI, staged through host memory")


def _reducer_kind(model) -> str:
    if isinstance(model.params, np.ndarray):
        return _HOST
    return _NCCL if getattr(model.backend, "nccl", None) is not None else _STAGED


def _make_reducer(kind: str, comm, model, MPI) -> Callable[[Any, Any, float], None]:
    if kind == _HOST:
        return _HostAllreduce(comm, MPI)
    if kind == _NCCL:
        return _NcclAllreduce(comm, model)
    return _StagedAllreduce(comm, model.backend, MPI)


class _HostAllreduce:
    """NumPy and Numba: the flat gradient buffer reduced in place, nothing allocated."""

    def __init__(self, comm, MPI) -> None:
        self.comm, self.in_place, self.sum = comm, MPI.IN_PLACE, MPI.SUM

    def __call__(self, grads: np.ndarray, loss: np.ndarray, weight: float) -> None:
        if weight == 0.0:
            grads.fill(0.0)
        else:
            grads *= weight + 0.0 * float(loss[0])  # 0 * inf or NaN poisons: see all_reduce
        self.comm.Allreduce(self.in_place, grads, op=self.sum)


class _NcclAllreduce:
    """CuPy: NCCL sums the device buffer in place, queued on the stream the per-step kernels
    run on, after one kernel that weighs this rank's gradient (backend.weigh_grads): no host
    wait, no allocation per step. The communicator is set up once, from a unique id broadcast
    over MPI. CI runs this on a CPU stand-in of CuPy and NCCL (tests/cudasim); not yet run on
    GPU hardware.

    Under ``comm`` fit() launches the step kernel by kernel, not as the backend's captured
    graph (train.py skips train_epoch): the all-reduce sits between backward and update, and
    the reducer, not the backend, owns it. NCCL >= 2.9 could be captured inside the step's
    graph, saving the ~30 launches per step; that needs EpochPlan to carry the reducer and
    each rank's per-variant weight, left for when a GPU can measure the gain."""

    def __init__(self, comm, model) -> None:
        self.backend = be = model.backend
        self.nccl = nccl = be.nccl
        unique_id = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
        self.device_comm = nccl.NcclCommunicator(comm.Get_size(), unique_id, comm.Get_rank())
        self.dtype = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}[model.storage.name]

    def __call__(self, grads, loss, weight: float) -> None:
        self.backend.weigh_grads(grads, loss, weight)
        self.device_comm.allReduce(grads.data.ptr, grads.data.ptr, grads.size, self.dtype,
                                   self.nccl.NCCL_SUM, self.backend.stream_ptr())


class _StagedAllreduce:
    """Any other backend: through a host copy, by the contract's to_host and copy."""

    def __init__(self, comm, backend, MPI) -> None:
        self.comm, self.backend, self.in_place, self.sum = comm, backend, MPI.IN_PLACE, MPI.SUM

    def __call__(self, grads, loss, weight: float) -> None:
        be = self.backend
        host = be.to_host(grads)
        if weight == 0.0:
            host.fill(0.0)  # as the other reducers do: 0 * a stale NaN is NaN
        else:
            host *= weight + 0.0 * float(be.to_host(loss)[0])
        self.comm.Allreduce(self.in_place, host, op=self.sum)
        be.copy(be.asarray(host), grads)
