"""Memory estimates checked before allocating: a model, its training state, its workspaces and
the data are refused with one error naming the sizes, instead of a MemoryError halfway (or the
kernel's OOM killer, which no Python code sees).

The estimates count the large buffers only (a few per layer and per data set), so they are a
little below what is used; the check refuses what cannot fit, never what might.
"""
from __future__ import annotations

from typing import Any

from .backends import host
from .backends.base import Backend
from .backends.host import InsufficientMemory, check, size_text
from .interop import host_backend

__all__ = ["InsufficientMemory", "check", "check_on", "size_text", "workspace_bytes", "describe"]


def backend_available(backend: Backend) -> tuple[int, str]:
    """(bytes, what limits them) of the memory the backend's arrays live in."""
    return backend.memory_available()


def check_on(backend: Backend, what: str, host_parts: dict[str, int],
             device_parts: dict[str, int]) -> None:
    """Check ``device_parts`` against the backend's memory and ``host_parts`` against the
    host's; on a host backend (numpy, numba) both against the host's, together."""
    if host_backend(backend):
        check(what, {**device_parts, **host_parts}, backend_available(backend))
        return
    check(what, device_parts, backend_available(backend))
    check(what, host_parts, host.memory_available())


def workspace_bytes(sizes: tuple[int, ...], keeps_z: list[bool], rows: int, itemsize: int,
                    target_bytes_per_row: int) -> int:
    """The buffers of one workspace (bpkernels.model.Workspace) for ``rows`` rows."""
    widths = sizes[1:]
    per_row = sizes[0] + 2 * sum(widths) + sum(w for w, z in zip(widths, keeps_z) if z)
    return rows * (per_row * itemsize + target_bytes_per_row)


def describe(model: Any) -> str:
    return f"MLP {list(model.sizes)} in {model.dtype.name} on backend '{model.backend.name}'"
