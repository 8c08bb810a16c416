"""The NumPy backend's activations and their derivatives: one function each, in place into
the arrays given (scratch buffers come from the backend), and erf to float64's last bits
(W. J. Cody's rational approximations) for GELU and the normal CDF."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .base import ACTIVATIONS, LEAKY_RELU_SLOPE, ONE_OVER_SQRT_2PI, SQRT_HALF

# W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23
# (1969): erf on [0, 0.46875], erfc on [0.46875, 4] and on [4, inf), ~1e-16 relative.
# NumPy has no erf, and GELU's parity with the other backends needs full double precision.
_ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
          3.20937758913846947e03, 1.85777706184603153e-1)
_ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
          2.84423683343917062e03)
_ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
          2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
          2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
          1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
          3.43936767414372164e03, 1.23033935480374942e03)
_ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
          1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_ERF_Q = (2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
          6.05183413124413191e-2, 2.33520497626869185e-3)
_ONE_OVER_SQRT_PI = 0.56418958354775628695


# ---------------------------------------------------------------------- activations
# Forward functions read the pre-activation ``Z`` and write ``A`` (which may be ``Z``).
# Derivative functions write act'(z) into ``out``, from ``A`` where that suffices.

def _identity(be, Z, A):
    if A is not Z:
        np.copyto(A, Z)


def _relu(be, Z, A):
    np.maximum(Z, 0, out=A)


def _leaky_relu(be, Z, A):
    # max(z, slope * z) is leaky ReLU for 0 < slope < 1.
    scaled = be._scratch("leaky", Z.shape, Z.dtype)
    np.multiply(Z, LEAKY_RELU_SLOPE, out=scaled)
    np.maximum(Z, scaled, out=A)


def sigmoid(be, Z, A):
    # 0.5 * (1 + tanh(z / 2)) never overflows, unlike 1 / (1 + exp(-z)).
    np.multiply(Z, 0.5, out=A)
    np.tanh(A, out=A)
    A += 1
    A *= 0.5


def _logistic(be, Z, out):
    """1 / (1 + exp(-z)) into ``out`` from e = exp(-|z|) <= 1: never overflows, and keeps its
    relative accuracy in the far negative tail (z < 0: e / (1 + e)), where 1 + tanh(z / 2)
    would cancel. NaN stays NaN."""
    e = be._scratch("logistic_e", Z.shape, Z.dtype)
    negative = be._scratch("logistic_neg", Z.shape, np.bool_)
    np.abs(Z, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.less(Z, 0, out=negative)
    np.add(e, 1, out=out)
    np.divide(1, out, out=out)
    np.multiply(out, e, out=out, where=negative)


def _tanh(be, Z, A):
    np.tanh(Z, out=A)


def _gelu(be, Z, A):
    cdf = be._scratch("gelu_cdf", Z.shape, Z.dtype)
    _normal_cdf(be, Z, cdf)
    np.multiply(Z, cdf, out=A)


def _silu(be, Z, A):
    s = be._scratch("silu_s", Z.shape, Z.dtype)
    _logistic(be, Z, s)
    np.multiply(Z, s, out=A)


def _d_relu(be, A, Z, out):
    np.sign(A, out=out)  # A >= 0, so sign(A) is the 0/1 step; 0 at z == 0 as in torch


def _d_leaky_relu(be, A, Z, out):
    np.sign(A, out=out)  # sign(A) == sign(z)
    np.maximum(out, 0, out=out)
    out *= 1.0 - LEAKY_RELU_SLOPE
    out += LEAKY_RELU_SLOPE


def _d_sigmoid(be, A, Z, out):
    np.subtract(1, A, out=out)
    out *= A


def _d_tanh(be, A, Z, out):
    np.multiply(A, A, out=out)
    np.subtract(1, out, out=out)


def _d_silu(be, A, Z, out):
    # d/dz z s(z) = s(z) (1 + z (1 - s(z)))
    tmp = be._scratch("silu_d", Z.shape, Z.dtype)
    _logistic(be, Z, out)
    np.subtract(1, out, out=tmp)
    tmp *= Z
    tmp += 1
    out *= tmp


def _d_gelu(be, A, Z, out):
    # d/dz z * Phi(z) = Phi(z) + z * phi(z)
    pdf = be._scratch("gelu_pdf", Z.shape, Z.dtype)
    _normal_cdf(be, Z, out)
    np.multiply(Z, Z, out=pdf)
    pdf *= -0.5
    np.exp(pdf, out=pdf)
    pdf *= ONE_OVER_SQRT_2PI
    pdf *= Z
    out += pdf


FORWARD: dict[str, Callable] = {"identity": _identity, "relu": _relu, "leaky_relu": _leaky_relu,
                                 "sigmoid": sigmoid, "tanh": _tanh, "gelu": _gelu,
                                 "silu": _silu}
DERIVATIVE: dict[str, Callable] = {"relu": _d_relu, "leaky_relu": _d_leaky_relu,
                                    "sigmoid": _d_sigmoid, "tanh": _d_tanh, "gelu": _d_gelu,
                                    "silu": _d_silu}
assert tuple(FORWARD) == ACTIVATIONS and set(DERIVATIVE) == set(ACTIVATIONS) - {"identity"}, \
    "numpy_backend.py: an activation of base.ACTIVATION_TABLE has no math here"


def _normal_cdf(be, Z, out):
    """Phi(z) = (1 + erf(z / sqrt 2)) / 2 into ``out``."""
    np.multiply(Z, SQRT_HALF, out=out)
    erf(out, out, be._scratch)
    out += 1
    out *= 0.5


def _horner(t, coeffs, out, lead=None):
    """out = ((lead * t + c0) * t + c1) * t + ... for Cody's xnum/xden recurrences."""
    if lead is None:
        np.copyto(out, t)
    else:
        np.multiply(t, lead, out=out)
    for c in coeffs:
        out += c
        out *= t


