"""A CPU stand-in for the part of CuPy that backends/cupy_backend.py uses, so the backend's own
host code (buffers, kernel launches, cuBLAS calls, graph capture and replay, streams, events,
pinned-memory transfers) runs unchanged on a machine without a GPU.

It is strict where a GPU would fail or silently compute garbage, so that a test here fails
instead:

- kernels are the production ``backends/cuda/*.cu``, built for the CPU (compiler.py); every
  argument is checked against the kernel's C parameter types (width, pointer or value, float
  or integer, element type of a pointer);
- device memory starts as NaN bytes (``empty`` is not ``zeros``) and is surrounded by guard
  bytes that are checked after every kernel: an out-of-bounds write fails the launch;
- work is queued per stream and runs only when the host waits for it (a stream or event sync,
  a device-to-host copy), following only the dependencies the code declared: a missing
  ``wait_event`` lets a consumer run before its producer and read stale data, a pinned host
  buffer refilled before its copy finished is copied with the new contents, as on a GPU;
- during graph capture nothing may allocate device memory, synchronise, or use another
  stream; a replayed graph whose memory was freed fails;
- a device array never converts to NumPy implicitly, and offers no arithmetic: only what the
  backend is allowed to use exists;
- ``cupy.cuda.nccl`` (``modules(nccl=True)``) sums device memory across the processes of an MPI
  job (see "NCCL" below): a call is queued on its stream like a kernel, runs when the host
  waits, and refuses a pointer, size or element type that a GPU would read as garbage.

``STATS`` counts what happened (kernels, GEMMs, graph launches, captures, host waits,
allocations, transfers) for tests that check, for example, one replay per step and no host
synchronisation inside an epoch.
"""
from __future__ import annotations

import collections
import ctypes
import hashlib
import os
import threading
import time
import types
import weakref

import numpy as np

from . import compiler

GUARD = 64          # bytes checked on each side of every allocation
_CANARY = 0xA5
_POISON = 0xFF      # fresh device memory: NaN as floats, -1 as integers
TOTAL_MEMORY = 1 << 30

STATS: collections.Counter = collections.Counter()


class SimError(RuntimeError):
    """What a GPU would reject or get wrong: illegal work during capture, freed or
    out-of-bounds memory, a host wait inside a capture."""


class CUDARuntimeError(RuntimeError):
    pass


class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list[Stream] = []


_local = _State()
_capturing: list["Stream"] = []        # the one stream being captured, if any
_pinned: list[tuple[int, int, weakref.ref]] = []
_all_streams: "weakref.WeakSet[Stream]" = weakref.WeakSet()
_allocated = [0]
_live: "weakref.WeakSet[Memory]" = weakref.WeakSet()  # for NCCL's pointer arguments
_compute_type = {np.dtype(np.float32): 1, np.dtype(np.float64): 1}


# ----------------------------------------------------------------------------- memory
class Memory:
    """One device allocation: a NaN-filled range with guard bytes on each side. It remembers
    its element type, so that NCCL, which gets bare pointers, can refuse a mismatch."""

    def __init__(self, nbytes: int, dtype=np.uint8) -> None:
        if _capturing:
            raise SimError("device memory allocated during graph capture: the graph would "
                           "hold memory the pool may hand out again")
        self.nbytes, self.dtype = nbytes, np.dtype(dtype)
        self.raw = np.full(nbytes + 2 * GUARD, _CANARY, np.uint8)
        self.raw[GUARD:GUARD + nbytes] = _POISON
        self.address = self.raw.ctypes.data + GUARD
        _allocated[0] += nbytes
        _live.add(self)
        STATS["allocations"] += 1
        weakref.finalize(self, _free, nbytes)

    def check(self) -> None:
        if (self.raw[:GUARD] != _CANARY).any() or (self.raw[GUARD + self.nbytes:] != _CANARY).any():
            raise SimError(f"a kernel wrote outside a device allocation of {self.nbytes} bytes")


def _free(nbytes: int) -> None:
    _allocated[0] -= nbytes


def _new(shape, dtype) -> "ndarray":
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    count = int(np.prod(shape, dtype=np.int64))
    mem = Memory(count * dtype.itemsize, dtype)
    view = mem.raw[GUARD:GUARD + count * dtype.itemsize].view(dtype).reshape(shape)
    return ndarray(view, mem)


