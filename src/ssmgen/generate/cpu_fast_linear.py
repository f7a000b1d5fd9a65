"""The cpu-fast engine's matrix products: a linear map packed in column panels (`panel_order`),
applied to one, two or four batch rows at a time so that every weight load serves them all, with
16-lane register accumulators (`ssmgen.simd`). Kept beside a plain reference in the tests
(tests/test_simd.py)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ssmgen.simd import vadd, vfma, vlane, vload, vsplat, vstore

#: numba options of every cpu-fast kernel
JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")
ALIGN = 16  # floats (64 bytes): the packer's block alignment, and the scratch rows' padding
PANEL = 64  # output columns per panel of a packed linear map (4 vectors of 16 floats)


@njit(**JIT)
def linear(W, woff, boff, nin, nout, X, xoff, xstride, O, ooff, ostride, B):
    """O[b, o] = bias[o] + sum_i X[b, i] W[i, o] for the B rows of X (row b at xoff + b xstride)
    and O (at ooff + b ostride); W is a (nin, nout) map packed in column panels at woff
    (`panel_order`), the bias at boff. Rows go 4, then 2, then 1 at a time through a register-
    blocked product: each 16-float weight vector is loaded once per group of rows, and the 64
    outputs of a panel stay in registers across the loop over the inputs, summed in two halves
    (added at the end) by every kernel alike."""
    b = 0
    while b + 4 <= B:
        _linear4(W, woff, boff, nin, nout, X, xoff + b * xstride, xstride, O,
                 ooff + b * ostride, ostride)
        b += 4
    if b + 2 <= B:
        _linear2(W, woff, boff, nin, nout, X, xoff + b * xstride, xstride, O,
                 ooff + b * ostride, ostride)
        b += 2
    if b < B:
        _linear1(W, woff, boff, nin, nout, X, xoff + b * xstride, O, ooff + b * ostride)


@njit(**JIT)
def _store_panel(O, o, n, a0, a1, a2, a3):
    """O[o:o + n] = the first n of the panel's 64 outputs (the last panel of a map may hold fewer
    than 64 columns: its other lanes are never written)."""
    if n >= PANEL:
        vstore(O, o, a0)
        vstore(O, o + 16, a1)
        vstore(O, o + 32, a2)
        vstore(O, o + 48, a3)
        return
    for k in range(min(n, 16)):
        O[o + k] = vlane(a0, k)
    for k in range(16, min(n, 32)):
        O[o + k] = vlane(a1, k - 16)
    for k in range(32, min(n, 48)):
        O[o + k] = vlane(a2, k - 32)
    for k in range(48, n):
        O[o + k] = vlane(a3, k - 48)


@njit(**JIT)
def _linear1(W, woff, boff, nin, nout, X, xoff, O, ooff):
    """One row: each panel's inputs in two halves, each half with its own 4 accumulators (8
    independent chains of fused multiply-adds: a batch of one hides their latency), added at the
    end. Every kernel sums the halves so: a row's bits do not depend on the rows beside it."""
    x = X[xoff:xoff + nin]
    h = nin // 2
    zero = vsplat(0.0)
    for ob in range(0, nout, PANEL):
        pw = min(PANEL, nout - ob)  # the panel's width: its rows' stride
        p = woff + ob * nin
        q = p + h * pw
        a0, a1 = vload(W, boff + ob), vload(W, boff + ob + 16)
        a2, a3 = vload(W, boff + ob + 32), vload(W, boff + ob + 48)
        b0, b1, b2, b3 = zero, zero, zero, zero
        for i in range(h):
            xi = vsplat(x[i])
            a0 = vfma(xi, vload(W, p), a0)
            a1 = vfma(xi, vload(W, p + 16), a1)
            a2 = vfma(xi, vload(W, p + 32), a2)
            a3 = vfma(xi, vload(W, p + 48), a3)
            xi = vsplat(x[h + i])
            b0 = vfma(xi, vload(W, q), b0)
            b1 = vfma(xi, vload(W, q + 16), b1)
            b2 = vfma(xi, vload(W, q + 32), b2)
            b3 = vfma(xi, vload(W, q + 48), b3)
            p += pw
            q += pw
        if nin % 2:  # the last input ends the second half
            xi = vsplat(x[nin - 1])
            b0 = vfma(xi, vload(W, q), b0)
            b1 = vfma(xi, vload(W, q + 16), b1)
            b2 = vfma(xi, vload(W, q + 32), b2)
            b3 = vfma(xi, vload(W, q + 48), b3)
        _store_panel(O, ooff + ob, nout - ob, vadd(a0, b0), vadd(a1, b1), vadd(a2, b2),
                     vadd(a3, b3))


@njit(**JIT)
def _linear2(W, woff, boff, nin, nout, X, xoff, xstride, O, ooff, ostride):
    """Two rows (8 accumulators), each panel's halves one after the other (`_rows2`), added at the
    end as in `_linear1`."""
    x = X[xoff:xoff + nin]
    y = X[xoff + xstride:xoff + xstride + nin]
    h = nin // 2
    zero = vsplat(0.0)
    for ob in range(0, nout, PANEL):
        pw = min(PANEL, nout - ob)
        p = woff + ob * nin
        f = _rows2(W, p, pw, 0, h, x, y, vload(W, boff + ob), vload(W, boff + ob + 16),
                   vload(W, boff + ob + 32), vload(W, boff + ob + 48))
        g = _rows2(W, p, pw, h, nin, x, y, zero, zero, zero, zero)
        n = nout - ob
        o = ooff + ob
        _store_panel(O, o, n, vadd(f[0], g[0]), vadd(f[1], g[1]), vadd(f[2], g[2]),
                     vadd(f[3], g[3]))
        _store_panel(O, o + ostride, n, vadd(f[4], g[4]), vadd(f[5], g[5]), vadd(f[6], g[6]),
                     vadd(f[7], g[7]))