def erf(x: np.ndarray, out: np.ndarray, scratch: Callable) -> np.ndarray:
    """The error function, elementwise, full precision; ``out`` may be ``x``.

    Each of Cody's three intervals is evaluated on the whole array with its argument clamped
    into the interval (so nothing overflows) and then selected by mask: no temporaries.
    """
    shape, dtype = x.shape, x.dtype
    y = scratch("erf_y", shape, dtype)
    t = scratch("erf_t", shape, dtype)
    num = scratch("erf_num", shape, dtype)
    den = scratch("erf_den", shape, dtype)
    mask = scratch("erf_mask", shape, np.bool_)
    sign = scratch("erf_sign", shape, dtype)
    np.copyto(sign, x)
    np.abs(x, out=y)

    # |x| > 4: erfc = exp(-y^2) (1/sqrt(pi) - z R(z)) / y with z = 1/y^2; erf(6) == 1 in float64.
    np.clip(y, 4.0, 6.0, out=t)
    np.multiply(t, t, out=den)
    np.divide(1.0, den, out=num)  # z
    z = num
    r_num = scratch("erf_rnum", shape, dtype)
    _horner(z, _ERF_P[:4], r_num, lead=_ERF_P[5])
    _horner(z, _ERF_Q[:4], den)
    r_num += _ERF_P[4]
    den += _ERF_Q[4]
    np.divide(r_num, den, out=r_num)
    r_num *= z
    np.subtract(_ONE_OVER_SQRT_PI, r_num, out=r_num)
    r_num /= t
    np.multiply(t, t, out=den)
    np.negative(den, out=den)
    np.exp(den, out=den)
    np.multiply(den, r_num, out=out)
    np.subtract(1.0, out, out=out)

    # 0.46875 < |x| <= 4: erfc = exp(-y^2) C(y) / D(y)
    np.clip(y, 0.46875, 4.0, out=t)
    _horner(t, _ERF_C[:7], num, lead=_ERF_C[8])
    _horner(t, _ERF_D[:7], den)
    num += _ERF_C[7]
    den += _ERF_D[7]
    np.divide(num, den, out=num)
    np.multiply(t, t, out=den)
    np.negative(den, out=den)
    np.exp(den, out=den)
    num *= den
    np.subtract(1.0, num, out=num)
    np.less_equal(y, 4.0, out=mask)
    np.copyto(out, num, where=mask)

    # |x| <= 0.46875: erf = y A(y^2) / B(y^2)
    np.minimum(y, 0.5, out=t)
    np.multiply(t, t, out=den)
    sq = den
    _horner(sq, _ERF_A[:3], num, lead=_ERF_A[4])
    num += _ERF_A[3]
    num *= t
    np.copyto(r_num, sq)
    _horner(sq, _ERF_B[:3], r_num)
    r_num += _ERF_B[3]
    np.divide(num, r_num, out=num)
    np.less_equal(y, 0.46875, out=mask)
    np.copyto(out, num, where=mask)

    np.copysign(out, sign, out=out)
    return out