class _Pointer:
    device_id = 0

    def __init__(self, array: "ndarray") -> None:
        self.ptr = array._a.ctypes.data


class ndarray:
    """A device array: a NumPy view into a guarded allocation, with CuPy's interface (only the
    parts the backend uses) and none of NumPy's implicit conversions."""

    __slots__ = ("_a", "_mem", "__weakref__")

    def __init__(self, view: np.ndarray, mem: Memory) -> None:
        self._a, self._mem = view, mem

    # --- description
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: _Pointer(self))
    T = property(lambda self: ndarray(self._a.T, self._mem))

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"<cudasim.ndarray shape={self.shape} dtype={self.dtype}>"

    # --- views
    def __getitem__(self, key) -> "ndarray":
        key = key if isinstance(key, tuple) else (key,)
        for k in key:
            if not (k is Ellipsis or isinstance(k, (int, np.integer, slice))):
                raise NotImplementedError(f"cudasim: only basic indexing, got {type(k).__name__}")
        if Ellipsis not in key:
            key = key + (Ellipsis,)  # an integer index gives a 0-d array, as CuPy's does
        return ndarray(self._a[key], self._mem)

    def reshape(self, *shape) -> "ndarray":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        view = self._a.reshape(shape)
        # Never a copy: CuPy would allocate one. (Setting .shape, which refused instead, is
        # deprecated since NumPy 2.5; reshape(copy=False) needs 2.1.)
        if view.size and not np.may_share_memory(view, self._a):
            raise NotImplementedError("cudasim: reshape of a non-contiguous array copies")
        return ndarray(view, self._mem)

    def ravel(self) -> "ndarray":
        return self.reshape(-1)

    def view(self) -> "ndarray":
        return ndarray(self._a.view(), self._mem)

    # --- device work
    def __setitem__(self, key, value) -> None:
        target = self[key]._a
        if isinstance(value, ndarray):
            source = value._a
            _enqueue(lambda: np.copyto(target, source, casting="unsafe"), [self, value], "copies")
        elif isinstance(value, (int, float, bool, np.generic)):
            _enqueue(lambda: target.fill(value), [self], "fills")
        else:
            raise TypeError(f"cudasim: cannot assign a {type(value).__name__} to a device array "
                            "(copy host data with set() or cupy.asarray first)")

    def fill(self, value) -> None:
        self[...] = value

    def copy(self) -> "ndarray":
        out = _new(self.shape, self.dtype)
        out[...] = self
        return out

    def astype(self, dtype, copy=True) -> "ndarray":
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        out = _new(self.shape, dtype)
        out[...] = self
        return out

    # --- transfers
    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        stream = stream or get_current_stream()
        if not blocking or out is not None:
            raise NotImplementedError("cudasim: get() is modelled as a blocking copy only")
        stream.synchronize()
        STATS["d2h"] += 1
        return np.array(self._a, order="C", copy=True)

    def set(self, arr, stream=None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        _copy_from_host(self, arr, stream or get_current_stream())

    @property
    def __cuda_array_interface__(self) -> dict:
        # Its "device" pointer is host memory: only this shim may read it (asarray, from_dlpack).
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3, "stream": None,
                "data": (self._a.ctypes.data, False),
                "strides": None if self._a.flags.c_contiguous else self.strides}

    # --- what CuPy refuses (or what would hide a host round trip)
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def _no_host_scalar(self, *args):
        raise TypeError("cudasim: a device value read as a host scalar (a hidden sync); "
                        "use to_host / cupy.asnumpy")

    __bool__ = __int__ = __float__ = __index__ = _no_host_scalar
    __iter__ = None


def _copy_from_host(dst: ndarray, src: np.ndarray, stream: "Stream") -> None:
    target = dst._a
    if _is_pinned(src):
        # Asynchronous: the host memory is read when the copy runs, as a DMA from pinned
        # memory is; refilling it before then changes what arrives.
        source = src
        STATS["h2d_async"] += 1
    else:
        source = np.array(src, copy=True)  # pageable: staged at the call, as CUDA does
        STATS["h2d"] += 1
    _enqueue(lambda: np.copyto(target, source.reshape(target.shape)), [dst], "copies",
             stream=stream)


