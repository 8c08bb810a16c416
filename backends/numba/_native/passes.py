"""The epoch kernel's row passes shared with the BLAS pool's workers (``pool.py``): dropout's
(forward and backward), LayerNorm's normalization (forward), the optimizer's update and
clipping's sum of squares. Between the GEMMs the pool's workers wait, spinning, on the cores a
parallel pass of Numba's would need (see pool.py): these passes then ran on one core of the
two. Each row's work depends on that row alone (dropout's noise on its step, layer and data-set
row; LayerNorm's statistics on its own values), so a share of the rows computes the bits that
one thread would.

Each pass is a job that ``gather.split_rows`` runs by address, like the gather: one compiled
copy per dtype, whose arrays and numbers come in a record of int64 slots (a float in a slot
as its float64 bits), one record per share (dropout's words scratch differs between shares),
in the epoch's ``tasks`` scratch.
The update's "rows" are blocks of BLOCK elements; each element's new values depend on its own
old ones alone, so the shares write the bits of the serial update too.
The activation after LayerNorm stays on the calling thread: the jobs are compiled for no
activation's kinds (``layers.activation_kinds``), and the activation's pass is cheap beside
the statistics.
"""
from __future__ import annotations

import numpy as np

from ..dropout import _dropout_rows
from ..norm import norm_rows
from ..optim import sum_squares, update_rule
from . import pool
from .gather import job_of_dtype, split_rows
from .toolkit import helper, inline, span

# A record's slots. Dropout: its input A and output D (rows x units), the batch's data-set
# rows (int64), the seed's words, the step, the layer, the keep threshold, the kept units'
# factor (float64 bits) and the share's words scratch. LayerNorm: H, b, gamma, beta, A and
# rstd, and eps (float64 bits).
ROWS, UNITS, FIRST = 0, 1, 2
(D_A, D_D, D_INDEX, D_K0, D_K1, D_STEP, D_LAYER, D_THRESHOLD, D_SCALE,
 D_WORDS) = range(FIRST, FIRST + 10)
N_H, N_B, N_GAMMA, N_BETA, N_A, N_RSTD, N_EPS = range(FIRST, FIRST + 7)
# The update: p, g and the three state buffers (STATES: bit k set where buffer k has the
# parameters' length, else it is empty and unused), the step, the clip coefficient and up to
# six hyper-parameters (float64 bits).
U_P, U_G, U_S1, U_S2, U_S3, U_STATES, U_STEP, U_COEF, U_HP = range(FIRST, FIRST + 9)
BLOCK = 64  # the update's elements to a "row": whole cache lines to each share
SLOTS = 16  # a record's int64 slots: 128 bytes, two cache lines' worth
assert U_HP + 6 <= SLOTS  # (the update's six hyper-parameters at most)


@inline
def record(tasks, share):
    """Share ``share``'s record in the epoch's ``tasks`` scratch (int64, SLOTS per share)."""
    return span(tasks, share * SLOTS, SLOTS)


@inline
def _float_slot(record_address, slot):
    return pool.float64_matrix_at(record_address, 1, SLOTS)[0, slot]


@inline
def _set_float(rec, slot, value):
    pool.float64_matrix_at(rec.ctypes.data, 1, SLOTS)[0, slot] = value


@inline
def _matrix(dtype_bits, address_, rows, columns):
    if dtype_bits == 32:
        return pool.float32_matrix_at(address_, rows, columns)
    return pool.float64_matrix_at(address_, rows, columns)


@inline
def _vector(dtype_bits, address_, n):
    return _matrix(dtype_bits, address_, 1, n)[0]


