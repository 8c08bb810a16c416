"""The CUDA C sources of the CuPy backend (``cuda/*.cu``), as the compilers receive them.

Importable without CuPy or a GPU: the backend compiles these texts with NVRTC, and the tests
compile the very same texts with nvcc (PTX, syntax and type check) and with a host C++
compiler under a header that runs each grid serially on the CPU.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
SOURCES = ("dense.cu", "loss.cu", "optim.cu")
DTYPES = ("float32", "float64")
_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)
_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\s*\(')


@lru_cache(maxsize=None)
def source(name: str) -> str:
    """The text of ``cuda/<name>`` with its local ``#include "..."`` headers spliced in: one
    self-contained string, so the compiler cache of CuPy keys on every line that is compiled."""
    text = (CUDA_DIR / name).read_text()
    return _INCLUDE.sub(lambda m: (CUDA_DIR / m.group(1)).read_text(), text)


def kernel_names(name: str) -> tuple[str, ...]:
    """The ``extern "C"`` kernels a source defines, in order."""
    return tuple(_KERNEL.findall(source(name)))


def options(dtype) -> tuple[str, ...]:
    """Compiler options of the module built for ``dtype`` (float32 or float64)."""
    real = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    return (f"-DREAL={real}",)
