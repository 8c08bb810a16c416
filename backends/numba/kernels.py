"""The compiled kernels of the Numba backend (numba_backend.py is the glue that calls them).

Numba compiles a kernel the first time it is called, for the types of that call, and caches the
machine code on disk (``cache=True``): a second process loads it instead of compiling. Importing
this module compiles nothing.

Kernels that may run in parallel take ``par``: None to run serially, or the fewest elements
worth a parallel chunk. Their work is then a serial worker plus a small ``prange`` driver over
chunks of at least ``par`` elements, which Numba shares out among its threads. The chunks depend
on the sizes only, not on the number of threads, and so do the results. ``par=None`` is a type
to Numba: the parallel drivers under such a call are pruned away, not even compiled.

Every kernel also runs as plain Python under ``NUMBA_DISABLE_JIT=1`` (slowly): nothing here
relies on a feature that only exists compiled.
"""
from __future__ import annotations

import gc
import math

import numba
import numpy as np

from numba.core import cgutils, event, types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

from ._native import pool
from ._native.blas import gemm_t
from ._native.unlinked import address, by_address, unlinked
from ..base import ACTIVATIONS, LEAKY_RELU_SLOPE, LOSSES

# Compile flags, in one place. fastmath stays off: its no-NaN/no-inf assumptions would let LLVM
# delete the finiteness tests of check_step and the NaN propagation of the activations, and its
# reassociation would reorder the float64 sums that match the NumPy backend to ~1e-12. Nothing
# here is compute-bound enough for it to pay (the GEMMs are BLAS).
# _nrt (Numba's reference counting) is given, not left to be inherited from the caller: see
# train_epoch, which has none.
_FLAGS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False, fastmath=False,
              _nrt=True)
# Kernels Python calls, and nothing calls as a C function: no C wrapper (a third of the epoch
# kernel's LLVM module, now that its helpers are not linked into it).
jit = numba.njit(no_cfunc_wrapper=True, **_FLAGS)
# Helpers only other kernels call get no Python entry point: the wrapper that unboxes their
# arguments (the nested tuples of the epoch kernel above all) is a large part of compile time.
# And they are called by symbol (_numba_unlinked): Numba would link each one's code into every
# caller's module, where LLVM optimized it and generated its machine code once more at every
# level above it (three-quarters of the epoch kernel's module; M's first compile -19%, S's
# -12% without).
_INTERNAL = dict(no_cpython_wrapper=True, no_cfunc_wrapper=True, **_FLAGS)


def helper(function):
    return unlinked(numba.njit(**_INTERNAL)(function))


# Scalar functions called once per element: linked into their callers, as Numba does, so that
# LLVM inlines them into the loop (called by symbol, GELU's layers ran 20-35% slower). Not
# inlined by Numba: erf's code copied into every loop costs more compile than it saves.
linked = numba.njit(**_INTERNAL)


def phelper(function):
    return unlinked(numba.njit(parallel=True, **_INTERNAL)(function))


# Inlined into its callers by Numba itself, for two reasons. Code that must be inlined into a
# loop for the loop to vectorize but that LLVM judges too big to inline (tanh). And compile
# time: each function compiled on its own has a fixed cost (~0.1 s: its pipeline, its LLVM
# module), so small helpers and one-call wrappers are cheaper inlined. Helpers called from
# several places with different types (_layer), or with loops that vectorize on their own,
# stay separate, and so do the dense layers' row passes (_bias_act_rows_of, _grad_rows_of):
# inlined into the epoch kernel, they ran M's epochs ~15% slower. Their wrappers
# (_dense_forward, _dense_dz) are inlined: compiled on their own they cost the first compile
# ~0.3 s. The loss and hit kernels stay separate too: the epoch kernel and the per-kernel
# entry points (evaluate's) then share one compiled copy, and the first evaluate after a fit
# compiles ~0.25 s less. Inlining has a cost of its own: Numba copies the callee block by
# block, each time with all its variables, and with the branches the caller will prune (so a
# callee whose branches some models never take is better split: _backward_scan).
inline = numba.njit(inline="always", **_INTERNAL)

MAX_CHUNKS = 64


class _CollectorPause(event.Listener):
    """Python's cyclic garbage collector paused while Numba compiles a kernel of this package.
    A compile allocates millions of short-lived objects (IR, types, llvmlite's IR), and the
    collector's full passes over them were ~10% of the epoch kernel's first compile. Numba
    compiles under one lock, one compile at a time: so a depth count suffices, and the
    collector is restored, as it was, when the outermost compile ends, errors included."""

    def __init__(self) -> None:
        self.depth, self.was_enabled = 0, False

    def on_start(self, compile_event) -> None:
        dispatcher = compile_event.data["dispatcher"]
        if self.depth or dispatcher.py_func.__module__.startswith(__package__):
            if self.depth == 0:
                self.was_enabled = gc.isenabled()
                gc.disable()
            self.depth += 1

    def on_end(self, compile_event) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0 and self.was_enabled:
                gc.enable()


event.register("numba:compile", _CollectorPause())


def _view_args(context, builder, signature, args):
    """The source array's struct, and the other arguments as intp."""
    source = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
    return source, [context.cast(builder, v, t, types.intp)
                    for v, t in zip(args[1:], signature.args[1:])]


def _finish_view(context, builder, signature, args, out):
    if context.enable_nrt:  # (not in the epoch kernel, compiled without reference counts)
        context.nrt.incref(builder, signature.args[0], args[0])  # one more reference to the data
    return out._getvalue()


