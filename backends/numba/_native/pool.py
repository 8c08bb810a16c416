"""Worker threads of our own for BLAS's parallel jobs and the epoch kernel's shared passes.

Inside the epoch kernel, BLAS's worker threads spin on the other cores between GEMMs while the
kernel's own passes (above all the gather of each batch) run on one core: a parallel pass of
Numba's would have to wake threads of its own onto cores that BLAS's workers spin on, and it
loses more than it gains. NumPy's OpenBLAS (0.3.28 and newer) lets a program run its parallel
jobs on threads of its own (``openblas_set_threads_callback_function``). Once a large model
trains with the Numba backend, ``ensure`` starts a worker per core but the caller's and
installs ``_blas_jobs`` there for the rest of the process: the workers then run both
BLAS's jobs and the kernel's share of each gather (``post``), and OpenBLAS's own threads sleep.
For the rest of the process, not per epoch: OpenBLAS's threads spin for ~0.1 s after each call
they serve, and an epoch started in that time (after a NumPy product, the benchmark's floor)
ran ~40% slower with its workers competing for the cores.

Measured on M (2 cores): the GEMMs run as fast as under OpenBLAS's own threads, and a gather
shared between the cores costs ~40% less than on one.

The control block: int64 slots in one array that lives as long as the process, which compiled
code reaches through a symbol of our own registered with LLVM (``control_address``), so that
cached code names no address. A header (the lock, the worker count), then one block per
worker: what its caller posts (two cache lines) and what the worker answers (the next line:
no false sharing). The caller, holding the lock, writes a task's fields, then its number; the
worker spins on that number, runs the task and stores the number as done. A worker idle for a
few milliseconds sleeps on a futex, and ``post`` wakes it. Linux on x86-64 only (the futex
call and the spin hint); elsewhere ``available`` is False and BLAS keeps its own threads.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import platform
import re
import sys
import threading
import time

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

from ...host import numpy_blas_libraries
from .switch import setting

# Header slots, then per worker: what the caller posts (slots 0-15), what it answers (16-23).
LOCK, WORKERS, SLEEP_LIMIT, HEADER = 0, 8, 10, 16  # SLEEP_LIMIT: a timespec, 2 slots
(POSTED, KIND, JOB, JOB_DATA, JOB_ARGUMENT, SOURCE, DESTINATION, ORDER, ROWS_START, ROWS_END,
 COLUMNS, SOURCE_STRIDE, SOURCE_ROWS) = range(13)
DONE, RESULT, SLEEPING, READY, BLOCK = 16, 17, 18, 19, 24
STOP, BLAS_JOB, GATHER = 0, 1, 2
MAX_WORKERS = 63
_SPINS = 1 << 15  # pause hints (~40-140 cycles each) before an idle worker sleeps: ~1-4 ms
_YIELD_EVERY = 1 << 10  # pause hints between sched_yield calls of a waiting caller
_SYS_SCHED_YIELD, _SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 24, 202, 128, 129  # x86-64, _PRIVATE
# The layout above is compiled into the cached kernels of _native/gather.py, whose cache does not
# see this file change: a worker told to stop answers with LAYOUT, which ``ensure`` checks.
LAYOUT = hash((LOCK, WORKERS, SLEEP_LIMIT, HEADER, POSTED, KIND, JOB, JOB_DATA, JOB_ARGUMENT,
               SOURCE, DESTINATION, ORDER, ROWS_START, ROWS_END, COLUMNS, SOURCE_STRIDE,
               SOURCE_ROWS, DONE, RESULT, SLEEPING, READY, BLOCK, STOP, BLAS_JOB, GATHER)) % (1 << 62)

_SYMBOLS = {"control": "bpkernels_pool_control", "exec_blas": "bpkernels_exec_blas",
            "set_callback": "bpkernels_set_blas_callback"}
_CONTROL = np.zeros(HEADER + MAX_WORKERS * BLOCK, np.int64)
_SLEEP_LIMIT = (0, 100_000_000)  # a sleeping worker looks again after 0.1 s, woken or not
llvm.add_symbol(_SYMBOLS["control"], _CONTROL.ctypes.data)
_I64, _I32 = ir.IntType(64), ir.IntType(32)


def _openblas():
    """ctypes functions of NumPy's OpenBLAS: (set_threads_callback_function, get_num_threads,
    exec_blas), or None where it has no callback (OpenBLAS before 0.3.28, MKL, Accelerate)."""
    for path in numpy_blas_libraries():
        try:
            library = ctypes.CDLL(path)  # already loaded by NumPy: the same handle
        except OSError:
            continue
        for prefix in ("scipy_openblas_", "openblas_"):
            set_callback = getattr(library, f"{prefix}set_threads_callback_function64_", None)
            get_threads = getattr(library, f"{prefix}get_num_threads64_", None)
            run = getattr(library, "exec_blas", None)
            if set_callback and get_threads and run:
                set_callback.argtypes, set_callback.restype = [ctypes.c_void_p], None
                get_threads.argtypes, get_threads.restype = [], ctypes.c_int
                return set_callback, get_threads, run
    return None


# The OpenBLAS releases whose exec_blas job records and threads callback this pool was tested
# with (the job layout is OpenBLAS's internal; its callback is public since 0.3.28).
TESTED_OPENBLAS = ((0, 3, 31),)


def openblas_version() -> tuple[int, ...] | None:
    """The release of NumPy's OpenBLAS, from its config string ("OpenBLAS 0.3.31..."), or None."""
    for path in numpy_blas_libraries():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_get_config64_", "openblas_get_config64_",
                     "openblas_get_config"):
            config = getattr(library, name, None)
            if config is not None:
                config.restype = ctypes.c_char_p
                found = re.search(rb"OpenBLAS (\d+)\.(\d+)\.(\d+)", config() or b"")
                return tuple(int(v) for v in found.groups()) if found else None
    return None


