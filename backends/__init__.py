"""The backend registry: name -> backend, "auto", and why a backend is unavailable.

Backends are imported lazily, the first time they are asked for, so ``import bpkernels``
never needs Numba, CuPy or a GPU.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .base import Backend


class BackendUnavailable(ImportError):
    """A backend exists but cannot run here (package missing, no device)."""


# name -> (module, class, pip extra that provides it); the order of preference for "auto"
# is fastest first.
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "cupy": (".cupy_backend", "CupyBackend", "cuda12"),
    "numba": (".numba", "NumbaBackend", "numba"),
    "numpy": (".numpy_backend", "NumpyBackend", None),
}

_instances: dict[str, Backend] = {}
_unavailable: dict[str, str] = {}
_threads: int | None = None  # the count of set_num_threads, for backends loaded later


def backend_names() -> tuple[str, ...]:
    """Every backend this version knows, available here or not."""
    return tuple(sorted(_REGISTRY))


def _load(name: str) -> Backend:
    if name in _instances:
        return _instances[name]
    if name in _unavailable:
        raise BackendUnavailable(_unavailable[name])
    module_name, class_name, extra = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name, __name__)
        backend = getattr(module, class_name)()
    except BackendUnavailable as err:
        _unavailable[name] = str(err)
        raise
    except ImportError as err:
        # A missing third-party package is the user's to install; a missing module of our own
        # or a broken library (a CUDA runtime that fails to load) is reported as it is.
        missing = (err.name or "").split(".")[0]
        if isinstance(err, ModuleNotFoundError) and missing and missing != "bpkernels":
            hint = f'pip install "bpkernels[{extra}]"' if extra else "reinstall bpkernels"
            reason = f"backend {name!r} needs the package {missing!r}: {hint}"
        else:
            reason = f"backend {name!r} failed to import: {err}"
        _unavailable[name] = reason
        raise BackendUnavailable(reason) from None
    except (OSError, MemoryError) as err:
        # A shared library that cannot be mapped (a low ``ulimit -v``, a broken install):
        # "auto" goes on to the next backend, and the reason names what failed.
        what = "ran out of memory" if isinstance(err, MemoryError) else "failed to load a library"
        reason = f"backend {name!r} {what} while importing: {type(err).__name__}: {err}"
        _unavailable[name] = reason
        raise BackendUnavailable(reason) from None
    if _threads is not None:
        _apply_threads(backend, _threads)
    _instances[name] = backend
    return backend


def set_num_threads(n: int | None) -> None:
    """Run every backend on at most ``n`` threads: ``Backend.set_threads`` of each backend
    loaded now (asked for at most its ``max_threads``), and of each backend when it is first
    loaded. ``None`` records that no count is requested (backends loaded later keep their own
    defaults) and changes no loaded backend. ``bpkernels.set_num_threads`` calls this; it also
    limits NumPy's BLAS."""
    global _threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"the thread count must be an integer >= 1 or None, got {n!r}")
    _threads = n
    if n is not None:
        for backend in list(_instances.values()):
            _apply_threads(backend, n)


def _apply_threads(backend: Backend, n: int) -> None:
    # A budget, not a demand: a pool fixed at start-up smaller than n runs on all of it.
    limit = backend.max_threads
    backend.set_threads(n if limit is None else min(n, limit))


def get_backend(name: str | Backend = "auto", bf16: bool = False) -> Backend:
    """The backend called ``name`` ("auto": the fastest one available here; with ``bf16``,
    the fastest that runs dtype="bf16", which the NumPy reference always does)."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (str), got {type(name).__name__}")
    if name == "auto":
        for candidate in _REGISTRY:
            try:
                backend = _load(candidate)
            except BackendUnavailable:
                continue
            if not bf16 or backend.bf16_unavailable() is None:
                return backend
        raise BackendUnavailable("no backend can run here: " + "; ".join(_unavailable.values()))
    if name not in _REGISTRY:
        valid = ", ".join(("auto",) + backend_names())
        raise ValueError(f"unknown backend {name!r}; valid backends: {valid}")
    return _load(name)


def available_backends() -> list[str]:
    """Names of the backends that can run here, fastest first."""
    names = []
    for name in _REGISTRY:
        try:
            _load(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def unavailable_reasons() -> dict[str, str]:
    """For each backend that cannot run here, why (and the pip extra that fixes it)."""
    available_backends()
    return dict(_unavailable)


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Add a backend made by ``factory`` under ``name`` (for third-party backends and tests)."""
    backend = factory()
    if not isinstance(backend, Backend):
        raise TypeError(f"a backend must subclass bpkernels.backends.base.Backend, got {type(backend).__name__}")
    if _threads is not None:
        _apply_threads(backend, _threads)
    _instances[name] = backend
    _unavailable.pop(name, None)
    _REGISTRY.setdefault(name, ("", "", None))


__all__ = ["Backend", "BackendUnavailable", "available_backends", "backend_names",
           "get_backend", "register", "set_num_threads", "unavailable_reasons"]