# Views by intrinsics rather than slices: a slice handles negative and clipped bounds and
# steps, which these never need, and its code was a sixth of the epoch kernel's (~100 LLVM
# instructions each, where these take ~15): less to lower and for LLVM to optimize in every
# first compile. Like any slice under boundscheck=False, they trust their bounds, which the
# callers derive from the layer table and the batch.
@intrinsic
def _as_matrix(typingctx, flat, start, rows, cols):
    """The C-ordered (rows, cols) matrix over rows * cols items of the contiguous 1-D
    ``flat`` from ``start`` on, which it must hold, sharing its data and reference count: what
    ``flat[start:start + rows * cols].reshape((rows, cols))`` gives (reshape also goes through
    a C helper call, ~5% of S's epoch at 36 reshapes a step)."""
    if not (isinstance(flat, types.Array) and flat.ndim == 1 and flat.layout == "C"):
        return None
    matrix = flat.copy(ndim=2, layout="C")

    def codegen(context, builder, signature, args):
        source, (start_, rows_, cols_) = _view_args(context, builder, signature, args)
        out = cgutils.create_struct_proxy(matrix)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(flat.dtype)))
        populate_array(out, data=builder.gep(source.data, [start_]), shape=[rows_, cols_],
                       strides=[builder.mul(cols_, itemsize), itemsize], itemsize=itemsize,
                       meminfo=source.meminfo, parent=None)
        return _finish_view(context, builder, signature, args, out)

    return matrix(flat, start, rows, cols), codegen