def _find() -> tuple[tuple | None, str | None]:
    """(NumPy's OpenBLAS functions, None) where the pool can run here, else (None, why not)."""
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        return None, "Linux on x86-64 only"
    version = openblas_version()
    if version is None:
        return None, "NumPy's BLAS is not an OpenBLAS this pool knows"
    if version not in TESTED_OPENBLAS and setting() != "1":
        tested = ", ".join(".".join(map(str, v)) for v in TESTED_OPENBLAS)
        return None, (f"not tested with OpenBLAS {'.'.join(map(str, version))} (tested: "
                      f"{tested}; BPK_NUMBA_NATIVE=1 tries it)")
    blas = _openblas()
    if blas is None:
        return None, "NumPy's OpenBLAS has no threads callback (0.3.28 and newer have)"
    return blas, None


_BLAS, _WHY_NOT = _find()
if _BLAS is not None:
    llvm.add_symbol(_SYMBOLS["exec_blas"], ctypes.cast(_BLAS[2], ctypes.c_void_p).value)
    llvm.add_symbol(_SYMBOLS["set_callback"], ctypes.cast(_BLAS[0], ctypes.c_void_p).value)


def _external(name, returns, *arguments, var_arg=False):
    """A call of the C function at the symbol ``name``, for the intrinsics below."""
    def call(builder, *values):
        callee = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(returns, list(arguments), var_arg=var_arg), name)
        return builder.call(callee, list(values))
    return call


def _syscall(builder, number, *values):
    return _external("syscall", _I64, _I64, var_arg=True)(builder, _I64(number), *values)


@intrinsic
def control_address(typingctx):
    """The control block's address."""
    def codegen(context, builder, signature, args):
        block = builder.module.globals.get(_SYMBOLS["control"])
        if block is None:
            block = ir.GlobalVariable(builder.module, _I64, _SYMBOLS["control"])
            block.linkage = "external"
        return builder.ptrtoint(block, _I64)
    return types.int64(), codegen


