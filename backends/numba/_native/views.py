"""Intrinsics for views of arrays, and the garbage collector paused while a kernel compiles.

Both rest on Numba internals (its array struct, ``populate_array``, the compile events), so
they live here: ``plain.py`` beside the kernels has the same views as slices and reshapes.
"""
from __future__ import annotations

import gc

from numba.core import cgutils, event, types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

_PACKAGE = __package__.rpartition(".")[0]  # bpkernels.backends.numba: its kernels' modules


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
        if self.depth or dispatcher.py_func.__module__.startswith(_PACKAGE):
            if self.depth == 0:
                self.was_enabled = gc.isenabled()
                gc.disable()
            self.depth += 1

    def on_end(self, compile_event) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0 and self.was_enabled:
                gc.enable()




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


_pause: _CollectorPause | None = None


def pause_collector_while_compiling() -> None:
    """From now on, compiles of this package's kernels run with the cyclic collector paused."""
    global _pause
    if _pause is None:
        _pause = _CollectorPause()
        event.register("numba:compile", _pause)


as_matrix, span, bits = _as_matrix, _span, _bits