@intrinsic
def _span(typingctx, array, start, length):
    """``array[start:start + length]`` of a C-ordered 1-D or 2-D array (rows, for 2-D), which
    must hold them, sharing its data and reference count."""
    if not (isinstance(array, types.Array) and array.ndim in (1, 2) and array.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        source, (start_, length_) = _view_args(context, builder, signature, args)
        out = cgutils.create_struct_proxy(array)(context, builder)
        shape = cgutils.unpack_tuple(builder, source.shape)
        first = start_ if array.ndim == 1 else builder.mul(start_, shape[1])
        populate_array(out, data=builder.gep(source.data, [first]),
                       shape=[length_] + shape[1:],
                       strides=cgutils.unpack_tuple(builder, source.strides),
                       itemsize=source.itemsize, meminfo=source.meminfo, parent=None)
        return _finish_view(context, builder, signature, args, out)

    return array(array, start, length), codegen


@intrinsic
def _bits(typingctx, array):
    """A view without a reference count (no meminfo: valid while the array lives) of a float
    array's data as integers of the same width: the floats' bits, each still in place. (An
    array's ``view`` compiles a function of its own for each type, ~0.5 s of the epoch
    kernel's first compile.)"""
    if not (isinstance(array, types.Array) and isinstance(array.dtype, types.Float)):
        return None
    bits = array.copy(dtype=types.int32 if array.dtype.bitwidth == 32 else types.int64)

    def codegen(context, builder, signature, args):
        source = cgutils.create_struct_proxy(array)(context, builder, value=args[0])
        out = cgutils.create_struct_proxy(bits)(context, builder)
        for field in ("nitems", "itemsize", "shape", "strides"):
            setattr(out, field, getattr(source, field))
        out.data = builder.bitcast(source.data, out.data.type)
        out.meminfo = cgutils.get_null_value(out.meminfo.type)
        out.parent = cgutils.get_null_value(out.parent.type)
        return out._getvalue()

    return bits(array), codegen


_MAGNITUDE_32, _MAGNITUDE_64 = (1 << 31) - 1, (1 << 63) - 1  # every bit of a float but its sign


if numba.config.DISABLE_JIT:  # plain Python
    def _as_matrix(flat, start, rows, cols):  # noqa: F811
        return flat[start:start + rows * cols].reshape((rows, cols))

    def _span(array, start, length):  # noqa: F811
        return array[start:start + length]

    def _bits(array):  # noqa: F811
        return array.view(np.int32 if array.itemsize == 4 else np.int64)


IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH, GELU = range(6)
ACTIVATION_CODES = {name: code for code, name in
                    enumerate(("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu"))}
MSE, CROSS_ENTROPY, BINARY_CROSS_ENTROPY = range(3)
LOSS_CODES = {"mse": MSE, "cross_entropy": CROSS_ENTROPY,
              "binary_cross_entropy": BINARY_CROSS_ENTROPY}
assert set(ACTIVATION_CODES) == set(ACTIVATIONS) and set(LOSS_CODES) == set(LOSSES)

_SLOPE = LEAKY_RELU_SLOPE
_SQRT_HALF = 0.7071067811865475244
_ONE_OVER_SQRT_2PI = 0.3989422804014326779
_INV_LN2 = 1.44269504088896338700
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm's split
_INV_FACTORIAL = tuple(1.0 / math.factorial(k) for k in range(14))
_TANH_TAYLOR = (1.0, -1.0 / 3, 2.0 / 15, -17.0 / 315, 62.0 / 2835, -1382.0 / 155925,
                21844.0 / 6081075, -929569.0 / 638512875, 6404582.0 / 10854718875)


@inline
def _chunks(size, par):
    """Into how many chunks of at least ``par`` elements to split work of ``size`` (1: serial).
    (Not the thread count: a compiled call of numba.get_num_threads() cannot be cached.)"""
    return 1 if par is None or size < 2 * par else min(size // par, MAX_CHUNKS)


@inline
def _bounds(c, chunks, n):
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
def _sigmoid(z):
    return 0.5 * (1.0 + _tanh(0.5 * z))  # never overflows, unlike 1 / (1 + exp(-z))


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
# loop copies of the None ones are pruned before they are compiled: a ReLU network compiles
# the ReLU and identity loops only, which cuts the first compile by seconds. A kernel called
# with an ``act`` its ``kinds`` lacks leaves A (or dA) as the product: the glue never does.

def activation_kinds(codes) -> tuple:
    """The ``kinds`` argument for activations ``codes`` (the identity of the output layer is
    always included)."""
    present = set(codes) | {IDENTITY}
    return tuple(True if code in present else None for code in range(len(ACTIVATION_CODES)))


@inline
def _bias_act_rows(Z, b, act, keep_z, A, r0, r1, kinds):
    _bias_act_rows_of(Z, b, act, keep_z, A, r0, r1, *kinds)


@helper
def _bias_act_rows_of(Z, b, act, keep_z, A, r0, r1, identity, relu, leaky_relu, sigmoid, tanh,
                      gelu):
    """Rows r0..r1: z = Z + b; Z = z when ``keep_z``; A = act(z). Without ``keep_z``, ``Z`` must
    be ``A``: the loops then read and write A alone, which LLVM vectorizes without the overlap
    test that fails (and falls back to scalar code) when two names hold one array. The last six
    arguments are ``kinds``, one by one (pruning sees arguments, not tuple items)."""
    o = A.shape[1]
    for r in range(r0, r1):
        if keep_z:
            if act == GELU:  # the one activation whose layers keep Z
                if gelu is not None:
                    for j in range(o):
                        z = Z[r, j] + b[j]
                        Z[r, j] = z
                        A[r, j] = _gelu(z)
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
                    A[r, j] = _sigmoid(A[r, j] + b[j])
        elif act == TANH:
            if tanh is not None:
                for j in range(o):
                    A[r, j] = _tanh(A[r, j] + b[j])
        elif act == GELU:
            if gelu is not None:
                for j in range(o):
                    A[r, j] = _gelu(A[r, j] + b[j])
        else:
            for j in range(o):
                A[r, j] += b[j]


@phelper
def _bias_act_par(Z, b, act, keep_z, A, chunks, kinds):
    for c in numba.prange(chunks):
        r0, r1 = _bounds(c, chunks, Z.shape[0])
        _bias_act_rows(Z, b, act, keep_z, A, r0, r1, kinds)


@inline
def _dense_forward(X, W, b, act, Z, A, keep_z, par, kinds):
    """Z = X @ W (by NumPy's BLAS) then, in one pass, Z += b and A = act(Z); ``Z`` is written
    only when ``keep_z`` (else pass ``A`` as ``Z``: the product lands in A and is activated in
    place)."""
    gemm_t(X, False, W, False, Z, 1.0, 0.0)
    chunks = _chunks(Z.size, par)
    if par is None or chunks == 1:
        _bias_act_rows(Z, b, act, keep_z, A, 0, Z.shape[0], kinds)
    else:
        _bias_act_par(Z, b, act, keep_z, A, chunks, kinds)


@jit
def dense_forward(X, W, b, act, Z, A, keep_z, par, kinds):
    _dense_forward(X, W, b, act, Z, A, keep_z, par, kinds)


@inline
def _scale(dA, r, j, derivative):
    """dA[r, j] *= derivative, returning the product. In the dtype of dA, which for float32
    keeps the loop in single precision (LLVM folds the casts of 0, 1 and a)."""
    dz = dA[r, j] * dA.dtype.type(derivative)
    dA[r, j] = dz
    return dz


@inline
def _grad_rows(dA, act, A, Z, total, magnitudes, r0, r1, kinds):
    _grad_rows_of(dA, act, A, Z, total, magnitudes, r0, r1, *kinds)


@helper
def _grad_rows_of(dA, act, A, Z, total, magnitudes, r0, r1, identity, relu, leaky_relu, sigmoid,
                  tanh, gelu):
    """Rows r0..r1: dA *= act'(A, or Z for gelu) in place, each row then added to the column
    sums ``total``, row after row and in the dtype, as NumPy's add.reduce does. Unless
    ``magnitudes`` is None, its rows 0 and 1 also sum the column's |dZ| and |A| (for
    ``_backward``'s bound), from the row just written, still in cache. The last six arguments
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
        r0, r1 = _bounds(c, chunks, dA.shape[0])
        _grad_rows(dA, act, A, Z, totals[c], None, r0, r1, kinds)


@inline
def _zero(x):
    """x[:] = 0 for a 1-D x, as a loop (the slice's broadcast assignment is ~300 LLVM
    instructions to compile)."""
    for i in range(x.size):
        x[i] = 0


@inline
def _dense_dz(dA, act, A, Z, db, par, kinds):
    """dZ = dA * act'(.) in place, with db = dZ.sum(0) in the same pass. ``Z`` is read for
    gelu only (pass ``A`` otherwise)."""
    chunks = min(_chunks(dA.size, par), dA.shape[0])
    if par is None or chunks == 1:
        _zero(db)
        _grad_rows(dA, act, A, Z, db, None, 0, dA.shape[0], kinds)
    else:
        _dense_dz_par(dA, act, A, Z, db, chunks, kinds)


@helper
def _dense_dz_par(dA, act, A, Z, db, chunks, kinds):
    """_dense_dz's pass in ``chunks`` parallel chunks, db from per-chunk column sums added in
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
    _dense_dz(dA, act, A, Z, db, par, kinds)
    gemm_t(X, True, dA, False, dW, 1.0, 0.0)
    if with_dx:
        gemm_t(dA, False, W, True, dX, 1.0, 0.0)


@jit
def dense_backward(X, W, dA, act, A, Z, dW, db, dX, with_dx, par, kinds):
    _dense_backward(X, W, dA, act, A, Z, dW, db, dX, with_dx, par, kinds)


# ------------------------------------------------------------------------- losses
# Each writes dY = d(mean loss)/dY and out[0] = the mean loss. Row and element losses are formed
# before they are summed (in float64): a difference of two large sums would cancel.

@inline
def _row_max(Y, r):
    m = Y[r, 0]
    for j in range(1, Y.shape[1]):
        if Y[r, j] > m:
            m = Y[r, j]
    return m


@inline
def _exp_shifted(Y, r, m, dY):
    """dY[r] = exp(Y[r] - m) (max-subtraction keeps exp finite); returns their float64 sum."""
    s = 0.0
    for j in range(Y.shape[1]):
        e = math.exp(float(Y[r, j]) - m)
        dY[r, j] = e
        s += e
    return s


@helper
def _softmax_xent_labels(Y, labels, dY, out):
    n, o = Y.shape
    scale = 1.0 / n
    total = 0.0
    for r in range(n):
        m = float(_row_max(Y, r))
        s = _exp_shifted(Y, r, m, dY)
        k = labels[r]
        total += (m - Y[r, k]) + math.log(s)  # -log softmax of the true class
        for j in range(o):
            dY[r, j] = (dY[r, j] / s - (1.0 if j == k else 0.0)) * scale
    out[0] = total / n


@jit
def softmax_xent_labels(Y, labels, dY, out):
    _softmax_xent_labels(Y, labels, dY, out)


@helper
def _softmax_xent_rows(Y, T, dY, out):
    n, o = Y.shape
    scale = 1.0 / n
    total = 0.0
    for r in range(n):
        m = float(_row_max(Y, r))
        s = _exp_shifted(Y, r, m, dY)
        log_norm = math.log(s)
        t_sum = 0.0
        for j in range(o):
            t = float(T[r, j])
            t_sum += t
            total -= t * ((Y[r, j] - m) - log_norm)
        for j in range(o):
            dY[r, j] = (dY[r, j] / s * t_sum - T[r, j]) * scale
    out[0] = total / n


@jit
def softmax_xent_rows(Y, T, dY, out):
    _softmax_xent_rows(Y, T, dY, out)


@helper
def _binary_xent(Y, T, dY, out):
    # max(y, 0) - y t + log(1 + exp(-|y|)) is finite for any logit
    n, o = Y.shape
    scale = 1.0 / (n * o)
    total = 0.0
    for r in range(n):
        for j in range(o):
            y, t = float(Y[r, j]), float(T[r, j])
            total += (math.log1p(math.exp(-abs(y))) + max(y, 0.0)) - y * t
            dY[r, j] = (_sigmoid(y) - t) * scale
    out[0] = total / (n * o)


@jit
def binary_xent(Y, T, dY, out):
    _binary_xent(Y, T, dY, out)


@helper
def _mse(Y, T, dY, out):
    n, o = Y.shape
    scale = 2.0 / (n * o)
    total = 0.0
    for r in range(n):
        for j in range(o):
            d = float(Y[r, j]) - float(T[r, j])
            total += d * d
            dY[r, j] = d * scale
    out[0] = total / (n * o)


@jit
def mse(Y, T, dY, out):
    _mse(Y, T, dY, out)


@inline
def _argmax(Y, r):
    """The first maximum of row r."""
    best, k = Y[r, 0], 0
    for j in range(1, Y.shape[1]):
        if Y[r, j] > best:
            best, k = Y[r, j], j
    return k


@helper
def _count_correct_labels(Y, labels, out):
    """Targets (n,): class ids, or 0/1 for a single output."""
    hits = 0
    for r in range(Y.shape[0]):
        if Y.shape[1] == 1:
            hits += (Y[r, 0] > 0) == (labels[r] >= 0.5)
        else:
            hits += _argmax(Y, r) == labels[r]
    out[0] = hits


@jit
def count_correct_labels(Y, labels, out):
    _count_correct_labels(Y, labels, out)


@helper
def _count_correct_rows(Y, T, out):
    """Targets (n, o): probability rows (compared by argmax), or 0/1 for a single output."""
    hits = 0
    for r in range(Y.shape[0]):
        if Y.shape[1] == 1:
            hits += (Y[r, 0] > 0) == (T[r, 0] >= 0.5)
        else:
            hits += _argmax(Y, r) == _argmax(T, r)
    out[0] = hits


@jit
def count_correct_rows(Y, T, out):
    _count_correct_rows(Y, T, out)


# ------------------------------------------------------------------------- divergence
@inline
def _finite(x):
    bad = False
    for i in range(x.size):
        bad |= (x[i] - x[i]) != 0  # NaN for inf and NaN, 0 for any finite value
    return not bad


@phelper
def _finite_par(x, chunks):
    ok = np.empty(chunks, np.bool_)
    for c in numba.prange(chunks):
        i0, i1 = _bounds(c, chunks, x.size)
        ok[c] = _finite(x[i0:i1])
    return ok.all()


@jit
def check_step(loss, grads, step, halted, par):
    if halted[0] != 0:
        return
    chunks = _chunks(grads.size, par)
    if par is None or chunks == 1:
        finite = _finite(grads)
    else:
        finite = _finite_par(grads, chunks)
    if not (finite and math.isfinite(loss[0])):
        halted[0] = step


# ------------------------------------------------------------------------- optimizers
# torch.optim's rules, one pass over the flat buffers, in the NumPy backend's order of
# operations and, like it, in the dtype of the parameters: they agree to the last bits, and
# float32 runs at full vector width (twice as fast as with float64 scalars). A rule's
# hyper-parameters come as a tuple of floats in RULE_HP order; a state buffer the rule does not
# use is an empty array. Workers take views of their chunk and count from 0: an index Numba
# cannot prove non-negative gets a wrap-around test per access, which stops LLVM vectorizing.

RULE_HP = {
    "sgd": ("lr", "momentum", "dampening", "nesterov", "weight_decay"),
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled"),
    "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
}
RULE_STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"),
              "rmsprop": ("square_avg", "momentum_buffer", "grad_avg")}


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
def _update(p, g, states, sgd, adam, rmsprop, step):
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
        i0, i1 = _bounds(c, chunks, p.size)
        # an unused state buffer is empty, and so is its slice
        chunk = (s1[i0:i1], s2[i0:i1], s3[i0:i1])
        _update(p[i0:i1], g[i0:i1], chunk, sgd, adam, rmsprop, step)


@inline
def _optimizer_step(p, g, states, sgd, adam, rmsprop, step, halted, par):
    """One update of the flat parameters ``p``, a no-op while halted[0] != 0, by the one rule
    of sgd / adam / rmsprop whose hyper-parameters are given: the others are None, a type to
    Numba, which then compiles that rule only. ``states``: three buffers in RULE_STATE order."""
    if halted[0] != 0:
        return
    chunks = _chunks(p.size, par)
    if par is None or chunks == 1:
        _update(p, g, states, sgd, adam, rmsprop, step)
    else:
        _update_par(p, g, states, sgd, adam, rmsprop, step, chunks)


@jit
def optimizer_step(p, g, states, sgd, adam, rmsprop, step, halted, par):
    _optimizer_step(p, g, states, sgd, adam, rmsprop, step, halted, par)


# ------------------------------------------------------------------------- a whole epoch
# What one epoch reads and writes comes in plain tuples (names as in base.EpochPlan):
#   net   (params, grads, layers): flat buffers; layers int64 (layers, 7), LAYER_COLUMNS
#   data  (X, order, batch): X (N, i), order (N,) int64, rows per step
#   work  (X, A, dA, Z, sums): per-step scratch, X (batch, i) and the flat A, dA and Z (gelu
#         layers only) of every layer at layer offsets (x rows); sums (2 x the widest layer,) in
#         the dtype, for _backward's bound. Per step, the kernels see (X, A, dA, Z).
#   out   (loss, correct, halted): (steps,), (steps,), (1,) int64
# The targets come as one of two pairs (all targets, the batch's scratch), the other None:
# ``labels`` int64 (N,), (batch,) or ``T`` (N, o), (batch, o).
# (Not namedtuples: Numba's cache index pickles argument types, and a namedtuple class that
# later changes or goes makes a stale index fail to load instead of being recompiled.)
LAYER_COLUMNS = ("inputs", "outputs", "W", "b", "activation", "A", "Z")


def layer_table(sizes, activations, batch):
    """The layers table of ``net`` for a model and batch size, and the lengths of work's A
    and Z."""
    rows, w, a, z = [], 0, 0, 0
    for i, o, act in zip(sizes[:-1], sizes[1:], activations):
        gelu = act == "gelu"
        rows.append((i, o, w, w + i * o, ACTIVATION_CODES[act], a, z if gelu else -1))
        w, a, z = w + i * o + o, a + batch * o, z + (batch * o if gelu else 0)
    return np.array(rows, dtype=np.int64), a, z


@helper
def _layer(net, work, layer, rows):
    """Views of one layer: W, b, dW, db, A, dA, Z (Z is A where the layer keeps no Z)."""
    params, grads, layers = net
    _, A_all, dA_all, Z_all = work
    i, o, w, b, _, a, z = layers[layer]
    W, dW = _as_matrix(params, w, i, o), _as_matrix(grads, w, i, o)
    A, dA = _as_matrix(A_all, a, rows, o), _as_matrix(dA_all, a, rows, o)
    Z = A if z < 0 else _as_matrix(Z_all, z, rows, o)
    return W, _span(params, b, o), dW, _span(grads, b, o), A, dA, Z


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
def _gather_bits(src_bits, index, dst_bits):
    """_gather on the floats' bits (``_bits``), returning the largest of them without the
    sign bit: the bits of the largest |x| gathered, inf's if one is inf, a NaN's if one is NaN.
    (``_backward``'s bound for the first layer, from the pass that writes the batch rather than
    one more over it.) Without its sign bit a float's bits order as its magnitude does, inf
    above every finite value and NaN above inf; and an integer maximum vectorizes, where a
    float one would not without fastmath. The rows of dst_bits are as wide as it is."""
    rows, k = index.size, dst_bits.shape[1]
    magnitude = src_bits.dtype.type(_MAGNITUDE_32 if src_bits.itemsize == 4 else _MAGNITUDE_64)
    m0 = m1 = m2 = m3 = magnitude & 0
    for r in range(0, rows - rows % 4, 4):
        i0, i1, i2, i3 = index[r], index[r + 1], index[r + 2], index[r + 3]
        for j in range(k):
            x0, x1, x2, x3 = src_bits[i0, j], src_bits[i1, j], src_bits[i2, j], src_bits[i3, j]
            dst_bits[r, j] = x0
            dst_bits[r + 1, j] = x1
            dst_bits[r + 2, j] = x2
            dst_bits[r + 3, j] = x3
            m0 = max(m0, x0 & magnitude)
            m1 = max(m1, x1 & magnitude)
            m2 = max(m2, x2 & magnitude)
            m3 = max(m3, x3 & magnitude)
    for r in range(rows - rows % 4, rows):
        for j in range(k):
            x = src_bits[index[r], j]
            dst_bits[r, j] = x
            m0 = max(m0, x & magnitude)
    return max(max(m0, m1), max(m2, m3))


@inline
def _as_float(bits, scratch):
    """The float of ``scratch``'s dtype whose bits ``bits`` are."""
    _bits(scratch)[0] = bits
    return scratch[0]


@inline
def _gather_rows(source, order, destination, r0, r1):
    """``_gather_bits`` of rows r0..r1 of a batch into ``destination`` (the batch), its row
    numbers at the address ``order``."""
    index = _span(pool.int64_matrix_at(order, 1, r1)[0], r0, r1 - r0)
    return np.int64(_gather_bits(source, index, _span(destination, r0, r1 - r0)))


# The row gathers of the large models' batches, one per width of float, by addresses and sizes
# rather than arrays: one compiled copy of each serves every model, in the epoch kernel and in
# the pool's workers (pool_worker), which call the one of the model's dtype by its address
# (``_row_gather``), so that only that one is compiled. Arguments: the data set (source_rows,
# ``stride`` elements apart) at ``source``, the batch (columns wide) at ``destination``, its
# row numbers (int64) at ``order``, and the rows r0..r1 to gather.
@helper
def _gather_rows_32(source, source_rows, stride, destination, columns, order, r0, r1):
    return _gather_rows(pool.int32_matrix_at(source, source_rows, stride), order,
                        pool.int32_matrix_at(destination, r1, columns), r0, r1)


@helper
def _gather_rows_64(source, source_rows, stride, destination, columns, order, r0, r1):
    return _gather_rows(pool.int64_matrix_at(source, source_rows, stride), order,
                        pool.int64_matrix_at(destination, r1, columns), r0, r1)


_GATHER_ARGUMENTS = (types.int64,) * 8
_call_gather = by_address(types.int64, _GATHER_ARGUMENTS)


@intrinsic
def _row_gather(typingctx, X_all):
    """The address of the row gather of ``X_all``'s dtype, for ``_call_gather``."""
    gather = _gather_rows_32 if X_all.dtype.bitwidth == 32 else _gather_rows_64

    def codegen(context, builder, signature, args):
        return address(context, builder, gather, _GATHER_ARGUMENTS)
    return types.int64(X_all), codegen


if numba.config.DISABLE_JIT:
    def _row_gather(X_all):  # noqa: F811 (the function itself, which _call_gather calls)
        return _gather_rows_32 if X_all.itemsize == 4 else _gather_rows_64


@helper
def _gather_split(workers, gather, source, source_rows, stride, destination, columns, order,
                  rows):
    """A row gather (``gather``, from ``_row_gather``) of a whole batch, its rows split
    between this thread and ``workers`` threads of the pool (``_numba_pool``; none: this
    thread alone): each core writes its share of the batch, ~40% faster on M than one
    writing all."""
    control = pool.control_address() if workers > 0 else 0  # (no intrinsics without JIT)
    parts = workers + 1
    if workers > 0:
        pool.lock(control)
    for worker in range(workers):
        block = pool.block_of(control, worker)
        r0, r1 = _bounds(worker + 1, parts, rows)
        pool.store(block, pool.SOURCE, source)
        pool.store(block, pool.SOURCE_ROWS, source_rows)
        pool.store(block, pool.SOURCE_STRIDE, stride)
        pool.store(block, pool.DESTINATION, destination)
        pool.store(block, pool.ORDER, order)
        pool.store(block, pool.ROWS_START, r0)
        pool.store(block, pool.ROWS_END, r1)
        pool.store(block, pool.COLUMNS, columns)
        pool.post(block, pool.GATHER, gather, 0, 0)
    r0, r1 = _bounds(0, parts, rows)
    largest = _call_gather(gather, (source, source_rows, stride, destination, columns, order,
                                    r0, r1))
    for worker in range(workers):
        block = pool.block_of(control, worker)
        pool.wait(block, pool.load(block, pool.POSTED))
        largest = max(largest, pool.load(block, pool.RESULT))
    if workers > 0:
        pool.unlock(control)
    return largest


@inline
def _gather_shared(workers, X_all, order, first, rows, dst, scratch):
    """dst[:rows] = X_all[order[first:first + rows]] by ``_gather_split`` (X_all C-ordered);
    returns the largest |x| gathered, inf if one is inf, NaN if one is NaN (a float of
    ``scratch``'s dtype)."""
    largest = _gather_split(workers, _row_gather(X_all), np.int64(X_all.ctypes.data),
                            X_all.shape[0], X_all.strides[0] // X_all.itemsize,
                            np.int64(dst.ctypes.data), dst.shape[1],
                            np.int64(order.ctypes.data) + first * order.itemsize, rows)
    return _as_float(largest, scratch)


@jit
def pool_worker(control, worker):
    """A worker thread of ``_numba_pool``: runs the tasks posted to its block (BLAS's jobs,
    shares of the epoch kernel's gathers) until told to stop."""
    block = pool.block_of(control, worker)
    pool.store(block, pool.READY, 1)
    done = 0
    while True:
        number = pool.next_task(block, done)
        kind = pool.load(block, pool.KIND)
        if kind == pool.BLAS_JOB:
            pool.run_job(pool.load(block, pool.JOB), worker + 1, pool.load(block, pool.JOB_DATA),
                         pool.load(block, pool.JOB_ARGUMENT))
        elif kind == pool.GATHER:
            largest = _call_gather(pool.load(block, pool.JOB), (
                pool.load(block, pool.SOURCE), pool.load(block, pool.SOURCE_ROWS),
                pool.load(block, pool.SOURCE_STRIDE), pool.load(block, pool.DESTINATION),
                pool.load(block, pool.COLUMNS), pool.load(block, pool.ORDER),
                pool.load(block, pool.ROWS_START), pool.load(block, pool.ROWS_END)))
            pool.store(block, pool.RESULT, largest)
        elif kind == pool.STOP:
            pool.store(block, pool.RESULT, pool.LAYOUT)
        pool.store(block, pool.DONE, number)
        done = number
        if kind == pool.STOP:
            return


@inline
def _forward(net, work, rows, par, kinds):
    layers = net[2]
    X = _span(work[0], 0, rows)
    for layer in range(layers.shape[0]):
        W, b, _, _, A, _, Z = _layer(net, work, layer, rows)
        act = layers[layer, 4]
        _dense_forward(X, W, b, act, Z, A, act == GELU, par, kinds)
        X = A


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
def _input_gradient(net, work, layer, rows, W, dZ):
    """dX = dZ @ W.T of ``layer`` into the dA of the layer below; returns the layer's X."""
    if layer == 0:
        return _span(work[0], 0, rows)
    _, _, _, _, X, dX, _ = _layer(net, work, layer - 1, rows)
    gemm_t(dZ, False, W, True, dX, 1.0, 0.0)
    return X


@inline
def _backward_scan(net, work, rows, par, kinds):
    """Backward through every layer but the weight gradients (``_weight_gradients``), for a
    small model, whose weight gradients check_step's scan checks: dZ and db of every layer
    and dX, top down. Returns whether every db is finite. (Apart from the large models'
    ``_backward`` because Numba inlines a callee whole, the branches the caller prunes
    included, and its copy costs ~blocks x variables: ~0.3 s of S's first compile.)"""
    layers = net[2]
    finite = True
    for layer in range(layers.shape[0] - 1, -1, -1):
        W, _, _, db, A, dA, Z = _layer(net, work, layer, rows)
        _dense_dz(dA, layers[layer, 4], A, Z, db, par, kinds)
        finite = _finite(db) and finite
        _input_gradient(net, work, layer, rows, W, dA)
    return finite


@helper
def _backward(net, work, rows, par, kinds, sums, input_bound):
    """``_backward_scan`` for a large model, bounding its weight gradients rather than
    scanning them. Returns (whether every db is finite, whether every dW is sure to be
    finite). The second without computing dW: |dW[i, j]| = |sum_r X[r, i] dZ[r, j]| <=
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
    finite, sure, above = True, True, 0.0
    limit = _bound_limit(net[0].itemsize, rows)
    top = layers.shape[0] - 1
    for layer in range(top, -1, -1):
        W, _, _, db, A, dA, Z = _layer(net, work, layer, rows)
        if par is None:  # the column sums of |dZ| and of |A| (the layer above's X) as dZ forms
            o = dA.shape[1]
            magnitudes = _as_matrix(sums, 0, 2, o)
            _zero(_span(sums, 0, 2 * o))
            _zero(db)
            _grad_rows(dA, layers[layer, 4], A, Z, db, magnitudes, 0, rows, kinds)
            if layer < top:
                sure = sure and _largest(magnitudes[1], o) * above <= limit
            above = _largest(magnitudes[0], o)
        else:
            _dense_dz(dA, layers[layer, 4], A, Z, db, par, kinds)
        finite = _finite(db) and finite
        X = _input_gradient(net, work, layer, rows, W, dA)
        if par is not None and sure:
            x_bound = input_bound if layer == 0 else _abs_column_sums_max(X, sums)
            sure = x_bound * _abs_column_sums_max(dA, sums) <= limit
    if par is None:
        sure = sure and input_bound * above <= limit
    return finite, sure


@inline
def _weight_gradients(net, work, rows, alpha, beta, into_weights, scan):
    """dW = X.T @ dZ for every layer, after ``_backward``; with ``into_weights``, W = beta W +
    alpha X.T @ dZ instead, dW left as it was. Returns whether every dW is finite, each read
    right after BLAS wrote it, while still in cache, where ``scan`` (else True)."""
    layers = net[2]
    finite = True
    X = _span(work[0], 0, rows)
    for layer in range(layers.shape[0]):
        W, _, dW, _, A, dZ, _ = _layer(net, work, layer, rows)
        if into_weights:
            gemm_t(X, True, dZ, False, W, alpha, beta)
        else:
            gemm_t(X, True, dZ, False, dW, 1.0, 0.0)
            if scan:  # dW flat, as the gradients hold it (dW.ravel() took ~0.2 s to compile)
                finite = _finite(_span(net[1], layers[layer, 2], dW.size)) and finite
        X = A
    return finite


# Without reference counting (_nrt=False). Every view Numba takes of an array (a slice, a
# layer's W out of the flat buffer) would bump the array's count with an atomic add and drop
# it again later: the epoch kernel takes ~20 views per layer per step, and on S those atomics
# cost ~18% of the epoch. Without them, its arrays carry no meminfo (nor do their views, in the
# helpers it calls), and their code is not emitted either: its first compile is ~6% shorter.
# Safe because it allocates nothing (the parallel pass that does is a helper of its own) and
# every buffer it reads outlives the call: its caller holds them all.
@numba.njit(**dict(_FLAGS, _nrt=False, no_cfunc_wrapper=True))
def train_epoch(net, data, work, out, first_step, loss, metric, labels, T, states, sgd, adam,
                rmsprop, workers, scan, par, kinds):
    """Every step of one epoch, as train.py's per-kernel loop runs them: gather the batch,
    forward, loss (and hits), backward, check_step, then the optimizer update of step
    ``first_step + s`` (a no-op once halted). The arguments that may be None (``labels`` or
    ``T``; all but one of the rules, as in optimizer_step) are separate so that Numba compiles
    the code of the given ones only. ``workers``, for large models: how many of
    ``_numba_pool``'s threads share each gather (0: none), which then bounds the weight
    gradients rather than scanning them (``_backward``) and fuses a plain SGD update into their
    GEMM; None for small models, which gather alone and scan (the code of the others then not
    compiled). ``scan``: True for small models, else None (for the same reason: Numba prunes
    by None only). A large model's batch is gathered by address (``_gather_split``): X must
    then be C-ordered."""
    params, grads, layers = net
    X_all, order, batch = data
    sums = work[4]
    work = work[:4]
    step_losses, step_hits, halted = out
    n = order.size
    steps = (n + batch - 1) // batch
    for s in range(steps):
        rows = min(batch, n - s * batch)
        index = _span(order, s * batch, rows)
        if workers is not None:  # a large model's gather, with the bound of its first layer
            input_bound = rows * _gather_shared(workers, X_all, order, s * batch, rows,
                                                work[0], sums)
        if scan is not None:  # (on S's 64 columns, the bound's maximum slowed the gather ~7%)
            _gather(X_all, index, work[0])
        _forward(net, work, rows, par, kinds)
        _, _, _, _, Y, dY, _ = _layer(net, work, layers.shape[0] - 1, rows)
        step_loss, step_correct = _span(step_losses, s, 1), _span(step_hits, s, 1)
        if labels is not None:
            all_labels, batch_labels = labels[0], _span(labels[1], 0, rows)
            for r in range(rows):
                batch_labels[r] = all_labels[index[r]]
            _softmax_xent_labels(Y, batch_labels, dY, step_loss)
            if metric:
                _count_correct_labels(Y, batch_labels, step_correct)
        elif T is not None:
            all_T, batch_T = T[0], _span(T[1], 0, rows)
            _gather(all_T, index, batch_T)
            if loss == CROSS_ENTROPY:
                _softmax_xent_rows(Y, batch_T, dY, step_loss)
            elif loss == BINARY_CROSS_ENTROPY:
                _binary_xent(Y, batch_T, dY, step_loss)
            else:
                _mse(Y, batch_T, dY, step_loss)
            if metric:
                _count_correct_rows(Y, batch_T, step_correct)
        if workers is not None:  # (two ifs: Numba prunes each by an argument that is None)
            finite, sure = _backward(net, work, rows, par, kinds, sums, input_bound)
        if scan is not None:
            finite, sure = _backward_scan(net, work, rows, par, kinds), False
        finite = finite and math.isfinite(step_loss[0])
        # Plain SGD (no momentum) updates W inside dW's GEMM, W = (1 - lr wd) W - lr X.T @ dZ,
        # as its update would (but for the rounding of dW, which is not stored): no separate
        # pass over every weight and its gradient, which no longer sit in cache by then (~100
        # us a step on M). Only where the step is sure to be finite: check_step's latch would
        # otherwise have to undo it. Not on the epoch's last step, whose gradients stay in
        # ``grads`` as the per-kernel loop leaves them.
        fused, alpha, beta = False, 1.0, 0.0
        if sgd is not None and workers is not None:
            if sgd[1] == 0 and sure and finite and halted[0] == 0 and s + 1 < steps:
                fused, alpha, beta = True, -sgd[0], 1.0 - sgd[0] * sgd[4]
        finite = _weight_gradients(net, work, rows, alpha, beta, fused, not sure) and finite
        if sgd is not None and workers is not None and fused:
            for layer in range(layers.shape[0]):  # the biases, by the rule itself
                b, o = layers[layer, 3], layers[layer, 1]
                _update(_span(params, b, o), _span(grads, b, o), states, sgd, adam, rmsprop,
                        first_step + s)
            continue
        if halted[0] == 0 and not finite:
            halted[0] = first_step + s  # check_step's latch
        _optimizer_step(params, grads, states, sgd, adam, rmsprop, first_step + s, halted, par)
