"""Dropout's generator: Philox4x32-10 against Random123's published known answers, every
implementation against the NumPy reference (bpkernels/philox.py) bit for bit, and the masks'
properties: a pure function of (seed, step, layer, row, unit), a kept fraction whose mean and
variance are the binomial's, and limits that are refused, not wrapped.

Each test of an implementation runs on every one that can run here: ``numpy`` (the reference),
``numba`` (backends/numba/philox.py; skipped without Numba), ``cuda-cpu`` (backends/cuda/
philox.cuh with a test kernel, under the CPU emulation of tests/cudasim; skipped without a C++
compiler) and ``cuda`` (the same kernel on a GPU through CuPy; skipped without one). Every
statistical bound is 5 sigma on fixed seeds: the tests cannot flake, and a biased generator or
a wrong layout misses them by far.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bpkernels as bpk
import cudasim
from bpkernels import philox
from bpkernels.backends import cuda_sources as sources

# Random123 (github.com/DEShawResearch/random123, commit 9545ff64), tests/kat_vectors: its three
# "philox4x32 10" lines, as published (name, rounds, counter, key, expected output).
KAT_VECTORS = """
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
"""  # noqa: E501
# The same commit's tests/old_kat_vectors: a set bit in each counter word and in each key word,
# which the lines above (all zeros, all ones, digits of pi) tell apart poorly.
OLD_KAT_VECTORS = """
philox4x32 10 00000001 00000000 00000000 00000000   00000001 00000000   ac08141b dfc5ccbe 79c07a47 a7f66093
philox4x32 10 00000000 00000001 00000000 00000000   00000001 00000000   833ff8dc 225c963c 232b88b3 0b334b07
philox4x32 10 00000000 00000000 00000001 00000000   00000001 00000000   07071c12 428264b6 3909104b 6da2bda2
philox4x32 10 00000000 00000000 00000000 00000001   00000001 00000000   127bee41 1e047488 48842b20 0a393496
philox4x32 10 00000000 00000000 00000000 80000000   00000000 00000001   0436a39b 31be9efa 6abd0c76 e7a68f83
philox4x32 10 a4093822 299f31d0 082efa98 ec4e6c89   00000000 ffffffff   9fcce05d 837d3f3c 5cdf3e61 db2544c0
philox4x32 10 452821e6 38d01377 be5466cf 34e90c6c   00000000 80000000   94ca5566 14924b2f 28214292 59faeaee
"""  # noqa: E501


def _vectors(text: str) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    out = []
    for line in text.strip().splitlines():
        name, rounds, *words = line.split()
        assert name == "philox4x32" and rounds == "10" and len(words) == 10, line
        words = [int(w, 16) for w in words]
        out.append((tuple(words[:4]), tuple(words[4:6]), tuple(words[6:])))
    return out


KATS = _vectors(KAT_VECTORS) + _vectors(OLD_KAT_VECTORS)
MASK32 = 0xFFFFFFFF


def _philox_by_hand(ctr, key):
    """Philox4x32-10 on Python ints, written from Random123's philox.h as it reads
    (philox4x32_R: a round, then for each further round the key bumped and a round), for the
    NumPy reference to be tested against something that is not itself."""
    c, k = list(ctr), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & MASK32, (k[1] + 0xBB67AE85) & MASK32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK32, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK32]
    return tuple(c)


# =============================================================== the implementations
CUDA_TEST_KERNELS = r"""
extern "C" __global__ void philox_rows(const unsigned int* ctr, long long m, unsigned int k0,
                                       unsigned int k1, unsigned int* out) {
    GRID_STRIDE(i, m) {
        philox4 c = {{ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3]}};
        philox4 w = philox4x32(c, k0, k1);
        for (int j = 0; j < 4; ++j) out[4 * i + j] = w.v[j];
    }
}