def _int64s(context, builder, signature, args):
    return [context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args)]


def _slot(builder, address, slot):
    return builder.inttoptr(builder.add(address, builder.mul(slot, _I64(8))), _I64.as_pointer())


# Sequentially consistent, all of them: the sleep handshake (a worker stores SLEEPING and then
# reads POSTED, a caller stores POSTED and then reads SLEEPING) needs it, and a task costs a
# few of them against microseconds of work.
@intrinsic
def load(typingctx, address, slot):
    """Slot ``slot`` of the int64s at ``address``."""
    def codegen(context, builder, signature, args):
        address_, slot_ = _int64s(context, builder, signature, args)
        return builder.load_atomic(_slot(builder, address_, slot_), "seq_cst", 8)
    return types.int64(address, slot), codegen


@intrinsic
def store(typingctx, address, slot, value):
    """Slot ``slot`` of the int64s at ``address`` = value."""
    def codegen(context, builder, signature, args):
        address_, slot_, value_ = _int64s(context, builder, signature, args)
        builder.store_atomic(value_, _slot(builder, address_, slot_), "seq_cst", 8)
        return context.get_dummy_value()
    return types.void(address, slot, value), codegen


@intrinsic
def try_lock(typingctx, address, slot):
    """Whether this call turned slot ``slot`` from 0 to 1."""
    def codegen(context, builder, signature, args):
        address_, slot_ = _int64s(context, builder, signature, args)
        swapped = builder.cmpxchg(_slot(builder, address_, slot_), _I64(0), _I64(1), "seq_cst",
                                  "seq_cst")
        return builder.extract_value(swapped, 1)
    return types.boolean(address, slot), codegen


@intrinsic
def pause(typingctx):
    """The spin-wait hint: lets the core's other thread run while this one spins."""
    def codegen(context, builder, signature, args):
        _external("llvm.x86.sse2.pause", ir.VoidType())(builder)
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def futex(typingctx, address, slot, operation, value, limit):
    """futex(2) on the low 32 bits of slot ``slot``: wait while it holds ``value``, for at most
    the timespec at address ``limit`` (0: none), or wake one waiter."""
    def codegen(context, builder, signature, args):
        address_, slot_, operation_, value_, limit_ = _int64s(context, builder, signature, args)
        word = builder.ptrtoint(_slot(builder, address_, slot_), _I64)
        return _syscall(builder, _SYS_FUTEX, word, operation_,
                        builder.and_(value_, _I64(0xFFFFFFFF)), limit_, _I64(0), _I64(0))
    return types.int64(address, slot, operation, value, limit), codegen


@intrinsic
def sched_yield(typingctx):
    """sched_yield(2): a waiting caller gives its core to a descheduled worker."""
    def codegen(context, builder, signature, args):
        _syscall(builder, _SYS_SCHED_YIELD)
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def run_job(typingctx, function, position, data, argument):
    """OpenBLAS's ``dojob(position, data, argument)``, a C function at address ``function``."""
    def codegen(context, builder, signature, args):
        function_, position_, data_, argument_ = _int64s(context, builder, signature, args)
        pointer = ir.IntType(8).as_pointer()
        callee = builder.inttoptr(
            function_, ir.FunctionType(ir.VoidType(), [_I32, pointer, _I32]).as_pointer())
        builder.call(callee, [builder.trunc(position_, _I32), builder.inttoptr(data_, pointer),
                              builder.trunc(argument_, _I32)])
        return context.get_dummy_value()
    return types.void(function, position, data, argument), codegen


