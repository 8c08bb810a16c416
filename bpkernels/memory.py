"""Memory estimates checked before allocating: a model, its training state, its workspaces and
the data are refused with one error naming the sizes, instead of a MemoryError halfway (or the
kernel's OOM killer, which no Python code sees).

The estimates count the large buffers only (a few per layer and per data set), so they are a
little below what is used; the check refuses what cannot fit, never what might.
"""
from __future__ import annotations

from typing import Any, Sequence

from .backends import host
from .backends.base import Backend
from .backends.host import InsufficientMemory, check, size_text
from .interop import host_backend

__all__ = ["InsufficientMemory", "check", "check_on", "size_text", "workspace_bytes", "describe",
           "check_address_space_for_training", "out_of_memory", "n_parameters"]


def check_on(backend: Backend, what: str, host_parts: dict[str, int],
             device_parts: dict[str, int]) -> None:
    """Check ``device_parts`` against the backend's memory and ``host_parts`` against the
    host's; on a host backend (numpy, numba) both against the host's, together."""
    if host_backend(backend):
        check(what, {**device_parts, **host_parts}, backend.memory_available())
        return
    check(what, device_parts, backend.memory_available())
    check(what, host_parts, host.memory_available())


def n_parameters(sizes: Sequence[int], norm: str | None) -> int:
    """The length of the flat parameter buffer: W and b per layer, LayerNorm's gamma and beta
    per hidden layer with ``norm``."""
    layers = list(zip(sizes[:-1], sizes[1:]))
    normed = sum(2 * o for _, o in layers[:-1]) if norm is not None else 0
    return sum(i * o + o for i, o in layers) + normed


def workspace_bytes(sizes: tuple[int, ...], extra: list[int], rows: int, itemsize: int,
                    target_bytes_per_row: int) -> int:
    """The buffers of one workspace (bpkernels.model.Workspace) for ``rows`` rows: X, each
    layer's A and dA, and ``extra[l]`` more of layer l's width (its Z, dropout's D)."""
    widths = sizes[1:]
    per_row = sizes[0] + 2 * sum(widths) + sum(w * int(k) for w, k in zip(widths, extra))
    return rows * (per_row * itemsize + target_bytes_per_row)


def describe(model: Any) -> str:
    return f"MLP {list(model.sizes)} in {model.dtype.name} on backend '{model.backend.name}'"


# Address space `bpk train` maps beyond `import bpkernels` (measured with Python 3.11 on 2
# cores: ~250 MiB for scikit-learn, SciPy and the BLAS buffers, ~200 MiB more for Numba and
# LLVM compiling): under a lower `ulimit -v` a library fails to load, or OpenBLAS or LLVM
# abort the process where no handler can report it, so the run is refused before it starts.
LIBRARY_BYTES = 256 * 2**20
NUMBA_BYTES = 256 * 2**20


def check_address_space_for_training(backend: str | None) -> None:
    """InsufficientMemory when ``ulimit -v`` leaves too little room for the libraries that
    `bpk train` on ``backend`` (None: "auto") loads; nothing without such a limit."""
    free, source = host.address_space_available()
    if free is None:
        return
    needs = {"scikit-learn, SciPy and the BLAS": LIBRARY_BYTES}
    if backend in (None, "auto", "numba"):
        needs["Numba and LLVM (--backend numpy does without)"] = NUMBA_BYTES
    check("bpk train", needs, (free, source))


def out_of_memory(err: MemoryError) -> str:
    """One line for a MemoryError that no estimate foresaw, with the memory available now."""
    free, source = host.memory_available()
    what = f"out of memory: {err}" if str(err) else "out of memory"
    return (f"{what} ({size_text(free)} available now, {source}); a smaller model, batch or "
            "data set, or a higher limit, may fit")
