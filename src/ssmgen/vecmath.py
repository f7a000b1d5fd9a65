"""Branch-free float math that numba (LLVM) vectorizes, shared by the compiled kernels.

libm's `exp` is one scalar call per element: in Mamba's selective scan and step, which take an
exp per (channel, state, step), those calls were most of the time. A polynomial with the power of
two put straight into the exponent bits has no call and no branch, so a loop over a block of
values runs 8 lanes at a time with AVX2. `silu` and `softplus` (Mamba's per-channel activations in
the cpu-fast step) are built on it the same way.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ssmgen.simd import (
    LANES,
    vadd,
    vdiv,
    vfloor,
    vfma,
    vkeep_ge,
    vload,
    vmax,
    vmul,
    vscale2,
    vsplat,
    vstore,
    vsub,
)

# Cephes' expf: exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 split in two so
# that k ln 2 is exact), exp(r) = 1 + r + r^2 p(r) on |r| <= ln 2 / 2.
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_P0, _P1, _P2 = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3),
                 np.float32(8.3334519073e-3))
_P3, _P4, _P5 = (np.float32(4.1665795894e-2), np.float32(1.6666665459e-1),
                 np.float32(5.0000001201e-1))

#: The lowest floor `exp_floored` accepts: exp(-86) ~ 4e-38 is still a normal float32.
MIN_FLOOR = -86.0


@njit(cache=True, nogil=True, error_model="numpy")
def exp_floored(X, n, floor, scratch):
    """X[:n] = exp(X[:n]) in place, and exactly 0 where X < floor (MIN_FLOOR <= floor <= 0).

    float32: Cephes expf, within 1 ulp of exp for X in [floor, 0] (values above 0 are not expected:
    these are decays), 0.8 ns per value against libm's 4-6 ns. Called from a fastmath kernel,
    numba compiles it with the caller's flags: reassociation merges the two-part ln 2 of the range
    reduction, which costs up to 4 ulps at the bottom of the range. `scratch`: int32, at least n
    long, for the powers of two (built in the exponent bits; a separate array, because writing the
    bits through an int view of X itself kept LLVM from vectorizing). float64 (the exact
    reference path of the tests): libm, scratch unused."""
    if X.itemsize == 4:
        f = np.float32(floor)
        for i in range(n):
            x0 = X[i]
            x = max(x0, f)
            k = np.floor(x * _LOG2E + np.float32(0.5))  # np.floor stays float (math.floor: int)
            r = x - k * _LN2_HI - k * _LN2_LO
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            X[i] = (p * r * r + r + np.float32(1.0)) if x0 >= f else np.float32(0.0)
            scratch[i] = (np.int32(k) + np.int32(127)) << 23  # the bits of 2^k (normal: k >= -125)
        pow2 = scratch[:n].view(np.float32)
        for i in range(n):
            X[i] *= pow2[i]
    else:
        for i in range(n):
            X[i] = math.exp(X[i]) if X[i] >= floor else 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def vexp_floored(x, floor):
    """`exp_floored` of the 16 lanes of the vector x, in registers (the same Cephes polynomial):
    a loop that needs the exps of its values at once takes no pass over memory for them."""
    f = vsplat(floor)
    xc = vmax(x, f)
    k = vfloor(vfma(xc, vsplat(_LOG2E), vsplat(0.5)))
    r = vsub(vsub(xc, vmul(k, vsplat(_LN2_HI))), vmul(k, vsplat(_LN2_LO)))
    p = vfma(vsplat(_P0), r, vsplat(_P1))
    for c in (_P2, _P3, _P4, _P5):
        p = vfma(p, r, vsplat(c))
    y = vfma(vmul(p, r), r, vadd(r, vsplat(1.0)))
    return vkeep_ge(vscale2(y, k), x, f)


# Cephes' logf: log(m) = z - z^2 / 2 + z^3 q(z) for m = 1 + z in [sqrt(1/2), sqrt(2)].
_Q = tuple(np.float32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1,
                                   -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                                   2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_SQRT2_M1 = np.float32(0.41421356237)


@njit(cache=True, nogil=True, error_model="numpy")
def log1p_unit(y):
    """log(1 + y) for float32 y in [0, 1], branch-free (vectorizes in a loop). Up to sqrt(2) - 1 the
    polynomial takes y itself (no rounding of 1 + y, so tiny y keep full relative precision);
    above, log(1 + y) = log((1 + y) / 2) + ln 2 with (1 + y) / 2 - 1 = (y - 1) / 2."""
    big = y > _SQRT2_M1
    z = (y - np.float32(1.0)) * np.float32(0.5) if big else y
    k = np.float32(1.0) if big else np.float32(0.0)
    q = _Q[0]
    for c in _Q[1:]:
        q = q * z + c
    z2 = z * z
    return z + (z2 * z * q - np.float32(0.5) * z2 + k * _LN2_LO) + k * _LN2_HI


@njit(cache=True, nogil=True, error_model="numpy")
def vlog1p_unit(y):
    """`log1p_unit` of the 16 lanes of y."""
    one = vsplat(1.0)
    k = vkeep_ge(one, y, vsplat(_SQRT2_M1))  # 1 where the halved form is taken
    z = vsub(y, vmul(k, vmul(vadd(y, one), vsplat(0.5))))  # y, or (y - 1) / 2
    q = vsplat(_Q[0])
    for c in _Q[1:]:
        q = vfma(q, z, vsplat(c))
    z2 = vmul(z, z)
    t = vfma(vmul(z2, z), q, vfma(k, vsplat(_LN2_LO), vmul(vsplat(-0.5), z2)))
    return vfma(k, vsplat(_LN2_HI), vadd(z, t))


@njit(cache=True, nogil=True, error_model="numpy")
def _vexp_neg_abs(x):
    zero = vsplat(0.0)
    return vexp_floored(vsub(zero, vmax(x, vsub(zero, x))), MIN_FLOOR)


@njit(cache=True, nogil=True, error_model="numpy")
def vsilu(x):
    """`silu` of the 16 lanes of x, in registers."""
    one = vsplat(1.0)
    e = _vexp_neg_abs(x)
    num = vadd(e, vkeep_ge(vsub(one, e), x, vsplat(0.0)))  # 1 for x >= 0, e below
    return vdiv(vmul(x, num), vadd(one, e))


@njit(cache=True, nogil=True, error_model="numpy")
def vsoftplus(x):
    """`softplus` of the 16 lanes of x, in registers."""
    return vadd(vmax(x, vsplat(0.0)), vlog1p_unit(_vexp_neg_abs(x)))


@njit(cache=True, nogil=True, error_model="numpy")
def silu(X, n, tmp, scratch):
    """X[:n] = X sigmoid(X) in place, float32: e = exp(-|x|), then sigmoid = 1 / (1 + e) for x >= 0
    and e / (1 + e) below (no overflow, no cancellation). 16 lanes at a time in registers
    (`vsilu`), the last n % 16 in one `exp_floored` pass; tmp: float32, scratch: int32, each at
    least n % 16 long."""
    m = n - n % LANES
    for i in range(0, m, LANES):
        vstore(X, i, vsilu(vload(X, i)))
    for i in range(m, n):
        tmp[i - m] = -abs(X[i])
    exp_floored(tmp, n - m, MIN_FLOOR, scratch)
    for i in range(m, n):
        x = X[i]
        e = tmp[i - m]
        X[i] = x * ((np.float32(1.0) if x >= 0 else e) / (np.float32(1.0) + e))


@njit(cache=True, nogil=True, error_model="numpy")
def softplus(X, n, tmp, scratch):
    """X[:n] = log(1 + exp(X)) in place, float32: max(x, 0) + log1p(exp(-|x|)). Above x = 17 the
    second term is under half an ulp of x, so this equals torch's `x` past its threshold of 20.
    16 lanes at a time (`vsoftplus`), the tail as `silu`'s."""
    m = n - n % LANES
    for i in range(0, m, LANES):
        vstore(X, i, vsoftplus(vload(X, i)))
    for i in range(m, n):
        tmp[i - m] = -abs(X[i])
    exp_floored(tmp, n - m, MIN_FLOOR, scratch)
    for i in range(m, n):
        X[i] = max(X[i], np.float32(0.0)) + log1p_unit(tmp[i - m])
