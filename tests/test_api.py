"""The public API as a type checker and an embedding project see it: every public callable is
annotated, and the package says so (PEP 561's py.typed marker ships with it)."""
from __future__ import annotations

import importlib.resources
import inspect

import pytest

import bpkernels as bpk
from bpkernels import datasets, interop, testing, threads


def public_callables():
    """(name, function) of every function and public method reachable from the package's
    public modules' ``__all__`` (or public names)."""
    modules = [bpk, datasets, testing, threads]
    seen, found = set(), []
    for module in modules:
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name)
            if id(obj) in seen or not getattr(obj, "__module__", "").startswith("bpkernels"):
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                        found.append((f"{module.__name__}.{name}.{attr}", member))
            elif inspect.isfunction(obj):
                found.append((f"{module.__name__}.{name}", obj))
    return found


@pytest.mark.parametrize("name, function", public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_callable_is_annotated(name, function):
    signature = inspect.signature(function)
    unannotated = [p.name for p in signature.parameters.values()
                   if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not unannotated, f"{name}: parameters without a type: {unannotated}"
    if function.__name__ != "__init__":
        assert signature.return_annotation is not inspect.Signature.empty, \
            f"{name}: no return type"


def test_the_package_is_marked_typed():
    assert importlib.resources.files("bpkernels").joinpath("py.typed").is_file()


def test_the_public_names_exist():
    for name in bpk.__all__:
        assert hasattr(bpk, name), name
    assert {"fit", "load", "MLP", "set_num_threads", "get_num_threads"} <= set(bpk.__all__)
    assert interop.ArrayLike is not None
