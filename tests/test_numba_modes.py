"""How the Numba backend chooses its mode (backends/numba/jit.py): native where its releases
were tested and its self-test passed, plain otherwise or where BPK_NUMBA_NATIVE=0 says so; the
same numbers either way, the two modes' compiled kernels cached apart, the BLAS pool gated on
the OpenBLAS release, and ``bpk info`` saying which mode and why.

The mode is chosen once, at import: each case runs in a Python of its own, with a Numba cache
of the test session's (empty at first: what it compiles, it compiles for itself)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

COMPILES = pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"),
                              reason="NUMBA_DISABLE_JIT: nothing compiles here")


def _run(code: str, cache: Path, *args: str, **env: str) -> str:
    """What ``code`` prints, run by another Python with the Numba cache ``cache`` and ``env``
    set (BPK_NUMBA_NATIVE and NUMBA_DISABLE_JIT only where ``env`` sets them)."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("BPK_NUMBA_NATIVE", "NUMBA_DISABLE_JIT")}
    environ.update(NUMBA_CACHE_DIR=str(cache), OPENBLAS_NUM_THREADS="1", **env)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=environ, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _report(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# Prints the mode that the process chose, and the backend's account of it.
_REPORT = """
import json, bpkernels as bpk
from bpkernels.backends.numba import jit
info = bpk.get_backend("numba").device_info()
print(json.dumps(dict(mode=jit.MODE, reason=jit.MODE_REASON, info_mode=info["mode"],
                      info_reason=info["mode_reason"], pool=info["blas_pool"])))
"""
# Loads backends/numba/_native (the package, by its file) before backends/numba, whose import
# chooses the mode: ``native``, to patch before the choice. (Importing _native by its name
# would import backends/numba first, and so choose the mode unpatched.)
_NATIVE_FIRST = """
import importlib.util, pathlib, sys
import bpkernels.backends
assert "bpkernels.backends.numba" not in sys.modules
path = pathlib.Path(bpkernels.backends.__path__[0], "numba", "_native", "__init__.py")
spec = importlib.util.spec_from_file_location("bpkernels.backends.numba._native", path,
                                              submodule_search_locations=[str(path.parent)])
native = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
"""
_TINY_FIT = """
import json, sys, numpy as np, bpkernels as bpk

def tiny_fit(backend, sizes=(5, 7, 3)):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    model = bpk.MLP(list(sizes), activation="tanh", backend=backend, dtype="float64", seed=1)
    history = bpk.fit(model, X, y, optimizer=bpk.Adam(lr=0.01), epochs=2, batch_size=16, seed=4)
    return np.asarray(model.params).tolist(), list(history["loss"])

# (a large model: the epoch kernel's bound in native mode, NumPy's products in plain mode)
LARGE = (5, 300, 250, 3)

if __name__ == "__main__":
    from bpkernels.backends.numba import epoch, jit
    params, loss = tiny_fit("numba")
    stats = epoch.train_epoch.stats
    hits, misses = sum(stats.cache_hits.values()), sum(stats.cache_misses.values())
    large_params, large_loss = tiny_fit("numba", LARGE)
    print(json.dumps(dict(mode=jit.MODE, params=params, loss=loss, large_params=large_params,
                          large_loss=large_loss, hits=hits, misses=misses)))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """This file's Numba cache: empty at first, shared by its cases (then the native self-test
    compiles once)."""
    return tmp_path_factory.mktemp("numba-cache")


@pytest.fixture(scope="module")
def two_modes(cache) -> dict:
    """A tiny fit in plain mode (BPK_NUMBA_NATIVE=0), then in native mode by another process
    with the same cache; and what each process said of its mode."""
    plain = _run(_REPORT, cache, BPK_NUMBA_NATIVE="0")
    return dict(plain=_report(plain),
                plain_fit=_report(_run(_TINY_FIT, cache, BPK_NUMBA_NATIVE="0")),
                native_fit=_report(_run(_TINY_FIT, cache, BPK_NUMBA_NATIVE="auto")))


@COMPILES
def test_bpk_numba_native_0_means_plain_mode(two_modes):
    plain = two_modes["plain"]
    assert plain["mode"] == plain["info_mode"] == "plain"
    assert plain["reason"] == plain["info_reason"] == "plain (BPK_NUMBA_NATIVE=0)"
    assert plain["pool"] == "off (plain mode)"
    assert two_modes["plain_fit"]["mode"] == "plain"


@COMPILES
def test_plain_mode_trains_as_native_mode_and_the_numpy_backend(two_modes):
    scope: dict = {}
    exec(_TINY_FIT, scope)
    params, loss = scope["tiny_fit"]("numpy")
    plain, native = two_modes["plain_fit"], two_modes["native_fit"]
    close = dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(plain["params"], params, **close, err_msg="plain vs numpy")
    np.testing.assert_allclose(plain["loss"], loss, **close)
    large_params, large_loss = scope["tiny_fit"]("numpy", scope["LARGE"])
    np.testing.assert_allclose(plain["large_params"], large_params, **close,
                               err_msg="plain vs numpy, a large model")
    np.testing.assert_allclose(plain["large_loss"], large_loss, **close)
    if native["mode"] != "native":
        pytest.skip("native mode is off here: plain mode checked against NumPy only")
    np.testing.assert_allclose(plain["params"], native["params"], **close,
                               err_msg="plain vs native")
    np.testing.assert_allclose(plain["loss"], native["loss"], **close)
    np.testing.assert_allclose(plain["large_params"], native["large_params"], **close,
                               err_msg="plain vs native, a large model")


@COMPILES
def test_plain_modes_compiled_kernels_are_cached_apart_from_native_ones(two_modes, cache):
    # Each process compiled its own epoch kernel (native mode did not load plain mode's), and
    # the cache holds both, under names of their own.
    plain, native = two_modes["plain_fit"], two_modes["native_fit"]
    assert (plain["hits"], plain["misses"]) == (0, 1)
    if native["mode"] != "native":
        pytest.skip("native mode is off here")
    assert (native["hits"], native["misses"]) == (0, 1)
    index = [path.name for path in cache.rglob("*.nbi")]
    assert any(name.startswith("epoch.train_epoch_plain-") for name in index), index
    assert any(name.startswith("epoch.train_epoch-") for name in index), index
    assert all("_plain" not in name for name in index if name.startswith("selftest."))


@COMPILES
def test_bpk_info_names_the_mode_and_the_pool(two_modes, cache):
    info = "from bpkernels.cli import main; main(['info'])"
    plain = _run(info, cache, BPK_NUMBA_NATIVE="0")
    assert "numba mode: plain (BPK_NUMBA_NATIVE=0)" in plain
    assert "numba BLAS pool: off (plain mode)" in plain
    native = _run(info, cache, BPK_NUMBA_NATIVE="auto")
    if two_modes["native_fit"]["mode"] == "native":
        assert "numba mode: native (self-test passed)" in native
    else:
        assert "numba mode: plain (" in native
    assert "numba BLAS pool: " in native


@pytest.mark.parametrize("setting", ["yes", "2"])
def test_a_setting_other_than_0_1_or_auto_means_plain_mode_naming_it(cache, setting):
    report = _report(_run(_REPORT, cache, BPK_NUMBA_NATIVE=setting))
    assert report["mode"] == report["info_mode"] == "plain"
    assert report["reason"] == f"plain (BPK_NUMBA_NATIVE={setting!r} is not 0, 1 or auto)"


def test_numba_disable_jit_means_plain_mode(cache):
    report = _report(_run(_REPORT, cache, NUMBA_DISABLE_JIT="1", BPK_NUMBA_NATIVE="1"))
    assert report["mode"] == "plain" and "NUMBA_DISABLE_JIT" in report["reason"]


_UNTESTED = _NATIVE_FIRST + """
native.TESTED = {"numba": ((0, 1),), "llvmlite": ((0, 2),)}  # no release ever was
""" + _REPORT


@COMPILES
@pytest.mark.parametrize("setting", ["auto", "1"])
def test_an_untested_release_means_plain_mode_unless_bpk_numba_native_is_1(cache, setting):
    report = _report(_run(_UNTESTED, cache, BPK_NUMBA_NATIVE=setting))
    if setting == "auto":
        assert report["mode"] == report["info_mode"] == "plain"
        assert report["reason"].startswith("plain (native layer not tested with numba ")
        assert "(tested: 0.1)" in report["reason"] and "(tested: 0.2)" in report["reason"]
        assert report["reason"].endswith("; BPK_NUMBA_NATIVE=1 tries it)")
    else:  # tried, and the self-test passed
        assert report["mode"] == report["info_mode"] == "native"
        assert report["reason"] == "native (self-test passed on untested releases " \
                                   "(BPK_NUMBA_NATIVE=1))"


_SELF_TEST_FAILS = _NATIVE_FIRST + """
from bpkernels.backends.numba._native import selftest