@intrinsic
def own_threads(typingctx, jobs, data):
    """OpenBLAS's exec_blas(jobs, queue) on its own threads: our callback out for the call."""
    def codegen(context, builder, signature, args):
        jobs_, data_ = _int64s(context, builder, signature, args)
        pointer = ir.IntType(8).as_pointer()
        set_callback = _external(_SYMBOLS["set_callback"], ir.VoidType(), pointer)
        set_callback(builder, ir.Constant(pointer, None))
        _external(_SYMBOLS["exec_blas"], _I32, _I64, pointer)(
            builder, jobs_, builder.inttoptr(data_, pointer))
        return context.get_dummy_value()
    return types.void(jobs, data), codegen


@intrinsic
def install(typingctx, callback):
    """openblas_set_threads_callback_function(callback), from compiled code."""
    def codegen(context, builder, signature, args):
        (callback_,) = _int64s(context, builder, signature, args)
        pointer = ir.IntType(8).as_pointer()
        _external(_SYMBOLS["set_callback"], ir.VoidType(), pointer)(
            builder, builder.inttoptr(callback_, pointer))
        return context.get_dummy_value()
    return types.void(callback), codegen


def _matrix_at(dtype):
    """An intrinsic: the C-ordered (rows, columns) matrix of ``dtype`` at an address, with no
    meminfo (memory the caller owns and keeps alive: a task's arrays)."""
    matrix = types.Array(dtype, 2, "C")

    @intrinsic
    def matrix_at(typingctx, address, rows, columns):
        def codegen(context, builder, signature, args):
            address_, rows_, columns_ = _int64s(context, builder, signature, args)
            out = cgutils.create_struct_proxy(matrix)(context, builder)
            itemsize = context.get_constant(types.intp, np.dtype(str(dtype)).itemsize)
            populate_array(out, data=builder.inttoptr(address_, out.data.type),
                           shape=[rows_, columns_],
                           strides=[builder.mul(columns_, itemsize), itemsize],
                           itemsize=itemsize, meminfo=None, parent=None)
            return out._getvalue()
        return matrix(address, rows, columns), codegen
    return matrix_at


int32_matrix_at, int64_matrix_at = _matrix_at(types.int32), _matrix_at(types.int64)
float32_matrix_at, float64_matrix_at = _matrix_at(types.float32), _matrix_at(types.float64)
uint32_matrix_at = _matrix_at(types.uint32)

if numba.config.DISABLE_JIT:  # plain Python: the same views, by ctypes
    def _python_matrix_at(ctype):
        def matrix_at(address, rows, columns):
            flat = (ctype * int(rows * columns)).from_address(int(address))
            return np.ctypeslib.as_array(flat).reshape(rows, columns)
        return matrix_at

    int32_matrix_at = _python_matrix_at(ctypes.c_int32)  # noqa: F811
    int64_matrix_at = _python_matrix_at(ctypes.c_int64)  # noqa: F811
    float32_matrix_at = _python_matrix_at(ctypes.c_float)  # noqa: F811
    float64_matrix_at = _python_matrix_at(ctypes.c_double)  # noqa: F811
    uint32_matrix_at = _python_matrix_at(ctypes.c_uint32)  # noqa: F811

_jit = dict(nogil=True, cache=True)
_inline = numba.njit(inline="always", **_jit)


@_inline
def block_of(control, worker):
    return control + 8 * (HEADER + worker * BLOCK)


@_inline
def _spin(spins):
    """One round of a caller's wait: the pause hint, and now and then the core given away,
    for a worker or lock holder that the system has descheduled. Returns the rounds so far."""
    spins += 1
    if spins % _YIELD_EVERY == 0:
        sched_yield()
    else:
        pause()
    return spins


@_inline
def lock(control):
    spins = 0
    while not try_lock(control, LOCK):
        spins = _spin(spins)


@_inline
def unlock(control):
    store(control, LOCK, 0)


@_inline
def post(block, kind, job, data, argument):
    """Post a task to the worker of ``block``, its other fields already stored (the caller
    holds the lock), and wake the worker if it sleeps. Returns the task's number."""
    number = load(block, POSTED) + 1
    store(block, KIND, kind)
    store(block, JOB, job)
    store(block, JOB_DATA, data)
    store(block, JOB_ARGUMENT, argument)
    store(block, POSTED, number)
    if load(block, SLEEPING) != 0:
        futex(block, POSTED, _FUTEX_WAKE, 1, 0)
    return number


