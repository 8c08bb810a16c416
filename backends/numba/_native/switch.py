"""The BPK_NUMBA_NATIVE switch, read by the choice of mode (../jit.py) and the pool's gate."""
from __future__ import annotations

import os


def setting() -> str:
    """BPK_NUMBA_NATIVE: "0", "1", "auto" (also when unset or empty), or whatever else it says
    (which means plain mode)."""
    return os.environ.get("BPK_NUMBA_NATIVE", "auto").strip().lower() or "auto"
