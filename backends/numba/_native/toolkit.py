"""Native mode's names for the kernels: the decorators, views and GEMM that ``../jit.py``
exports when this layer is in force (``../plain.py`` has the plain ones, by the same names)."""
from __future__ import annotations

import numba

from .blas import BLAS_SOURCE, gemm_t
from .unlinked import unlinked
from .views import as_matrix, bits, pause_collector_while_compiling, span

# fastmath stays off: its no-NaN/no-inf assumptions would let LLVM delete the finiteness tests
# of check_step and the NaN propagation of the activations, and its reassociation would
# reorder the float64 sums that match the NumPy backend to ~1e-12. Nothing here is
# compute-bound enough for it to pay (the GEMMs are BLAS). _nrt (Numba's reference counting)
# is given, not left to be inherited from the caller: see EPOCH, which has none.
FLAGS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False, fastmath=False,
             _nrt=True)
# Kernels Python calls, and nothing calls as a C function: no C wrapper (a third of the epoch
# kernel's LLVM module, now that its helpers are not linked into it).
jit = numba.njit(no_cfunc_wrapper=True, **FLAGS)
# Helpers only other kernels call get no Python entry point: the wrapper that unboxes their
# arguments (the nested tuples of the epoch kernel above all) is a large part of compile time.
INTERNAL = dict(no_cpython_wrapper=True, no_cfunc_wrapper=True, **FLAGS)


def helper(function):
    """A helper called by symbol (unlinked.py): LLVM no longer optimizes and emits its code
    again in every caller (M's first compile -19%, S's -12%)."""
    return unlinked(numba.njit(**INTERNAL)(function))


def phelper(function):
    return unlinked(numba.njit(parallel=True, **INTERNAL)(function))


# Scalar functions called once per element: linked into their callers, as Numba does, so that
# LLVM inlines them into the loop (called by symbol, GELU's layers ran 20-35% slower).
linked = numba.njit(**INTERNAL)
inline = numba.njit(inline="always", **INTERNAL)
def summing(function):
    """A reduction in float64 with reassociation alone, so that LLVM adds in vector lanes:
    kept in order, one addition waited for the last (a row's sums 0.42 ns an element against
    0.08, float32, Xeon with AVX-512). No other fast-math flag: NaN and inf still propagate.
    Called by symbol like ``helper``: one machine code, so one order of addition for every
    caller (inlined, LLVM could vectorize it differently where a caller knows the length)."""
    return unlinked(numba.njit(**dict(INTERNAL, fastmath={"reassoc"}))(function))
# The epoch kernel, without reference counting. Every view Numba takes of an array (a slice, a
# layer's W out of the flat buffer) would bump the array's count with an atomic add and drop
# it again later: the epoch kernel takes ~20 views per layer per step, and on S those atomics
# cost ~18% of the epoch. Without them, its arrays carry no meminfo (nor do their views, in the
# helpers it calls): its first compile is ~6% shorter too. Safe because it allocates nothing
# (the parallel pass that does is a helper of its own) and every buffer it reads outlives the
# call: its caller holds them all.
epoch = numba.njit(**dict(FLAGS, _nrt=False, no_cfunc_wrapper=True))

pause_collector_while_compiling()

__all__ = ["BLAS_SOURCE", "as_matrix", "bits", "epoch", "gemm_t", "helper", "inline", "jit",
           "linked", "phelper", "span", "summing"]
