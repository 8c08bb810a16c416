"""The Numba backend: the contract's kernels compiled by Numba on the CPU (see docs/numba.md)."""
from .backend import NumbaBackend

__all__ = ["NumbaBackend"]