def _is_pinned(array: np.ndarray) -> bool:
    address = array.ctypes.data
    return any(start <= address < end and ref() is not None for start, end, ref in _pinned)


# ----------------------------------------------------------------------------- streams
class _Op:
    """One unit of queued device work. ``mems`` are weak references to the allocations it
    touches: checked for out-of-bounds writes after it runs, and for being alive when a graph
    replays it."""

    __slots__ = ("run", "mems", "wait", "marker", "strong")

    def __init__(self, run, arrays=(), wait=None, marker=None, strong=True) -> None:
        self.run = run
        self.mems = [weakref.ref(a._mem) for a in arrays]
        # Queued (not captured) work keeps its arrays alive, as CuPy's stream-ordered pool does.
        self.strong = [a._mem for a in arrays] if strong else None
        self.wait = wait      # a _Marker this op waits for (stream.wait_event)
        self.marker = marker  # the _Marker this op completes (event.record)

    def execute(self) -> None:
        self.run()
        for ref in self.mems:
            mem = ref()
            if mem is not None:
                mem.check()


class _Marker:
    def __init__(self) -> None:
        self.done = False
        self.time = None


def _enqueue(run, arrays, kind: str, stream=None) -> None:
    stream = stream or get_current_stream()
    if _capturing and stream is not _capturing[0]:
        raise SimError(f"work queued on another stream during graph capture ({kind})")
    STATS[kind] += 1
    if _capturing:
        stream._graph.append(_Op(run, arrays, strong=False))
    else:
        stream._queue.append(_Op(run, arrays))


def _drive(stream: "Stream", until, depth: int = 0) -> None:
    """Run ``stream``'s queued work, in order, until ``until()``; an op that waits for another
    stream's marker first drives that stream just far enough."""
    if depth > 8:
        raise SimError("streams wait on each other in a cycle")
    while not until():
        if not stream._queue:
            raise SimError("waited for work that was never queued")
        op = stream._queue[0]
        if op.wait is not None and not op.wait.done:
            owner = op.wait.stream
            _drive(owner, lambda: op.wait.done, depth + 1)
        stream._queue.popleft()
        op.execute()


class Stream:
    null: "Stream"

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None) -> None:
        if not null and not non_blocking:
            raise NotImplementedError("cudasim models non-blocking streams only (a blocking "
                                      "stream also orders against the legacy null stream)")
        self._queue: collections.deque[_Op] = collections.deque()
        self._graph: list[_Op] = []
        self._null = null
        self.ptr = 0 if null else id(self)
        self.device_id = 0
        _all_streams.add(self)

    def __enter__(self) -> "Stream":
        _local.stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _local.stack.pop()

    def use(self) -> "Stream":
        _local.stack[:] = [self]
        return self

    @property
    def done(self) -> bool:
        return not self._queue

    def synchronize(self) -> None:
        if _capturing:
            raise SimError("host synchronisation during graph capture")
        STATS["host_waits"] += 1
        _drive(self, lambda: not self._queue)

    def record(self, event=None) -> "Event":
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event) -> None:
        if _capturing:
            raise SimError("a captured stream waits on an event recorded outside the capture")
        marker = event._marker
        if marker is not None and not marker.done:
            STATS["stream_waits"] += 1
            self._queue.append(_Op(lambda: None, wait=marker))

    def begin_capture(self, mode=None) -> None:
        if self._null:
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if _capturing:
            raise SimError("a capture is already in progress")
        self._graph = []
        _capturing.append(self)

    def end_capture(self) -> "Graph":
        if not _capturing or _capturing[0] is not self:
            raise SimError("end_capture without begin_capture on this stream")
        _capturing.clear()
        STATS["captures"] += 1
        graph, self._graph = Graph(self._graph), []
        return graph

    def is_capturing(self) -> bool:
        return bool(_capturing) and _capturing[0] is self


Stream.null = Stream(null=True)


