"""The thread budget of bpkernels: one count for NumPy's BLAS and Numba's parallel kernels.

``set_num_threads(n)`` keeps the whole process on at most ``n`` threads from then on;
``limit_threads(n)`` does it for a block and then restores the counts it found (also when the
block raises). ``get_num_threads()`` says what is in force.

- BLAS: through threadpoolctl where it is installed (every BLAS loaded in the process), else
  through the thread functions of the OpenBLAS that NumPy's wheels bundle (by ctypes); where
  neither can reach NumPy's BLAS, setting a count raises an ImportError naming threadpoolctl.
  BLAS libraries keep one count per process.
- Numba: ``numba.set_num_threads`` holds per calling thread and cannot exceed the pool Numba
  starts with (NUMBA_NUM_THREADS, every core by default). The count is a budget, so Numba gets
  ``min(n, NUMBA_NUM_THREADS)`` rather than an error, while BLAS gets ``n``. Numba is never
  imported here (it takes seconds): the count reaches the backends through the registry
  (``bpkernels.backends.set_num_threads``: ``Backend.set_threads`` of every backend loaded now
  and of each one loaded later), and ``limit_threads()`` (no count) applies the process's
  count to the thread that enters it, which is how a training run in another thread honors it.
"""
from __future__ import annotations

import contextlib
import ctypes
import numbers
import os
import sys
import threading
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np

from . import backends
from .backends.host import numpy_blas_libraries
from .validation import shown

__all__ = ["set_num_threads", "get_num_threads", "limit_threads", "requested_num_threads"]

_lock = threading.RLock()
_requested: int | None = None  # the count in force by set_num_threads / limit_threads


def set_num_threads(n: int) -> None:
    """Run bpkernels (NumPy's BLAS and the Numba backend) on at most ``n`` threads from now on.
    ``n``: an integer >= 1; Numba takes at most its pool size (NUMBA_NUM_THREADS)."""
    global _requested
    n = _check_count(n)
    with _lock:
        _limit_blas(n)  # first: a BLAS out of reach fails before anything changed
        _requested = n
        _apply_backends(n)
        _apply_numba(n)


def get_num_threads() -> int:
    """The thread count in force: the one set by :func:`set_num_threads` or the innermost
    :func:`limit_threads` block, else the count NumPy's BLAS runs on now (its default: the
    cores, or OPENBLAS_NUM_THREADS / OMP_NUM_THREADS), else the number of cores."""
    if _requested is not None:
        return _requested
    blas = _blas_threads()
    return blas if blas is not None else os.cpu_count() or 1


def requested_num_threads() -> int | None:
    """The count set by set_num_threads or limit_threads, None while the libraries' own
    defaults rule."""
    return _requested


class _Block:
    """An open ``limit_threads(n)`` block: what closing it restores."""

    def __init__(self, previous: int | None, restore_blas: Callable[[], None]) -> None:
        self.previous, self.restore_blas = previous, restore_blas


# The open limit_threads(n) blocks of every thread, oldest first. Blocks in concurrent threads
# can close in any order: one that closes under a newer block hands what it would restore to
# that block, so the newer block's count stays in force and the last to close restores the
# counts found before the first (a plain restore-on-exit would undo the newer block's count,
# then reinstate the older block's for good).
_blocks: list[_Block] = []


@contextlib.contextmanager
def limit_threads(n: int | None = None) -> Iterator[None]:
    """``with limit_threads(n):`` runs the block on at most ``n`` threads (as set_num_threads),
    then restores the previous counts, also when the block raises. ``n=None`` changes no count
    but applies the process's count (if one was set) to Numba in the calling thread for the
    block: Numba keeps its count per thread, and training may run in a thread of its own.
    BLAS's count is one per process, so blocks in concurrent threads should use the same n."""
    global _requested
    if n is not None:
        n = _check_count(n)
    block = None
    with _lock:
        count = _requested if n is None else n
        numba_before = None
        if n is not None:
            restore_blas = _limit_blas(n)
            numba_before = _numba_threads()
            try:
                _apply_backends(n)
                _apply_numba(n)
            except BaseException:
                backends.set_num_threads(_requested)
                restore_blas()
                raise
            block = _Block(_requested, restore_blas)
            _blocks.append(block)
            _requested = n
        elif count is not None:
            numba_before = _numba_threads()
            _apply_numba(count)
    try:
        yield
    finally:
        if count is not None:
            with _lock:
                if block is not None:
                    _close(block)
                _restore_numba(numba_before, _requested)