extern "C" __global__ void dropout_keep_mask(unsigned int k0, unsigned int k1, unsigned int step,
                                             unsigned int layer, const long long* rows,
                                             long long n, long long units,
                                             unsigned int threshold, unsigned char* keep) {
    GRID_STRIDE(i, n * units) {
        long long row = i / units, unit = i - row * units;
        philox4 w = dropout_bits(k0, k1, step, layer, rows[row], unit / 4);
        keep[i] = dropout_keeps(w.v[unit % 4], threshold);
    }
}
"""


def cuda_test_source() -> str:
    """philox.cuh, after common.cuh (GRID_STRIDE), with the test kernels: what a kernel source
    that includes both will compile."""
    return sources.source("common.cuh") + sources.source("philox.cuh") + CUDA_TEST_KERNELS


class NumpyImpl:
    def philox(self, counters, key):
        return philox.philox4x32(counters, key)

    def keep(self, seed, step, layer, rows, units, p):
        return philox.dropout_keep(seed, step, layer, rows, units, p)


class NumbaImpl(NumpyImpl):
    def __init__(self) -> None:
        pytest.importorskip("numba")
        from bpkernels.backends.numba import philox as compiled
        self.compiled = compiled

    def philox(self, counters, key):
        flat = np.ascontiguousarray(counters.reshape(-1, 4))
        out = np.empty_like(flat)
        self.compiled.philox4x32_numba(flat, int(key[0]), int(key[1]), out)
        return out.reshape(counters.shape)

    def keep(self, seed, step, layer, rows, units, p):
        d = philox.dropout_draw(seed, step, layer, rows, units, p)
        out = np.empty((d.rows.size, d.units), bool)
        self.compiled.dropout_keep_numba(d.key0, d.key1, d.step, d.layer, d.rows, d.units,
                                         d.threshold, out)
        return out


class CudaImpl(NumpyImpl):
    """The test kernels on ``xp``: the CPU emulation's stand-in for CuPy, or CuPy on a GPU."""

    def __init__(self, xp, launch=None) -> None:
        self.xp, self.launch = xp, launch
        module = xp.RawModule(code=cuda_test_source(), options=sources.options("float32"))
        self.rows_kernel = module.get_function("philox_rows")
        self.mask_kernel = module.get_function("dropout_keep_mask")

    def _run(self, kernel, total, args):
        grid, block = self.launch or ((max(1, min(1024, -(-total // 128))),), (128,))
        kernel(grid, block, args)

    def philox(self, counters, key):
        flat = np.ascontiguousarray(counters.reshape(-1, 4))
        out = self.xp.zeros(flat.shape, np.uint32)
        self._run(self.rows_kernel, len(flat), (self.xp.asarray(flat), np.int64(len(flat)),
                                                np.uint32(key[0]), np.uint32(key[1]), out))
        return self.xp.asnumpy(out).reshape(counters.shape)

    def keep(self, seed, step, layer, rows, units, p):
        d = philox.dropout_draw(seed, step, layer, rows, units, p)
        out = self.xp.zeros((d.rows.size, d.units), np.uint8)
        if out.size:
            u32 = np.uint32
            self._run(self.mask_kernel, out.size,
                      (u32(d.key0), u32(d.key1), u32(d.step), u32(d.layer),
                       self.xp.asarray(d.rows), np.int64(d.rows.size), np.int64(d.units),
                       u32(d.threshold), out))
        return self.xp.asnumpy(out).astype(bool)


def _cuda_cpu(launch=None):
    reason = cudasim.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CPU emulation of CUDA: {reason}")
    return CudaImpl(cudasim.shim, launch)


def _cuda_gpu():
    reason = bpk.backends.unavailable_reasons().get("cupy")
    if reason is not None:
        pytest.skip(f"no CUDA GPU here: {reason}")
    import cupy
    return CudaImpl(cupy)


_MAKERS = {"numpy": NumpyImpl, "numba": NumbaImpl, "cuda-cpu": _cuda_cpu, "cuda": _cuda_gpu}
_MADE: dict = {}


@pytest.fixture(params=list(_MAKERS))
def impl(request):
    if request.param not in _MADE:
        _MADE[request.param] = _MAKERS[request.param]()
    return _MADE[request.param]


# =============================================================== the generator
def test_the_known_answers_are_random123s():
    """The hand-written rounds give the published answers: the vectors are parsed right, and
    the independent implementation the reference is checked against below is right."""
    for ctr, key, expected in KATS:
        assert _philox_by_hand(ctr, key) == expected, [hex(w) for w in ctr + key]


def test_known_answers(impl):
    for ctr, key, expected in KATS:
        got = impl.philox(np.array([ctr], np.uint32), key)
        assert got.dtype == np.uint32 and got.shape == (1, 4)
        assert tuple(int(w) for w in got[0]) == expected, [hex(w) for w in ctr + key]


def test_every_implementation_draws_the_same_bits(impl):
    """Random counters and keys, edge words among them (0, 1, 2**31, 2**32 - 1), against the
    hand-written rounds (on the reference) and against the reference (on the others)."""
    rng = np.random.default_rng(20)
    edges = np.array([0, 1, 2 ** 31, MASK32], np.uint32)
    keys = [(0, 0), (MASK32, MASK32), (1, 2 ** 31)] + [tuple(int(w) for w in rng.integers(
        0, 2 ** 32, 2, dtype=np.uint64)) for _ in range(5)]
    for key in keys:
        counters = rng.integers(0, 2 ** 32, (257, 4), dtype=np.uint64).astype(np.uint32)
        counters[:4] = edges[rng.integers(0, 4, (4, 4))]
        got = impl.philox(counters.reshape(1, 257, 4), key)
        assert got.shape == (1, 257, 4) and got.dtype == np.uint32
        if isinstance(impl, (NumbaImpl, CudaImpl)):
            np.testing.assert_array_equal(got[0], philox.philox4x32(counters, key))
        else:
            by_hand = [_philox_by_hand(tuple(int(w) for w in c), key) for c in counters[:40]]
            np.testing.assert_array_equal(got[0, :40], np.array(by_hand, np.uint32))


def test_uniform_is_exact_in_float32_and_below_one():
    words = np.array([0, 0xFF, 0x100, 2 ** 31, MASK32 - 0xFF, MASK32], np.uint32)
    u32, u64 = philox.uniform(words, "float32"), philox.uniform(words)
    assert u32.dtype == np.float32 and u64.dtype == np.float64
    np.testing.assert_array_equal(u32.astype(np.float64), u64)  # the same numbers, no rounding
    assert list(u64) == [0.0, 0.0, 2.0 ** -24, 0.5, 1 - 2.0 ** -24, 1 - 2.0 ** -24]


def test_keep_threshold_is_the_uniforms_test_in_integers():
    """``word >> 8 >= keep_threshold(p)`` is ``uniform(word) >= p`` compared exactly (float64
    holds both), at random p and at p on the uniforms' grid, where >= keeps the equal one."""
    rng = np.random.default_rng(3)
    words = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)
    grid = [k * 2.0 ** -24 for k in (1, 2 ** 23, 2 ** 24 - 1)]
    for p in [0.0, 1e-300, 0.1, 1 / 3, 0.5, 0.9, 1 - 2.0 ** -30, *grid, *rng.uniform(0, 1, 20)]:
        t = philox.keep_threshold(p)
        np.testing.assert_array_equal((words >> 8) >= t, philox.uniform(words) >= p, f"p={p}")
    assert [philox.keep_threshold(p) for p in grid] == [1, 2 ** 23, 2 ** 24 - 1]


# =============================================================== the masks
def _by_element(seed, step, layer, row, unit, p):
    """A unit's keep decision from the documented layout, one element at a time."""
    counter = (unit // 4, row & MASK32, step, layer | (row >> 32) << 16)
    word = _philox_by_hand(counter, (seed & MASK32, seed >> 32))[unit % 4]
    return (word >> 8) * 2.0 ** -24 >= p


def test_the_reference_mask_follows_the_documented_layout():
    rng = np.random.default_rng(5)
    for seed, step, layer, rows in [(0, 0, 0, [0, 1]), (2 ** 64 - 1, 2 ** 32 - 1, 2 ** 16 - 1,
                                                        [2 ** 48 - 1, 2 ** 32, 2 ** 32 - 1]),
                                    (12345, 1, 3, rng.integers(0, 2 ** 48, 4))]:
        mask = philox.dropout_keep(seed, step, layer, np.array(rows, np.int64), 11, 0.4)
        expected = [[_by_element(seed, step, layer, int(r), u, 0.4) for u in range(11)]
                    for r in rows]
        np.testing.assert_array_equal(mask, np.array(expected))


def test_every_implementation_draws_the_same_mask(impl):
    """Edge values of every field (the largest seed, step, layer and row), a width that four
    does not divide, one unit, none."""
    rng = np.random.default_rng(8)
    rows = np.concatenate([[0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 48 - 1],
                           rng.integers(0, 2 ** 40, 40)]).astype(np.int64)
    cases = [(0, 0, 0, 37, 0.3), (2 ** 64 - 1, 2 ** 32 - 1, 2 ** 16 - 1, 37, 0.3),
             (987654321987, 1000, 2, 1, 0.5), (7, 3, 1, 0, 0.5), (7, 3, 1, 64, 0.95)]
    for seed, step, layer, units, p in cases:
        mask = impl.keep(seed, step, layer, rows, units, p)
        assert mask.dtype == bool and mask.shape == (rows.size, units)
        np.testing.assert_array_equal(mask, philox.dropout_keep(seed, step, layer, rows, units, p),
                                      f"seed={seed} step={step} layer={layer} units={units}")


def test_the_cuda_kernel_agrees_under_any_launch():
    """A grid smaller than the work (each thread's grid-stride loop runs many times), a block
    that is not a power of two, one thread."""
    rows = np.arange(50, dtype=np.int64) * 1_000_003
    expected = philox.dropout_keep(99, 5, 1, rows, 23, 0.25)
    for launch in [((3,), (7,)), ((1,), (1,))]:
        np.testing.assert_array_equal(_cuda_cpu(launch).keep(99, 5, 1, rows, 23, 0.25), expected)


def test_a_mask_is_a_pure_function_of_its_fields(impl):
    """The same rows drawn in another order, split across two calls (as MPI ranks draw their
    parts of a global batch), repeated, or with fewer units, give the same rows of the mask."""
    rng = np.random.default_rng(11)
    rows = np.concatenate([rng.permutation(300), 2 ** 40 + rng.permutation(100)]).astype(np.int64)
    full = impl.keep(42, 17, 1, rows, 50, 0.3)
    order = rng.permutation(rows.size)
    np.testing.assert_array_equal(impl.keep(42, 17, 1, rows[order], 50, 0.3), full[order])
    parts = [impl.keep(42, 17, 1, part, 50, 0.3) for part in np.array_split(rows, [123])]
    np.testing.assert_array_equal(np.concatenate(parts), full)
    again = impl.keep(42, 17, 1, rows[[5, 5, 5]], 50, 0.3)
    assert (again == full[5]).all()
    np.testing.assert_array_equal(impl.keep(42, 17, 1, rows, 13, 0.3), full[:, :13])


def _agreement_bound(a, b, q):
    """Two masks drawn independently agree on a unit with probability q^2 + (1 - q)^2: True
    when their agreement is within 5 sigma of that (so not the same draw, nor an anti-copy)."""
    n = a.size
    both = q * q + (1 - q) * (1 - q)
    return abs((a == b).sum() - n * both) <= 5 * math.sqrt(n * both * (1 - both))


def test_each_field_draws_a_mask_of_its_own(impl):
    """Changing only the seed's high word, the step, the layer, the row's high bits or the unit
    block gives a new, independent mask: no field is dropped or aliased onto another (layer 1
    and row 2**32 would collide if the row's high bits overlapped the layer's)."""
    rows = np.arange(400, dtype=np.int64)
    base = impl.keep(5, 9, 1, rows, 64, 0.5)
    others = {"seed high word": impl.keep(5 + 2 ** 32, 9, 1, rows, 64, 0.5),
              "step": impl.keep(5, 10, 1, rows, 64, 0.5),
              "layer": impl.keep(5, 9, 2, rows, 64, 0.5),
              "row high bits": impl.keep(5, 9, 1, rows + 2 ** 32, 64, 0.5),
              "layer vs row": impl.keep(5, 9, 0, rows + 2 ** 32, 64, 0.5)}
    for name, other in others.items():
        assert _agreement_bound(base, other, 0.5), name
    assert _agreement_bound(base[:, :32], base[:, 32:], 0.5), "unit blocks"
    assert _agreement_bound(others["layer vs row"], others["row high bits"], 0.5)


def test_the_counters_never_collide_at_the_limits():
    """Distinct (step, layer, row, block) within the limits give distinct counters: every
    field at 0, 1 and its largest value, in every combination."""
    seen = set()
    for step in (0, 1, philox.STEP_LIMIT - 1):
        for layer in (0, 1, philox.LAYER_LIMIT - 1):
            rows = np.array([0, 1, 2 ** 32 - 1, 2 ** 32, philox.ROW_LIMIT - 1], np.int64)
            draw = philox.dropout_draw(0, step, layer, rows, 8, 0.5)
            for counter in philox.dropout_counters(draw).reshape(-1, 4):
                seen.add(tuple(int(w) for w in counter))
    assert len(seen) == 3 * 3 * 5 * 2
    # (the block field: units < UNIT_LIMIT never needs a block index past 32 bits)
    assert (philox.UNIT_LIMIT - 1) // 4 == MASK32


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_is_binomial(impl, p):
    """Over 2000 rows x 501 units: the kept count within 5 sigma of its binomial mean, each of
    the four lanes of a Philox call too; the variance of the kept count across rows, and
    across units, within 5 sigma of the binomial's (chi-square with n - 1 degrees of freedom,
    whose standard deviation is sqrt(2 (n - 1)))."""
    n, units = 2000, 501
    rows = (np.arange(n, dtype=np.int64) * 7919) + np.where(np.arange(n) % 2, 2 ** 33, 0)
    keep = impl.keep(2026, 123, 2, rows, units, p)
    q = 1 - philox.keep_threshold(p) / 2 ** 24  # the exact keep probability, 1 - p within 2**-24
    assert abs(q - (1 - p)) < 2 ** -24

    def mean_ok(kept):
        return abs(kept.sum() - kept.size * q) <= 5 * math.sqrt(kept.size * q * (1 - q))

    assert mean_ok(keep), keep.mean()
    for lane in range(4):
        assert mean_ok(keep[:, lane::4]), (lane, keep[:, lane::4].mean())
    for axis, trials in ((1, units), (0, n)):
        counts = keep.sum(axis)
        dof = counts.size - 1
        chi2 = dof * counts.var(ddof=1) / (trials * q * (1 - q))
        assert abs(chi2 - dof) <= 5 * math.sqrt(2 * dof), (axis, chi2, dof)


def test_p_zero_keeps_everything(impl):
    rows = np.arange(9, dtype=np.int64)
    assert impl.keep(1, 2, 3, rows, 13, 0.0).all()
    assert impl.keep(1, 2, 3, rows, 13, 0).shape == (9, 13)
    assert impl.keep(1, 2, 3, rows[:0], 13, 0.5).shape == (0, 13)
    assert impl.keep(1, 2, 3, rows, 0, 0.5).shape == (9, 0)


@pytest.mark.parametrize("arguments, error, match", [
    (dict(p=1.0), ValueError, r"p must lie in \[0.0, 1.0\)"),
    (dict(p=-0.1), ValueError, r"p must lie in"),
    (dict(p=float("nan")), ValueError, "p must be finite"),
    (dict(p=True), TypeError, "must be a number"),
    (dict(p="0.5"), TypeError, "must be a number"),
    (dict(rows=[3, -1]), ValueError, r"rows must be data-set indices in \[0, 2\*\*48\), got -1"),
    (dict(rows=[2 ** 48]), ValueError, r"rows must be .* got 281474976710656"),
    (dict(rows=[0.0, 1.0]), TypeError, "integer row indices"),
    (dict(rows=[[0, 1]]), ValueError, "rows must be 1-D"),
    (dict(step=2 ** 32), ValueError, r"step must be < 2\*\*32 .*wrap.*got 4294967296"),
    (dict(step=-1), ValueError, "step must be >= 0"),
    (dict(step=1.0), TypeError, "step must be an integer"),
    (dict(layer=2 ** 16), ValueError, r"layer must be < 2\*\*16"),
    (dict(seed=2 ** 64), ValueError, r"seed must be < 2\*\*64"),
    (dict(seed=-3), ValueError, "seed must be >= 0"),
    (dict(units=2 ** 34), ValueError, r"units must be < 2\*\*34"),
    (dict(units=True), TypeError, "units must be an integer"),
])
def test_bad_arguments_are_clear_errors(arguments, error, match):
    call = dict(seed=0, step=1, layer=0, rows=[0, 1], units=8, p=0.5) | arguments
    with pytest.raises(error, match=match):
        philox.dropout_keep(**call)


def test_bad_generator_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="uint32 array of shape"):
        philox.philox4x32(np.zeros((2, 4), np.int64), (0, 0))
    with pytest.raises(TypeError, match="uint32 array of shape"):
        philox.philox4x32(np.zeros((2, 3), np.uint32), (0, 0))
    with pytest.raises(TypeError, match="pair of 32-bit words"):
        philox.philox4x32(np.zeros((2, 4), np.uint32), 7)
    with pytest.raises(ValueError, match=r"key words must be < 2\*\*32"):
        philox.philox4x32(np.zeros((2, 4), np.uint32), (0, 2 ** 32))
    with pytest.raises(ValueError, match="float32 or float64"):
        philox.uniform(np.zeros(2, np.uint32), "float16")


# =============================================================== the sources and the modes
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CI has it)")
def test_nvcc_compiles_the_device_functions(tmp_path):
    path = tmp_path / "philox_test.cu"
    path.write_text(cuda_test_source())
    result = subprocess.run([shutil.which("nvcc"), "-ptx", "-arch=sm_80", "-Werror",
                             "all-warnings", *sources.options("float32"), str(path), "-o",
                             str(tmp_path / "philox_test.ptx")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "philox_test.ptx").read_text()
    assert ".entry philox_rows(" in ptx and ".entry dropout_keep_mask(" in ptx


_IN_ANOTHER_MODE = """
import json, numpy as np
from bpkernels import philox
from bpkernels.backends.numba import jit, philox as compiled
d = philox.dropout_draw(2 ** 63 + 5, 77, 3, np.array([0, 9, 2 ** 45 + 1]), 10, 0.4)
out = np.empty((3, 10), bool)
compiled.dropout_keep_numba(d.key0, d.key1, d.step, d.layer, d.rows, d.units, d.threshold, out)
words = np.empty((1, 4), np.uint32)
compiled.philox4x32_numba(np.array([[0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344]],
                                   np.uint32), 0xa4093822, 0x299f31d0, words)
print(json.dumps(dict(mode=jit.MODE, mask=out.tolist(), words=words[0].tolist())))
"""


@pytest.mark.parametrize("env", [{"BPK_NUMBA_NATIVE": "0"}, {"NUMBA_DISABLE_JIT": "1"}],
                         ids=["plain", "python"])
def test_the_numba_version_in_plain_mode_and_as_python(env, tmp_path):
    """This process tests the mode it chose (native where tested); plain mode and plain Python
    (NUMBA_DISABLE_JIT) are chosen at import, so they run in a Python of their own."""
    pytest.importorskip("numba")
    import json
    environ = {k: v for k, v in os.environ.items()
               if k not in ("BPK_NUMBA_NATIVE", "NUMBA_DISABLE_JIT")}
    environ.update(NUMBA_CACHE_DIR=str(tmp_path), **env)
    done = subprocess.run([sys.executable, "-c", _IN_ANOTHER_MODE], capture_output=True,
                          text=True, env=environ, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mode"] == "plain"
    expected = philox.dropout_keep(2 ** 63 + 5, 77, 3, np.array([0, 9, 2 ** 45 + 1]), 10, 0.4)
    assert result["mask"] == expected.tolist()
    assert result["words"] == [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
