"""A whole epoch in one compiled call: gather, forward, loss, backward, check and update, per
step, as train.py's loop of kernel calls runs them (base.EpochPlan).

Large models (see backend.BOUND_MIN_PARAMS) bound their weight gradients rather than scan them,
fuse plain SGD's update into dW's GEMM, and in native mode share each batch's gather with the
BLAS pool's workers (``_native/gather.py``); small models scan.
"""
from __future__ import annotations

import math

import numpy as np

from ..base import ACTIVATION_CODES, KEEPS_Z
from .jit import NATIVE, as_matrix, epoch, gemm_t, helper, inline, span
from .dropout import dropout_pass
from .layers import (GELU, IDENTITY, SILU, _bias_act_rows, bias_activation_pass, chunk_count,
                     dense_layer, dz_and_db, grad_rows, zero)
from .mixed import gemm_bf16, round_bf16
from .norm import norm_backward, norm_forward
from .losses import (BINARY_CROSS_ENTROPY, CROSS_ENTROPY, MSE, binary_xent_of,
                     class_stats_labels_of, class_stats_rows_of, count_correct_labels_of,
                     count_correct_rows_of, mse_of, regression_stats_of, softmax_xent_labels_of,
                     softmax_xent_rows_of)
from .optim import (adam_at_step, all_finite, grad_sum_squares, norm_bound, optimizer_update,
                    rmsprop_at_step, sgd_at_step, update_ready, update_rule, update_written)

if NATIVE is not None:
    from ._native.gather import gather_shared, pool_worker
    from ._native.passes import (dropout_shared, norm_rows_shared, sum_squares_shared,
                                 update_shared)
else:  # (the large models' shared passes are native only: plain mode never passes workers)
    gather_shared = pool_worker = dropout_shared = norm_rows_shared = update_shared = None
    sum_squares_shared = None

# What one epoch reads and writes comes in plain tuples (names as in base.EpochPlan):
#   net   (params, grads, layers): flat buffers; layers int64 (layers, 7), LAYER_COLUMNS
#   data  (X, order, batch): X (N, i), order (N,) int64, rows per step
#   work  (X, A, dA, Z, sums, tasks): per-step scratch, X (batch, i) and the flat A, dA and Z
#         (layers of base.KEEPS_Z only) of every layer at layer offsets (x rows); sums (2 x the
#         widest layer,) in the dtype, for _backward's bound; tasks (int64), the records of the
#         passes shared with the pool's workers (_native/passes.py), a record per share. Per
#         step, the kernels see (X, A, dA, Z).
#   out   (loss, correct, halted, bounds): (steps,), (steps,), (1,) int64, (base.BOUNDS,) float64
#         (the updates' bounds, base.py: unknown at the epoch's start, kept from step to step)
#   drop  None, or dropout's (k0, k1, thresholds, scales, D, offsets, words): the seed's words;
#         per layer the keep threshold (int64), the kept units' factor (the dtype) and where its
#         output D starts in the flat D (-1: no dropout), as base.Dropout has them; the
#         passes' scratch (dropout.words_scratch)
# The targets come as one of two pairs (all targets, the batch's scratch), the other None:
# ``labels`` int64 (N,), (batch,) or ``T`` (N, o), (batch, o).
# (Not namedtuples: Numba's cache index pickles argument types, and a namedtuple class that
# later changes or goes makes a stale index fail to load instead of being recompiled.)
#   norm  None, or LayerNorm's (H, rstd, eps, nothing): the flat xhat and 1 / std of every
#         normalized layer (at the table's offsets), eps, and zeros as wide as the widest layer
#   mixed None, or bf16's uint16 scratch (X, A, dZ, W): the rounded bits of the batch's X and
#         of every layer's output (at A's offsets; dropout's D where it drops), of every dZ (at
#         A's offsets) and of every W (at the table's W offsets), each rounded by the step
#         before the products read it: forward rounds X and W, backward dZ, and dW's product
#         reads forward's copies again
LAYER_COLUMNS = ("inputs", "outputs", "W", "b", "activation", "A", "Z", "gamma", "H", "rstd")


