"""The vectorized float math of the compiled kernels against numpy."""

import numpy as np
import pytest
from numba import njit

from ssmgen.simd import vload, vstore
from ssmgen.vecmath import MIN_FLOOR, log1p_unit, silu, softplus, vexp_floored
from ssmgen.vecmath import exp_floored as shared_exp_floored

# numba compiles a callee with its caller's fastmath flags and keeps that overload for every later
# call with the same types: once a fastmath kernel (cpu-fast) has called the shared dispatcher,
# direct calls get the reassociated version too. A private dispatcher is the plain code, always.
exp_floored = njit(shared_exp_floored.py_func)


def test_exp_float32_is_within_one_ulp_over_every_scale_of_decay():
    rng = np.random.default_rng(0)
    x = np.concatenate([-np.logspace(-9, np.log10(-MIN_FLOOR), 100_000), [0.0, -1e-30],
                        rng.random(1000) * MIN_FLOOR]).astype(np.float32)
    got = x.copy()
    exp_floored(got, len(got), MIN_FLOOR, np.empty(len(got), np.int32))
    ref = np.exp(x.astype(np.float64)).astype(np.float32)
    ulps = np.abs(got.astype(np.float64) - ref) / np.spacing(ref)
    assert ulps.max() <= 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_is_exactly_zero_below_the_floor_and_leaves_the_tail_alone(dtype):
    x = np.array([-59.9, -60.0, -60.1, -1e4, -np.inf, -1.0, -2.0], dtype)
    got = x.copy()
    exp_floored(got, 5, -60.0, np.empty(5, np.int32))
    assert got[2] == got[3] == got[4] == 0.0
    np.testing.assert_allclose(got[:2], np.exp(x[:2].astype(np.float64)), rtol=2e-7)
    np.testing.assert_array_equal(got[5:], x[5:])  # only the first n are touched
    if dtype == np.float64:  # the reference path is libm itself
        np.testing.assert_array_equal(got[:2], np.exp(x[:2]))


@pytest.mark.parametrize("fastmath", [False, True])
def test_exp_in_registers_matches_the_array_form(fastmath):
    """`vexp_floored` (the Mamba step's decays): the same polynomial, within 4 ulps either build,
    exactly 0 below the floor."""
    @njit(fastmath=fastmath)
    def run(X):
        for i in range(0, len(X), 16):
            vstore(X, i, vexp_floored(vload(X, i), -60.0))

    x = np.concatenate([-np.logspace(-9, np.log10(60), 16 * 1000), [0.0, -60.0, -60.1, -1e4],
                        np.zeros(12)]).astype(np.float32)
    got = x.copy()
    run(got)
    ref = np.exp(x.astype(np.float64))
    ok = x >= -60
    assert (_ulps(got[ok], ref[ok]) <= 4.0).all() and (got[~ok] == 0).all()


def test_exp_under_a_fastmath_caller_stays_within_four_ulps():
    """What the cpu-fast kernels get: reassociation merges the two-part ln 2 of the range
    reduction, which costs up to 4 ulps at the bottom of the range (measured)."""
    inner = njit(shared_exp_floored.py_func)

    @njit(fastmath=True)
    def caller(X, s):
        inner(X, len(X), MIN_FLOOR, s)

    x = -np.logspace(-9, np.log10(-MIN_FLOOR), 20_000).astype(np.float32)
    got = x.copy()
    caller(got, np.empty(len(got), np.int32))
    ref = np.exp(x.astype(np.float64)).astype(np.float32)
    assert (np.abs(got.astype(np.float64) - ref) / np.spacing(ref)).max() <= 4.0


def _ulps(got, ref64):
    return np.abs(got.astype(np.float64) - ref64) / np.spacing(np.abs(ref64).astype(np.float32))


@pytest.mark.parametrize("fastmath", [False, True])  # the cpu-fast kernels call them with fastmath
def test_silu_and_softplus_float32_within_a_few_ulps(fastmath):
    """The bounds hold for either build: once a fastmath kernel has compiled the shared helpers,
    a plain caller in the same process gets those builds too (see above)."""
    @njit(fastmath=fastmath)
    def run(X, which, tmp, scratch):
        if which == 0:
            silu(X, len(X), tmp, scratch)
        else:
            softplus(X, len(X), tmp, scratch)

    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-80, 100, 100_001), rng.standard_normal(1000) * 1e-6,
                        [0.0, 17.0, 20.0, 20.5, 0.41421356, 0.4142136]]).astype(np.float32)
    x64 = x.astype(np.float64)
    tmp, scratch = np.empty(len(x), np.float32), np.empty(len(x), np.int32)
    got = x.copy()
    run(got, 0, tmp, scratch)
    # exp_floored's fastmath build is within 4 ulps at the bottom of its range (above), where
    # softplus is exp itself; measured up to 3.1 (silu) and 4.1 (softplus) depending on the build.
    # Rounding 1 + y before the log would cost ~1e28 ulps at 1e-35.
    assert _ulps(got, x64 / (1 + np.exp(-x64))).max() <= 8.0
    got = x.copy()
    run(got, 1, tmp, scratch)
    assert _ulps(got, np.log1p(np.exp(x64))).max() <= 8.0
    assert got[-4] == np.float32(20.0) and got[-3] == np.float32(20.5)  # torch's threshold


def test_log1p_keeps_tiny_arguments_exact():
    plain = njit(log1p_unit.py_func)  # a private dispatcher: the plain build, always
    y = np.logspace(-30, 0, 2000).astype(np.float32)
    got = np.array([plain(v) for v in y], np.float32)
    assert _ulps(got, np.log1p(y.astype(np.float64))).max() <= 1.0
