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
from .jit import helper, inline, jit, phelper, summing
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
def magnitude_bound(x):
    """A power of two >= every |x[i]|, from the largest exponent field (an integer max over
    the bits); inf where any x[i] is inf or NaN."""
    if x.itemsize == 4:
        bits32 = x.view(np.uint32)
        top32 = np.uint32(0)
        for i in range(bits32.size):
            top32 = max(top32, bits32[i] & np.uint32(0x7f800000))
        e = int(top32 >> np.uint32(23))
        return math.inf if e == 255 else math.ldexp(1.0, e - 126)
    bits64 = x.view(np.uint64)
    top64 = np.uint64(0)
    for i in range(bits64.size):
        top64 = max(top64, bits64[i] & np.uint64(0x7ff0000000000000))
    e = int(top64 >> np.uint64(52))
    return math.inf if e == 2047 else math.ldexp(1.0, e - 1022)


@inline
def finite_and_bound(x):
    """all_finite(x) and a power of two >= every |x[i]| (inf where unknown), in the one pass:
    the bound from the OR of the exponent fields, which is at least their maximum. (An OR
    reduction runs as fast as all_finite's; an integer max took twice as long. Where the
    gradients mix exponents at or above 1 with smaller ones the OR may reach the inf
    pattern: the bound is then unknown, and the update checks in full.)"""
    bad = False
    if x.itemsize == 4:
        bits32 = x.view(np.uint32)
        any32 = np.uint32(0)
        for i in range(x.size):
            bad |= (x[i] - x[i]) != 0
            any32 |= bits32[i] & np.uint32(0x7f800000)
        e = int(any32 >> np.uint32(23))
        return not bad, (math.inf if e == 255 else math.ldexp(1.0, e - 126))
    bits64 = x.view(np.uint64)
    any64 = np.uint64(0)
    for i in range(x.size):
        bad |= (x[i] - x[i]) != 0
        any64 |= bits64[i] & np.uint64(0x7ff0000000000000)
    e = int(any64 >> np.uint64(52))
    return not bad, (math.inf if e == 2047 else math.ldexp(1.0, e - 1022))


@summing
def sum_squares(x):
    """The sum of x[i]^2 in float64: inf or NaN where any x[i] is (or where the sum
    overflows), so it is the latch's finiteness check too. In vector lanes (jit.summing): one
    addition after the other, clipping's pass cost M ~0.3 ms a step."""
    total = 0.0
    for i in range(x.size):
        value = np.float64(x[i])
        total += value * value
    return total


@inline
def norm_bound(total, n):
    """A bound on every |g[i]| from the sum of squares ``total`` of the ``n`` gradients
    (sum_squares): |g[i]| <= sqrt(sum g^2), with room for the float64 sum's roundings (in any
    order, a relative (n - 1) 2^-53 at most) and sqrt's; inf where the sum is not finite. The
    update's bound under clipping without a pass of its own (optimizer_update)."""
    if not math.isfinite(total):
        return math.inf
    return math.sqrt(total) * (1.0 + (n + 8) * 2.0 ** -52)


@phelper
def _sum_squares_par(x, chunks):
    total = 0.0
    for c in numba.prange(chunks):
        i0, i1 = chunk_bounds(c, chunks, x.size)
        total += sum_squares(x[i0:i1])
    return total


@helper
def grad_sum_squares(grads, par):
    """check_step's pass under gradient clipping: the sum of squares of every gradient. On one
    thread, that of each half, then their sum: the order the epoch kernel keeps where the
    BLAS pool's worker sums the second half (_native/passes.py)."""
    chunks = chunk_count(grads.size, par)
    if par is None or chunks == 1:
        half = grads.size // 2
        return sum_squares(grads[:half]) + sum_squares(grads[half:])
    return _sum_squares_par(grads, chunks)


@inline
def clip_coefficient(clip):
    """The factor of every gradient element: torch.nn.utils.clip_grad_norm_'s, from
    check_step's sum of squares (clip[0]) and the max norm (clip[1]); 1 without ``clip``."""
    if clip is None:
        return 1.0
    return min(1.0, clip[1] / (math.sqrt(clip[0]) + CLIP_EPS))


