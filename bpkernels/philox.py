"""Dropout's random bits: Philox4x32-10 and the reference keep-mask (see docs/dropout.md).

Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC'11) is a counter-based generator: a pure function of a 128-bit counter and a 64-bit key,
here bit for bit Random123's ``philox4x32_R(10, ctr, key)``, the generator that cuRAND's
``Philox4_32_10`` (and so PyTorch's CUDA generator) is built on. Its constants are in
``backends/base.py``; the Numba (``backends/numba/philox.py``) and CUDA
(``backends/cuda/philox.cuh``) versions compute the same bits with 32-bit integer operations,
and tests/test_philox.py holds them all to Random123's known answers and to this module.

A dropout mask is drawn, not generated as a stream: the word of each (optimizer step, hidden
layer, data-set row, unit) is the Philox output for a counter that names them,

    key     = (seed mod 2**32, seed // 2**32)                  the model's seed
    counter = (unit // 4,                                       four units per call
               row mod 2**32,
               step,
               layer + (row // 2**32) * 2**DROPOUT_LAYER_BITS)

and unit ``u`` takes word ``u % 4`` of its call. Every field has bits of its own, so the mask
of a row is the same whichever process, backend, batch or resumed run draws it. The limits,
beyond which a field would wrap into another (each refused with a ValueError): seed < 2**64,
step < 2**32, layer < 2**16, row < 2**48, units < 2**34.

A unit is kept when its uniform ``(word >> 8) * 2**-24`` is >= p, decided in integers as
``word >> 8 >= ceil(p * 2**24)`` (:func:`keep_threshold`): the same test, exact, with no
rounding of p to a float32 kernel's precision. It keeps a unit with probability
``1 - ceil(p * 2**24) / 2**24``, within 2**-24 of ``1 - p``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import (DROPOUT_LAYER_BITS, DROPOUT_UNIFORM_BITS, PHILOX_M, PHILOX_ROUNDS,
                            PHILOX_W, Dropout)
from .validation import check_positive_int, check_real

SEED_LIMIT = 2 ** 64
STEP_LIMIT = 2 ** 32
LAYER_LIMIT = 2 ** DROPOUT_LAYER_BITS
ROW_BITS = 64 - DROPOUT_LAYER_BITS  # 32 in the second word, the rest in the last
ROW_LIMIT = 2 ** ROW_BITS
UNIT_LIMIT = 2 ** 34  # the first word counts blocks of four units: at most 2**32 of them
_SHIFT = 32 - DROPOUT_UNIFORM_BITS
_WORD = np.uint64(0xFFFFFFFF)
_HALF = np.uint64(32)


def philox4x32(counters, key) -> np.ndarray:
    """Philox4x32-10 of each counter under one key.

    ``counters``: a uint32 array of shape (..., 4), the counter words in Random123's order;
    ``key``: two integers in [0, 2**32). Returns a new uint32 array of the counters' shape.
    The 32 x 32 -> 64-bit products that Random123 calls mulhilo are formed in uint64, which
    holds them exactly.
    """
    c = np.asarray(counters)
    if c.dtype != np.uint32 or c.ndim == 0 or c.shape[-1] != 4:
        raise TypeError(f"counters must be a uint32 array of shape (..., 4), got "
                        f"{c.dtype} of shape {c.shape}")
    k0, k1 = (np.uint64(k) for k in _key_words(key))
    c0, c1, c2, c3 = (c[..., i].astype(np.uint64) for i in range(4))
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    w0, w1 = np.uint64(PHILOX_W[0]), np.uint64(PHILOX_W[1])
    for _ in range(PHILOX_ROUNDS):
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (p1 >> _HALF) ^ c1 ^ k0, p1 & _WORD, (p0 >> _HALF) ^ c3 ^ k1, p0 & _WORD
        # the key of the next round (Random123 bumps it before every round but the first)
        k0, k1 = (k0 + w0) & _WORD, (k1 + w1) & _WORD
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _key_words(key: Any) -> tuple[int, int]:
    words = tuple(key) if isinstance(key, (tuple, list, np.ndarray)) else None
    if words is None or len(words) != 2:
        raise TypeError(f"key must be a pair of 32-bit words, got {key!r}")
    k0, k1 = (check_positive_int(w, "a key word", 0) for w in words)
    if max(k0, k1) >= 2 ** 32:
        raise ValueError(f"key words must be < 2**32, got {hex(k0)}, {hex(k1)}")
    return k0, k1


def uniform(bits, dtype="float64") -> np.ndarray:
    """Each uint32 word as a float in [0, 1): ``(bits >> 8) * 2**-24``, in ``dtype`` (float32
    or float64).

    24 bits, not 32: every value is then a float32 exactly (a 24-bit integer times a power of
    two), so a float32 and a float64 kernel, NumPy, Numba and CUDA alike, get the same number
    with no rounding to agree on. The 32-bit variant ``bits * 2**-32`` would round in float32,
    up to 1.0 itself for the largest words.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    words = np.asarray(bits)
    if words.dtype != np.uint32:
        raise TypeError(f"bits must be a uint32 array, got {words.dtype}")
    return (words >> np.uint32(_SHIFT)).astype(dtype) * dtype.type(2.0 ** -DROPOUT_UNIFORM_BITS)


