"""bfloat16 rounding, in NumPy only: the reference every backend's bf16 rounding must equal.

``dtype="bf16"`` rounds the inputs of each matrix product to bfloat16 (the top 16 bits of a
float32) and accumulates in float32, as torch.autocast does. NumPy has no bfloat16 type, so a
bfloat16 value is kept as its bits (uint16), or widened back to the float32 it stands for.

Rounding is to nearest, ties to even, on the float32 bit pattern: adding 0x7FFF plus the lowest
kept bit and truncating carries into the exponent where it must (the largest finite floats
round to infinity, as IEEE wants) and rounds subnormals like any other pattern. NaN is the one
pattern that arithmetic would corrupt (a payload in the low bits only would truncate to
infinity), so it becomes the quiet NaN 0x7FC0 with its sign, as ml_dtypes and Eigen give.
"""
from __future__ import annotations

import numpy as np

__all__ = ["bf16_round", "to_bf16_bits", "widen_bf16_bits"]

_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)


def to_bf16_bits(x) -> np.ndarray:
    """The bfloat16 bits (uint16, same shape) nearest to float32 ``x``, ties to even; NaN becomes
    the quiet NaN 0x7FC0 or 0xFFC0 (its sign kept), infinities stay infinities."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    upper = bits >> np.uint32(16)
    rounded = (bits + (np.uint32(0x7FFF) + (upper & np.uint32(1)))) >> np.uint32(16)
    nan = (bits & _ABS) > _INF
    quiet = (upper & np.uint32(0x8000)) | np.uint32(0x7FC0)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def widen_bf16_bits(bits) -> np.ndarray:
    """The float32 values that bfloat16 bits (uint16) stand for: exact, no rounding."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def bf16_round(x) -> np.ndarray:
    """float32 ``x`` rounded to the nearest bfloat16 value, as float32 (what a product's input
    becomes under ``dtype="bf16"``)."""
    return widen_bf16_bits(to_bf16_bits(x))
