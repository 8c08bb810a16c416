"""Facts about the host machine that several layers need, found in one place: the CPU's name
and the files of the OpenBLAS that NumPy's wheels bundle.

Plain Python (no Numba, no ctypes loading): the engine (bpkernels/threads.py, the CLI, the
benchmark) and the backends read them from here.
"""
from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys
from functools import lru_cache

import numpy as np

__all__ = ["cpu_name", "numpy_blas_libraries"]

# /proc/cpuinfo's "CPU implementer" codes on ARM (the Arm ARM's MIDR_EL1 table), for kernels that
# print no model name: the vendor is then the most we can say without a table of part numbers.
_ARM_IMPLEMENTERS = {0x41: "Arm", 0x42: "Broadcom", 0x43: "Cavium", 0x46: "Fujitsu",
                     0x48: "HiSilicon", 0x4E: "NVIDIA", 0x50: "Ampere (APM)", 0x51: "Qualcomm",
                     0x53: "Samsung", 0x61: "Apple", 0xC0: "Ampere"}


def numpy_blas_libraries() -> list[str]:
    """Paths of the OpenBLAS libraries NumPy's wheels bundle (Linux and Windows: numpy.libs
    beside the package; macOS: numpy/.dylibs), sorted; empty for a NumPy built against a
    system BLAS or MKL. NumPy has loaded the one it uses already, so ctypes.CDLL(path) gives
    the same handle."""
    package = os.path.dirname(np.__file__)
    found: list[str] = []
    for folder in (os.path.join(package, os.pardir, "numpy.libs"), os.path.join(package, ".dylibs")):
        found += sorted(glob.glob(os.path.join(folder, "*openblas*")))
    return found


@lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU's name, e.g. "AMD EPYC 7763 64-Core Processor" or "Apple M2": on Linux
    /proc/cpuinfo's "model name" (x86; platform.processor() there is only "x86_64"), on ARM
    Linux its "Model"/"Hardware" line or else the vendor of "CPU implementer", on macOS the
    brand string sysctl reports; else platform.processor() or platform.machine()."""
    if sys.platform.startswith("linux"):
        name = _linux_cpu_name()
    elif sys.platform == "darwin":
        name = _sysctl("machdep.cpu.brand_string")
    else:
        name = None
    return name or platform.processor() or platform.machine() or "unknown"


def _linux_cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    for key in ("model name", "Model", "Hardware"):
        if fields.get(key):
            return fields[key]
    try:
        implementer = int(fields.get("CPU implementer", ""), 0)
    except ValueError:
        return None
    vendor = _ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer:#x}")
    part = fields.get("CPU part")
    return f"{vendor} {platform.machine()}" + (f" (part {part})" if part else "")


def _sysctl(name: str) -> str | None:
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None