def layer_table(sizes, activations, batch, normed=False):
    """The layers table of ``net`` for a model and batch size (``normed``: LayerNorm in every
    hidden layer, its gamma and beta after b; -1 in the last three columns of a layer without
    it), and the lengths of work's A and Z and of norm's H and rstd."""
    rows, w, a, z, h, s = [], 0, 0, 0, 0, 0
    for layer, (i, o, act) in enumerate(zip(sizes[:-1], sizes[1:], activations)):
        keeps_z = act in KEEPS_Z
        norm = normed and layer < len(sizes) - 2
        rows.append((i, o, w, w + i * o, ACTIVATION_CODES[act], a, z if keeps_z else -1,
                     w + i * o + o if norm else -1, h if norm else -1, s if norm else -1))
        w, a, z = w + i * o + o + (2 * o if norm else 0), a + batch * o, \
            z + (batch * o if keeps_z else 0)
        h, s = h + (batch * o if norm else 0), s + (batch if norm else 0)
    return np.array(rows, dtype=np.int64), a, z, h, s


@helper
def _layer(net, work, layer, rows):
    """Views of one layer: W, b, dW, db, A, dA, Z (Z is A where the layer keeps no Z)."""
    params, grads, layers = net
    _, A_all, dA_all, Z_all = work
    i, o, w, b, _, a, z = layers[layer, :7]
    W, dW = as_matrix(params, w, i, o), as_matrix(grads, w, i, o)
    A, dA = as_matrix(A_all, a, rows, o), as_matrix(dA_all, a, rows, o)
    Z = A if z < 0 else as_matrix(Z_all, z, rows, o)
    return W, span(params, b, o), dW, span(grads, b, o), A, dA, Z


@inline
def _gather(src, index, dst):
    """dst[r] = src[index[r]] for the rows of a batch. Four rows at a time: four streams of
    cache misses in flight gather M's batches ~1.4x faster than one."""
    rows, k = index.size, src.shape[1]
    for r in range(0, rows - rows % 4, 4):
        i0, i1, i2, i3 = index[r], index[r + 1], index[r + 2], index[r + 3]
        for j in range(k):
            dst[r, j] = src[i0, j]
            dst[r + 1, j] = src[i1, j]
            dst[r + 2, j] = src[i2, j]
            dst[r + 3, j] = src[i3, j]
    for r in range(rows - rows % 4, rows):
        for j in range(k):
            dst[r, j] = src[index[r], j]


@inline
def _batch_weights(weights, index, rows):
    """The batch's row weights gathered like its targets, or None without weights (the branch
    Numba prunes, so an unweighted epoch compiles no weight code)."""
    if weights is None:
        return None
    all_W, batch_W = weights[0], span(weights[1], 0, rows)
    for r in range(rows):
        batch_W[r] = all_W[index[r]]
    return batch_W


@inline
def _output(drop, A, layer, rows):
    """What the layer above reads of ``layer``: dropout's D, or A where it has no dropout."""
    offset = drop[5][layer]
    return A if offset < 0 else as_matrix(drop[4], offset, rows, A.shape[1])


# Dropout, LayerNorm and the backward's regularized dZ are helpers, not inlined: Numba inlines
# by copying the callee's IR at every call site (Python's deepcopy), which was ~40% of an
# epoch kernel's first compile; a helper compiles once per signature and is cached on its
# own, so the epoch kernels of other optimizers, losses or clipping reuse it (a second
# kernel of M+reg's layers 17.5 -> 4.8 s cold). Called once per layer and step: S and
# M+reg ran as fast in interleaved runs.
@helper
def _dropout(drop, A, D, index, step, layer, par, workers, tasks):
    """``D = A * noise`` of ``layer``'s dropout (D may be A) where it has one: its rows shared
    with the pool's ``workers`` where there are any (a large model's, in native mode)."""
    if drop[5][layer] >= 0:
        shared = False
        if workers is not None:  # (two ifs: Numba prunes the first by an argument's None)
            if workers > 0:
                dropout_shared(workers, tasks, A, D, index, drop[0], drop[1], step, layer,
                               drop[2][layer], drop[3][layer], drop[6])
                shared = True
        if not shared:
            dropout_pass(A, D, index, drop[0], drop[1], step, layer, drop[2][layer],
                         drop[3][layer], par, drop[6])