@_inline
def wait(block, number):
    """Spin until the worker of ``block`` has done task ``number``."""
    spins = 0
    while load(block, DONE) != number:
        spins = _spin(spins)


@_inline
def next_task(block, done):
    """Spin, then sleep, until a task after ``done`` is posted to ``block``; its number."""
    limit = control_address() + 8 * SLEEP_LIMIT
    spins = 0
    while True:
        number = load(block, POSTED)
        if number != done:
            return number
        spins += 1
        if spins < _SPINS:
            pause()
            continue
        store(block, SLEEPING, 1)
        if load(block, POSTED) == done:  # a post after this sees SLEEPING, and wakes us
            futex(block, POSTED, _FUTEX_WAIT, done, limit)
        store(block, SLEEPING, 0)
        spins = 0


# Calls of ours to _blas_jobs, from Python (``_control``), told apart from OpenBLAS's, whose job
# counts are positive: one compiled function rather than one more per operation (~0.15 s of a
# large model's first compile each).
INSTALL, HOLD, RELEASE = -1, -2, -3


def _blas_jobs(sync, job, jobs, job_size, data, argument):
    """OpenBLAS's threads callback: its ``jobs`` jobs at once, the first on the calling thread,
    job i on worker i - 1. Each must run beside the others (they wait on one another's packed
    blocks). With fewer workers than that (BLAS's thread count raised since ``ensure``), the
    call goes to OpenBLAS's own threads, and the next ``ensure`` puts the callback back.
    Our own calls: INSTALL publishes ``argument`` workers and installs the callback at
    ``data``, under the lock, never while a caller runs a call on OpenBLAS's own threads (the
    fallback); HOLD takes the lock and keeps it, RELEASE lets it go."""
    control = control_address()
    if jobs == RELEASE:
        unlock(control)
        return
    lock(control)
    if jobs == HOLD:
        return
    if jobs == INSTALL:
        store(control, WORKERS, max(argument, load(control, WORKERS)))
        install(data)
        unlock(control)
        return
    if jobs - 1 > load(control, WORKERS):
        # under the lock: a caller in callback mode must not run beside OpenBLAS's threads,
        # which would share their job slots and buffers (ensure reinstalls under it too)
        own_threads(jobs, data)
        unlock(control)
        return
    for worker in range(jobs - 1):
        post(block_of(control, worker), BLAS_JOB, job, data + (worker + 1) * job_size, argument)
    run_job(job, 0, data, argument)
    for worker in range(jobs - 1):
        block = block_of(control, worker)
        wait(block, load(block, POSTED))
    unlock(control)


_CALLBACK_SIGNATURE = types.void(types.int32, types.int64, types.int32, types.int64, types.int64,
                                 types.int32)
_callback = None  # _blas_jobs compiled, on the first ensure: a cfunc compiles when made
_started: list[threading.Thread] = []
_guard = threading.Lock()


def _control(operation: int, data: int = 0, argument: int = 0) -> None:
    """One of our own operations (INSTALL, HOLD, RELEASE) by the compiled callback."""
    call = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64,
                            ctypes.c_int64, ctypes.c_int32)(_callback.address)
    call(0, 0, operation, 0, data, argument)


def available() -> bool:
    return _BLAS is not None


def status() -> str:
    """Whether the pool runs BLAS's jobs here, and why not (for ``bpk info``)."""
    if _BLAS is None:
        return f"off ({_WHY_NOT})"
    return f"on ({len(_started)} workers)" if _started else "ready (starts with a large model)"


