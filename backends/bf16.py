"""bfloat16 rounding in NumPy (NumPy has no bfloat16 type): the reference every backend's
``dtype="bf16"`` products are tested against. A bfloat16 is the upper half of a float32, so a
float32 holding a rounded value stands for it exactly, and a float32 product of two such values
is exact (8 + 8 significant bits): float32 GEMM on rounded inputs is bf16 x bf16 -> float32."""
from __future__ import annotations

import numpy as np


def to_bf16_bits(x) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 ``x`` rounded to nearest, ties to even;
    NaN stays NaN (made quiet), infinities and overflow give infinity."""
    return (bf16_round(x).view(np.uint32) >> 16).astype(np.uint16)


def bf16_round(x, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``x`` rounded to bfloat16, as float32 (``out``, not ``x``, when given)."""
    x = np.ascontiguousarray(x, np.float32)
    if out is None:
        out = np.empty_like(x)
    if np.shares_memory(x, out):
        raise ValueError("bf16_round needs an output apart from its input")
    bits, o = x.view(np.uint32), out.view(np.uint32)
    # round half to even: add 0x7fff plus the lowest kept bit, then cut the low half
    np.right_shift(bits, 16, out=o)
    np.bitwise_and(o, 1, out=o)
    o += 0x7FFF
    o += bits
    o &= 0xFFFF0000
    nan = np.isnan(x)
    if nan.any():  # the carry of the addition could turn a NaN into an infinity or a zero
        o[nan] = (bits[nan] | 0x00400000) & 0xFFFF0000
    return out


def bf16_widen(bits) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (uint16)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)
