"""The dense layer's kernels: the activations and their derivatives, and the row passes that
fuse them with the bias (forward) and with db (backward) around NumPy's BLAS.

Numba compiles a kernel the first time it is called, for the types of that call; in native
mode it caches the machine code on disk (``cache=True``) and a second process loads it.
Importing this module compiles nothing. Decorators, views and the GEMM come from ``jit.py``,
by the same names in native and plain mode.

Kernels that may run in parallel take ``par``: None to run serially, or the fewest elements
worth a parallel chunk. Their work is then a serial worker plus a small ``prange`` driver over
chunks of at least ``par`` elements, which Numba shares out among its threads. The chunks depend
on the sizes only, not on the number of threads, and so do the results. ``par=None`` is a type
to Numba: the parallel drivers under such a call are pruned away, not even compiled.

Every kernel also runs as plain Python under ``NUMBA_DISABLE_JIT=1`` (slowly).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ..base import ACTIVATION_CODES, LEAKY_RELU_SLOPE, ONE_OVER_SQRT_2PI, SQRT_HALF
from .jit import gemm_t, helper, inline, jit, linked, phelper

# Inlined into its callers by Numba itself (``inline``), for two reasons. Code that must be
# inlined into a loop for the loop to vectorize but that LLVM judges too big to inline (tanh).
# And compile time: each function compiled on its own has a fixed cost (~0.1 s: its pipeline,
# its LLVM module), so small helpers and one-call wrappers are cheaper inlined. Helpers called
# from several places with different types, or with loops that vectorize on their own, stay
# separate (``helper``), and so do the dense layers' row passes (_bias_act_rows_of,
# _grad_rows_of): inlined into the epoch kernel, they ran M's epochs ~15% slower. Their
# wrappers (dense_layer, dz_and_db) are inlined: compiled on their own they cost the first
# compile ~0.3 s. Inlining has a cost of its own: Numba copies the callee block by block, each
# time with all its variables, and with the branches the caller will prune (so a callee whose
# branches some models never take is better split: epoch._backward_scan).

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH, GELU, SILU = (ACTIVATION_CODES[name] for name in (
    "identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"))
MAX_CHUNKS = 64

_SLOPE = LEAKY_RELU_SLOPE
_SQRT_HALF, _ONE_OVER_SQRT_2PI = SQRT_HALF, ONE_OVER_SQRT_2PI
_INV_LN2 = 1.44269504088896338700
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm's split
_INV_FACTORIAL = tuple(1.0 / math.factorial(k) for k in range(14))
_TANH_TAYLOR = (1.0, -1.0 / 3, 2.0 / 15, -17.0 / 315, 62.0 / 2835, -1382.0 / 155925,
                21844.0 / 6081075, -929569.0 / 638512875, 6404582.0 / 10854718875)


@inline
def chunk_count(size, par):
    """Into how many chunks of at least ``par`` elements to split work of ``size`` (1: serial).
    (Not the thread count: a compiled call of numba.get_num_threads() cannot be cached.)"""
    return 1 if par is None or size < 2 * par else min(size // par, MAX_CHUNKS)


@inline
def chunk_bounds(c, chunks, n):
    return c * n // chunks, (c + 1) * n // chunks


# ------------------------------------------------------------------------- activations
# tanh (and sigmoid, from it) from arithmetic only: libm's tanh is a call per element (~17 ns),
# this inlines into the activation loops, which LLVM then vectorizes (~2 ns in float64), and
# agrees with libm to 5e-16 relative.

@inline
def _exp_neg(x):
    """exp(-x) for 0 <= x <= 42: 2^-k exp(r) with |r| <= ln2 / 2, exp(r) by its Taylor
    polynomial of degree 13 (error < 1e-17)."""
    k = math.floor(x * _INV_LN2 + 0.5)
    r = (k * _LN2_HI - x) + k * _LN2_LO
    f = _INV_FACTORIAL
    p = ((((((((((((f[13] * r + f[12]) * r + f[11]) * r + f[10]) * r + f[9]) * r + f[8]) * r
                + f[7]) * r + f[6]) * r + f[5]) * r + f[4]) * r + f[3]) * r + f[2]) * r
         + f[1]) * r + f[0]
    return p / float(1 << int(k))


@inline
def _tanh(z):
    a = min(abs(z), 21.0)  # tanh(21) rounds to 1 in float64; exp_neg's range
    e = _exp_neg(2.0 * a)
    # (1 - e) / (1 + e) loses digits to cancellation near 0, where the Taylor series is exact
    c, a2 = _TANH_TAYLOR, a * a
    small = a * ((((((((c[8] * a2 + c[7]) * a2 + c[6]) * a2 + c[5]) * a2 + c[4]) * a2 + c[3])
                    * a2 + c[2]) * a2 + c[1]) * a2 + c[0])
    t = math.copysign(small if a < 0.125 else (1.0 - e) / (1.0 + e), z)
    return z if z != z else t


@linked
def _normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z * _SQRT_HALF))


@linked
def _gelu(z):
    return z * _normal_cdf(z)


@linked
def _gelu_derivative(z):  # d/dz z Phi(z) = Phi(z) + z phi(z)
    return _normal_cdf(z) + math.exp(z * z * -0.5) * _ONE_OVER_SQRT_2PI * z


@inline
def _relu(z):
    return 0.0 if z <= 0 else z  # NaN stays NaN (as np.maximum), so divergence is not hidden


@inline
def _leaky_relu(z):
    return z if z > 0 else z * _SLOPE


@inline
def logistic(z):
    return 0.5 * (1.0 + _tanh(0.5 * z))  # never overflows, unlike 1 / (1 + exp(-z))


@inline
def _silu(z):
    return z * logistic(z)


@inline
def _silu_derivative(z):  # d/dz z s(z) = s(z) (1 + z (1 - s(z)))
    s = logistic(z)
    return s * (1.0 + z * (1.0 - s))


@inline
def _relu_derivative(a):  # at 0 torch's choice, 0; a NaN output gives NaN
    return 1.0 if a > 0 else (0.0 if a <= 0 else a)


@inline
def _leaky_relu_derivative(a):  # at 0 torch's choice, the slope
    return 1.0 if a > 0 else (_SLOPE if a <= 0 else a)


@inline
def _sigmoid_derivative(a):
    return (1.0 - a) * a


@inline
def _tanh_derivative(a):
    return 1.0 - a * a


# ------------------------------------------------------------------------- dense layer
# The per-element loops below branch on the activation outside the loop over columns, with one
# copy of the loop per activation, so that each is a branch-free vector loop. (One loop that
# branches per element runs ~6x slower: ReLU's select becomes a jump that random signs
# mispredict.)
#
# ``kinds`` says which activations a call may meet: a tuple indexed by activation code, True
# for each one and None for the others (``activation_kinds``). It is a type to Numba, and the
# loop copies of the None ones are pruned before they are compiled. Only GELU and SiLU (erf
# and exp loops, the costly ones to compile) are pruned: the cheap five are always compiled
# (+0.4 s on an 11 s first compile), so that networks which differ in those alone share one
# compiled epoch kernel rather than compiling one each. A kernel called with an ``act`` its
# ``kinds`` lacks leaves A (or dA) as the product: the glue never does.
_PRUNED = (GELU, SILU)


def activation_kinds(codes) -> tuple:
    """The ``kinds`` argument for activations ``codes``: every activation but the pruned ones
    absent from ``codes``."""
    present = set(codes)
    return tuple(None if code in _PRUNED and code not in present else True
                 for code in range(len(ACTIVATION_CODES)))


@inline
def _bias_act_rows(Z, b, act, keep_z, A, r0, r1, kinds):
    _bias_act_rows_of(Z, b, act, keep_z, A, r0, r1, *kinds)


@helper
def _bias_act_rows_of(Z, b, act, keep_z, A, r0, r1, identity, relu, leaky_relu, sigmoid, tanh,
                      gelu, silu):
    """Rows r0..r1: z = Z + b; Z = z when ``keep_z``; A = act(z). Without ``keep_z``, ``Z`` must
    be ``A``: the loops then read and write A alone, which LLVM vectorizes without the overlap
    test that fails (and falls back to scalar code) when two names hold one array. The last
    arguments are ``kinds``, one by one (pruning sees arguments, not tuple items)."""
    o = A.shape[1]
    for r in range(r0, r1):
        if keep_z:
            if act == GELU:  # the activations whose layers keep Z (base.KEEPS_Z)
                if gelu is not None:
                    for j in range(o):
                        z = Z[r, j] + b[j]
                        Z[r, j] = z
                        A[r, j] = _gelu(z)
                continue
            if act == SILU:
                if silu is not None:
                    for j in range(o):
                        z = Z[r, j] + b[j]
                        Z[r, j] = z
                        A[r, j] = _silu(z)
                continue
            # Any other: A takes X @ W and is activated in place below, as without keep_z. (One
            # generic loop here would compile every activation once more, for no caller.)
            for j in range(o):
                A[r, j] = Z[r, j]
                Z[r, j] += b[j]
        if act == RELU:
            if relu is not None:
                for j in range(o):
                    A[r, j] = _relu(A[r, j] + b[j])
        elif act == LEAKY_RELU:
            if leaky_relu is not None:
                for j in range(o):
                    A[r, j] = _leaky_relu(A[r, j] + b[j])
        elif act == SIGMOID:
            if sigmoid is not None:
                for j in range(o):
                    A[r, j] = logistic(A[r, j] + b[j])
        elif act == TANH:
            if tanh is not None:
                for j in range(o):
                    A[r, j] = _tanh(A[r, j] + b[j])
        elif act == GELU:
            if gelu is not None:
                for j in range(o):
                    A[r, j] = _gelu(A[r, j] + b[j])
        elif act == SILU:
            if silu is not None:
                for j in range(o):
                    A[r, j] = _silu(A[r, j] + b[j])
        else:
            for j in range(o):
                A[r, j] += b[j]


@phelper
def _bias_act_par(Z, b, act, keep_z, A, chunks, kinds):
    for c in numba.prange(chunks):
        r0, r1 = chunk_bounds(c, chunks, Z.shape[0])
        _bias_act_rows(Z, b, act, keep_z, A, r0, r1, kinds)


@inline
def dense_layer(X, W, b, act, Z, A, keep_z, par, kinds):
    """Z = X @ W (by NumPy's BLAS) then, in one pass, Z += b and A = act(Z); ``Z`` is written
    only when ``keep_z`` (else pass ``A`` as ``Z``: the product lands in A and is activated in
    place)."""
    gemm_t(X, False, W, False, Z, 1.0, 0.0)
    bias_activation_pass(Z, b, act, keep_z, A, par, kinds)


@inline
def bias_activation_pass(Z, b, act, keep_z, A, par, kinds):
    chunks = chunk_count(Z.size, par)
    if par is None or chunks == 1:
        _bias_act_rows(Z, b, act, keep_z, A, 0, Z.shape[0], kinds)
    else:
        _bias_act_par(Z, b, act, keep_z, A, chunks, kinds)


@jit
def dense_forward(X, W, b, act, Z, A, keep_z, par, kinds):
    dense_layer(X, W, b, act, Z, A, keep_z, par, kinds)


@jit
def bias_activation(Z, b, act, keep_z, A, par, kinds):
    """dense_layer after its product, which the caller has formed in Z (plain mode's large
    models: by NumPy, see backend.GEMM_BY_NUMPY)."""
    bias_activation_pass(Z, b, act, keep_z, A, par, kinds)


@inline
def _scale(dA, r, j, derivative):
    """dA[r, j] *= derivative, returning the product. In the dtype of dA, which for float32
    keeps the loop in single precision (LLVM folds the casts of 0, 1 and a)."""
    dz = dA[r, j] * dA.dtype.type(derivative)
    dA[r, j] = dz
    return dz


@inline
def grad_rows(dA, act, A, Z, total, magnitudes, r0, r1, kinds):
    _grad_rows_of(dA, act, A, Z, total, magnitudes, r0, r1, *kinds)


@helper
def _grad_rows_of(dA, act, A, Z, total, magnitudes, r0, r1, identity, relu, leaky_relu, sigmoid,
                  tanh, gelu, silu):
    """Rows r0..r1: dA *= act'(A, or Z where the layer keeps Z) in place, each row then added to the column
    sums ``total``, row after row and in the dtype, as NumPy's add.reduce does. Unless
    ``magnitudes`` is None, its rows 0 and 1 also sum the column's |dZ| and |A| (for
    ``_backward``'s bound), from the row just written, still in cache. The last arguments
    are ``kinds``, as in _bias_act_rows_of."""
    o = dA.shape[1]
    for r in range(r0, r1):
        if act == RELU:
            if relu is not None:
                for j in range(o):
                    total[j] += _scale(dA, r, j, _relu_derivative(A[r, j]))
        elif act == LEAKY_RELU:
            if leaky_relu is not None:
                for j in range(o):
                    total[j] += _scale(dA, r, j, _leaky_relu_derivative(A[r, j]))
        elif act == SIGMOID:
            if sigmoid is not None:
                for j in range(o):
                    total[j] += _scale(dA, r, j, _sigmoid_derivative(A[r, j]))
        elif act == TANH:
            if tanh is not None:
                for j in range(o):
                    total[j] += _scale(dA, r, j, _tanh_derivative(A[r, j]))
        elif act == GELU:
            if gelu is not None:
                for j in range(o):
                    total[j] += _scale(dA, r, j, _gelu_derivative(Z[r, j]))
        elif act == SILU:
            if silu is not None:
                for j in range(o):
                    total[j] += _scale(dA, r, j, _silu_derivative(Z[r, j]))
        else:
            for j in range(o):
                total[j] += dA[r, j]
        if magnitudes is not None:  # (a loop of its own: in the one above, LLVM would need
            for j in range(o):      # more overlap tests than it makes, and not vectorize)
                magnitudes[0, j] += abs(dA[r, j])
                magnitudes[1, j] += abs(A[r, j])


@phelper
def _grad_rows_par(dA, act, A, Z, totals, chunks, kinds):
    for c in numba.prange(chunks):
        r0, r1 = chunk_bounds(c, chunks, dA.shape[0])
        grad_rows(dA, act, A, Z, totals[c], None, r0, r1, kinds)


@inline
def zero(x):
    """x[:] = 0 for a 1-D x, as a loop (the slice's broadcast assignment is ~300 LLVM
    instructions to compile)."""
    for i in range(x.size):
        x[i] = 0


@inline
def dz_and_db(dA, act, A, Z, db, par, kinds):
    """dZ = dA * act'(.) in place, with db = dZ.sum(0) in the same pass. ``Z`` is read for
    gelu only (pass ``A`` otherwise)."""
    chunks = min(chunk_count(dA.size, par), dA.shape[0])
    if par is None or chunks == 1:
        zero(db)
        grad_rows(dA, act, A, Z, db, None, 0, dA.shape[0], kinds)
    else:
        _dense_dz_par(dA, act, A, Z, db, chunks, kinds)


@helper
def _dense_dz_par(dA, act, A, Z, db, chunks, kinds):
    """dz_and_db's pass in ``chunks`` parallel chunks, db from per-chunk column sums added in
    chunk order. They are allocated per call, but only on this path, for work of millions of
    elements, beside which an allocation is noise (and in a helper of its own: the epoch
    kernel, which calls it, has no reference counting to free them)."""
    totals = np.zeros((chunks, dA.shape[1]), dA.dtype)
    _grad_rows_par(dA, act, A, Z, totals, chunks, kinds)
    for j in range(dA.shape[1]):
        column = totals[0, j]
        for c in range(1, chunks):
            column += totals[c, j]
        db[j] = column


@helper
def _dense_backward(X, W, dA, act, A, Z, dW, db, dX, with_dx, par, kinds):
    """dZ = dA * act'(.) in place with db = dZ.sum(0) in the same pass; dW = X.T @ dZ and, when
    ``with_dx``, dX = dZ @ W.T (BLAS, transposes as flags). ``Z`` is read for gelu only (pass
    ``A`` otherwise), ``dX`` is written only when ``with_dx``."""
    dz_and_db(dA, act, A, Z, db, par, kinds)
    gemm_t(X, True, dA, False, dW, 1.0, 0.0)
    if with_dx:
        gemm_t(dA, False, W, True, dX, 1.0, 0.0)


@jit
def dense_backward(X, W, dA, act, A, Z, dW, db, dX, with_dx, par, kinds):
    _dense_backward(X, W, dA, act, A, Z, dW, db, dX, with_dx, par, kinds)


@jit
def dense_dz(dA, act, A, Z, db, par, kinds):
    """_dense_backward without its products, which the caller forms (as bias_activation)."""
    dz_and_db(dA, act, A, Z, db, par, kinds)
