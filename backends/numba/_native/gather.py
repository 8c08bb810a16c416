"""The large models' batch gather, shared between the epoch kernel's thread and the BLAS
pool's workers (``pool.py``), and the workers' loop itself.

The row gathers are called by address (``unlinked.by_address``), the batch's and the data
set's memory reached by address too (``pool.int64_matrix_at``): one compiled copy of each
serves every model, and a worker compiles only the one of the model's dtype.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from . import pool
from .toolkit import bits, helper, inline, jit, span
from .unlinked import address, by_address


@inline
def chunk_bounds(c, chunks, n):
    return c * n // chunks, (c + 1) * n // chunks


_MAGNITUDE_32, _MAGNITUDE_64 = (1 << 31) - 1, (1 << 63) - 1  # every bit of a float but its sign


@inline
def _gather_bits(src_bits, index, dst_bits):
    """_gather on the floats' bits (``bits``), returning the largest of them without the
    sign bit: the bits of the largest |x| gathered, inf's if one is inf, a NaN's if one is NaN.
    (``_backward``'s bound for the first layer, from the pass that writes the batch rather than
    one more over it.) Without its sign bit a float's bits order as its magnitude does, inf
    above every finite value and NaN above inf; and an integer maximum vectorizes, where a
    float one would not without fastmath. The rows of dst_bits are as wide as it is."""
    rows, k = index.size, dst_bits.shape[1]
    magnitude = src_bits.dtype.type(_MAGNITUDE_32 if src_bits.itemsize == 4 else _MAGNITUDE_64)
    m0 = m1 = m2 = m3 = magnitude & 0
    for r in range(0, rows - rows % 4, 4):
        i0, i1, i2, i3 = index[r], index[r + 1], index[r + 2], index[r + 3]
        for j in range(k):
            x0, x1, x2, x3 = src_bits[i0, j], src_bits[i1, j], src_bits[i2, j], src_bits[i3, j]
            dst_bits[r, j] = x0
            dst_bits[r + 1, j] = x1
            dst_bits[r + 2, j] = x2
            dst_bits[r + 3, j] = x3
            m0 = max(m0, x0 & magnitude)
            m1 = max(m1, x1 & magnitude)
            m2 = max(m2, x2 & magnitude)
            m3 = max(m3, x3 & magnitude)
    for r in range(rows - rows % 4, rows):
        for j in range(k):
            x = src_bits[index[r], j]
            dst_bits[r, j] = x
            m0 = max(m0, x & magnitude)
    return max(max(m0, m1), max(m2, m3))


@inline
def _as_float(value, scratch):
    """The float of ``scratch``'s dtype whose bits ``value`` are."""
    bits(scratch)[0] = value
    return scratch[0]


@inline
def _gather_rows(source, order, destination, r0, r1):
    """``_gather_bits`` of rows r0..r1 of a batch into ``destination`` (the batch), its row
    numbers at the address ``order``."""
    index = span(pool.int64_matrix_at(order, 1, r1)[0], r0, r1 - r0)
    return np.int64(_gather_bits(source, index, span(destination, r0, r1 - r0)))


# The row gathers of the large models' batches, one per width of float, by addresses and sizes
# rather than arrays: one compiled copy of each serves every model, in the epoch kernel and in
# the pool's workers (pool_worker), which call the one of the model's dtype by its address
# (``_row_gather``), so that only that one is compiled. Arguments: the data set (source_rows,
# ``stride`` elements apart) at ``source``, the batch (columns wide) at ``destination``, its
# row numbers (int64) at ``order``, and the rows r0..r1 to gather.
@helper
def _gather_rows_32(source, source_rows, stride, destination, columns, order, r0, r1):
    return _gather_rows(pool.int32_matrix_at(source, source_rows, stride), order,
                        pool.int32_matrix_at(destination, r1, columns), r0, r1)


@helper
def _gather_rows_64(source, source_rows, stride, destination, columns, order, r0, r1):
    return _gather_rows(pool.int64_matrix_at(source, source_rows, stride), order,
                        pool.int64_matrix_at(destination, r1, columns), r0, r1)


_GATHER_ARGUMENTS = (types.int64,) * 8  # (a job's of split_rows: six arguments, r0, r1)
_call_gather = by_address(types.int64, _GATHER_ARGUMENTS)


def job_of_dtype(job32, job64):
    """An intrinsic ``job(array)``: the address of ``job32`` or ``job64`` (helpers taking
    split_rows's eight int64 arguments) by ``array``'s dtype; only that one is compiled."""
    @intrinsic
    def job(typingctx, array):
        chosen = job32 if array.dtype.bitwidth == 32 else job64

        def codegen(context, builder, signature, args):
            return address(context, builder, chosen, _GATHER_ARGUMENTS)
        return types.int64(array), codegen
    return job


