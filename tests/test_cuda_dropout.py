"""The CuPy backend's dropout (cuda/dropout.cu), run on the CPU through tests/cudasim: its
noise is bpkernels.philox.dropout_noise bit for bit (both dtypes, any width, data-set rows
past 2**32, every p), backward multiplies by forward's noise, and a dropped inf gives NaN as
in PyTorch.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import cudasim
from bpkernels import philox

pytestmark = pytest.mark.skipif(cudasim.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA: {cudasim.unavailable_reason()}")

SEED = 0x9E3779B97F4A7C15  # both key words non-zero
# data-set rows around the counter's word boundary and up to its limit: the high bits go
# into the counter's last word, beside the layer
ROWS = np.array([0, 1, 5, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, philox.ROW_LIMIT - 1,
                 17], np.int64)
UNITS = [1, 3, 4, 7, 33]
PS = [0.0, 0.1, 0.5, 0.9]
DTYPES = ["float32", "float64"]


@pytest.fixture(scope="module")
def be():
    return cudasim.make_backend()


def _drop(be, rows, p, step=2**31 + 5, layer=3):
    """The kernels' Dropout for host ``rows`` (uploaded) and the reference's (on the host)."""
    drop = philox.layer_dropout(SEED, step, layer, be.asarray(rows), p)
    return drop, dataclasses.replace(drop, rows=rows)


def _same_bits(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes(), np.argwhere(
        got.view(np.uint8).reshape(got.shape + (-1,)) !=
        expected.view(np.uint8).reshape(expected.shape + (-1,)))[:5]


# ====================================================================== the kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("units", UNITS)
@pytest.mark.parametrize("p", PS)
def test_forward_and_backward_multiply_by_the_reference_noise(be, dtype, units, p):
    rng = np.random.default_rng(units)
    A = rng.standard_normal((ROWS.size, units)).astype(dtype)
    dD = rng.standard_normal((ROWS.size, units)).astype(dtype)
    drop, host = _drop(be, ROWS, p)
    noise = philox.dropout_noise(host, units, dtype)
    D, grad = be.empty(A.shape, dtype), be.asarray(dD)
    be.dropout_forward(be.asarray(A), D, drop)
    be.dropout_backward(grad, drop)
    _same_bits(be.to_host(D), A * noise)
    _same_bits(be.to_host(grad), dD * noise)
    kept = noise != 0
    assert (noise[kept] == np.dtype(dtype).type(1 / (1 - p))).all()
    if p == 0:
        assert kept.all()
    elif units == 33:  # the reference really drops, and not every unit
        assert 0 < kept.mean() < 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_applies_forwards_mask(be, dtype):
    """Ones through both kernels give the noise itself: backward drops exactly the units
    forward dropped, with the same factor, for every row and unit."""
    n, units = ROWS.size, 33
    drop, host = _drop(be, ROWS, 0.5)
    ones = np.ones((n, units), dtype)
    D, grad = be.empty((n, units), dtype), be.asarray(ones)
    be.dropout_forward(be.asarray(ones), D, drop)
    be.dropout_backward(grad, drop)
    forward, backward = be.to_host(D), be.to_host(grad)
    _same_bits(forward, backward)
    _same_bits(forward, philox.dropout_noise(host, units, dtype))
    # another step, layer or seed draws another mask
    for other in (dataclasses.replace(drop, step=drop.step + 1),
                  dataclasses.replace(drop, layer=drop.layer + 1),
                  dataclasses.replace(drop, key1=drop.key1 ^ 1)):
        grad = be.asarray(ones)
        be.dropout_backward(grad, other)
        assert (be.to_host(grad) != forward).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_dropped_inf_gives_nan_as_in_pytorch(be, dtype):
    """A product, not a select: inf * 0 is NaN (PyTorch's ``input * noise``), so that the
    divergence latch sees a step whose activations overflowed; a kept inf stays inf."""
    n, units = ROWS.size, 7
    A = np.full((n, units), np.inf, dtype)
    A[::2] = -np.inf
    A[1, 2] = np.nan
    drop, host = _drop(be, ROWS, 0.5)
    noise = philox.dropout_noise(host, units, dtype)
    D, grad = be.empty(A.shape, dtype), be.asarray(A)
    be.dropout_forward(be.asarray(A), D, drop)
    be.dropout_backward(grad, drop)
    for got in (be.to_host(D), be.to_host(grad)):
        dropped = noise == 0
        assert dropped.any() and (~dropped).any()
        assert np.isnan(got[dropped]).all()
        np.testing.assert_array_equal(got[~dropped], A[~dropped])  # +-inf (and the NaN)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_rows_and_units_in_a_grid_stride_launch(be, dtype):
    """More (row, block of four) pairs than the launch has threads: every thread loops over
    several, rows and blocks crossing thread boundaries; and the same kernel launched with odd
    grids gives the same bits."""
    n, units = 613, 301
    rng = np.random.default_rng(7)
    rows = rng.choice(2**33, size=n, replace=False).astype(np.int64)
    A = rng.standard_normal((n, units)).astype(dtype)
    drop, host = _drop(be, rows, 0.3, step=12, layer=1)
    expected = A * philox.dropout_noise(host, units, dtype)
    D = be.empty(A.shape, dtype)
    be.dropout_forward(be.asarray(A), D, drop)
    _same_bits(be.to_host(D), expected)
    kernel = be._kernels(dtype)["dropout_mul"]
    for grid, block in (((1,), (1,)), ((3,), (37,)), ((1000,), (256,))):
        D = be.zeros(A.shape, dtype)
        kernel(grid, block, (be.asarray(A), np.int64(n), np.int64(units), drop.rows, None,
                             np.int64(0), np.uint32(drop.key0), np.uint32(drop.key1),
                             np.int64(drop.step), None, np.uint32(drop.layer),
                             np.uint32(drop.threshold), np.float64(drop.scale), D))
        _same_bits(be.to_host(D), expected)


def test_rows_kept_in_host_memory(be):
    """An epoch's order too large for the device stays a HostArray: its batch's rows reach
    the kernel all the same."""
    streaming = cudasim.make_backend(max_resident_bytes=16)
    rows_host = streaming.asarray(ROWS)
    assert isinstance(rows_host, cudasim.backend_module().HostArray)
    A = np.random.default_rng(1).standard_normal((ROWS.size, 9))
    drop = philox.layer_dropout(SEED, 3, 0, rows_host, 0.5)
    D = streaming.empty(A.shape, A.dtype)
    A_dev = streaming.empty(A.shape, A.dtype)
    A_dev.set(A)
    streaming.dropout_forward(A_dev, D, drop)
    _same_bits(streaming.to_host(D),
               A * philox.dropout_noise(dataclasses.replace(drop, rows=ROWS), 9, A.dtype))