def run():
    raise RuntimeError("wrong results from a GEMM")
selftest.run = run
""" + _REPORT


def test_a_failing_self_test_means_plain_mode(cache):
    report = _report(_run(_SELF_TEST_FAILS, cache))
    assert report["mode"] == report["info_mode"] == "plain"
    assert report["reason"] == \
        "plain (native self-test failed: RuntimeError: wrong results from a GEMM)"
    assert report["pool"] == "off (plain mode)"


# pool.py reads the OpenBLAS release at import, from its config string: this one says 0.3.0.
_OPENBLAS_0_3_0 = _NATIVE_FIRST + """
import ctypes
from bpkernels.backends.numba._native import blas  # (the real CDLL: its GEMM symbols)

class Library(ctypes.CDLL):
    def __getattr__(self, name):
        if "get_config" in name:
            return type("Config", (), dict(restype=None, __call__=lambda _: b"OpenBLAS 0.3.0"))()
        return super().__getattr__(name)

real, ctypes.CDLL = ctypes.CDLL, Library
from bpkernels.backends.numba._native import pool
ctypes.CDLL = real
print(pool.status())
from bpkernels.cli import main
main(["info"])
""" + _REPORT


@COMPILES
@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the pool runs on Linux on x86-64 only")
@pytest.mark.parametrize("setting", ["auto", "1"])
def test_the_pool_is_off_on_an_untested_openblas_unless_bpk_numba_native_is_1(cache, setting):
    out = _run(_OPENBLAS_0_3_0, cache, BPK_NUMBA_NATIVE=setting)
    report = _report(out)
    assert report["mode"] == "native"  # (Numba and llvmlite: tested)
    why = "off (not tested with OpenBLAS 0.3.0 (tested: 0.3.31; BPK_NUMBA_NATIVE=1 tries it))"
    if setting == "auto":
        assert report["pool"] == why
        assert out.startswith(f"{why}\n")
        assert f"numba BLAS pool: {why}" in out
    else:  # gated on the threads callback only (and its own self-test, at its first start)
        assert not report["pool"].startswith("off (not tested"), report["pool"]
