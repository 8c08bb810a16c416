"""Calls from one compiled kernel to another that do not copy the callee into the caller.

Numba links every compiled function a kernel calls into the kernel's own LLVM module, where
LLVM optimizes it and generates its machine code again; and again in every kernel above that
one. The epoch kernel's module was three-quarters helpers (11,200 lines on M, 2,800 its
own), each compiled once on its own and once more there, and the pool worker and the
batch gather each compiled the gather of rows once more. ``unlinked(helper)`` is a function
that compiled code calls like ``helper``, which compiles ``helper`` for the call's types as
Numba would, and calls the machine code compiled then: by a symbol of our own, named after
the helper and its argument types, that names the compiled function in the running process
(``llvm.add_symbol``), as blas.py names BLAS's GEMMs.

A kernel loaded from Numba's cache by another process finds the symbol because Numba runs a
cached kernel's ``reload_init`` functions before it loads the kernel's machine code: each
unlinked call adds one, which compiles (or loads from the cache) the helper and names it.

The price: LLVM no longer sees the helper's code from the caller, so never inlines it nor
learns what it leaves untouched. The helpers called this way are passes over whole arrays
and a few small ones called once per layer and step: in interleaved runs, S's and M's epochs
took as long as with the helpers linked (M's first compile -19%, S's -12%).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import NamedTuple

import llvmlite.binding as llvm
import numba
from numba.core import cgutils, types
from numba.core.imputils import fix_returning_optional, impl_ret_new_ref
from numba.extending import intrinsic

_named: dict[str, object] = {}  # symbol -> the dispatcher it names, in this process


def _symbol(dispatcher, argtypes) -> str:
    function = dispatcher.py_func
    key = f"{function.__module__}.{function.__qualname__}{tuple(map(str, argtypes))}"
    return "bpkernels_" + function.__name__ + "_" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _compiled(dispatcher, argtypes):
    """The compile result of ``dispatcher`` for ``argtypes``, compiled (or loaded) if need be."""
    dispatcher.compile(argtypes)
    return dispatcher.overloads[argtypes]


def _name(dispatcher, argtypes, symbol):
    """Name the machine code of ``dispatcher`` for ``argtypes`` ``symbol``, compiling it first
    if need be; returns its compile result."""
    named = _named.get(symbol)
    if named is not None and named is not dispatcher:
        # (two closures of one factory: one name and qualname, other code)
        raise TypeError(f"unlinked helpers {named} and {dispatcher} would share the symbol "
                        f"{symbol}: each must be a function of its own, at module level")
    result = _compiled(dispatcher, argtypes)
    if named is None:
        llvm.add_symbol(symbol, result.library.get_pointer_to_function(result.fndesc.mangled_name))
        _named[symbol] = dispatcher
    return result


class _Reload(NamedTuple):
    """A cached kernel's reload_init: a helper it calls named before its code loads. By the
    symbol its code was compiled with, whatever ``_symbol`` would say today; and refused if
    the helper now returns another type (Numba's cache of a kernel does not see its helpers'
    files change)."""
    module: str
    name: str
    argtypes: tuple
    symbol: str
    restype: object

    def __call__(self) -> None:
        helper = getattr(getattr(importlib.import_module(self.module), self.name, None),
                         "dispatcher", None)
        returns = None if helper is None else \
            _compiled(helper, self.argtypes).signature.return_type
        if returns != self.restype:
            raise RuntimeError(
                f"bpkernels: the Numba cache holds a kernel compiled against another version "
                f"of {self.module}.{self.name}; delete it (NUMBA_CACHE_DIR or the backends' "
                f"__pycache__)")
        _name(helper, self.argtypes, self.symbol)


def _declare(context, builder, dispatcher, argtypes):
    """In an intrinsic's codegen: ``dispatcher`` compiled for ``argtypes`` (if need be) and
    named, declared in the module being built, and named again before a cached copy of that
    module loads. Returns the LLVM function."""
    function = dispatcher.py_func
    symbol = _symbol(dispatcher, argtypes)
    restype = _name(dispatcher, argtypes, symbol).signature.return_type
    context.active_code_library._reload_init.add(
        _Reload(function.__module__, function.__name__, argtypes, symbol, restype))
    fnty = context.call_conv.get_function_type(restype, argtypes)
    return cgutils.get_or_insert_function(builder.module, fnty, symbol)


def _call(context, builder, callee, restype, argtypes, values):
    """Call ``callee`` as Numba calls a compiled function: an error it raises propagates."""
    status, value = context.call_conv.call_function(builder, callee, restype, argtypes, values)
    with cgutils.if_unlikely(builder, status.is_error):
        context.call_conv.return_status_propagate(builder, status)
    value = fix_returning_optional(context, builder, restype(*argtypes), status, value)
    return impl_ret_new_ref(context, builder, restype, value)  # as Numba's own calls


def unlinked(dispatcher):
    """``dispatcher`` (a helper without a Python entry point) as compiled code calls it, but by
    a symbol rather than with its code copied in; ``.dispatcher`` is the helper. Plain Python
    (NUMBA_DISABLE_JIT) calls the function itself."""
    if numba.config.DISABLE_JIT:
        return dispatcher
    function = dispatcher.py_func
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD or p.default is not p.empty
           for p in parameters):
        raise TypeError(f"unlinked helper {function.__qualname__}: plain positional "
                        "parameters only (no defaults, *args or keyword-only ones)")

    def typer(typingctx, *args):
        argtypes = tuple(types.unliteral(a) for a in args)
        restype = _compiled(dispatcher, argtypes).signature.return_type

        def codegen(context, builder, signature, values):
            callee = _declare(context, builder, dispatcher, argtypes)
            return _call(context, builder, callee, restype, argtypes, values)
        return restype(*argtypes), codegen

    # An intrinsic's typer takes the call's arguments one by one, by name: one of the
    # helper's arity (a typer of *args would get them packed in a tuple).
    names = ", ".join(inspect.signature(function).parameters)
    scope = {"typer": typer}
    exec(f"def {function.__name__}(typingctx, {names}):\n"
         f"    return typer(typingctx, {names})", scope)
    call = intrinsic(scope[function.__name__])
    call.dispatcher = dispatcher
    return call


def address(context, builder, helper, argtypes):
    """In an intrinsic's codegen: the address (an int64) of the unlinked ``helper`` compiled
    for ``argtypes``, which ``by_address`` calls. For a callee chosen at run time, compiled
    only for the types some caller asks for."""
    callee = _declare(context, builder, helper.dispatcher, argtypes)
    return builder.ptrtoint(callee, context.get_value_type(types.int64))


def by_address(restype, argtypes):
    """An intrinsic: ``call(function, arguments)`` calls the function at ``function`` (from
    ``address``), compiled for ``argtypes`` and returning ``restype``, with the tuple
    ``arguments``. Plain Python: ``function`` is the function itself."""
    if numba.config.DISABLE_JIT:
        return lambda function, arguments: function(*arguments)

    @intrinsic
    def call(typingctx, function, arguments):
        def codegen(context, builder, signature, values):
            fnty = context.call_conv.get_function_type(restype, argtypes)
            callee = builder.inttoptr(values[0], fnty.as_pointer())
            values = [builder.extract_value(values[1], i) for i in range(len(argtypes))]
            return _call(context, builder, callee, restype, argtypes, values)
        return restype(types.int64, types.Tuple(argtypes)), codegen
    return call
