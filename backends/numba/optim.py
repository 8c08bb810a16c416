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

from ..base import CLIP_EPS
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


@inline
def sum_squares(x):
    """The sum of x[i]^2 in float64: inf or NaN where any x[i] is (or where the sum
    overflows), so it is the latch's finiteness check too."""
    total = 0.0
    for i in range(x.size):
        value = np.float64(x[i])
        total += value * value
    return total


@phelper
def _sum_squares_par(x, chunks):
    total = 0.0
    for c in numba.prange(chunks):
        i0, i1 = chunk_bounds(c, chunks, x.size)
        total += sum_squares(x[i0:i1])
    return total


@helper
def grad_sum_squares(grads, par):
    """check_step's pass under gradient clipping: the sum of squares of every gradient."""
    chunks = chunk_count(grads.size, par)
    if par is None or chunks == 1:
        return sum_squares(grads)
    return _sum_squares_par(grads, chunks)


@inline
def clip_coefficient(clip):
    """The factor of every gradient element: torch.nn.utils.clip_grad_norm_'s, from
    check_step's sum of squares (clip[0]) and the max norm (clip[1]); 1 without ``clip``."""
    if clip is None:
        return 1.0
    return min(1.0, clip[1] / (math.sqrt(clip[0]) + CLIP_EPS))


@jit
def check_step(loss, grads, step, halted, par, clip):
    if halted[0] != 0:
        return
    if clip is not None:  # the one pass: the sum of squares is finite only where every g is
        clip[0] = grad_sum_squares(grads, par)
        finite = math.isfinite(clip[0])
    else:
        chunks = chunk_count(grads.size, par)
        if par is None or chunks == 1:
            finite = all_finite(grads)
        else:
            finite = _finite_par(grads, chunks)
    if not (finite and math.isfinite(loss[0])):
        halted[0] = step


# ------------------------------------------------------------------------- optimizers
# Each rule is one function of an element's old values returning its new ones (``_*_element``)
# and one loop over the buffers (``_sgd``, ``_adam``, ``_rmsprop``) that either writes those new
# values (``write``) or only asks whether every one of them is finite: the latch's check of the
# update runs the very arithmetic the write then repeats, so the two can never disagree.
# x - x is NaN for inf and NaN, 0 for any finite x: a sum of such terms is 0 only where every
# value is finite, with no branch to stop the check loops vectorizing.


# _unused: a state buffer the rule leaves unused is empty, and a load guarded by a condition
# stops LLVM vectorizing the loop (a write pass ~4x slower). Such a buffer's old values are read
# from ``g`` instead (same length, never written): loaded unconditionally, ignored by the rule.
@inline
def _sgd_element(w, d, b, first, lr, momentum, undamped, weight_decay, nesterov):
    """(new weight, new momentum buffer) of one element; ``b`` is ignored without momentum."""
    if weight_decay != 0:
        d = w * weight_decay + d  # torch adds L2 decay before momentum
    if momentum != 0:
        b = d if first else b * momentum + d * undamped
        d = d + b * momentum if nesterov else b
    return w - d * lr, b


@inline
def _sgd(p, g, buf, hp, first, coef, write):
    cast = p.dtype.type
    coef = cast(coef)  # the clip coefficient, 1 without clipping (an exact multiply)
    lr, momentum, undamped, weight_decay = cast(hp[0]), cast(hp[1]), cast(1.0 - hp[2]), cast(hp[4])
    nesterov = hp[3] != 0
    old = buf if momentum != 0 else g  # see _unused
    if write:
        for i in range(p.size):
            w, b = _sgd_element(p[i], g[i] * coef, old[i], first, lr, momentum, undamped,
                                weight_decay, nesterov)
            if momentum != 0:
                old[i] = b  # (buf itself: a store through another name would alias it)
            p[i] = w
        return True
    bad = False
    for i in range(p.size):
        w, b = _sgd_element(p[i], g[i] * coef, old[i], first, lr, momentum, undamped,
                            weight_decay, nesterov)
        bad |= ((w - w) + (b - b)) != 0
    return not bad