@helper
def _normalize(H, b, gamma, beta, act, A, rstd, norm, kinds, workers, tasks):
    """LayerNorm's forward (norm.norm_forward): the statistics' rows shared with the pool's
    ``workers`` where there are any, the activation on this thread."""
    shared = False
    if workers is not None:
        if workers > 0:
            norm_rows_shared(workers, tasks, H, b, gamma, beta, A, rstd, norm[2])
            _bias_act_rows(A, norm[3], act, False, A, 0, H.shape[0], kinds)
            shared = True
    if not shared:
        norm_forward(H, b, gamma, beta, act, A, rstd, norm[2], norm[3], kinds)


@inline
def _normalized(net, norm, layer, rows):
    """LayerNorm's views of a normalized layer: gamma, beta, dgamma, dbeta, H, rstd."""
    layers = net[2]
    o, g = layers[layer, 1], layers[layer, 7]
    return (span(net[0], g, o), span(net[0], g + o, o), span(net[1], g, o),
            span(net[1], g + o, o), as_matrix(norm[0], layers[layer, 8], rows, o),
            span(norm[1], layers[layer, 9], rows))


@inline
def _rounded(net, mixed, layer, rows):
    """bf16's views of ``layer``: the bits of its input X, of its dZ and of its W."""
    layers = net[2]
    i, o = layers[layer, 0], layers[layer, 1]
    Xb = as_matrix(mixed[0], 0, rows, i) if layer == 0 else \
        as_matrix(mixed[1], layers[layer - 1, 5], rows, i)
    return Xb, as_matrix(mixed[2], layers[layer, 5], rows, o), \
        as_matrix(mixed[3], layers[layer, 2], i, o)


@inline
def _product(X, W, Y, mixed, net, layer, rows, par):
    """Y = X @ W of ``layer``: in bf16 (``mixed``), of X and W rounded into their copies."""
    if mixed is None:
        gemm_t(X, False, W, False, Y, 1.0, 0.0)
    else:
        Xb, _, Wb = _rounded(net, mixed, layer, rows)
        round_bf16(X, Xb, par)
        round_bf16(W, Wb, par)
        gemm_bf16(Xb, False, Wb, False, Y, 1.0, 0.0)


@inline
def _forward(net, work, rows, par, kinds, drop, index, step, norm, mixed, workers, tasks):
    layers = net[2]
    X = span(work[0], 0, rows)
    for layer in range(layers.shape[0]):
        W, b, _, _, A, _, Z = _layer(net, work, layer, rows)
        act = layers[layer, 4]
        if norm is not None and layers[layer, 7] >= 0:  # the product into H, then LayerNorm
            gamma, beta, _, _, H, rstd = _normalized(net, norm, layer, rows)
            _product(X, W, H, mixed, net, layer, rows, par)
            _normalize(H, b, gamma, beta, act, A, rstd, norm, kinds, workers, tasks)
        elif mixed is not None:  # (Z is A where the layer keeps none: _layer)
            _product(X, W, Z, mixed, net, layer, rows, par)
            bias_activation_pass(Z, b, act, act == GELU or act == SILU, A, par, kinds)
        else:
            dense_layer(X, W, b, act, Z, A, act == GELU or act == SILU, par, kinds)
        X = A
        if drop is not None:
            X = _output(drop, A, layer, rows)
            _dropout(drop, A, X, index, step, layer, par, workers, tasks)


@inline
def _largest(sums, n):
    """The largest of sums[:n] (>= 0), inf if one is NaN."""
    largest = 0.0
    for j in range(n):
        if not sums[j] <= largest:
            largest = sums[j] if sums[j] == sums[j] else math.inf
    return largest


_FLOAT32_MAX, _FLOAT64_MAX = float(np.finfo(np.float32).max), float(np.finfo(np.float64).max)
_FLOAT32_ROUNDOFF, _FLOAT64_ROUNDOFF = 2.0 ** -24, 2.0 ** -53