@inline
def _dropout_job(bits, rec, r0, r1):
    t = pool.int64_matrix_at(rec, 1, SLOTS)[0]
    n, units = t[ROWS], t[UNITS]
    A, D = _matrix(bits, t[D_A], n, units), _matrix(bits, t[D_D], n, units)
    scale = A.dtype.type(_float_slot(rec, D_SCALE))
    words = pool.uint32_matrix_at(t[D_WORDS], 1, 4 * ((units + 3) // 4))[0]
    _dropout_rows(A, D, pool.int64_matrix_at(t[D_INDEX], 1, n)[0], t[D_K0], t[D_K1],
                  t[D_STEP], t[D_LAYER], t[D_THRESHOLD], scale, r0, r1, words)
    return np.int64(0)


@helper
def _dropout_job_32(rec, a1, a2, a3, a4, a5, r0, r1):
    return _dropout_job(32, rec, r0, r1)


@helper
def _dropout_job_64(rec, a1, a2, a3, a4, a5, r0, r1):
    return _dropout_job(64, rec, r0, r1)


@inline
def _norm_job(bits, rec, r0, r1):
    t = pool.int64_matrix_at(rec, 1, SLOTS)[0]
    n, o = t[ROWS], t[UNITS]
    norm_rows(_matrix(bits, t[N_H], n, o), _vector(bits, t[N_B], o),
              _vector(bits, t[N_GAMMA], o), _vector(bits, t[N_BETA], o),
              _matrix(bits, t[N_A], n, o), _vector(bits, t[N_RSTD], n),
              _float_slot(rec, N_EPS), r0, r1)
    return np.int64(0)


@helper
def _norm_job_32(rec, a1, a2, a3, a4, a5, r0, r1):
    return _norm_job(32, rec, r0, r1)


@helper
def _norm_job_64(rec, a1, a2, a3, a4, a5, r0, r1):
    return _norm_job(64, rec, r0, r1)


_dropout_job_of = job_of_dtype(_dropout_job_32, _dropout_job_64)
_norm_job_of = job_of_dtype(_norm_job_32, _norm_job_64)


@inline
def _copy_records(workers, tasks):
    """Share 0's record copied to shares 1..workers."""
    first = record(tasks, 0)
    for share in range(1, workers + 1):
        rec = record(tasks, share)
        for slot in range(SLOTS):
            rec[slot] = first[slot]


@inline
def dropout_shared(workers, tasks, A, D, index, k0, k1, step, layer, threshold, scale, words):
    """``dropout.dropout_pass`` (serial) over every row, the rows shared between this thread
    and ``workers`` of the pool; ``words``: dropout.words_scratch for workers + 1 chunks or
    more (each share draws a row's words into a row of its own)."""
    first = record(tasks, 0)
    first[ROWS], first[UNITS] = A.shape[0], A.shape[1]
    first[D_A], first[D_D], first[D_INDEX] = A.ctypes.data, D.ctypes.data, index.ctypes.data
    first[D_K0], first[D_K1], first[D_STEP], first[D_LAYER] = k0, k1, step, layer
    first[D_THRESHOLD] = threshold
    _set_float(first, D_SCALE, float(scale))
    _copy_records(workers, tasks)
    width = 4 * ((A.shape[1] + 3) // 4)
    for share in range(workers + 1):
        record(tasks, share)[D_WORDS] = words.ctypes.data + share * width * words.itemsize
    split_rows(workers, _dropout_job_of(A), first.ctypes.data, SLOTS * 8, 0, 0, 0, 0, 0,
               A.shape[0])


@inline
def norm_rows_shared(workers, tasks, H, b, gamma, beta, A, rstd, eps):
    """``norm.norm_rows`` over every row, the rows shared between this thread and ``workers``
    of the pool."""
    first = record(tasks, 0)
    first[ROWS], first[UNITS] = H.shape[0], H.shape[1]
    first[N_H], first[N_B], first[N_GAMMA] = H.ctypes.data, b.ctypes.data, gamma.ctypes.data
    first[N_BETA], first[N_A], first[N_RSTD] = beta.ctypes.data, A.ctypes.data, rstd.ctypes.data
    _set_float(first, N_EPS, float(eps))
    _copy_records(workers, tasks)
    split_rows(workers, _norm_job_of(H), first.ctypes.data, SLOTS * 8, 0, 0, 0, 0, 0,
               H.shape[0])



@inline
def _update_job(bits, rule, rec, r0, r1):
    t = pool.int64_matrix_at(rec, 1, SLOTS)[0]
    h = pool.float64_matrix_at(rec, 1, SLOTS)[0]
    n, used = t[ROWS], t[U_STATES]
    i0, i1 = r0 * BLOCK, min(r1 * BLOCK, n)
    p, g = _vector(bits, t[U_P], n), _vector(bits, t[U_G], n)
    # an unused state buffer is empty, and so is its slice (as in optim._update_par)
    states = (_vector(bits, t[U_S1], n if used & 1 else 0)[i0:i1],
              _vector(bits, t[U_S2], n if used & 2 else 0)[i0:i1],
              _vector(bits, t[U_S3], n if used & 4 else 0)[i0:i1])
    k = U_HP
    hp = (h[k], h[k + 1], h[k + 2], h[k + 3], h[k + 4], h[k + 5])
    if rule == 0:
        update_rule(p[i0:i1], g[i0:i1], states, hp[:5], None, None, t[U_STEP], h[U_COEF], True)
    elif rule == 1:
        update_rule(p[i0:i1], g[i0:i1], states, None, hp, None, t[U_STEP], h[U_COEF], True)
    else:
        update_rule(p[i0:i1], g[i0:i1], states, None, None, hp, t[U_STEP], h[U_COEF], True)
    return np.int64(0)


@helper
def _sgd_job_32(rec, a1, a2, a3, a4, a5, r0, r1):
    return _update_job(32, 0, rec, r0, r1)


@helper
def _sgd_job_64(rec, a1, a2, a3, a4, a5, r0, r1):
    return _update_job(64, 0, rec, r0, r1)


@helper
def _adam_job_32(rec, a1, a2, a3, a4, a5, r0, r1):
    return _update_job(32, 1, rec, r0, r1)


@helper
def _adam_job_64(rec, a1, a2, a3, a4, a5, r0, r1):
    return _update_job(64, 1, rec, r0, r1)


@helper
def _rmsprop_job_32(rec, a1, a2, a3, a4, a5, r0, r1):
    return _update_job(32, 2, rec, r0, r1)


@helper
def _rmsprop_job_64(rec, a1, a2, a3, a4, a5, r0, r1):
    return _update_job(64, 2, rec, r0, r1)


_sgd_job_of = job_of_dtype(_sgd_job_32, _sgd_job_64)
_adam_job_of = job_of_dtype(_adam_job_32, _adam_job_64)
_rmsprop_job_of = job_of_dtype(_rmsprop_job_32, _rmsprop_job_64)


@inline
def _state_slot(first, slot, state, n):
    first[slot] = state.ctypes.data
    return 1 if state.size == n else 0


@inline
def _post_update(workers, tasks, first, hp, job, blocks):
    """The rule's hyper-parameters into share 0's record, copied to every share's, then the
    update's blocks shared out."""
    for k in range(len(hp)):
        _set_float(first, U_HP + k, float(hp[k]))
    _copy_records(workers, tasks)
    split_rows(workers, job, first.ctypes.data, SLOTS * 8, 0, 0, 0, 0, 0, blocks)


@inline
def update_shared(workers, tasks, p, g, states, sgd, adam, rmsprop, step, coef):
    """``optim.update_rule``'s write over every element, the blocks shared between this thread
    and ``workers`` of the pool (rules by None as there: one is given)."""
    first = record(tasks, 0)
    n = p.size
    first[ROWS], first[UNITS] = n, 0
    first[U_P], first[U_G] = p.ctypes.data, g.ctypes.data
    s1, s2, s3 = states
    first[U_STATES] = (_state_slot(first, U_S1, s1, n) | 2 * _state_slot(first, U_S2, s2, n) |
                       4 * _state_slot(first, U_S3, s3, n))
    first[U_STEP] = step
    _set_float(first, U_COEF, float(coef))
    blocks = (n + BLOCK - 1) // BLOCK
    if sgd is not None:
        _post_update(workers, tasks, first, sgd, _sgd_job_of(p), blocks)
    elif adam is not None:
        _post_update(workers, tasks, first, adam, _adam_job_of(p), blocks)
    elif rmsprop is not None:
        _post_update(workers, tasks, first, rmsprop, _rmsprop_job_of(p), blocks)


@inline
def _halves_job(bits, rec, r0, r1):
    """The sum of squares of half r0 (0 or 1) of the gradients, into the record's U_COEF."""
    t = pool.int64_matrix_at(rec, 1, SLOTS)[0]
    n = t[ROWS]
    g = _vector(bits, t[U_G], n)
    half = n // 2
    total = 0.0
    if r1 > r0:
        total = sum_squares(g[:half]) if r0 == 0 else sum_squares(g[half:])
    _set_float(t, U_COEF, total)
    return np.int64(0)


@helper
def _halves_job_32(rec, a1, a2, a3, a4, a5, r0, r1):
    return _halves_job(32, rec, r0, r1)


@helper
def _halves_job_64(rec, a1, a2, a3, a4, a5, r0, r1):
    return _halves_job(64, rec, r0, r1)


_halves_job_of = job_of_dtype(_halves_job_32, _halves_job_64)


@inline
def sum_squares_shared(tasks, g):
    """optim.grad_sum_squares on one thread (the sum of squares of each half of ``g``, then
    their sum), the second half summed by one worker of the pool meanwhile: the same bits.
    Needs a pool of one worker or more, and ``tasks`` of two records or more."""
    first = record(tasks, 0)
    first[ROWS], first[U_G] = g.size, g.ctypes.data
    _copy_records(1, tasks)
    split_rows(1, _halves_job_of(g), first.ctypes.data, SLOTS * 8, 0, 0, 0, 0, 0, 2)
    return _float_slot(first.ctypes.data, U_COEF) + _float_slot(record(tasks, 1).ctypes.data,
                                                                  U_COEF)