def keep_threshold(p: Any) -> int:
    """The integer test of ``uniform >= p``: a word is kept when ``word >> 8 >= threshold``.

    For an integer k, ``k * 2**-24 >= p`` exactly when ``k >= p * 2**24``, that is when
    ``k >= ceil(p * 2**24)``; p * 2**24 is exact in float64 (a power-of-two scaling), and so is
    its ceiling. p = 0 gives 0: every unit kept.
    """
    p = check_real(p, "dropout probability p", 0.0, 1.0, high_open=True)
    return math.ceil(p * 2.0 ** DROPOUT_UNIFORM_BITS)


@dataclass(frozen=True, eq=False)
class DropoutDraw:
    """The checked integers of one mask draw, as a kernel receives them."""

    key0: int           # the seed's low 32 bits
    key1: int           # its high 32 bits
    step: int
    layer: int
    rows: np.ndarray    # int64 (n,): data-set row indices
    units: int
    threshold: int      # keep_threshold(p)


def dropout_draw(seed: Any, step: Any, layer: Any, rows: Any, units: Any, p: Any) -> DropoutDraw:
    """The arguments of :func:`dropout_keep`, checked against the limits of the counter's
    fields (the module docstring) and turned into the integers every backend takes."""
    seed = _bounded(seed, "seed", SEED_LIMIT)
    step = _bounded(step, "step", STEP_LIMIT)
    layer = _bounded(layer, "layer", LAYER_LIMIT)
    units = _bounded(units, "units", UNIT_LIMIT)
    return DropoutDraw(seed & 0xFFFFFFFF, seed >> 32, step, layer, _rows(rows), units,
                       keep_threshold(p))


def _bounded(value: Any, name: str, limit: int) -> int:
    value = check_positive_int(value, name, 0)
    if value >= limit:
        raise ValueError(f"{name} must be < 2**{limit.bit_length() - 1} for dropout's counter "
                         f"(its field would wrap into another's), got {value}")
    return value


def _rows(rows: Any) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"rows must be an array of integer row indices, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"rows must be 1-D (one index per batch row), got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= ROW_LIMIT):
        bad = arr[(arr < 0) | (arr >= ROW_LIMIT)][0]
        raise ValueError(f"rows must be data-set indices in [0, 2**{ROW_BITS}), got {int(bad)}")
    return arr.astype(np.int64)


def dropout_counters(draw: DropoutDraw) -> np.ndarray:
    """The counters of a draw: uint32 (n, ceil(units / 4), 4), row by row, block by block."""
    rows = draw.rows.astype(np.uint64)
    blocks = -(-draw.units // 4)
    out = np.empty((rows.size, blocks, 4), np.uint32)
    out[..., 0] = np.arange(blocks, dtype=np.uint32)
    out[..., 1] = (rows & _WORD).astype(np.uint32)[:, None]
    out[..., 2] = draw.step
    high = (rows >> _HALF) << np.uint64(DROPOUT_LAYER_BITS)
    out[..., 3] = (high | np.uint64(draw.layer)).astype(np.uint32)[:, None]
    return out


def dropout_scale(p: float) -> float:
    """Inverted dropout's factor of a kept unit, 1 / (1 - p), in float64 (as PyTorch divides
    its noise by 1 - p); kernels round it to the model's dtype."""
    return 1.0 / (1.0 - p)


def layer_dropout(seed: int, step: int, layer: int, rows: Any, p: float) -> Dropout:
    """The kernels' Dropout of a hidden layer at an optimizer step, for a batch whose data-set
    row indices are the device vector ``rows`` (not read here: no device round trip per step;
    fit checks once that the data set's rows fit the counter). ``seed`` and ``p`` were
    checked when the model was made; ``step`` is checked here, each step."""
    if not 0 <= step < STEP_LIMIT:
        raise ValueError(f"dropout draws its masks for optimizer steps < 2**32 (its counter's "
                         f"step field), and this is step {step}")
    return Dropout(rows, seed & 0xFFFFFFFF, seed >> 32, step, layer, keep_threshold(p),
                   dropout_scale(p))


def dropout_noise(drop: Dropout, units: int, dtype: Any) -> np.ndarray:
    """What the dropout kernels multiply by, for host ``drop.rows``: (n, units) of the dtype,
    ``drop.scale`` rounded to it where a unit is kept, 0 where dropped. The NumPy backend's
    kernels and the tests' reference."""
    dtype = np.dtype(dtype)
    rows = np.asarray(drop.rows, np.int64)
    draw = DropoutDraw(drop.key0, drop.key1, drop.step, drop.layer, rows, units,
                       drop.threshold)
    keep = _keep(draw)
    return np.where(keep, dtype.type(drop.scale), dtype.type(0))


def _keep(draw: DropoutDraw) -> np.ndarray:
    if draw.threshold == 0:
        return np.ones((draw.rows.size, draw.units), bool)
    counters = dropout_counters(draw)
    n, blocks, _ = counters.shape
    words = philox4x32(counters, (draw.key0, draw.key1)).reshape(n, 4 * blocks)[:, :draw.units]
    return (words >> np.uint32(_SHIFT)) >= np.uint32(draw.threshold)


def dropout_keep(seed: Any, step: Any, layer: Any, rows: Any, units: Any, p: Any) -> np.ndarray:
    """The keep-mask of hidden layer ``layer`` at optimizer step ``step`` for the data-set rows
    ``rows`` (int array (n,)) of a model seeded ``seed``: bool (n, units), True where a unit is
    kept. A pure function of (seed, step, layer, row, unit): a row's mask does not depend on
    the other rows drawn with it, their order, or how many calls draw them. ``p == 0`` keeps
    every unit and draws nothing. Limits and layout: the module docstring.
    """
    return _keep(dropout_draw(seed, step, layer, rows, units, p))