@njit(**JIT)
def _rows2(W, p, pw, i0, i1, x, y, a0, a1, a2, a3):
    """`_rows4` for two rows."""
    b0, b1, b2, b3 = a0, a1, a2, a3
    p += i0 * pw
    for i in range(i0, i1):
        w0, w1 = vload(W, p), vload(W, p + 16)
        w2, w3 = vload(W, p + 32), vload(W, p + 48)
        xi = vsplat(x[i])
        a0, a1 = vfma(xi, w0, a0), vfma(xi, w1, a1)
        a2, a3 = vfma(xi, w2, a2), vfma(xi, w3, a3)
        xi = vsplat(y[i])
        b0, b1 = vfma(xi, w0, b0), vfma(xi, w1, b1)
        b2, b3 = vfma(xi, w2, b2), vfma(xi, w3, b3)
        p += pw
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(**JIT)
def _rows4(W, p, pw, i0, i1, x, y, z, u, a0, a1, a2, a3):
    """Four rows times inputs i0 .. i1 - 1 of a panel (its rows at p, stride pw), each row's 4
    accumulators starting from a0 .. a3: the 16 of them, row by row."""
    b0, b1, b2, b3 = a0, a1, a2, a3
    c0, c1, c2, c3 = a0, a1, a2, a3
    d0, d1, d2, d3 = a0, a1, a2, a3
    p += i0 * pw
    for i in range(i0, i1):
        w0, w1 = vload(W, p), vload(W, p + 16)
        w2, w3 = vload(W, p + 32), vload(W, p + 48)
        xi = vsplat(x[i])
        a0, a1 = vfma(xi, w0, a0), vfma(xi, w1, a1)
        a2, a3 = vfma(xi, w2, a2), vfma(xi, w3, a3)
        xi = vsplat(y[i])
        b0, b1 = vfma(xi, w0, b0), vfma(xi, w1, b1)
        b2, b3 = vfma(xi, w2, b2), vfma(xi, w3, b3)
        xi = vsplat(z[i])
        c0, c1 = vfma(xi, w0, c0), vfma(xi, w1, c1)
        c2, c3 = vfma(xi, w2, c2), vfma(xi, w3, c3)
        xi = vsplat(u[i])
        d0, d1 = vfma(xi, w0, d0), vfma(xi, w1, d1)
        d2, d3 = vfma(xi, w2, d2), vfma(xi, w3, d3)
        p += pw
    return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3


@njit(**JIT)
def _linear4(W, woff, boff, nin, nout, X, xoff, xstride, O, ooff, ostride):
    """Four rows (16 accumulators), each panel's halves one after the other, added at the end as
    in `_linear1`."""
    x = X[xoff:xoff + nin]
    y = X[xoff + xstride:xoff + xstride + nin]
    z = X[xoff + 2 * xstride:xoff + 2 * xstride + nin]
    u = X[xoff + 3 * xstride:xoff + 3 * xstride + nin]
    h = nin // 2
    zero = vsplat(0.0)
    for ob in range(0, nout, PANEL):
        pw = min(PANEL, nout - ob)
        p = woff + ob * nin
        f = _rows4(W, p, pw, 0, h, x, y, z, u, vload(W, boff + ob), vload(W, boff + ob + 16),
                   vload(W, boff + ob + 32), vload(W, boff + ob + 48))
        g = _rows4(W, p, pw, h, nin, x, y, z, u, zero, zero, zero, zero)
        n = nout - ob
        o = ooff + ob
        _store_panel(O, o, n, vadd(f[0], g[0]), vadd(f[1], g[1]), vadd(f[2], g[2]),
                     vadd(f[3], g[3]))
        _store_panel(O, o + ostride, n, vadd(f[4], g[4]), vadd(f[5], g[5]), vadd(f[6], g[6]),
                     vadd(f[7], g[7]))
        _store_panel(O, o + 2 * ostride, n, vadd(f[8], g[8]), vadd(f[9], g[9]),
                     vadd(f[10], g[10]), vadd(f[11], g[11]))
        _store_panel(O, o + 3 * ostride, n, vadd(f[12], g[12]), vadd(f[13], g[13]),
                     vadd(f[14], g[14]), vadd(f[15], g[15]))


def panel_order(wt: np.ndarray) -> np.ndarray:
    """A (nin, nout) map in the order `linear` reads it: column panels of PANEL, each a row-major
    (nin, PANEL) block, one after the other, the last one only as wide as the columns left (so
    every weight of a panel is read in one forward stream, 4 vectors per input, and no padding
    is read: the lanes of a narrower panel's vectors past its width hold the next input's weights,
    and are never stored)."""
    nin, nout = wt.shape
    full = nout - nout % PANEL
    panels = wt[:, :full].reshape(nin, -1, PANEL).transpose(1, 0, 2).ravel()
    return np.concatenate([panels, wt[:, full:].ravel()]).astype(np.float32)
