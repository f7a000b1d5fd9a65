"""The explicit SIMD vectors (ssmgen.simd) and the cpu-fast product kernel built on them, against
numpy."""

import numpy as np
import pytest
from numba import njit

from ssmgen.generate.cpu_fast_linear import PANEL, linear, panel_order
from ssmgen.simd import (
    LANES,
    vadd,
    vdiv,
    vfloor,
    vfma,
    vkeep_ge,
    vlane,
    vload,
    vmax,
    vmul,
    vscale2,
    vsplat,
    vstore,
    vsub,
    vsum,
)


@njit(cache=False)
def _ops(a, w, out, s, i, j):
    vstore(out, j, vfma(vsplat(s), vload(w, i), vload(a, i)))


@njit(cache=False)
def _arith(a, b, out):
    x, y = vload(a, 0), vload(b, 0)
    vstore(out, 0, vmul(x, y))
    vstore(out, 16, vadd(x, y))
    vstore(out, 32, vsub(x, y))
    return vsum(x), vlane(y, 5), vlane(y, 15)


def test_lane_arithmetic_sum_and_lanes():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, LANES)).astype(np.float32)
    out = np.zeros(3 * LANES, np.float32)
    total, l5, l15 = _arith(a, b, out)
    np.testing.assert_array_equal(out, np.concatenate([a * b, a + b, a - b]))
    assert abs(total - a.astype(np.float64).sum()) <= 1e-5 and l5 == b[5] and l15 == b[15]


@njit(cache=False)
def _exp_parts(a, b, k, out):
    x, y = vload(a, 0), vload(b, 0)
    vstore(out, 0, vdiv(x, y))
    vstore(out, 16, vmax(x, y))
    vstore(out, 32, vfloor(x))
    vstore(out, 48, vscale2(x, vload(k, 0)))
    vstore(out, 64, vkeep_ge(x, x, y))


def test_division_max_floor_powers_of_two_and_masking():
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((2, LANES)) * 10).astype(np.float32)
    k = np.arange(-8, 8, dtype=np.float32) * 15  # -120 .. 105: whole numbers in range
    out = np.zeros(5 * LANES, np.float32)
    _exp_parts(a, b, k, out)
    np.testing.assert_array_equal(out[:16], a / b)
    np.testing.assert_array_equal(out[16:32], np.maximum(a, b))
    np.testing.assert_array_equal(out[32:48], np.floor(a))
    np.testing.assert_array_equal(out[48:64], np.ldexp(a, k.astype(int)))
    np.testing.assert_array_equal(out[64:], np.where(a >= b, a, 0))


def test_vector_ops_are_lane_by_lane():
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((2, 40)).astype(np.float32)
    out = np.full(40, 7.0, np.float32)
    _ops(a, w, out, 1.5, 3, 20)  # unaligned on both sides
    ref = (np.float32(1.5) * w[3:3 + LANES] + a[3:3 + LANES]).astype(np.float32)
    np.testing.assert_allclose(out[20:20 + LANES], ref, rtol=1e-6)
    assert (out[:20] == 7).all() and (out[20 + LANES:] == 7).all()  # nothing else written


def test_panel_order_puts_each_panel_in_one_block_the_last_as_wide_as_its_columns():
    wt = np.arange(5 * 150, dtype=np.float32).reshape(5, 150) + 1
    p = panel_order(wt)
    assert p.shape == (5 * 150,)
    np.testing.assert_array_equal(p[:5 * PANEL].reshape(5, PANEL), wt[:, :PANEL])
    np.testing.assert_array_equal(p[5 * PANEL:10 * PANEL].reshape(5, PANEL), wt[:, PANEL:2 * PANEL])
    np.testing.assert_array_equal(p[10 * PANEL:].reshape(5, 150 - 2 * PANEL), wt[:, 2 * PANEL:])


@pytest.mark.parametrize("nin,nout", [(64, 64), (16, 256), (48, 200), (7, 36), (130, 13)])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 7])
def test_linear_is_the_matrix_product_for_every_batch_and_width(nin, nout, B):
    """Rows 4, 2 and 1 at a time, full panels, the narrower last panel and its scalar columns,
    rows at strides wider than their length, inside arrays with other data around them."""
    rng = np.random.default_rng(nin * nout + B)
    wt = rng.standard_normal((nin, nout)).astype(np.float32)
    bias = rng.standard_normal(nout).astype(np.float32)
    woff = 32
    packed = panel_order(wt)
    boff = woff + packed.size + 5
    W = rng.standard_normal(boff + nout + PANEL).astype(np.float32)  # as the packer: PANEL after
    W[woff:woff + packed.size] = packed
    W[boff:boff + nout] = bias
    xs, os_ = nin + 3, nout + 11
    X = rng.standard_normal(4 + B * xs).astype(np.float32)
    O = np.full(2 + B * os_, 9.0, np.float32)
    linear(W, woff, boff, nin, nout, X, 4, xs, O, 2, os_, B)
    x = np.stack([X[4 + b * xs:4 + b * xs + nin] for b in range(B)]).astype(np.float64)
    ref = x @ wt.astype(np.float64) + bias
    got = np.stack([O[2 + b * os_:2 + b * os_ + nout] for b in range(B)])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(nin))
    gaps = np.concatenate([O[:2]] + [O[2 + b * os_ + nout:2 + (b + 1) * os_] for b in range(B)])
    assert (gaps == 9).all()  # nothing written between the rows