def get_current_stream(device_id=-1) -> Stream:
    return _local.stack[-1] if _local.stack else Stream.null


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False) -> None:
        self._marker: _Marker | None = None
        self._timing = not disable_timing

    def record(self, stream=None) -> None:
        stream = stream or get_current_stream()
        if _capturing:
            raise SimError("cudasim: events inside a capture are not modelled")
        marker = self._marker = _Marker()
        marker.stream = stream

        def reached():
            marker.done = True
            marker.time = time.perf_counter()
        stream._queue.append(_Op(reached, marker=marker))

    @property
    def done(self) -> bool:
        return self._marker is None or self._marker.done

    def synchronize(self) -> None:
        if _capturing:
            raise SimError("host synchronisation during graph capture")
        STATS["host_waits"] += 1
        STATS["event_waits"] += 1
        marker = self._marker
        if marker is not None:  # never recorded: complete, as in CUDA
            _drive(marker.stream, lambda: marker.done)


def get_elapsed_time(start: Event, end: Event) -> float:
    for event in (start, end):
        if not event._timing or event._marker is None or not event._marker.done:
            raise CUDARuntimeError("cudaErrorNotReady: event not recorded, timed or complete")
    return (end._marker.time - start._marker.time) * 1e3


class Graph:
    def __init__(self, nodes: list[_Op]) -> None:
        self._nodes = nodes

    def launch(self, stream=None) -> None:
        stream = stream or get_current_stream()
        if _capturing:
            raise SimError("cudasim: graph launch inside a capture is not modelled")
        for node in self._nodes:
            if any(ref() is None for ref in node.mems):
                raise SimError("a graph replays a kernel on device memory that has been freed")
        STATS["graph_launches"] += 1
        stream._queue.extend(self._nodes)

    def upload(self, stream=None) -> None:
        pass

    @property
    def node_count(self) -> int:
        return len(self._nodes)


# ----------------------------------------------------------------------------- kernels
class RawModule:
    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 name_expressions=None, jitify=None) -> None:
        if code is None or path is not None or backend != "nvrtc" or name_expressions or jitify:
            raise NotImplementedError("cudasim: RawModule(code=..., options=...) only")
        self.code, self.options = code, tuple(options)
        self._library = None

    def get_function(self, name: str) -> "RawKernel":
        if self._library is None:
            STATS["module_builds"] += 1
            self._library = compiler.Library(compiler.build(self.code, self.options))
        return RawKernel(self._library, name)


_BLOCK_MAX = (1024, 1024, 64)
_GRID_MAX = (2 ** 31 - 1, 65535, 65535)


class RawKernel:
    def __init__(self, library: compiler.Library, name: str) -> None:
        self.name = name
        self._library = library
        self._signature = library.signature(name)  # raises for an unknown kernel

    def __call__(self, grid, block, args, *, shared_mem=0) -> None:
        if not isinstance(args, tuple):
            raise TypeError("kernel arguments must be a tuple")
        if shared_mem:
            raise SimError("cudasim: the kernels use no shared memory")
        grid, block = _dims(grid, _GRID_MAX), _dims(block, _BLOCK_MAX)
        if block[0] * block[1] * block[2] > 1024:
            raise SimError(f"{self.name}: more than 1024 threads per block")
        if len(args) != len(self._signature):
            raise TypeError(f"{self.name} takes {len(self._signature)} arguments, "
                            f"got {len(args)}")
        holders, arrays = [], []
        for position, (value, param) in enumerate(zip(args, self._signature)):
            holder = _argument(self.name, position, value, param)
            holders.append(holder)
            if isinstance(value, ndarray):
                arrays.append(value)
        argv = (ctypes.c_void_p * len(holders))(*[h.ctypes.data for h in holders])
        library, name, dims = self._library, self.name, grid + block
        keep = (holders, argv)

        def run():
            library.launch(name, dims, keep[1])
        _enqueue(run, arrays, "kernels")


def _dims(value, limits) -> tuple[int, int, int]:
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise TypeError(f"grid and block are tuples of 1 to 3 ints, got {value!r}")
    dims = tuple(int(v) for v in value) + (1,) * (3 - len(value))
    if any(d < 1 or d > m for d, m in zip(dims, limits)):
        raise SimError(f"launch dimensions {dims} out of range")
    return dims


def _scalar_dtype(value) -> np.dtype:
    """CuPy's rule for a kernel argument passed by value."""
    if isinstance(value, bool):
        return np.dtype(np.bool_)
    if isinstance(value, int):
        return np.dtype(np.uint64 if value >= 2 ** 63 else np.int64)
    if isinstance(value, float):
        return np.dtype(np.float64)
    if isinstance(value, np.generic):
        return value.dtype
    raise TypeError(f"Unsupported type {type(value)}")