@inline
def _bound_limit(itemsize, rows):
    """How large the bound (sum_r |X[r, i]|) (sum_r |dZ[r, j]|), each sum as computed in the
    dtype, may be with every computed dW[i, j] sure to be finite. A sum of n terms computed in
    any order is within gamma = n u / (1 - n u) of the exact one, relative to the sum of the
    terms' magnitudes (u: the unit roundoff); so the exact bound is at most the computed one
    over (1 - gamma)^2, and BLAS's dW at most (1 + gamma) times the exact bound. Half the
    largest value of the dtype as the margin; no limit at all (-1) where n u nears 1."""
    largest = _FLOAT32_MAX if itemsize == 4 else _FLOAT64_MAX
    nu = (rows + 1) * (_FLOAT32_ROUNDOFF if itemsize == 4 else _FLOAT64_ROUNDOFF)
    if nu >= 0.5:
        return -1.0
    gamma = nu / (1.0 - nu)
    return largest / 2 * ((1.0 - gamma) * (1.0 - gamma)) / (1.0 + gamma)  # (** compiles ~0.1 s)


@inline
def _worse(bound, value):
    """The larger of a bound and a new value, inf where the value is NaN (inf times 0)."""
    if value <= bound:
        return bound
    return value if value == value else math.inf


@inline
def _abs_max(x):
    """The largest |x[i]|, inf if one is NaN."""
    largest = 0.0
    for i in range(x.size):
        largest = _worse(largest, abs(x[i]))
    return largest


@inline
def _fused_weight_bound(itemsize, rows, w_bound, dw_bound, alpha, beta):
    """A bound on every |W| after BLAS's W = beta W + alpha X.T @ dZ, given |W| <= ``w_bound``
    and ``dw_bound`` from ``_backward`` (exact |X.T @ dZ| <= dw_bound / (1 - gamma)^2, see
    ``_bound_limit``); inf where it could exceed half the dtype's largest value, or where
    alpha or beta would not survive their rounding to the dtype (an inf alpha times a zero
    gradient is NaN). The GEMM rounds within gamma of |beta| |W| + |alpha| |X|.T |dZ|, one
    more u for alpha's and beta's own rounding."""
    largest = _FLOAT32_MAX if itemsize == 4 else _FLOAT64_MAX
    u = _FLOAT32_ROUNDOFF if itemsize == 4 else _FLOAT64_ROUNDOFF
    nu = (rows + 2) * u
    if nu >= 0.5 or not (abs(alpha) <= largest / 2 and abs(beta) <= largest / 2):
        return math.inf
    gamma = nu / (1.0 - nu)
    new = (abs(beta) * w_bound + abs(alpha) * dw_bound / ((1.0 - gamma) * (1.0 - gamma))) \
        * (1.0 + gamma) * (1.0 + 2 * u)
    return new if new <= largest / 2 else math.inf


@helper
def _abs_column_sums_max(M, sums):
    """The largest column sum of |M| (accumulated in ``sums``), inf where M holds inf or NaN.
    Column by column, so that the row loop vectorizes (a scalar sum would not, without
    fastmath's reordering)."""
    o = M.shape[1]
    sums[:o] = 0.0
    for r in range(M.shape[0]):
        for j in range(o):
            sums[j] += abs(M[r, j])
    return _largest(sums, o)


@inline
def _input_gradient(net, work, layer, rows, W, dZ, mixed, par):
    """dX = dZ @ W.T of ``layer`` into the dA of the layer below; returns the layer's X. In
    bf16 (``mixed``), dZ is rounded into its copy first (dW's product reads it too), and W's
    copy is forward's."""
    if mixed is not None:
        _, dZb, _ = _rounded(net, mixed, layer, rows)
        round_bf16(dZ, dZb, par)
    if layer == 0:
        return span(work[0], 0, rows)
    _, _, _, _, X, dX, _ = _layer(net, work, layer - 1, rows)
    if mixed is None:
        gemm_t(dZ, False, W, True, dX, 1.0, 0.0)
    else:
        _, dZb, Wb = _rounded(net, mixed, layer, rows)
        gemm_bf16(dZb, False, Wb, True, dX, 1.0, 0.0)
    return X


