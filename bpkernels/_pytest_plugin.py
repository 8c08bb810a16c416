"""The pytest plugin of bpkernels, loaded in every project where bpkernels is installed (entry
point ``pytest11: bpkernels``; ``pytest -p no:bpkernels`` turns it off). Its fixtures:

- ``bpk_backend``: a backend name (str). A test that uses it, directly or through another
  fixture, runs once per backend in the registry (test ids are the names); where a backend
  cannot run here the test is skipped with the registry's reason, which names the pip extra.
- ``bpk_dtype``: "float32" or "float64"; skipped where the test's backend lacks the dtype.
- ``bpk_tolerance``: the :class:`bpkernels.testing.Tolerance` (rtol, atol) of ``bpk_dtype``.

The registry is read while tests are collected, after every conftest.py was imported, so a
backend that a conftest registers (``bpkernels.backends.register``) is tested too. Backends are
loaded only when a test that uses them is set up: starting pytest imports no Numba or CuPy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import Tolerance

BACKEND = "bpk_backend"
DTYPE = "bpk_dtype"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if BACKEND in metafunc.fixturenames and not _parametrized_by_test(metafunc, BACKEND):
        from .backends import backend_names
        names = list(backend_names())
        metafunc.parametrize(BACKEND, names, ids=names, indirect=True)
    if DTYPE in metafunc.fixturenames and not _parametrized_by_test(metafunc, DTYPE):
        from .model import DTYPES
        metafunc.parametrize(DTYPE, list(DTYPES), ids=list(DTYPES), indirect=True)


def _parametrized_by_test(metafunc: pytest.Metafunc, argname: str) -> bool:
    """Whether the test's own ``parametrize`` mark names ``argname`` (it then takes precedence,
    as it does over any parametrized fixture)."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if argname in names:
            return True
    return False


def _param(request: pytest.FixtureRequest, argname: str) -> str:
    if not hasattr(request, "param"):
        raise pytest.UsageError(f"{argname} is parametrized when tests are collected: request it "
                                "as an argument of the test or of a fixture the test uses, not "
                                "through request.getfixturevalue")
    return request.param


@pytest.fixture
def bpk_backend(request: pytest.FixtureRequest) -> str:
    """The name of one registered backend; skips where it cannot run, saying why."""
    from .backends import BackendUnavailable, get_backend
    name = _param(request, BACKEND)
    try:
        get_backend(name)
    except BackendUnavailable as why:
        pytest.skip(str(why))
    return name


@pytest.fixture
def bpk_dtype(request: pytest.FixtureRequest) -> str:
    """A dtype name; skips where the test's backend (``bpk_backend``) does not support it."""
    dtype = _param(request, DTYPE)
    if BACKEND in request.fixturenames:
        from .backends import get_backend
        name = request.getfixturevalue(BACKEND)
        supported = get_backend(name).dtypes
        if dtype not in supported:
            pytest.skip(f"backend {name!r} does not support {dtype}; it supports "
                        f"{', '.join(supported)}")
    return dtype


@pytest.fixture
def bpk_tolerance(bpk_dtype: str) -> "Tolerance":
    """The (rtol, atol) of ``bpk_dtype`` from bpkernels.testing.TOLERANCES."""
    from .testing import tolerance
    return tolerance(bpk_dtype)