def _self_test() -> bool:
    """A product big enough for OpenBLAS to share out, computed through the pool, against the
    same product by OpenBLAS's own threads moments before; on any difference the pool is
    switched off for good (BLAS gets its own threads back, ``status`` says why)."""
    global _BLAS, _WHY_NOT
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 384)), rng.standard_normal((384, 320))
    _BLAS[0](None)
    expected = a @ b
    _control(INSTALL, _callback.address, len(_started))
    if np.allclose(a @ b, expected, rtol=1e-12, atol=1e-12):
        return True
    _BLAS[0](None)
    _BLAS, _WHY_NOT = None, "its self-test gave wrong products"
    return False


def blas_threads() -> int:
    return _BLAS[1]() if _BLAS is not None else 1


def ensure(worker_function, workers: int) -> int:
    """At least ``workers`` threads running ``worker_function(control, worker)`` and BLAS's
    parallel jobs routed to them, from now on; returns how many to use (0: no pool here). The
    first call should come while no other thread is inside BLAS (OpenBLAS's condition for
    setting the callback)."""
    if _BLAS is None or workers < 1:
        return 0
    global _callback
    workers = min(workers, MAX_WORKERS)
    control = _CONTROL.ctypes.data
    with _guard:
        if _callback is None:
            _CONTROL[SLEEP_LIMIT:SLEEP_LIMIT + 2] = _SLEEP_LIMIT
            # Compiled here, not in a thread: a compile error there would leave callers
            # spinning on a worker that never answers. Told to stop, it returns at once,
            # answering with the layout it was compiled for.
            _CONTROL[HEADER + KIND], _CONTROL[HEADER + POSTED] = STOP, 1
            worker_function(control, 0)
            if _CONTROL[HEADER + RESULT] != LAYOUT:
                raise RuntimeError("bpkernels: the Numba cache holds kernels compiled for "
                                   "another version of backends/numba/_native/pool.py; delete it "
                                   "(NUMBA_CACHE_DIR or the backends' __pycache__)")
            _CONTROL[HEADER:] = 0
            _callback = numba.cfunc(_CALLBACK_SIGNATURE, **_jit)(_blas_jobs)
        # As many as OpenBLAS may ask for (a thread count up to the cores), so that raising
        # BLAS's threads later does not send calls to its own threads (the fallback of
        # _blas_jobs); idle ones sleep.
        wanted = min(max(workers, (os.cpu_count() or 1) - 1), MAX_WORKERS)
        started = len(_started)
        for worker in range(started, wanted):
            thread = threading.Thread(target=worker_function, args=(control, worker),
                                      name=f"bpkernels-blas-{worker}", daemon=True)
            thread.start()
            _started.append(thread)
        # Published once in compiled code: a caller holding the GIL (a product from a C
        # extension) must not wait on a worker still starting up in Python.
        for worker in range(started, wanted):
            while not _CONTROL[HEADER + worker * BLOCK + READY]:
                if not _started[worker].is_alive():
                    raise RuntimeError(f"bpkernels: BLAS worker {worker} did not start")
                time.sleep(0)
        first = started == 0
        _control(INSTALL, _callback.address, len(_started))
        if first and not _self_test():
            return 0
    return workers


def _shutdown() -> None:
    """At exit: BLAS's jobs back to OpenBLAS's threads (ours, daemons, end with the process)."""
    if _BLAS is not None and _started:
        _BLAS[0](None)


def _before_fork() -> None:
    """No BLAS call in flight on the pool while the process forks: OpenBLAS's own fork handler
    shuts its threads down, and a job of ours running meanwhile would keep one from ending."""
    if _started:
        _control(HOLD)


def _after_fork_in_parent() -> None:
    if _started:
        _control(RELEASE)


def _after_fork_in_child() -> None:
    """A child has none of the workers: BLAS gets its own threads back."""
    global _guard, _callback
    _guard = threading.Lock()
    if _BLAS is not None:
        _BLAS[0](None)
    _CONTROL[:] = 0
    _callback = None
    _started.clear()


atexit.register(_shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
