"""Runs the CuPy backend without a GPU: its production CUDA kernels built for the CPU
(compiler.py, cpu_emulation.h) behind a strict stand-in for CuPy (shim.py).

``register()`` adds the backend ``cupy-cudasim`` to the registry: the real
``backends/cupy_backend.py``, loaded a second time with ``cupy`` bound to the shim, so that the
whole parametrized suite runs through its host code (buffers, launches, graph capture and
replay, streams, transfers) and its kernels. Only tests do this; the package never does.
``make_backend(nccl=False)`` gives the backend of a CuPy installed without NCCL.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from . import compiler, shim

NAME = "cupy-cudasim"
_why_not: list[str] = []


def unavailable_reason() -> str | None:
    """Why the emulation cannot run here (no host C++ compiler), or None."""
    if not _why_not:
        try:
            compiler.host_compiler()
            _why_not.append("")
        except compiler.CompilerUnavailable as err:
            _why_not.append(str(err))
    return _why_not[0] or None


# The backend's modules that import cupy, each loaded after those it imports: every one is
# copied, so that the copy of cupy_backend imports the shim's copy of cupy_graphs.
_MODULES = ("cupy_graphs", "cupy_mixed", "cupy_backend")


def load_backend_module(nccl: bool = True):
    """A fresh copy of bpkernels.backends.cupy_backend whose ``cupy`` is the shim (with its
    ``cupy.cuda.nccl`` unless ``nccl`` is False), and so is that of the modules it imports."""
    import bpkernels.backends as package
    folder = Path(package.__file__).resolve().parent
    replacements = shim.modules(nccl=nccl)
    # A real CuPy imported earlier in the process (installed on a machine without a GPU) has
    # its submodules in sys.modules: each is hidden while the copy loads, or an import the shim
    # lacks (``cupy.cuda.nccl`` of a CuPy without NCCL) would find the real one. None in
    # sys.modules makes such an import fail, as it does where CuPy lacks the module.
    hidden = {name: None for name in sys.modules if name.split(".")[0] in ("cupy", "cupyx")}
    hidden.update(replacements)
    if not nccl:
        hidden["cupy.cuda.nccl"] = None
    # while the copies load, their relative imports (``from .cupy_graphs import``) find the
    # copies, not the real modules (bound to a real CuPy, or to none)
    hidden.update({f"bpkernels.backends.{name}": None for name in _MODULES})
    saved = {name: sys.modules.get(name, _ABSENT) for name in hidden}
    sys.modules.update(hidden)
    try:
        for name in _MODULES:
            spec = importlib.util.spec_from_file_location(
                f"bpkernels.backends._{name}_cudasim", folder / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[f"bpkernels.backends.{name}"] = module
    finally:
        for name, previous in saved.items():
            if previous is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


_ABSENT = object()


_modules: dict[bool, object] = {}


def backend_module(nccl: bool = True):
    if nccl not in _modules:
        _modules[nccl] = load_backend_module(nccl)
    return _modules[nccl]


def make_backend(nccl: bool = True, **options):
    """A CupyBackend on the shim, named ``cupy-cudasim`` (``nccl``: whether its CuPy has
    NCCL)."""
    backend = backend_module(nccl).CupyBackend(**options)
    backend.name = NAME
    return backend


def register() -> bool:
    """Add ``cupy-cudasim`` to the registry when the emulation can run here."""
    if unavailable_reason() is not None:
        return False
    from bpkernels.backends import register as add
    add(NAME, make_backend)
    return True
