"""Divergence (check_step's latch) and the optimizers' fused updates of the flat buffers.

torch.optim's rules, one pass over the flat buffers, in the NumPy backend's order of
operations and, like it, in the dtype of the parameters: they agree to the last bits, and
float32 runs at full vector width (twice as fast as with float64 scalars). A rule's
hyper-parameters come as a tuple of floats in the order of its row of ``base.RULES``; a state
buffer the rule does not use is an empty array. Workers take views of their chunk and count
from 0: an index Numba cannot prove non-negative gets a wrap-around test per access, which
stops LLVM vectorizing.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .jit import helper, inline, jit, phelper
from .layers import chunk_bounds, chunk_count

# ------------------------------------------------------------------------- divergence
@inline
def all_finite(x):
    bad = False
    for i in range(x.size):
        bad |= (x[i] - x[i]) != 0  # NaN for inf and NaN, 0 for any finite value
    return not bad


@phelper
def _finite_par(x, chunks):
    ok = np.empty(chunks, np.bool_)
    for c in numba.prange(chunks):
        i0, i1 = chunk_bounds(c, chunks, x.size)
        ok[c] = all_finite(x[i0:i1])
    return ok.all()


@jit
def check_step(loss, grads, step, halted, par):
    if halted[0] != 0:
        return
    chunks = chunk_count(grads.size, par)
    if par is None or chunks == 1:
        finite = all_finite(grads)
    else:
        finite = _finite_par(grads, chunks)
    if not (finite and math.isfinite(loss[0])):
        halted[0] = step


# ------------------------------------------------------------------------- optimizers
@inline
def _sgd(p, g, buf, hp, first):
    cast = p.dtype.type
    lr, momentum, undamped, weight_decay = cast(hp[0]), cast(hp[1]), cast(1.0 - hp[2]), cast(hp[4])
    nesterov = hp[3] != 0
    for i in range(p.size):
        d = g[i]
        if weight_decay != 0:
            d = p[i] * weight_decay + d  # torch adds L2 decay before momentum
        if momentum != 0:
            m = d if first else buf[i] * momentum + d * undamped
            buf[i] = m
            d = d + m * momentum if nesterov else m
        p[i] = p[i] - d * lr


@inline
def _adam(p, g, m, v, hp, step_size, root_bc2):
    cast = p.dtype.type
    beta1, beta2, eps, weight_decay = cast(hp[1]), cast(hp[2]), cast(hp[3]), cast(hp[4])
    decay, decoupled = cast(1.0 - hp[0] * hp[4]), hp[5] != 0
    new1, new2, step_size, root_bc2 = cast(1.0 - hp[1]), cast(1.0 - hp[2]), cast(step_size), \
        cast(root_bc2)
    for i in range(p.size):
        d = g[i]
        if weight_decay != 0:
            if decoupled:
                p[i] = p[i] * decay
            else:
                d = p[i] * weight_decay + d
        m[i] = m[i] * beta1 + d * new1
        v[i] = v[i] * beta2 + d * d * new2
        # torch divides sqrt(v) by sqrt(bias correction) before adding eps
        p[i] = p[i] - m[i] / (math.sqrt(v[i]) / root_bc2 + eps) * step_size


@inline
def _rmsprop(p, g, square_avg, buf, grad_avg, hp):
    cast = p.dtype.type
    lr, alpha, eps, weight_decay = cast(hp[0]), cast(hp[1]), cast(hp[2]), cast(hp[3])
    momentum, new, centered = cast(hp[4]), cast(1.0 - hp[1]), hp[5] != 0
    for i in range(p.size):
        d = g[i]
        if weight_decay != 0:
            d = p[i] * weight_decay + d
        square_avg[i] = square_avg[i] * alpha + d * d * new
        if centered:
            grad_avg[i] = grad_avg[i] * alpha + d * new
            avg = math.sqrt(square_avg[i] - grad_avg[i] * grad_avg[i])
        else:
            avg = math.sqrt(square_avg[i])
        d = d / (avg + eps)
        if momentum > 0:
            buf[i] = buf[i] * momentum + d
            d = buf[i]
        p[i] = p[i] - d * lr


@helper
def update_rule(p, g, states, sgd, adam, rmsprop, step):
    s1, s2, s3 = states
    if sgd is not None:
        _sgd(p, g, s1, sgd, step == 1)  # the momentum buffer starts as the gradient
    elif adam is not None:
        # math.pow, as Python's float ** int (the NumPy backend's) computes it; Numba's ** by
        # an integer multiplies instead (other last bits), and costs its own compile
        step_size = adam[0] / (1.0 - math.pow(adam[1], step))
        _adam(p, g, s1, s2, adam, step_size, math.sqrt(1.0 - math.pow(adam[2], step)))
    elif rmsprop is not None:
        _rmsprop(p, g, s1, s2, s3, rmsprop)


@phelper
def _update_par(p, g, states, sgd, adam, rmsprop, step, chunks):
    s1, s2, s3 = states
    for c in numba.prange(chunks):
        i0, i1 = chunk_bounds(c, chunks, p.size)
        # an unused state buffer is empty, and so is its slice
        chunk = (s1[i0:i1], s2[i0:i1], s3[i0:i1])
        update_rule(p[i0:i1], g[i0:i1], chunk, sgd, adam, rmsprop, step)


@inline
def optimizer_update(p, g, states, sgd, adam, rmsprop, step, halted, par):
    """One update of the flat parameters ``p``, a no-op while halted[0] != 0, by the one rule
    of sgd / adam / rmsprop whose hyper-parameters are given: the others are None, a type to
    Numba, which then compiles that rule only. ``states``: three buffers in the order of the rule's ``base.RULES`` row."""
    if halted[0] != 0:
        return
    chunks = chunk_count(p.size, par)
    if par is None or chunks == 1:
        update_rule(p, g, states, sgd, adam, rmsprop, step)
    else:
        _update_par(p, g, states, sgd, adam, rmsprop, step, chunks)


@jit
def optimizer_step(p, g, states, sgd, adam, rmsprop, step, halted, par):
    optimizer_update(p, g, states, sgd, adam, rmsprop, step, halted, par)
