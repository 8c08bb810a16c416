"""Builds a CUDA source into a host shared library whose kernels run their grid serially on
the CPU (see cpu_emulation.h), and calls those kernels through ctypes.

Libraries are cached by a hash of everything that goes into them (source, options, the
emulation header, the compiler), under the temporary directory: each is compiled once per
machine, not once per test session.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().parent / "cpu_emulation.h"
CACHE = Path(tempfile.gettempdir()) / "bpkernels-cudasim"
_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\s*\(')
_FLAGS = ("-std=c++14", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Wextra",
          "-Werror")


class CompilerUnavailable(RuntimeError):
    """No host C++ compiler here: the CPU emulation of the CUDA kernels cannot be built."""


def host_compiler() -> str:
    """$CXX, else c++, g++ or clang++ from PATH (nvcc itself needs one of them)."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise CompilerUnavailable("no host C++ compiler (set CXX, or install g++)")


def build(code: str, options: tuple[str, ...] = ()) -> Path:
    """The shared library of ``code`` (one CUDA source) compiled with ``options`` (-D only)."""
    for option in options:
        if not option.startswith("-D"):
            raise ValueError(f"cudasim: unsupported compiler option {option!r}")
    compiler = host_compiler()
    names = _KERNEL.findall(code)
    exports = "".join(f"CUDASIM_EXPORT({name})\n" for name in names)
    text = code + "\n" + exports
    digest = hashlib.sha256("\0".join(
        [text, HEADER.read_text(), compiler, *options, *_FLAGS]).encode()).hexdigest()[:24]
    library = CACHE / f"{digest}.so"
    if library.exists():
        return library
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        source = Path(work) / "module.cpp"
        source.write_text(text)
        output = Path(work) / "module.so"
        result = subprocess.run([compiler, *_FLAGS, "-include", str(HEADER), *options,
                                 "-x", "c++", str(source), "-o", str(output)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"cudasim: the CPU build of a CUDA source failed:\n{result.stderr}")
        os.replace(output, library)  # atomic: parallel sessions never see half a library
    return library


class Signature:
    """One kernel parameter: its size, whether a pointer or a float, and for a pointer the size
    and float-ness of what it points to (0 for void)."""

    def __init__(self, row) -> None:
        self.size, self.pointer, self.floating, self.pointee_size, self.pointee_floating = \
            (int(x) for x in row)


class Library:
    """The kernels of one built source: ``launch(name, grid, block, argv)`` and their
    ``signature(name)``."""

    def __init__(self, path: Path) -> None:
        self._lib = ctypes.CDLL(str(path))
        self._signatures: dict[str, list[Signature]] = {}

    def signature(self, name: str) -> list[Signature]:
        if name not in self._signatures:
            try:
                fn = getattr(self._lib, f"cudasim_signature_{name}")
            except AttributeError:
                raise AttributeError(f"cudasim: no kernel named {name!r} in the module") from None
            fn.restype = ctypes.c_int
            rows = np.zeros((64, 5), np.int64)
            count = fn(rows.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong)), rows.size)
            self._signatures[name] = [Signature(r) for r in rows[:count]]
        return self._signatures[name]

    def launch(self, name: str, dims: tuple[int, ...], argv) -> None:
        fn = getattr(self._lib, f"cudasim_launch_{name}")
        fn((ctypes.c_uint * 6)(*dims), argv)
