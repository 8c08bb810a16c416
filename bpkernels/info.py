"""``bpk info``: the installation and the machine, as one JSON-able report (``collect_info``)
or as text (``print_info``)."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import numpy as np

import bpkernels
from .backends import backend_names, get_backend
from .backends.host import cpu_name

_OPTIONAL_PACKAGES = ("numba", "cupy-cuda12x", "cupy-cuda13x", "cupy", "scikit-learn", "tqdm")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _usable_cores() -> int | None:
    # The cores this process may run on (taskset, containers), when the OS says.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _backend_report() -> dict[str, dict[str, Any]]:
    from .backends import available_backends, unavailable_reasons
    available = set(available_backends())
    reasons = unavailable_reasons()
    report: dict[str, dict[str, Any]] = {}
    for name in backend_names():
        if name in available:
            try:
                backend = get_backend(name)
                device = backend.device_info()
                bf16 = backend.bf16_unavailable()
            except Exception as err:  # a broken driver must not hide the rest of the report
                device, bf16 = {"error": f"{type(err).__name__}: {err}"}, "unknown"
            report[name] = {"available": True, "device": device,
                            "bf16": "available" if bf16 is None else f"unavailable: {bf16}"}
        else:
            report[name] = {"available": False,
                            "reason": reasons.get(name, "unavailable (no reason recorded)")}
    return report


def collect_info() -> dict[str, Any]:
    """Everything `bpk info` reports, JSON-able."""
    from .backends.numpy_backend import blas_info
    packages = {"numpy": np.__version__}
    for dist in _OPTIONAL_PACKAGES:
        found = _version(dist)
        if found is not None:
            packages[dist] = found
    backends = _backend_report()
    gpus = [dict(info["device"], backend=name) for name, info in backends.items()
            if info["available"] and info["device"].get("device", "cpu") != "cpu"]
    return {
        "bpkernels": bpkernels.__version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "packages": packages,
        "platform": platform.platform(),
        "cpu": {"name": cpu_name(), "cores": os.cpu_count(), "usable_cores": _usable_cores()},
        "blas": blas_info(),
        "backends": backends,
        "gpus": gpus,
    }


def _memory_text(device: dict[str, Any]) -> str:
    # Backends name the field differently (memory, total_memory, memory_bytes...): take the
    # first one that mentions memory; integers are bytes.
    for key, value in device.items():
        if "memory" in key or "mem" == key:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1 << 20:
                return f"{value / 2**30:.1f} GiB"
            return str(value)
    return "memory unknown"


def print_info(info: dict[str, Any]) -> None:
    """``collect_info()``'s report as the text `bpk info` prints."""
    cpu, blas = info["cpu"], info["blas"]
    cores = f"{cpu['cores']}"
    if cpu["usable_cores"] is not None and cpu["usable_cores"] != cpu["cores"]:
        cores += f" ({cpu['usable_cores']} usable)"
    blas_text = " ".join(str(blas[k]) for k in ("name", "version") if blas.get(k)) or "unknown"
    threads = blas.get("threads")
    lines = [f"bpkernels: {info['bpkernels']}", f"Python: {info['python']}"]
    names = {"numpy": "NumPy", "scikit-learn": "scikit-learn"}
    lines += [f"{names.get(dist, dist)}: {v}" for dist, v in info["packages"].items()]
    lines += [f"platform: {info['platform']}", f"CPU: {cpu['name']}", f"cores: {cores}",
              f"BLAS: {blas_text}, {threads if threads is not None else 'unknown'} threads"]
    lines.append("backends:")
    for name, entry in info["backends"].items():
        status = "available" if entry["available"] else f"unavailable: {entry['reason']}"
        lines.append(f"  {name}: {status}")
        if "bf16" in entry:
            lines.append(f"    {name} bf16: {entry['bf16']}")
        device = entry.get("device") or {}
        if "mode" in device:  # the Numba backend: native or plain, and why
            lines.append(f"    {name} mode: {device['mode_reason']}")
            lines.append(f"    {name} BLAS pool: {device['blas_pool']}")
    for gpu in info["gpus"]:
        lines.append(f"GPU ({gpu['backend']}): {gpu.get('name', 'unknown')}, {_memory_text(gpu)}")
    print("\n".join(lines), flush=True)