def _close(block: _Block) -> None:
    global _requested
    i = _blocks.index(block)
    del _blocks[i]
    if i < len(_blocks):  # a newer block is open: it restores what this one would have
        _blocks[i].previous, _blocks[i].restore_blas = block.previous, block.restore_blas
        return
    backends.set_num_threads(block.previous)
    block.restore_blas()  # after: a backend's set_threads may have set BLAS too
    _requested = block.previous


def _check_count(n: object) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"the thread count must be an integer >= 1, got {shown(n)}")
    if n < 1:
        raise ValueError(f"the thread count must be an integer >= 1, got {n}")
    return int(n)


# ---------------------------------------------------------------------------------- backends
def _apply_backends(n: int) -> None:
    """The registry's count for every backend, loaded now or later. BLAS is set again after:
    a backend's set_threads may limit BLAS to its own pool's size, and the budget is ``n``."""
    backends.set_num_threads(n)
    _set_blas(n)


def _set_blas(n: int) -> None:
    try:
        import threadpoolctl
    except ImportError:
        _numpy_openblas()[1](n)
        return
    with _blas_control(threadpoolctl):
        threadpoolctl.threadpool_limits(limits=n, user_api="blas")


# ---------------------------------------------------------------------------------- Numba
def _numba():
    """The numba module where something has imported it already, else None."""
    return sys.modules.get("numba")


def _numba_threads() -> int | None:
    numba = _numba()
    return None if numba is None else numba.get_num_threads()


def _apply_numba(n: int) -> None:
    numba = _numba()
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _restore_numba(before: int | None, requested: int | None) -> None:
    numba = _numba()
    if numba is None:
        return
    if before is None:
        # Numba was imported inside the block: it starts out on the process's count, or its
        # own default (the whole pool).
        before = numba.config.NUMBA_NUM_THREADS if requested is None else \
            min(requested, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(before)


# ---------------------------------------------------------------------------------- BLAS
def _limit_blas(n: int) -> Callable[[], None]:
    """Put BLAS on ``n`` threads; returns what restores the counts it had."""
    try:
        import threadpoolctl
    except ImportError:
        get, set_ = _numpy_openblas()
        before = get()
        set_(n)
        return lambda: set_(before)
    with _blas_control(threadpoolctl):
        limiter = threadpoolctl.threadpool_limits(limits=n, user_api="blas")

    def restore() -> None:
        with _blas_control(threadpoolctl):
            limiter.restore_original_limits()
    return restore


@contextlib.contextmanager
def _blas_control(threadpoolctl) -> Iterator[None]:
    """Let the calling thread set the count of an OpenBLAS with its own thread pool: threadpoolctl
    (3.8) lets only the first thread that sets one (while it lives) do so, and silently ignores
    every other thread, so a limit set in a worker thread would do nothing. The count
    bpkernels sets is the process's, set under _lock: take control for the call, then give it
    back so that the application's own threadpoolctl calls keep working."""
    clear = getattr(getattr(threadpoolctl, "OpenBLASController", None),
                    "clear_controlling_thread", None)
    if clear is None:  # an older threadpoolctl: any thread sets the count
        yield
        return
    clear(force=True)
    try:
        yield
    finally:
        clear()


def _blas_threads() -> int | None:
    """The most threads any BLAS in the process runs on now; None where none can be asked."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        try:
            get, _ = _numpy_openblas()
        except ImportError:
            return None
        return get()
    counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return max(counts) if counts else None


# OpenBLAS's thread functions under the names of the builds NumPy's wheels ship: NumPy >= 2
# bundles scipy-openblas (64- or 32-bit integers), NumPy 1.x openblas64_ or plain OpenBLAS.
_OPENBLAS_NAMES = (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                   ("openblas", ""))


@lru_cache(maxsize=None)
def _numpy_openblas() -> tuple[Callable[[], int], Callable[[int], None]]:
    """(get, set) of the thread count of the OpenBLAS bundled with NumPy
    (backends.host.numpy_blas_libraries)."""
    for path in numpy_blas_libraries():
        try:
            library = ctypes.CDLL(path)  # already loaded by NumPy: the same handle
        except OSError:
            continue
        for prefix, suffix in _OPENBLAS_NAMES:
            get = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.argtypes, get.restype = [], ctypes.c_int
                set_.argtypes, set_.restype = [ctypes.c_int], None
                return get, set_
    raise ImportError("bpkernels cannot reach the thread count of the BLAS that NumPy "
                      f"{np.__version__} uses (not a bundled OpenBLAS); install threadpoolctl to "
                      "limit it: pip install threadpoolctl")