_row_gather = job_of_dtype(_gather_rows_32, _gather_rows_64)


@inline
def split_rows(workers, job, first, step, a1, a2, a3, a4, a5, rows):
    """``job(a0, a1, ..., a5, r0, r1)`` (an int64 function by address, from ``address``) on the
    rows 0..rows, split between this thread (the first share) and ``workers`` threads of the
    pool (``pool.py``; none: this thread alone); share p's a0 is ``first + p * step`` (a
    record of its own, or the same argument for every share with step 0). Returns the
    largest of the jobs' results."""
    control = pool.control_address() if workers > 0 else 0  # (no intrinsics without JIT)
    parts = workers + 1
    if workers > 0:
        pool.lock(control)
    for worker in range(workers):
        block = pool.block_of(control, worker)
        r0, r1 = chunk_bounds(worker + 1, parts, rows)
        pool.store(block, pool.SOURCE, first + (worker + 1) * step)
        pool.store(block, pool.SOURCE_ROWS, a1)
        pool.store(block, pool.SOURCE_STRIDE, a2)
        pool.store(block, pool.DESTINATION, a3)
        pool.store(block, pool.COLUMNS, a4)
        pool.store(block, pool.ORDER, a5)
        pool.store(block, pool.ROWS_START, r0)
        pool.store(block, pool.ROWS_END, r1)
        pool.post(block, pool.GATHER, job, 0, 0)
    r0, r1 = chunk_bounds(0, parts, rows)
    largest = _call_gather(job, (first, a1, a2, a3, a4, a5, r0, r1))
    for worker in range(workers):
        block = pool.block_of(control, worker)
        pool.wait(block, pool.load(block, pool.POSTED))
        largest = max(largest, pool.load(block, pool.RESULT))
    if workers > 0:
        pool.unlock(control)
    return largest


@helper
def _gather_split(workers, gather, source, source_rows, stride, destination, columns, order,
                  rows):
    """A row gather (``gather``, from ``_row_gather``) of a whole batch, its rows split
    between this thread and ``workers`` threads of the pool: each core writes its share of
    the batch, ~40% faster on M than one writing all."""
    return split_rows(workers, gather, source, 0, source_rows, stride, destination, columns,
                      order, rows)


@inline
def gather_shared(workers, X_all, order, first, rows, dst, scratch):
    """dst[:rows] = X_all[order[first:first + rows]] by ``_gather_split`` (X_all C-ordered);
    returns the largest |x| gathered, inf if one is inf, NaN if one is NaN (a float of
    ``scratch``'s dtype)."""
    largest = _gather_split(workers, _row_gather(X_all), np.int64(X_all.ctypes.data),
                            X_all.shape[0], X_all.strides[0] // X_all.itemsize,
                            np.int64(dst.ctypes.data), dst.shape[1],
                            np.int64(order.ctypes.data) + first * order.itemsize, rows)
    return _as_float(largest, scratch)


@jit
def pool_worker(control, worker):
    """A worker thread of ``pool.py``: runs the tasks posted to its block (BLAS's jobs,
    shares of the epoch kernel's gathers and row passes: ``split_rows``) until told to stop."""
    block = pool.block_of(control, worker)
    pool.store(block, pool.READY, 1)
    done = 0
    while True:
        number = pool.next_task(block, done)
        kind = pool.load(block, pool.KIND)
        if kind == pool.BLAS_JOB:
            pool.run_job(pool.load(block, pool.JOB), worker + 1, pool.load(block, pool.JOB_DATA),
                         pool.load(block, pool.JOB_ARGUMENT))
        elif kind == pool.GATHER:
            largest = _call_gather(pool.load(block, pool.JOB), (
                pool.load(block, pool.SOURCE), pool.load(block, pool.SOURCE_ROWS),
                pool.load(block, pool.SOURCE_STRIDE), pool.load(block, pool.DESTINATION),
                pool.load(block, pool.COLUMNS), pool.load(block, pool.ORDER),
                pool.load(block, pool.ROWS_START), pool.load(block, pool.ROWS_END)))
            pool.store(block, pool.RESULT, largest)
        elif kind == pool.STOP:
            pool.store(block, pool.RESULT, pool.LAYOUT)
        pool.store(block, pool.DONE, number)
        done = number
        if kind == pool.STOP:
            return
