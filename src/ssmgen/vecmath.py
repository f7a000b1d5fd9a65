"""Branch-free float math that numba (LLVM) vectorizes, shared by the compiled kernels.

libm's `exp` is one scalar call per element: in Mamba's selective scan and step, which take an
exp per (channel, state, step), those calls were most of the time. A polynomial with the power of
two put straight into the exponent bits has no call and no branch, so a loop over a block of
values runs 8 lanes at a time with AVX2.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Cephes' expf: exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 split in two so
# that k ln 2 is exact), exp(r) = 1 + r + r^2 p(r) on |r| <= ln 2 / 2.
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)

#: The lowest floor `exp_floored` accepts: exp(-86) ~ 4e-38 is still a normal float32.
MIN_FLOOR = -86.0


@njit(cache=True, nogil=True, error_model="numpy")
def exp_floored(X, n, floor, scratch):
    """X[:n] = exp(X[:n]) in place, and exactly 0 where X < floor (MIN_FLOOR <= floor <= 0).

    float32: Cephes expf, within 1 ulp of exp for X in [floor, 0] (values above 0 are not expected:
    these are decays), 0.8 ns per value against libm's 4-6 ns. Called from a fastmath kernel,
    numba compiles it with the caller's flags: reassociation merges the two-part ln 2 of the range
    reduction, which costs up to 4 ulps at the bottom of the range. `scratch`: int32, at least n long,
    for the powers of two (built in the exponent bits; a separate array, because writing the
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