def _argument(kernel: str, position: int, value, param) -> np.ndarray:
    """The bytes of one argument, checked against the kernel's parameter."""
    where = f"{kernel} argument {position}"
    if param.pointer:
        if value is None:
            return np.array(0, np.uintp)
        if not isinstance(value, ndarray):
            raise TypeError(f"{where}: a pointer parameter needs a device array, got "
                            f"{type(value).__name__}")
        if not value.flags.c_contiguous:
            raise SimError(f"{where}: a non-contiguous array passed to a raw kernel")
        if param.pointee_size and (value.itemsize != param.pointee_size or
                                   (value.dtype.kind == "f") != bool(param.pointee_floating)):
            raise TypeError(f"{where}: a {value.dtype} array passed for a pointer to a "
                            f"{'float' if param.pointee_floating else 'integer'} of "
                            f"{param.pointee_size} bytes")
        return np.array(value._a.ctypes.data, np.uintp)
    if value is None or isinstance(value, ndarray):
        raise TypeError(f"{where}: a value parameter got {type(value).__name__}")
    dtype = _scalar_dtype(value)
    if dtype.itemsize != param.size or (dtype.kind == "f") != bool(param.floating):
        raise TypeError(f"{where}: a {dtype} value passed for a "
                        f"{'float' if param.floating else 'integer'} parameter of "
                        f"{param.size} bytes")
    return np.array(value, dtype)


# ----------------------------------------------------------------------------- cuBLAS
def _tf32(x: np.ndarray) -> np.ndarray:
    """Round float32 to TF32 (10 mantissa bits), as tensor cores read the inputs."""
    bits = np.ascontiguousarray(x).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def matmul(a: ndarray, b: ndarray, out: ndarray | None = None) -> ndarray:
    for name, x in (("a", a), ("b", b), ("out", out)):
        if not isinstance(x, ndarray) or x.ndim != 2:
            raise NotImplementedError(f"cudasim: matmul of 2-D device arrays into a given "
                                      f"out only ({name} is {x!r})")
    if not (a.dtype == b.dtype == out.dtype) or not out.flags.c_contiguous:
        raise SimError("cupy.matmul would compute into a temporary and copy (allocation): "
                       "out must be C-contiguous and of the inputs' dtype")
    if np.shares_memory(out._a, a._a) or np.shares_memory(out._a, b._a):
        raise SimError("cupy.matmul would copy an output that overlaps an input")
    if a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"matmul shapes {a.shape} @ {b.shape} -> {out.shape}")
    x, y, z = a._a, b._a, out._a
    tf32 = x.dtype == np.float32 and _compute_type[x.dtype] == COMPUTE_TYPE_TF32

    def run():
        np.matmul(_tf32(x) if tf32 else x, _tf32(y) if tf32 else y, out=z)
    _enqueue(run, [a, b, out], "gemms")
    return out


COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC, COMPUTE_TYPE_TF32 = 1, 2, 7


def set_compute_type(dtype, compute_type) -> None:
    _compute_type[np.dtype(dtype)] = int(compute_type)


def get_compute_type(dtype) -> int:
    return _compute_type[np.dtype(dtype)]


# ----------------------------------------------------------------------------- NCCL
# What a GPU would do: NCCL runs a collective as device work queued on the stream it is given,
# and (since NCCL 2.9) a collective issued on a capturing stream becomes a node of the graph,
# performed again by every replay. The stand-in does the same: allReduce queues an op on the
# stream (or appends it to the graph being captured, where only the capturing stream may be
# used), and the op sums over MPI when it runs, that is when some host wait drives the stream.
# So every rank must queue collectives and replay graphs in one order, as with real NCCL. One
# difference: real NCCL progresses on the GPU while the host goes on, here it progresses at host
# waits; ranks that wait for their streams at different points (one in a host MPI collective,
# another in a stream sync) can deadlock here where a GPU would not. bpkernels' ranks all wait
# at the same points (the epoch's end).
# Constants as nccl.h defines them and cupy.cuda.nccl exports them.
NCCL_INT32, NCCL_INT64, NCCL_FLOAT32, NCCL_FLOAT64 = 2, 4, 7, 8
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4
_NCCL_TYPES = {NCCL_INT32: np.dtype(np.int32), NCCL_INT64: np.dtype(np.int64),
               NCCL_FLOAT32: np.dtype(np.float32), NCCL_FLOAT64: np.dtype(np.float64)}
