"""How the kernels are compiled: native mode or plain mode, chosen once, at import.

Native mode (``_native/``) is the fast one; it rests on private internals of Numba, llvmlite
and OpenBLAS, and is switched on only for the releases it was tested with and after its
self-test passed. Plain mode (``plain.py``) is public Numba only. The kernels import their
decorators, views and GEMM from here, by the same names in both modes.

``BPK_NUMBA_NATIVE``: ``0`` plain mode; ``1`` native mode on untested releases too (the
self-test still decides); unset or ``auto``, native where tested.
"""
from __future__ import annotations

import numba


def _choose():
    """(the native toolkit or None, why), by the rules above."""
    if numba.config.DISABLE_JIT:
        return None, "plain (NUMBA_DISABLE_JIT is set: plain Python)"
    from . import _native  # (imports no internals: _native.load does)
    setting = _native.setting()
    if setting == "0":
        return None, "plain (BPK_NUMBA_NATIVE=0)"
    if setting not in ("1", "auto"):
        return None, f"plain (BPK_NUMBA_NATIVE={setting!r} is not 0, 1 or auto)"
    untested = _native.untested()
    if untested and setting != "1":
        return None, ("plain (native layer not tested with " + "; ".join(untested)
                      + "; BPK_NUMBA_NATIVE=1 tries it)")
    try:
        toolkit = _native.load()
    except Exception as err:  # whatever an internal that moved raises: plain, never broken
        return None, f"plain (native self-test failed: {type(err).__name__}: {err})"
    forced = " on untested releases (BPK_NUMBA_NATIVE=1)" if untested else ""
    return toolkit, f"native (self-test passed{forced})"


NATIVE, MODE_REASON = _choose()
MODE = "native" if NATIVE is not None else "plain"
if NATIVE is not None:
    from ._native.toolkit import (BLAS_SOURCE, as_matrix, epoch, gemm_t, helper, inline, jit,
                                  linked, phelper, span, summing)
else:
    from .plain import (BLAS_SOURCE, as_matrix, epoch, gemm_t, helper, inline,  # noqa: F401
                        jit, linked, phelper, span, summing)

__all__ = ["BLAS_SOURCE", "MODE", "MODE_REASON", "NATIVE", "as_matrix", "epoch",
           "gemm_t", "helper", "inline", "jit", "linked", "phelper", "span", "summing"]
