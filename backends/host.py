"""Facts about the host machine that several layers need, found in one place: the CPU's name,
the files of the OpenBLAS that NumPy's wheels bundle, and the memory a process may still take.

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

__all__ = ["InsufficientMemory", "address_space_available", "check", "cpu_name",
           "memory_available", "numpy_blas_libraries",
           "size_text"]

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


class InsufficientMemory(MemoryError):
    """The memory an operation needs, estimated before allocating, exceeds what is available.
    ``needed`` and ``available`` are byte counts; the message names the parts."""

    def __init__(self, message: str, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed, self.available = needed, available


def size_text(nbytes: float) -> str:
    """A byte count for people: "512 B", "3.0 MiB", "29.8 GiB", "3.6 TiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def check(what: str, parts: dict[str, int], available: tuple[int, str]) -> None:
    """InsufficientMemory when the parts (name -> bytes; zero parts are left out of the
    message) add up to more than ``available`` (bytes, what limits them)."""
    needed = sum(parts.values())
    free, source = available
    if needed <= free:
        return
    listed = ", ".join(f"{name} {size_text(n)}" for name, n in parts.items() if n)
    raise InsufficientMemory(f"{what} needs {size_text(needed)} ({listed}), but only "
                             f"{size_text(free)} is available ({source})", needed, free)


def memory_available() -> tuple[int, str]:
    """(bytes, what limits them): the least of the memory the kernel could give without
    swapping (/proc/meminfo MemAvailable), what the process's cgroup still allows (v2
    memory.max, v1 memory.limit_in_bytes, less the usage) and its address-space limit
    (``ulimit -v``, RLIMIT_AS, less what is mapped). Read afresh on each call; a source that
    cannot be read does not count (where none can, the result is unbounded)."""
    found = [(b, why) for b, why in (_meminfo_available(), _cgroup_available(),
                                     address_space_available()) if b is not None]
    return min(found) if found else (sys.maxsize, "no limit found")


def _meminfo_available(path: str = "/proc/meminfo") -> tuple[int | None, str]:
    why = "MemAvailable in /proc/meminfo"
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, why
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS and the BSDs: free pages only (a lower bound of what could be had)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical memory"
    except (ValueError, OSError, AttributeError):
        return None, why


def _cgroup_available(proc: str = "/proc/self/cgroup",
                      root: str = "/sys/fs/cgroup") -> tuple[int | None, str]:
    try:
        with open(proc, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            files, folder = ("memory.max", "memory.current"), root
        elif "memory" in controllers.split(","):
            files, folder = ("memory.limit_in_bytes", "memory.usage_in_bytes"), root + "/memory"
        else:
            continue
        # Inside a container the cgroup namespace makes its own cgroup the root of the mount.
        for where in (folder + path, folder):
            limit, usage = (_read_int(f"{where}/{name}") for name in files)
            if limit is not None and usage is not None:
                if limit >= sys.maxsize:
                    return None, ""
                return max(0, limit - usage), f"the cgroup's {files[0]} ({_gib(limit)})"
    return None, ""


def address_space_available(status: str = "/proc/self/status") -> tuple[int | None, str]:
    """(bytes, what limits them) left under the address-space limit (``ulimit -v``), which
    counts every library mapped and every thread's reserved stack and heap, not only data;
    (None, "") where there is no such limit."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None, ""
    if soft == resource.RLIM_INFINITY:
        return None, ""
    mapped = 0
    try:
        with open(status, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - mapped), f"the address-space limit (ulimit -v {soft // 1024})"


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return sys.maxsize
    try:
        value = int(text)
    except ValueError:
        return None
    # cgroup v1 writes "no limit" as the largest page-aligned 64-bit count.
    return sys.maxsize if value >= 1 << 62 else value


def _gib(nbytes: int) -> str:
    return "no limit" if nbytes >= sys.maxsize else size_text(nbytes)


def no_gpu_driver_note() -> str:
    """CUDA says "driver version is insufficient" where there is no driver at all (a CPU-only
    machine with CuPy installed): say that instead, where Linux shows it."""
    if os.path.isdir("/proc") and not os.path.exists("/proc/driver/nvidia/version"):
        return " (no NVIDIA driver is loaded: no GPU here)"
    return ""