_NCCL_TYPE_NAMES = {NCCL_INT32: "NCCL_INT32", NCCL_INT64: "NCCL_INT64",
                    NCCL_FLOAT32: "NCCL_FLOAT32", NCCL_FLOAT64: "NCCL_FLOAT64"}
_NCCL_OPS = {NCCL_SUM: "SUM", NCCL_PROD: "PROD", NCCL_MAX: "MAX", NCCL_MIN: "MIN",
             NCCL_AVG: "SUM"}
_UNIQUE_ID_LENGTH = 128  # NCCL_UNIQUE_ID_BYTES


class NcclError(RuntimeError):
    pass


def get_unique_id() -> tuple[int, ...]:
    """As CuPy's: the 128 bytes of an ncclUniqueId as a tuple of ints (to send to the others)."""
    return tuple(os.urandom(_UNIQUE_ID_LENGTH))


class NcclCommunicator:
    """``NcclCommunicator(ndev, unique_id, rank)`` over MPI. The processes that pass the same
    unique id find each other by splitting ``MPI.COMM_WORLD``, which is collective: every
    process of the MPI job creates one at the same time (bpkernels does: one per fit, on every
    rank). A real NCCL init with a wrong ``ndev`` or a rank given twice never completes; here
    it raises NcclError on every process of the id."""

    def __init__(self, ndev: int, commId, rank: int) -> None:
        if _capturing:
            raise SimError("an NCCL communicator created during graph capture")
        if not (isinstance(commId, tuple) and len(commId) == _UNIQUE_ID_LENGTH and
                all(isinstance(b, int) for b in commId)):
            raise TypeError("NcclCommunicator: commId must be the tuple get_unique_id() gave")
        if not (_is_int(ndev) and _is_int(rank) and ndev >= 1 and 0 <= rank < ndev):
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: rank {rank!r} of ndev {ndev!r}")
        from mpi4py import MPI
        self._mpi = MPI
        digest = hashlib.blake2b(bytes(b % 256 for b in commId), digest_size=3).digest()
        self._comm = MPI.COMM_WORLD.Split(int.from_bytes(digest, "little"), rank)
        joined = self._comm.allgather((ndev, rank))
        if sorted(r for _, r in joined) != list(range(ndev)) or {n for n, _ in joined} != {ndev}:
            self._comm.Free()
            raise NcclError(f"NCCL_ERROR_INVALID_USAGE: the processes of one unique id gave "
                            f"(ndev, rank) {sorted(joined)}; a real init would never complete")
        self._ndev, self._rank = ndev, rank

    def size(self) -> int:
        return self._ndev

    def rank_id(self) -> int:
        return self._rank

    def destroy(self) -> None:
        if self._comm is not None:
            self._comm.Free()
            self._comm = None

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int,
                  stream: int) -> None:
        """Queue ``recvbuf[:count] = op over the ranks of sendbuf[:count]`` on ``stream``."""
        for name, value in (("sendbuf", sendbuf), ("recvbuf", recvbuf), ("count", count),
                            ("datatype", datatype), ("op", op), ("stream", stream)):
            if not _is_int(value):
                raise TypeError(f"allReduce: {name} is an int (pointers are .data.ptr, the "
                                f"stream is .ptr), got {type(value).__name__}")
        if self._comm is None:
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: the communicator was destroyed")
        if datatype not in _NCCL_TYPES or op not in _NCCL_OPS or count < 0:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: datatype {datatype}, op {op}, "
                            f"count {count}")
        dtype = _NCCL_TYPES[datatype]
        source = _device_range(sendbuf, count, dtype, _NCCL_TYPE_NAMES[datatype], "sendbuf")
        target = _device_range(recvbuf, count, dtype, _NCCL_TYPE_NAMES[datatype], "recvbuf")
        if sendbuf != recvbuf and np.shares_memory(source._a, target._a):
            raise SimError("allReduce: sendbuf and recvbuf overlap without being the same "
                           "buffer (in place means the same pointer)")
        call, mpi_op = (count, datatype, op), getattr(self._mpi, _NCCL_OPS[op])

        def run():
            if self._comm is None:
                raise SimError("an NCCL allReduce ran on a destroyed communicator")
            calls = self._comm.allgather(call)
            if len(set(calls)) > 1:
                raise SimError(f"NCCL allReduce calls differ across ranks (count, datatype, op "
                               f"by rank: {calls}): a GPU would hang or sum garbage")
            host = np.array(source._a, copy=True)  # the interconnect: through host memory
            self._comm.Allreduce(self._mpi.IN_PLACE, host, op=mpi_op)
            if op == NCCL_AVG:
                host /= self._ndev
            np.copyto(target._a, host)
        _enqueue(run, [source, target], "nccl_allreduces", stream=_stream_at(stream))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _device_range(pointer: int, count: int, dtype: np.dtype, type_name: str,
                  what: str, caller: str = "allReduce") -> ndarray:
    """The ``count`` elements at ``pointer`` as a device array; SimError where a GPU would read
    or write memory that is not this buffer, or read its bytes as another type."""
    for mem in list(_live):
        offset = pointer - mem.address
        if 0 <= offset < max(mem.nbytes, 1):
            break
    else:
        raise SimError(f"{caller}: {what} {pointer:#x} is not in any live device allocation")
    if mem.dtype != dtype:
        raise SimError(f"{caller}: {type_name} over {what}'s {mem.dtype} memory: a GPU would "
                       "sum its bytes as another type")
    nbytes = count * dtype.itemsize
    if offset % dtype.itemsize:
        raise SimError(f"{caller}: {what} is not aligned to a {type_name} element")
    if offset + nbytes > mem.nbytes:
        raise SimError(f"{caller}: {count} {type_name} elements at {what} run past the end of "
                       f"its allocation ({mem.nbytes - offset} bytes left)")
    view = mem.raw[GUARD + offset:GUARD + offset + nbytes].view(dtype)
    return ndarray(view, mem)


