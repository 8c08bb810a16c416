"""Dropout's random bits in compiled code: Philox4x32-10 on scalars, the counter of a
(step, layer, row, block of four units), and the keep test. The reference, its layout and its
limits are bpkernels/philox.py's (docs/dropout.md); these are the scalar forms a fused kernel
calls inside its loops (dropout.py).

Every word is a uint64 holding 32 bits, and every constant a uint64 too: Numba types a mix of
uint64 and int64 as float64, which would round the products. The 32 x 32-bit products fit a
uint64 exactly, so no operation here ever rounds or wraps but where masked to 32 bits.
"""
from __future__ import annotations

import numpy as np

from ..base import DROPOUT_LAYER_BITS, DROPOUT_UNIFORM_BITS, PHILOX_M, PHILOX_ROUNDS, PHILOX_W
from .jit import inline, jit, linked

_M0, _M1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
_W0, _W1 = np.uint64(PHILOX_W[0]), np.uint64(PHILOX_W[1])
_WORD = np.uint64(0xFFFFFFFF)
_HALF = np.uint64(32)
_LAYER_SHIFT = np.uint64(DROPOUT_LAYER_BITS)
_UNIFORM_SHIFT = np.uint64(32 - DROPOUT_UNIFORM_BITS)


# Linked, not inlined by Numba: its ten rounds are a fair amount of IR to copy into every
# caller, and LLVM inlines and unrolls it where the loop around it pays for that.
@linked
def philox4x32(x0, x1, x2, x3, key0, key1):
    """Random123's philox4x32_R(10, (x0, x1, x2, x3), (key0, key1)): four words, as uint64."""
    # new names, not rebound arguments: each keeps one type (uint64) through the loop
    c0, c1, c2, c3 = np.uint64(x0), np.uint64(x1), np.uint64(x2), np.uint64(x3)
    k0, k1 = np.uint64(key0), np.uint64(key1)
    for _ in range(PHILOX_ROUNDS):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> _HALF) ^ c1 ^ k0, p1 & _WORD, (p0 >> _HALF) ^ c3 ^ k1, p0 & _WORD
        k0 = (k0 + _W0) & _WORD  # the next round's key (the last bump goes unused)
        k1 = (k1 + _W1) & _WORD
    return c0, c1, c2, c3


@inline
def dropout_bits(k0, k1, step, layer, row, block):
    """The words of units 4 * block .. 4 * block + 3 of data-set row ``row`` (>= 0) in hidden
    layer ``layer`` at optimizer step ``step``."""
    # Every word masked to 32 bits, though the callers' values fit: LLVM then knows each
    # round's products to be 32 x 32 bits (the vectorized dropout pass: 0.84 ns a unit
    # against 0.98 unmasked, float32, one thread of a Xeon).
    r = np.uint64(row)
    high = (((r >> _HALF) << _LAYER_SHIFT) | np.uint64(layer)) & _WORD
    return philox4x32(np.uint64(block) & _WORD, r & _WORD, np.uint64(step) & _WORD, high,
                      np.uint64(k0) & _WORD, np.uint64(k1) & _WORD)


# Linked, not inlined by Numba: inlined into dropout's row loop, this loop stayed scalar (4x
# slower); called, it vectorizes, Philox's products as packed 32 x 32-bit multiplies.
@linked
def dropout_words(words, blocks, k0, k1, step, layer, row):
    """words[4 b .. 4 b + 3] = dropout_bits(..., row, b) for b < ``blocks`` (uint32 words)."""
    for block in range(blocks):
        w0, w1, w2, w3 = dropout_bits(k0, k1, step, layer, row, block)
        words[4 * block] = w0
        words[4 * block + 1] = w1
        words[4 * block + 2] = w2
        words[4 * block + 3] = w3


@inline
def dropout_keeps(word, threshold):
    """Whether the unit of ``word`` is kept: its uniform >= p, as ``word >> 8 >= threshold``
    with threshold = bpkernels.philox.keep_threshold(p)."""
    return (np.uint64(word) >> _UNIFORM_SHIFT) >= np.uint64(threshold)


@jit
def philox4x32_numba(counters, k0, k1, out):
    """philox4x32 of each row of ``counters`` (uint32 (m, 4)) into ``out`` (uint32 (m, 4)):
    for the tests."""
    for i in range(counters.shape[0]):
        w = philox4x32(counters[i, 0], counters[i, 1], counters[i, 2], counters[i, 3], k0, k1)
        for j in range(4):
            out[i, j] = w[j]


@jit
def dropout_keep_numba(k0, k1, step, layer, rows, units, threshold, out):
    """bpkernels.philox.dropout_keep into ``out`` (bool (len(rows), units)), from the checked
    integers of bpkernels.philox.dropout_draw: for the tests, a fused kernel's loop in small."""
    for i in range(rows.shape[0]):
        for block in range((units + 3) // 4):
            w = dropout_bits(k0, k1, step, layer, rows[i], block)
            for lane in range(min(4, units - 4 * block)):
                out[i, 4 * block + lane] = dropout_keeps(w[lane], threshold)