@inline
def _backward_scan(net, work, rows, par, kinds, drop, index, step, norm, mixed):
    """Backward through every layer but the weight gradients (``_weight_gradients``), for a
    small model, whose weight gradients check_step's scan checks: dZ and db of every layer
    and dX, top down. Returns whether every db is finite. (Apart from the large models'
    ``_backward`` because Numba inlines a callee whole, the branches the caller prunes
    included, and its copy costs ~blocks x variables: ~0.3 s of S's first compile.)"""
    layers = net[2]
    finite = True
    for layer in range(layers.shape[0] - 1, -1, -1):
        W, _, _, db, A, dA, Z = _layer(net, work, layer, rows)
        finite = _regularized_dz(net, layer, rows, par, kinds, drop, index, step, norm, db, A,
                                 dA, Z, None, None) and finite
        _input_gradient(net, work, layer, rows, W, dA, mixed, par)
    return finite


@helper
def _regularized_dz(net, layer, rows, par, kinds, drop, index, step, norm, db, A, dA, Z,
                    workers, tasks):
    """dZ (in dA) and db of ``layer`` through its dropout and LayerNorm (dgamma and dbeta
    too), where it has them; returns whether db, dgamma and dbeta are finite."""
    if drop is not None:  # dA holds the gradient of dropout's output: now of its input
        _dropout(drop, dA, dA, index, step, layer, par, workers, tasks)
    act = net[2][layer, 4]
    finite = True
    if norm is not None and net[2][layer, 7] >= 0:  # to the product's gradient, and db
        gamma, beta, dgamma, dbeta, H, rstd = _normalized(net, norm, layer, rows)
        if min(chunk_count(dA.size, par), rows) == 1:  # db in LayerNorm's pass, row by row
            norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, Z,
                          act == GELU or act == SILU, kinds, db)
        else:  # db summed in the chunks of the kernel loop's dense_backward (identity)
            norm_backward(dA, act, A, H, gamma, beta, rstd, dgamma, dbeta, Z,
                          act == GELU or act == SILU, kinds, None)
            dz_and_db(dA, IDENTITY, A, dA, db, par, kinds)
        finite = all_finite(dgamma) and all_finite(dbeta)
    else:
        dz_and_db(dA, act, A, Z, db, par, kinds)
    return all_finite(db) and finite


# bf16: |x| below this rounds to a finite bfloat16 (overflow needs |x| >= 3.3961e38), and a
# rounded value is at most (1 + 2^-8) times the float32 one, so a product of two at most this
# much larger than the bound of their unrounded magnitudes.
_BF16_SAFE = _FLOAT32_MAX / 2
_BF16_GROWTH = (1.0 + 2.0 ** -8) * (1.0 + 2.0 ** -8)


@helper
def _backward(net, work, rows, par, kinds, sums, input_bound, drop, index, step, norm, mixed,
              workers, tasks):
    """``_backward_scan`` for a large model, bounding its weight gradients rather than
    scanning them. Returns (whether every db is finite, whether every dW is sure to be
    finite, the largest bound of a layer's |dW| as computed, inf where unknown). The second without computing dW: |dW[i, j]| = |sum_r X[r, i] dZ[r, j]| <=
    (sum_r |X[r, i]|) (sum_r |dZ[r, j]|), and ``_bound_limit`` leaves room for every rounding,
    BLAS's and the column sums' own, in any order of summation. With no inf or NaN in X or dZ
    and that bound kept, no dW can be inf or NaN: check_step's scan of every weight gradient
    (~20 us a step on M) is then not needed, and plain SGD may update W inside the GEMM that
    computes dW (``train_epoch``). Sums in the dtype (float32's vectorize twice as wide): one
    that overflows is inf, which only costs the shortcut. For the first layer, ``input_bound``
    (rows * the batch's largest |x|, from the gather) stands for the column sums of |X|: no
    smaller than any of them. The others come from the pass that forms dZ, which reads and
    writes every element they sum (``_grad_rows_of``): dZ's of this layer, and A's, the layer
    above's X; or, where the passes run in parallel (which sum no magnitudes), from passes
    of their own. (Compiled on its own rather than inlined: M's first compile ~0.1 s
    shorter. The small models' ``_backward_scan`` is cheaper inlined.)"""
    layers = net[2]
    finite, bound, above = True, 0.0, 0.0
    limit = _bound_limit(net[0].itemsize, rows)
    top = layers.shape[0] - 1
    # Where dropout or LayerNorm stand between a layer's A and the sums (the layer above reads
    # dropout's output; LayerNorm's pass forms dZ), the sums come from passes of their own.
    along = par is None and drop is None and norm is None and mixed is None
    for layer in range(top, -1, -1):
        W, _, _, db, A, dA, Z = _layer(net, work, layer, rows)
        if along:  # the column sums of |dZ| and of |A| (the layer above's X) as dZ forms
            o = dA.shape[1]
            magnitudes = as_matrix(sums, 0, 2, o)
            zero(span(sums, 0, 2 * o))
            zero(db)
            grad_rows(dA, layers[layer, 4], A, Z, db, magnitudes, 0, rows, kinds)
            if layer < top:
                bound = _worse(bound, _largest(magnitudes[1], o) * above)
            above = _largest(magnitudes[0], o)
            finite = all_finite(db) and finite
        else:
            finite = _regularized_dz(net, layer, rows, par, kinds, drop, index, step, norm, db,
                                     A, dA, Z, workers, tasks) and finite
        X = _input_gradient(net, work, layer, rows, W, dA, mixed, par)
        if drop is not None and layer > 0:
            X = _output(drop, X, layer - 1, rows)
        if not along and bound <= limit:
            x_bound = input_bound if layer == 0 else _abs_column_sums_max(X, sums)
            dz_bound = _abs_column_sums_max(dA, sums)
            if mixed is not None:  # the products read X and dZ rounded (see _BF16_SAFE)
                if not (x_bound <= _BF16_SAFE and dz_bound <= _BF16_SAFE):
                    bound = math.inf
                bound = _worse(bound, x_bound * dz_bound * _BF16_GROWTH)
            else:
                bound = _worse(bound, x_bound * dz_bound)
    if along:
        bound = _worse(bound, input_bound * above)
    return finite, bound <= limit, bound