def _stream_at(pointer: int) -> Stream:
    if pointer == 0:
        return Stream.null
    for stream in list(_all_streams):
        if stream.ptr == pointer:
            return stream
    raise SimError(f"stream {pointer:#x} is not a live stream")


class Device:
    """``cupy.cuda.Device(i).use()``: makes ``i`` the current device (runtime.getDevice). Every
    simulated device shares one memory and one set of streams: DEVICE_COUNT > 1 only lets a
    test check which device each MPI rank picks."""

    def __init__(self, device=None) -> None:
        self.id = _current_device[0] if device is None else int(device)
        if not 0 <= self.id < DEVICE_COUNT:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")

    def use(self) -> None:
        _current_device[0] = self.id


DEVICE_COUNT = 1
_current_device = [0]


# ----------------------------------------------------------------------------- module API
def empty(shape, dtype=np.float64, order="C") -> ndarray:
    return _new(shape, dtype)


def zeros(shape, dtype=np.float64, order="C") -> ndarray:
    out = _new(shape, dtype)
    out.fill(0)
    return out


def _foreign(a) -> bool:
    return hasattr(a, "__cuda_array_interface__") or hasattr(a, "__dlpack_device__")


def asarray(a, dtype=None, order=None) -> ndarray:
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    if _foreign(a) and not isinstance(a, np.ndarray):
        raise SimError(f"cudasim: device memory of another library ({type(a).__name__}) is not "
                       "modelled; only cudasim arrays are device arrays here")
    host = np.ascontiguousarray(a, dtype=dtype)
    out = _new(host.shape, host.dtype)
    _copy_from_host(out, host, get_current_stream())
    return out


def array(obj, dtype=None, copy=True, order="K") -> ndarray:
    if isinstance(obj, ndarray):
        return obj.astype(dtype or obj.dtype)
    return asarray(obj, dtype)


def from_dlpack(obj) -> ndarray:
    if isinstance(obj, ndarray):
        return obj
    raise SimError(f"cudasim: DLPack import of another library's memory ({type(obj).__name__}) "
                   "is not modelled; only cudasim arrays are device arrays here")


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return np.asarray(a, order=order)


def empty_pinned(shape, dtype=np.float64, order="C") -> np.ndarray:
    host = np.empty(shape, dtype, order=order)
    host.fill(0)
    _pinned.append((host.ctypes.data, host.ctypes.data + max(host.nbytes, 1), weakref.ref(host)))
    return host