@inline
def _adam_element(w, d, m, v, beta1, beta2, eps, weight_decay, decay, decoupled, new1, new2,
                  step_size, root_bc2):
    """(new weight, new exp_avg, new exp_avg_sq) of one element."""
    if weight_decay != 0:
        if decoupled:
            w = w * decay
        else:
            d = w * weight_decay + d
    m = m * beta1 + d * new1
    v = v * beta2 + d * d * new2
    # torch divides sqrt(v) by sqrt(bias correction) before adding eps
    return w - m / (math.sqrt(v) / root_bc2 + eps) * step_size, m, v


@inline
def _adam(p, g, m, v, hp, step_size, root_bc2, coef, write):
    cast = p.dtype.type
    coef = cast(coef)
    beta1, beta2, eps, weight_decay = cast(hp[1]), cast(hp[2]), cast(hp[3]), cast(hp[4])
    decay, decoupled = cast(1.0 - hp[0] * hp[4]), hp[5] != 0
    new1, new2, step_size, root_bc2 = cast(1.0 - hp[1]), cast(1.0 - hp[2]), cast(step_size), \
        cast(root_bc2)
    if write:
        for i in range(p.size):
            w, mi, vi = _adam_element(p[i], g[i] * coef, m[i], v[i], beta1, beta2, eps, weight_decay,
                                      decay, decoupled, new1, new2, step_size, root_bc2)
            p[i], m[i], v[i] = w, mi, vi
        return True
    bad = False
    for i in range(p.size):
        w, mi, vi = _adam_element(p[i], g[i] * coef, m[i], v[i], beta1, beta2, eps, weight_decay, decay,
                                  decoupled, new1, new2, step_size, root_bc2)
        bad |= ((w - w) + (mi - mi) + (vi - vi)) != 0
    return not bad


@inline
def _rmsprop_element(w, d, sq, b, ga, lr, alpha, eps, weight_decay, momentum, new, centered):
    """(new weight, square_avg, momentum buffer, grad_avg) of one element; ``b`` and ``ga`` are
    passed through unchanged where momentum is 0 and where not centered."""
    if weight_decay != 0:
        d = w * weight_decay + d
    sq = sq * alpha + d * d * new
    if centered:
        ga = ga * alpha + d * new
        avg = math.sqrt(sq - ga * ga)
    else:
        avg = math.sqrt(sq)
    d = d / (avg + eps)
    if momentum > 0:
        b = b * momentum + d
        d = b
    return w - d * lr, sq, b, ga


@inline
def _rmsprop(p, g, square_avg, buf, grad_avg, hp, coef, write):
    cast = p.dtype.type
    coef = cast(coef)
    lr, alpha, eps, weight_decay = cast(hp[0]), cast(hp[1]), cast(hp[2]), cast(hp[3])
    momentum, new, centered = cast(hp[4]), cast(1.0 - hp[1]), hp[5] != 0
    old_buf, old_avg = buf if momentum > 0 else g, grad_avg if centered else g  # see _unused
    if write:
        for i in range(p.size):
            w, sq, b, ga = _rmsprop_element(p[i], g[i] * coef, square_avg[i], old_buf[i], old_avg[i],
                                            lr, alpha, eps, weight_decay, momentum, new,
                                            centered)
            square_avg[i] = sq
            if momentum > 0:
                old_buf[i] = b  # (buf and grad_avg themselves, see _sgd)
            if centered:
                old_avg[i] = ga
            p[i] = w
        return True
    bad = False
    for i in range(p.size):
        w, sq, b, ga = _rmsprop_element(p[i], g[i] * coef, square_avg[i], old_buf[i], old_avg[i], lr,
                                        alpha, eps, weight_decay, momentum, new, centered)
        bad |= ((w - w) + (sq - sq) + (b - b) + (ga - ga)) != 0
    return not bad