@inline
def _weight_gradients(net, work, rows, alpha, beta, into_weights, scan, drop, mixed):
    """dW = X.T @ dZ for every layer, after ``_backward``; with ``into_weights``, W = beta W +
    alpha X.T @ dZ instead, dW left as it was. Returns whether every dW is finite, each read
    right after BLAS wrote it, while still in cache, where ``scan`` (else True)."""
    layers = net[2]
    finite = True
    X = span(work[0], 0, rows)
    for layer in range(layers.shape[0]):
        W, _, dW, _, A, dZ, _ = _layer(net, work, layer, rows)
        if mixed is not None:
            Xb, dZb, _ = _rounded(net, mixed, layer, rows)
            if into_weights:
                gemm_bf16(Xb, True, dZb, False, W, alpha, beta)
            else:
                gemm_bf16(Xb, True, dZb, False, dW, 1.0, 0.0)
                if scan:
                    finite = all_finite(span(net[1], layers[layer, 2], dW.size)) and finite
        elif into_weights:
            gemm_t(X, True, dZ, False, W, alpha, beta)
        else:
            gemm_t(X, True, dZ, False, dW, 1.0, 0.0)
            if scan:  # dW flat, as the gradients hold it (dW.ravel() took ~0.2 s to compile)
                finite = all_finite(span(net[1], layers[layer, 2], dW.size)) and finite
        X = A
        if drop is not None:
            X = _output(drop, A, layer, rows)
    return finite


@helper
def _update(params, grads, states, sgd, adam, rmsprop, step, halted, par, clip, bounds, workers,
            tasks):
    """optimizer_update, its write shared with the pool's ``workers`` where a large model has
    them and the update would run on this thread alone: a pass over every parameter, its
    gradient and state, which no longer sit in cache (on M under clipping ~0.1 ms a step)."""
    shared = False
    if workers is not None:  # (two ifs: Numba prunes the first by an argument's None)
        if workers > 0 and chunk_count(params.size, par) == 1:
            shared = True
            write, coef, sure, w, s1, s2, s3 = update_ready(params, grads, states, sgd, adam,
                                                            rmsprop, step, halted, par, clip,
                                                            bounds)
            if write:
                update_shared(workers, tasks, params, grads, states, sgd, adam, rmsprop, step,
                              coef)
                update_written(params, states, bounds, sure, w, s1, s2, s3)
    if not shared:
        optimizer_update(params, grads, states, sgd, adam, rmsprop, step, halted, par, clip,
                         bounds)