@jit
def check_step(loss, grads, step, halted, par, clip, bounds):
    if halted[0] != 0:
        return
    if clip is not None:  # the one pass: the sum of squares is finite only where every g is
        clip[0] = grad_sum_squares(grads, par)
        finite = math.isfinite(clip[0])
        if bounds is not None:
            bounds[4] = norm_bound(clip[0], grads.size)
    elif bounds is not None and (par is None or chunk_count(grads.size, par) == 1):
        # the same one pass, an integer max: the gradients' bound for the update (bounds[4])
        finite, bounds[4] = finite_and_bound(grads)
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


# ------------------------------------------------------------------------- bounded updates
# The update's check pass, skipped where bounds prove every new value finite (base.py's
# ``bounds``): upper bounds of max |p| and of each state buffer's max |value| (inf: unknown),
# kept from step to step. A step then reads only the gradient (its largest exponent: an integer
# pass, which vectorizes where a float max would not), bounds every intermediate and new value
# of its rule in float64 from those, and, where each is at most a quarter of the dtype's
# largest value, writes at once and keeps the new bounds. (A computed value is a few roundings,
# each of relative error u, from a sum of terms each at most its bound: (1 + u)^10 < 1.001
# leaves it far below the largest value.) Otherwise the full check pass runs, and the bounds
# are measured again after its write.
_F32_MAX, _F64_MAX = float(np.finfo(np.float32).max), float(np.finfo(np.float64).max)


@inline
def _below(limit, values):
    """Whether every one of the tuple ``values`` is at most ``limit`` (False for NaN)."""
    ok = True
    for value in values:
        ok = ok and value <= limit
    return ok


@helper
def rule_bounds(p, sgd, adam, rmsprop, step, coef, grad, bounds):
    """(whether every value the update of ``step`` computes is sure to be finite, and the new
    bounds of |p| and of the three state buffers), from ``grad`` >= max |g| and ``bounds``.
    The hyper-parameters as the rule rounds them to the dtype."""
    cast = p.dtype.type
    limit = (_F32_MAX if p.itemsize == 4 else _F64_MAX) / 4
    w, s1, s2, s3 = bounds[0], bounds[1], bounds[2], bounds[3]
    if sgd is not None:
        lr, momentum = abs(float(cast(sgd[0]))), abs(float(cast(sgd[1])))
        undamped, decay = abs(float(cast(1.0 - sgd[2]))), abs(float(cast(sgd[4])))
        d = grad * float(cast(coef)) + w * decay
        b = 0.0
        if momentum != 0:
            b = d if step == 1 else s1 * momentum + d * undamped
            d = d + b * momentum if sgd[3] != 0 else b
        new_w = w + d * lr
        return _below(limit, (d, b, d * lr, new_w)), new_w, b, s2, s3
    if adam is not None:
        decoupled = adam[5] != 0 and adam[4] != 0
        beta1, beta2 = abs(float(cast(adam[1]))), abs(float(cast(adam[2])))
        eps, decay = float(cast(adam[3])), abs(float(cast(adam[4])))
        step_size = abs(float(cast(adam[0] / (1.0 - math.pow(adam[1], step)))))
        root_bc2 = float(cast(math.sqrt(1.0 - math.pow(adam[2], step))))
        if decoupled:
            w = w * abs(float(cast(1.0 - adam[0] * adam[4])))
        d = grad * float(cast(coef)) + (0.0 if decoupled else w * decay)
        m = s1 * beta1 + d * abs(float(cast(1.0 - adam[1])))
        v = s2 * beta2 + d * d * abs(float(cast(1.0 - adam[2])))
        if not (eps > 0 and root_bc2 > 0):  # a denominator that may be 0
            return False, w, m, v, s3
        q = m / eps  # |m / (sqrt(v) / root_bc2 + eps)|, v >= 0
        new_w = w + q * step_size
        return _below(limit, (d, d * d, m, v, math.sqrt(v) / root_bc2, q, q * step_size,
                              new_w)), new_w, m, v, s3
    if rmsprop is not None:
        lr, alpha, eps = abs(float(cast(rmsprop[0]))), abs(float(cast(rmsprop[1]))), \
            float(cast(rmsprop[2]))
        decay, momentum = abs(float(cast(rmsprop[3]))), abs(float(cast(rmsprop[4])))
        if rmsprop[5] != 0 or not eps > 0:  # centered: sqrt(sq - ga^2) may be of a negative
            return False, w, s1, s2, s3
        d = grad * float(cast(coef)) + w * decay
        sq = s1 * alpha + d * d * abs(float(cast(1.0 - rmsprop[1])))
        u = d / eps  # |d / (sqrt(sq) + eps)|
        b = 0.0
        if momentum > 0:
            b = s2 * momentum + u
            u = b
        new_w = w + u * lr
        return _below(limit, (d, d * d, sq, u, b, u * lr, new_w)), new_w, sq, b, s3
    return False, w, s1, s2, s3