# A per-step schedule's row s (rates[s] = learning rate, base.RATE_MOMENTUM) in a rule's
# hyper-parameters: the epoch kernel's update of step s. Helpers, not inlined: each is compiled
# for its own argument types, so that Numba prunes by ``hp is None`` and ``rates is None``.
@helper
def sgd_at_step(hp, rates, s):
    if hp is None or rates is None:
        return hp
    return (rates[s, 0], rates[s, 1], hp[2], hp[3], hp[4])


@helper
def adam_at_step(hp, rates, s):
    if hp is None or rates is None:
        return hp
    return (rates[s, 0], rates[s, 1], hp[2], hp[3], hp[4], hp[5])


@helper
def rmsprop_at_step(hp, rates, s):
    if hp is None or rates is None:
        return hp
    return (rates[s, 0], hp[1], hp[2], hp[3], rates[s, 1], hp[5])


@helper
def update_rule(p, g, states, sgd, adam, rmsprop, step, coef, write):
    """With ``write``, the update of one rule (the others' hyper-parameters None) over ``p``
    and its state buffers, returning True; without, writes nothing and returns whether every
    value the update would write is finite. ``coef``: the gradient's clip coefficient (1.0
    without clipping)."""
    s1, s2, s3 = states
    if sgd is not None:
        return _sgd(p, g, s1, sgd, step == 1, coef, write)  # the momentum buffer starts as the gradient
    elif adam is not None:
        # math.pow, as Python's float ** int (the NumPy backend's) computes it; Numba's ** by
        # an integer multiplies instead (other last bits), and costs its own compile
        step_size = adam[0] / (1.0 - math.pow(adam[1], step))
        return _adam(p, g, s1, s2, adam, step_size, math.sqrt(1.0 - math.pow(adam[2], step)),
                     coef, write)
    elif rmsprop is not None:
        return _rmsprop(p, g, s1, s2, s3, rmsprop, coef, write)
    return True


@phelper
def _update_par(p, g, states, sgd, adam, rmsprop, step, coef, chunks, write):
    """``update_rule`` chunk by chunk in parallel; returns whether every chunk's did (so,
    without ``write``, whether the whole update is finite). A count of the bad chunks: a prange
    reduction, no array allocated per step."""
    s1, s2, s3 = states
    bad = 0
    for c in numba.prange(chunks):
        i0, i1 = chunk_bounds(c, chunks, p.size)
        # an unused state buffer is empty, and so is its slice
        chunk = (s1[i0:i1], s2[i0:i1], s3[i0:i1])
        bad += 0 if update_rule(p[i0:i1], g[i0:i1], chunk, sgd, adam, rmsprop, step, coef,
                                write) else 1
    return bad == 0


@inline
def optimizer_update(p, g, states, sgd, adam, rmsprop, step, halted, par, clip):
    """One update of the flat parameters ``p``, a no-op while halted[0] != 0, by the one rule
    of sgd / adam / rmsprop whose hyper-parameters are given: the others are None, a type to
    Numba, which then compiles that rule only. ``states``: three buffers in the order of the
    rule's ``base.RULES`` row. The latch covers the update: a first pass computes every new
    value and writes none; if one is not finite, ``halted[0] = step`` and nothing is written
    (one more read of the buffers per step, no host round trip). ``clip``: None, or
    check_step's clipping array (base.py), whose coefficient scales each gradient as read."""
    if halted[0] != 0:
        return
    coef = clip_coefficient(clip)
    chunks = chunk_count(p.size, par)
    if par is None or chunks == 1:
        if update_rule(p, g, states, sgd, adam, rmsprop, step, coef, False):
            update_rule(p, g, states, sgd, adam, rmsprop, step, coef, True)
        else:
            halted[0] = step
    elif _update_par(p, g, states, sgd, adam, rmsprop, step, coef, chunks, False):
        _update_par(p, g, states, sgd, adam, rmsprop, step, coef, chunks, True)
    else:
        halted[0] = step


@jit
def optimizer_step(p, g, states, sgd, adam, rmsprop, step, halted, par, clip):
    optimizer_update(p, g, states, sgd, adam, rmsprop, step, halted, par, clip)
