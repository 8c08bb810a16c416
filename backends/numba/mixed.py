"""``dtype="bf16"`` on the Numba backend: the dense layer's kernels with bfloat16 products by
MKL (``_native/mkl.py``). The float32 arrays stay as they are; the rounded copy a product reads
is made into a uint16 scratch buffer of the caller's, row chunks in parallel where large, and the
bias, activation and their derivative passes are the float32 layer's own."""
from __future__ import annotations

from ._native.mkl import gemm_bf16, round_bf16
from .jit import jit
from .layers import bias_activation, dz_and_db


@jit
def dense_forward(X, W, b, act, Z, A, keep_z, Xb, Wb, par, kinds):
    """layers.dense_forward with ``Z = bf16(X) @ bf16(W)``: ``Xb`` and ``Wb`` (uint16, the
    shapes of X and W) are scratch for the rounded inputs."""
    round_bf16(X, Xb)
    round_bf16(W, Wb)
    gemm_bf16(Xb, False, Wb, False, Z, 1.0, 0.0)
    bias_activation(Z, b, act, keep_z, A, par, kinds)


@jit
def dense_backward(X, W, dA, act, A, Z, dW, db, dX, with_dx, Xb, Wb, dZb, par, kinds):
    """layers.dense_backward with both products on bfloat16 inputs: dZ (formed in dA, whose
    column sums db takes unrounded), X and W rounded into the scratch ``dZb``, ``Xb``, ``Wb``."""
    dz_and_db(dA, act, A, Z, db, par, kinds)
    round_bf16(dA, dZb)
    round_bf16(X, Xb)
    gemm_bf16(Xb, True, dZb, False, dW, 1.0, 0.0)
    if with_dx:
        round_bf16(W, Wb)
        gemm_bf16(dZb, False, Wb, True, dX, 1.0, 0.0)