def _device_synchronize() -> None:
    if _capturing:
        raise SimError("host synchronisation during graph capture")
    for stream in list(_all_streams):
        stream.synchronize()


def _properties(device: int) -> dict:
    return {"name": b"cudasim (CPU emulation)", "totalGlobalMem": TOTAL_MEMORY,
            "major": 9, "minor": 0, "multiProcessorCount": 4}


def _mem_get_info() -> tuple[int, int]:
    return TOTAL_MEMORY - _allocated[0], TOTAL_MEMORY


def modules(nccl: bool = True) -> dict[str, types.ModuleType]:
    """sys.modules entries under which the backend finds this shim as ``cupy`` and ``cupyx``;
    ``nccl=False`` leaves out ``cupy.cuda.nccl``, as a CuPy installed without NCCL does."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.ModuleType("cupy.cuda.runtime")
    graph = types.ModuleType("cupy.cuda.graph")
    core = types.ModuleType("cupy._core")
    linalg = types.ModuleType("cupy._core._routines_linalg")
    cupyx = types.ModuleType("cupyx")

    cupy.__version__ = "cudasim"
    cupy.ndarray, cupy.RawModule, cupy.RawKernel = ndarray, RawModule, RawKernel
    cupy.empty, cupy.zeros, cupy.asarray, cupy.array = empty, zeros, asarray, array
    cupy.asnumpy, cupy.matmul, cupy.from_dlpack = asnumpy, matmul, from_dlpack
    cupy.cuda, cupy._core = cuda, core
    for name in ("float32", "float64", "int64", "int32", "bool_"):
        setattr(cupy, name, getattr(np, name))

    cuda.Stream, cuda.Event, cuda.runtime, cuda.graph = Stream, Event, runtime, graph
    cuda.get_current_stream, cuda.get_elapsed_time = get_current_stream, get_elapsed_time
    cuda.Device = Device
    from . import cublas as raw  # (it imports this module)
    cublas = cuda.cublas = types.ModuleType("cupy.cuda.cublas")
    device = cuda.device = types.ModuleType("cupy.cuda.device")
    device.get_cublas_handle = raw.get_cublas_handle
    cublas.gemmEx, cublas.CUBLASError = raw.gemm_ex, raw.CUBLASError
    cublas.setStream, cublas.getStream = raw.set_stream, raw.get_stream
    cublas.setPointerMode, cublas.getPointerMode = raw.set_pointer_mode, raw.get_pointer_mode

    runtime.CUDARuntimeError = CUDARuntimeError
    runtime.getDeviceCount = lambda: DEVICE_COUNT
    runtime.getDevice = lambda: _current_device[0]
    runtime.getDeviceProperties = _properties
    runtime.memGetInfo = _mem_get_info
    runtime.runtimeGetVersion = lambda: 12080
    runtime.driverGetVersion = lambda: 12080
    runtime.deviceSynchronize = _device_synchronize

    graph.Graph = Graph
    core._routines_linalg = linalg
    linalg.set_compute_type, linalg.get_compute_type = set_compute_type, get_compute_type
    linalg.COMPUTE_TYPE_DEFAULT = COMPUTE_TYPE_DEFAULT
    linalg.COMPUTE_TYPE_PEDANTIC = COMPUTE_TYPE_PEDANTIC
    linalg.COMPUTE_TYPE_TF32 = COMPUTE_TYPE_TF32
    cupyx.empty_pinned = empty_pinned
    found = {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime,
             "cupy.cuda.graph": graph, "cupy._core": core,
             "cupy._core._routines_linalg": linalg, "cupyx": cupyx,
             "cupy.cuda.cublas": cublas, "cupy.cuda.device": device}
    if nccl:
        library = cuda.nccl = found["cupy.cuda.nccl"] = types.ModuleType("cupy.cuda.nccl")
        library.NcclCommunicator, library.NcclError = NcclCommunicator, NcclError
        library.get_unique_id, library.get_version = get_unique_id, lambda: 22105
        for name in ("NCCL_INT32", "NCCL_INT64", "NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_SUM",
                     "NCCL_PROD", "NCCL_MAX", "NCCL_MIN", "NCCL_AVG"):
            setattr(library, name, globals()[name])
    return found
