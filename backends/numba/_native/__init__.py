"""The only code of bpkernels that touches other libraries' private internals.

What lives here, and what each rests on:
- ``unlinked.py``: kernels calling their helpers by a symbol of our own instead of linking the
  helper's code into every caller (Numba's calling convention, ``CompileResult`` internals,
  a cached library's ``_reload_init``);
- ``views.py``: views of arrays by intrinsics (Numba's array struct), and the garbage
  collector paused while a kernel compiles (Numba's compile events);
- ``blas.py``: GEMM by NumPy's own OpenBLAS, called from compiled code through its 64-bit
  CBLAS symbols (found in NumPy's wheel layout);
- ``mkl.py``: MKL's bf16 GEMM (``cblas_gemm_bf16bf16f32``) for dtype="bf16", called from
  compiled code by a symbol of our own; found lazily, on CPUs with AMX-BF16 or AVX512-BF16 only,
  after its own self-test (``availability``); and the rounding of a row span that the bf16
  rounding passes (``../mixed.py``) run;
- ``pool.py``: worker threads of our own for OpenBLAS's parallel jobs (``exec_blas`` and its
  job records, Linux x86-64 system calls);
- ``gather.py``: the large models' batch gather shared with those workers;
- ``toolkit.py``: the decorators of native mode (Numba's private ``_nrt``,
  ``no_cpython_wrapper`` and ``no_cfunc_wrapper`` options) and the names the kernels use.

Each is switched on only for the versions it was tested with (``untested``) and after a
self-test (``selftest.py``) that runs every trick once on a tiny case and compares it with
the plain result; the pool has a version check and a self-test of its own (``pool.py``).
Otherwise the backend runs its plain mode (``../plain.py``): slower, never broken.
``BPK_NUMBA_NATIVE=1`` tries native mode on untested versions (the self-tests still run).

Importing this package imports no internals: ``load`` does.
"""
from __future__ import annotations

import re

from .switch import setting  # noqa: F401  (jit.py's, and the pool's gate)

# The releases this layer was tested with: (major, minor) of Numba and llvmlite.
TESTED = {"numba": ((0, 68),), "llvmlite": ((0, 50),)}


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def untested() -> list[str]:
    """The libraries whose installed release this layer was not tested with, as "name
    version (tested: ...)"; empty where all were."""
    import llvmlite
    import numba
    found = []
    for module in (numba, llvmlite):
        name, version = module.__name__, module.__version__
        if _release(version)[:2] not in TESTED[name]:
            tested = ", ".join(".".join(map(str, v)) for v in TESTED[name])
            found.append(f"{name} {version} (tested: {tested})")
    return found


def load():
    """The native toolkit, its self-test passed; raises whatever fails."""
    from . import selftest, toolkit
    selftest.run()
    return toolkit