@inline
def _grad_sum_squares(grads, par, workers, tasks):
    """optim.grad_sum_squares, its second half summed by the pool's worker where a large model
    has one and the sum would run on this thread alone (the same bits either way)."""
    if workers is not None:
        if workers > 0 and chunk_count(grads.size, par) == 1:
            return sum_squares_shared(tasks, grads)
    return grad_sum_squares(grads, par)


@inline
def _unfused(layers, layer):
    """Where a layer's parameters outside W start in the flat buffers, and how many: b, and
    LayerNorm's gamma and beta right after it."""
    o = layers[layer, 1]
    return layers[layer, 3], o if layers[layer, 7] < 0 else 3 * o


# (``epoch``: compiled without reference counting in native mode, see _native/toolkit.py.)
@epoch
def train_epoch(net, data, work, out, first_step, loss, metric, labels, T, weights, stats, states,
                sgd, adam, rmsprop, workers, scan, par, update_par, kinds, clip, rates, drop, norm,
                mixed):
    """Every step of one epoch, as train.py's per-kernel loop runs them: gather the batch,
    forward, loss (and hits), backward, check_step, then the optimizer update of step
    ``first_step + s`` (a no-op once halted). The arguments that may be None (``labels`` or
    ``T``; ``weights``, the pair (every row's weight, the batch's), or None; ``stats``, the
    pair (ks, the epoch's statistics) of Backend.accumulate_stats, or None; all but one of the
    rules, as in optimizer_step) are separate so that Numba compiles the code of the given ones
    only. ``workers``, for large models in native mode: how many
    of the BLAS pool's threads (_native/pool.py) share each gather (0: none), which then bounds
    the weight gradients rather than scanning them (``_backward``) and fuses a plain SGD update
    into their GEMM; None for small models, which gather alone and scan (the code of the others then not
    compiled). ``scan``: True for small models, else None (for the same reason: Numba prunes
    by None only). A large model's batch is gathered by address (``_gather_split``): X must
    then be C-ordered. ``drop``: dropout (the table above) or None; ``norm``: LayerNorm's
    buffers or None; ``mixed``: bf16's scratch (the table above) or None. ``par``: that of the
    forward and backward passes, ``update_par`` of check_step's and the update's (two, because
    bf16's passes run in parallel from smaller sizes: backend.PARALLEL_MIN_BF16)."""
    params, grads, layers = net
    X_all, order, batch = data
    sums, tasks = work[4], work[5]
    work = work[:4]
    step_losses, step_hits, halted, bounds = out
    for i in range(bounds.size):  # unknown: anything may have written the weights since
        bounds[i] = math.inf
    n = order.size
    steps = (n + batch - 1) // batch
    # Plain SGD fused into dW's GEMM writes W before anything can check it: it runs only where
    # a bound on every |W| shows the new weights finite. The bound starts from a scan (once an
    # epoch), each fused step bounds its own result, and a step that is not fused scans again.
    fusable = sgd is not None and workers is not None and sgd[1] == 0 and clip is None
    w_bound = _abs_max(params) if fusable else math.inf
    for s in range(steps):
        rows = min(batch, n - s * batch)
        # this step's hyper-parameters: the given ones, or the schedule's row s in them
        sgd_s, adam_s = sgd_at_step(sgd, rates, s), adam_at_step(adam, rates, s)
        rmsprop_s = rmsprop_at_step(rmsprop, rates, s)
        index = span(order, s * batch, rows)
        if workers is not None:  # a large model's gather, with the bound of its first layer
            input_bound = rows * gather_shared(workers, X_all, order, s * batch, rows,
                                                work[0], sums)
        if scan is not None:  # (on S's 64 columns, the bound's maximum slowed the gather ~7%)
            _gather(X_all, index, work[0])
        _forward(net, work, rows, par, kinds, drop, index, first_step + s, norm, mixed, workers,
                 tasks)
        _, _, _, _, Y, dY, _ = _layer(net, work, layers.shape[0] - 1, rows)
        step_loss, step_correct = span(step_losses, s, 1), span(step_hits, s, 1)
        W = _batch_weights(weights, index, rows)
        if labels is not None:
            all_labels, batch_labels = labels[0], span(labels[1], 0, rows)
            for r in range(rows):
                batch_labels[r] = all_labels[index[r]]
            softmax_xent_labels_of(Y, batch_labels, W, dY, step_loss)
            if metric:
                count_correct_labels_of(Y, batch_labels, W, step_correct)
            if stats is not None:
                class_stats_labels_of(Y, batch_labels, W, stats[0], stats[1])
        elif T is not None:
            all_T, batch_T = T[0], span(T[1], 0, rows)
            _gather(all_T, index, batch_T)
            if loss == CROSS_ENTROPY:
                softmax_xent_rows_of(Y, batch_T, W, dY, step_loss)
            elif loss == BINARY_CROSS_ENTROPY:
                binary_xent_of(Y, batch_T, W, dY, step_loss)
            else:
                mse_of(Y, batch_T, W, dY, step_loss)
            if metric:
                count_correct_rows_of(Y, batch_T, W, step_correct)
            if stats is not None:
                if loss == MSE:
                    regression_stats_of(Y, batch_T, W, stats[1])
                else:
                    class_stats_rows_of(Y, batch_T, W, stats[0], stats[1])
        if workers is not None:  # (two ifs: Numba prunes each by an argument that is None)
            finite, sure, dw_bound = _backward(net, work, rows, par, kinds, sums, input_bound,
                                               drop, index, first_step + s, norm, mixed,
                                               workers, tasks)
        if scan is not None:
            finite, sure, dw_bound = _backward_scan(net, work, rows, par, kinds, drop, index,
                                                      first_step + s, norm, mixed), False, \
                math.inf
        finite = finite and math.isfinite(step_loss[0])
        # Plain SGD (no momentum) updates W inside dW's GEMM, W = (1 - lr wd) W - lr X.T @ dZ,
        # as its update would (but for the rounding of dW, which is not stored): no separate
        # pass over every weight and its gradient, which no longer sit in cache by then (~100
        # us a step on M). Only where the step is sure to be finite, its update included (the
        # bound on |W|, and the biases' update checked first): the latch could not undo it.
        # Not on the epoch's last step, whose gradients stay in ``grads`` as the per-kernel
        # loop leaves them.
        fused, alpha, beta = False, 1.0, 0.0
        # (``sgd is not None`` first: Numba prunes a test of an argument against None before
        # typing, on every release, but not ``fusable``, and sgd_s[0] has no type when None)
        if sgd is not None:
            if fusable:
                if sure and finite and halted[0] == 0 and s + 1 < steps:
                    alpha, beta = -sgd_s[0], 1.0 - sgd_s[0] * sgd_s[4]
                    new_bound = _fused_weight_bound(params.itemsize, rows, w_bound, dw_bound,
                                                    alpha, beta)
                    fused = new_bound < math.inf
                    for layer in range(layers.shape[0]):  # the biases' update, not yet written
                        b, o = _unfused(layers, layer)
                        fused = fused and update_rule(span(params, b, o), span(grads, b, o),
                                                      states, sgd_s, adam_s, rmsprop_s,
                                                      first_step + s, 1.0, False)
                    if fused:
                        w_bound = new_bound
                    else:
                        alpha, beta = 1.0, 0.0
        finite = _weight_gradients(net, work, rows, alpha, beta, fused,
                                   not sure and clip is None, drop, mixed) and finite
        if clip is not None:  # check_step's pass, the norm's sum of squares with it
            clip[0] = _grad_sum_squares(grads, update_par, workers, tasks)
            finite = finite and math.isfinite(clip[0])
            bounds[4] = norm_bound(clip[0], grads.size)
        if fusable and fused:
            for layer in range(layers.shape[0]):  # the biases, by the rule itself
                b, o = _unfused(layers, layer)
                update_rule(span(params, b, o), span(grads, b, o), states, sgd_s, adam_s,
                            rmsprop_s, first_step + s, 1.0, True)
            bounds[0] = math.inf  # (the GEMM wrote W: its bound is w_bound's business)
            continue
        if halted[0] == 0 and not finite:
            halted[0] = first_step + s  # check_step's latch
        # (the gradients' bound comes from a pass of the update's own: the scans above check)
        _update(params, grads, states, sgd_s, adam_s, rmsprop_s, first_step + s, halted,
                update_par, clip, bounds, workers, tasks)
        if fusable and halted[0] == 0 and s + 2 < steps:
            w_bound = _abs_max(params)  # a step that was not fused moved W by its own rule
