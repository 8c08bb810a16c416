"""bfloat16 rounding, in NumPy only: the reference every backend's bf16 rounding must equal.

``dtype="bf16"`` rounds the inputs of each matrix product to bfloat16 (the top 16 bits of a
float32) and accumulates in float32, as torch.autocast does. NumPy has no bfloat16 type, so a
bfloat16 value is kept as its bits (uint16), or as the float32 it stands for: the product of two
such float32 values is exact (8 + 8 significant bits), so a float32 GEMM of rounded inputs is a
bf16 x bf16 -> float32 GEMM up to the order of its sums (the NumPy backend's bf16 products).

Rounding is to nearest, ties to even, on the float32 bit pattern: adding 0x7FFF plus the lowest
kept bit and truncating carries into the exponent where it must (the largest finite floats
round to infinity, as IEEE wants) and rounds subnormals like any other pattern. NaN is the one
pattern that arithmetic would corrupt (a payload in the low bits only would truncate to
infinity), so it becomes the quiet NaN 0x7FC0 with its sign, as ml_dtypes and Eigen give.
"""
from __future__ import annotations

import numpy as np

__all__ = ["QUIET_NAN", "bf16_round", "to_bf16_bits", "widen_bf16_bits"]

QUIET_NAN = 0x7FC0  # the bfloat16 bits every positive NaN rounds to (the CUDA kernel's too)


def bf16_round(x, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``x`` rounded to the nearest bfloat16 value, as float32 (what a product's input
    becomes under ``dtype="bf16"``), into ``out`` (a float32 array apart from ``x``) when given:
    then nothing is allocated unless ``x`` holds a NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    elif np.shares_memory(x, out):
        raise ValueError("bf16_round needs an output apart from its input")
    bits, rounded = x.view(np.uint32), out.view(np.uint32)
    np.right_shift(bits, 16, out=rounded)
    np.bitwise_and(rounded, 1, out=rounded)
    rounded += 0x7FFF
    rounded += bits
    rounded &= 0xFFFF0000
    with np.errstate(all="ignore"):  # inf - inf gives NaN too: then the mask finds none
        maybe_nan = np.isnan(np.add.reduce(x, axis=None))  # a scalar: no mask unless needed
    if maybe_nan:
        nan = np.isnan(x)
        rounded[nan] = (bits[nan] & 0x80000000) | (QUIET_NAN << 16)
    return out


def to_bf16_bits(x) -> np.ndarray:
    """The bfloat16 bits (uint16, same shape) nearest to float32 ``x``, ties to even; NaN becomes
    the quiet NaN 0x7FC0 or 0xFFC0 (its sign kept), infinities stay infinities."""
    return (bf16_round(x).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def widen_bf16_bits(bits) -> np.ndarray:
    """The float32 values that bfloat16 bits (uint16) stand for: exact, no rounding."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)
