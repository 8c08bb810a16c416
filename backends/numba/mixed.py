"""``dtype="bf16"`` on the Numba backend: the dense layer's kernels with bfloat16 products by
MKL (``_native/mkl.py``). The float32 arrays stay as they are; the rounded copy a product reads
is made into a uint16 scratch buffer of the caller's, in row chunks on Numba's threads where the
work is large (the ``par`` rule of the other passes), and the bias, activation and derivative
passes are the float32 layer's own.

Everything here calls inline functions and unlinked helpers, never another ``@jit`` kernel:
a kernel compiled while a ``@jit`` callee came from Numba's cache links the callee's code
without its reload_init list (Numba does not keep it for cached code), and a later process
loading the kernel then lacks the helpers' symbols and crashes."""
from __future__ import annotations

import numba

from ._native.mkl import gemm_bf16, round_span
from .jit import helper, inline, jit, phelper
from .layers import bias_activation_pass, chunk_bounds, chunk_count, dz_and_db


@helper
def _round_rows(src, dst, r0, r1):
    round_span(src, dst, r0, r1)


@phelper
def _round_par(src, dst, chunks):
    for c in numba.prange(chunks):
        r0, r1 = chunk_bounds(c, chunks, src.shape[0])
        _round_rows(src, dst, r0, r1)


@inline
def round_bf16(src, dst, par):
    """dst (uint16, src's shape) = the bfloat16 bits nearest to float32 ``src`` (2-D), ties to
    even: ``backends/bf16.py``'s to_bf16_bits, bit for bit."""
    chunks = chunk_count(src.size, par)
    if chunks == 1:
        _round_rows(src, dst, 0, src.shape[0])
    else:
        _round_par(src, dst, min(chunks, src.shape[0]))


@jit
def dense_forward(X, W, b, act, Z, A, keep_z, Xb, Wb, par, kinds):
    """layers.dense_forward with ``Z = bf16(X) @ bf16(W)``: ``Xb`` and ``Wb`` (uint16, the
    shapes of X and W) are scratch for the rounded inputs."""
    round_bf16(X, Xb, par)
    round_bf16(W, Wb, par)
    gemm_bf16(Xb, False, Wb, False, Z, 1.0, 0.0)
    bias_activation_pass(Z, b, act, keep_z, A, par, kinds)


@jit
def dense_backward(X, W, dA, act, A, Z, dW, db, dX, with_dx, Xb, Wb, dZb, par, kinds):
    """layers.dense_backward with both products on bfloat16 inputs: dZ (formed in dA, whose
    column sums db takes unrounded), X and W rounded into the scratch ``dZb``, ``Xb``, ``Wb``."""
    dz_and_db(dA, act, A, Z, db, par, kinds)
    round_bf16(dA, dZb, par)
    round_bf16(X, Xb, par)
    gemm_bf16(Xb, True, dZb, False, dW, 1.0, 0.0)
    if with_dx:
        round_bf16(W, Wb, par)
        gemm_bf16(dZb, False, Wb, True, dX, 1.0, 0.0)


@jit
def products(acts, outs, grads, gouts, Ws, dWs):
    """One step of ``bpk bench``'s bf16 GEMM floor: the step's matrix products alone on bfloat16
    inputs, as a bf16 step forms them (forward ``acts[l] @ Ws[l]`` into ``outs[l + 1]``;
    backward ``acts[l].T @ grads[l + 1]`` into ``dWs[l]`` and, but for the first layer,
    ``grads[l + 1] @ Ws[l].T`` into ``gouts[l]``). Tuples of uint16 inputs and float32
    outputs; nothing is rounded here."""
    layers = len(Ws)
    for layer in range(layers):
        gemm_bf16(acts[layer], False, Ws[layer], False, outs[layer + 1], 1.0, 0.0)
    for layer in range(layers - 1, -1, -1):
        gemm_bf16(acts[layer], True, grads[layer + 1], False, dWs[layer], 1.0, 0.0)
        if layer:
            gemm_bf16(grads[layer + 1], False, Ws[layer], True, gouts[layer], 1.0, 0.0)