@inline
def measure_bounds(p, states, bounds):
    s1, s2, s3 = states
    bounds[0] = magnitude_bound(p)
    bounds[1] = magnitude_bound(s1)
    bounds[2] = magnitude_bound(s2)
    bounds[3] = magnitude_bound(s3)


@helper
def update_ready(p, g, states, sgd, adam, rmsprop, step, halted, par, clip, bounds):
    """optimizer_update up to its write: (whether to write, the clip coefficient, whether the
    bounds proved the update finite, and then the new bounds). Not sure, the check pass runs
    here, and a step it finds not finite latches (halted[0] = step) and is not written."""
    coef = clip_coefficient(clip)
    sure, w, s1, s2, s3 = False, math.inf, math.inf, math.inf, math.inf
    if halted[0] != 0:
        return False, coef, sure, w, s1, s2, s3
    if bounds is not None:
        # the gradients' bound from this step's check_step, used once (a later step without
        # check_step scans them itself)
        grad = bounds[4] if bounds[4] < math.inf else magnitude_bound(g)
        bounds[4] = math.inf
        sure, w, s1, s2, s3 = rule_bounds(p, sgd, adam, rmsprop, step, coef, grad, bounds)
    if not sure:
        chunks = chunk_count(p.size, par)
        if par is None or chunks == 1:
            finite = update_rule(p, g, states, sgd, adam, rmsprop, step, coef, False)
        else:
            finite = _update_par(p, g, states, sgd, adam, rmsprop, step, coef, chunks, False)
        if not finite:
            halted[0] = step
            return False, coef, sure, w, s1, s2, s3
    return True, coef, sure, w, s1, s2, s3


@helper
def update_written(p, states, bounds, sure, w, s1, s2, s3):
    """optimizer_update after its write: the bounds of the values just written, or measured
    (a step the bounds could not prove finite starts them afresh)."""
    if bounds is not None:
        if sure:
            bounds[0], bounds[1], bounds[2], bounds[3] = w, s1, s2, s3
        else:
            measure_bounds(p, states, bounds)


@helper  # (not inlined: compiled once per rule and dtype for every epoch kernel, epoch.py)
def optimizer_update(p, g, states, sgd, adam, rmsprop, step, halted, par, clip, bounds):
    """One update of the flat parameters ``p``, a no-op while halted[0] != 0, by the one rule
    of sgd / adam / rmsprop whose hyper-parameters are given: the others are None, a type to
    Numba, which then compiles that rule only. ``states``: three buffers in the order of the
    rule's ``base.RULES`` row. The latch covers the update: a first pass computes every new
    value and writes none; if one is not finite, ``halted[0] = step`` and nothing is written
    (one more read of the buffers per step, no host round trip). ``clip``: None, or
    check_step's clipping array (base.py), whose coefficient scales each gradient as read.
    ``bounds``: None, or base.py's bounds of |p| and the state: where they prove the update
    finite, the first pass is skipped (``rule_bounds``)."""
    write, coef, sure, w, s1, s2, s3 = update_ready(p, g, states, sgd, adam, rmsprop, step,
                                                    halted, par, clip, bounds)
    if not write:
        return
    chunks = chunk_count(p.size, par)
    if par is None or chunks == 1:
        update_rule(p, g, states, sgd, adam, rmsprop, step, coef, True)
    else:
        _update_par(p, g, states, sgd, adam, rmsprop, step, coef, chunks, True)
    update_written(p, states, bounds, sure, w, s1, s2, s3)


@jit
def optimizer_step(p, g, states, sgd, adam, rmsprop, step, halted, par, clip, bounds):
    optimizer_update(p, g, states, sgd, adam, rmsprop, step, halted, par, clip, bounds)
