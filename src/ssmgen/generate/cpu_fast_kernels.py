"""Numba kernels of the cpu-fast engine: the whole SaShiMi recurrent step over flat float32 arrays.

Every array is 1-D; `cpu_fast.py` packs the weights (`W`) and state (`S`) and passes int64 offset
tables. Activations are (B, CAP) row-major scratch buffers. Matrix-vector products are axpys over
rows of the transposed weight (contiguous inner loop over outputs, which LLVM vectorizes with
fastmath), looping the batch inside so each weight row is read once per step.

Two things come as data rather than being written here: the tier schedule (a table per step, made
by `SaShiMi.schedule_table`) and where each backend field lies (the LO row positions below are
derived from `backends.base.FAST_LAYOUTS`, the table the backends' `fast_step()` follows).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ssmgen.backends.base import FAST_LAYOUTS
from ssmgen.backends.selective_scan import EXP_FLOOR
from ssmgen.prior import ORDER, RING, ZMAX
from ssmgen.simd import LANES, vadd, vfma, vlane, vload, vmul, vsplat, vstore, vsub, vsum
from ssmgen.tokens import N_TOKENS
from ssmgen.vecmath import exp_floored, silu, softplus, vexp_floored

JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")

# Backend kinds: the position of each fast step form in FAST_LAYOUTS
KIND_IDS = {kind: i for i, kind in enumerate(FAST_LAYOUTS)}
S4D, S4, MAMBA = KIND_IDS["s4d"], KIND_IDS["s4"], KIND_IDS["mamba"]

# LO (per layer weight offsets) fields
N1G, N1B, OLW, OLB, N2G, N2B, F1W, F1B, F2W, F2B, BK = range(11)  # BK: first backend field
# GO (global weight offsets) fields; pool i uses 8 + 4 i .. 11 + 4 i
G_EMB, G_NG, G_NB, G_HW, G_HB, G_T0, G_PRIOR = range(7)
# CI (config ints) fields
C_T, C_NL, C_FFE, C_GLU, C_KIND, C_OUTPROJ, C_CAP, C_PRIOR = range(8)
# The prior's block in W (at GO[G_PRIOR]): its buffers one after the other (packer: cpu_fast.py)
P_COEF, P_MASK = 0, ORDER
P_TABLE = P_MASK + RING
P_EDGES = P_TABLE + N_TOKENS  # 257 bin edges: lo_0 .. lo_255, hi_255 (hi_k = lo_(k+1))
P_WIDTH = P_EDGES + N_TOKENS + 1  # hi_k - lo_k (from the float64 edges)
P_SET = P_WIDTH + N_TOKENS  # c, floor, eps, window
P_SIZE = P_SET + 4
# Schedule table columns (SaShiMi.schedule_table): the top tier, then each pool's slot
SCH_TOP, SCH_POS = 0, 1
ALIGN = 16  # floats (64 bytes): the packer's block alignment, and the scratch rows' padding
PANEL = 64  # output columns per panel of a packed linear map (4 vectors of 16 floats)


def lo_slots(kind: str) -> dict[str, int]:
    """Where a layer's LO row holds each field offset of `kind`'s fast step (from BK, in the
    layout's order), then each of its dimensions."""
    layout = FAST_LAYOUTS[kind]
    return {name: BK + k for k, name in enumerate(layout.names() + list(layout.dims))}


#: LO's row length: the common fields, then the longest backend layout's offsets and dimensions.
LO_WIDTH = max(BK + len(lay.fields) + len(lay.dims) for lay in FAST_LAYOUTS.values())

# The kernels' positions of each backend field in an LO row, all from the layout table.
_D, _S, _M = lo_slots("s4d"), lo_slots("s4"), lo_slots("mamba")
D_DA_RE, D_DA_IM, D_DB_RE, D_DB_IM = _D["dA_re"], _D["dA_im"], _D["dB_re"], _D["dB_im"]
D_C2_RE, D_C2_IM, D_D, D_N2 = _D["C2_re"], _D["C2_im"], _D["D"], _D["N2"]
S_E_RE, S_E_IM, S_G_RE, S_G_IM = _S["E_re"], _S["E_im"], _S["G_re"], _S["G_im"]
S_P_RE, S_P_IM, S_GP_RE, S_GP_IM = _S["P_re"], _S["P_im"], _S["GP_re"], _S["GP_im"]
S_B2_RE, S_B2_IM, S_C2_RE, S_C2_IM = _S["B2_re"], _S["B2_im"], _S["C2_re"], _S["C2_im"]
S_D, S_SINV, S_N2, S_R = _S["D"], _S["Sinv"], _S["N2"], _S["R"]
M_IN_W, M_IN_B, M_CONV_W, M_CONV_B = (_M["in_proj_w"], _M["in_proj_b"], _M["conv_w"],
                                      _M["conv_b"])
M_X_W, M_X_B, M_DT_W, M_DT_B = _M["x_proj_w"], _M["x_proj_b"], _M["dt_proj_w"], _M["dt_proj_b"]
M_A, M_D, M_OUT_W, M_OUT_B = _M["A"], _M["D"], _M["out_proj_w"], _M["out_proj_b"]
M_E, M_N, M_R, M_K = _M["E"], _M["N"], _M["R"], _M["K"]


def scratch_floats(kind: str, dims: dict[str, int], wmax: int) -> int:
    """Floats per batch row of the backend step's scratch buffers T1 and T2 (one row stride for
    both), for a layer of `kind` with layout dimensions `dims` in a model of widest tier `wmax`:
    s4_step keeps v (N) and the rank sums (2R) in T1; mamba_step lays out T1 as its docstring
    says and keeps the E x N decays and their int scratch in T2."""
    tmp = 16 * wmax
    if kind == "s4":
        tmp = max(tmp, 2 * dims["N2"] + 2 * dims["R"] + ALIGN)
    if kind == "mamba":
        E, N, R = dims["E"], dims["N"], dims["R"]
        tmp = max(tmp, 6 * E + R + 2 * N + ALIGN, 2 * E * N)
    return tmp


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


@njit(**JIT)
def layernorm(X, O, W, goff, bboff, n, B, cap):
    g = W[goff:goff + n]
    bb = W[bboff:bboff + n]
    for b in range(B):
        x = X[b * cap:b * cap + n]
        o = O[b * cap:b * cap + n]
        m = np.float32(0.0)
        for i in range(n):
            m += x[i]
        m /= n
        v = np.float32(0.0)
        for i in range(n):
            d = x[i] - m
            v += d * d
        v /= n
        inv = np.float32(1.0) / math.sqrt(v + np.float32(1e-5))
        for i in range(n):
            o[i] = (x[i] - m) * inv * g[i] + bb[i]


@njit(**JIT)
def gelu(X, n, B, cap):
    """Exact (erf) GELU, with erf as a float32 rational approximation on [-4, 4] (Eigen's; within
    2e-6 of torch's GELU) that vectorizes, unlike a call to libm's erf (3.5x slower here)."""
    for b in range(B):
        x = X[b * cap:b * cap + n]
        for i in range(n):
            v = x[i]
            z = v * np.float32(0.7071067811865476)
            z = min(max(z, np.float32(-4.0)), np.float32(4.0))
            z2 = z * z
            p = z2 * np.float32(-2.72614225801306e-10) + np.float32(2.77068142495902e-08)
            p = z2 * p + np.float32(-2.10102402082508e-06)
            p = z2 * p + np.float32(-5.69250639462346e-05)
            p = z2 * p + np.float32(-7.34990630326855e-04)
            p = z2 * p + np.float32(-2.95459980854025e-03)
            p = z2 * p + np.float32(-1.60960333262415e-02)
            q = z2 * np.float32(-1.45660718464996e-05) + np.float32(-2.13374055278905e-04)
            q = z2 * q + np.float32(-1.68282697438203e-03)
            q = z2 * q + np.float32(-7.37332916720468e-03)
            q = z2 * q + np.float32(-1.42647390514189e-02)
            x[i] = np.float32(0.5) * v * (np.float32(1.0) + z * p / q)


@njit(**JIT)
def s4d_step(W, lo, S, so, U, Y, w, B, cap):
    """Diagonal complex SSM ("s4d" layout): s = dA s + dB u, y = Re(2C s) + D u. Channel by
    channel, each row of the batch in turn while the channel's coefficients are in L1; the N2
    modes 16 at a time (`s4d_step_scalar` when N2 is not a multiple of 16)."""
    N2 = lo[D_N2]
    if N2 % LANES:
        s4d_step_scalar(W, lo, S, so, U, Y, w, B, cap)
        return
    M = w * N2
    zero = vsplat(0.0)
    dd = W[lo[D_D]:lo[D_D] + w]
    for h in range(w):
        c0 = h * N2
        for b in range(B):
            u = U[b * cap + h]
            uv = vsplat(u)
            sr0 = so[0] + b * M + c0
            si0 = so[1] + b * M + c0
            acc = zero
            for k in range(0, N2, LANES):
                r = vload(S, sr0 + k)
                i = vload(S, si0 + k)
                ar = vload(W, lo[D_DA_RE] + c0 + k)
                ai = vload(W, lo[D_DA_IM] + c0 + k)
                nr = vsub(vfma(ar, r, vmul(vload(W, lo[D_DB_RE] + c0 + k), uv)), vmul(ai, i))
                ni = vfma(ai, r, vfma(ar, i, vmul(vload(W, lo[D_DB_IM] + c0 + k), uv)))
                vstore(S, sr0 + k, nr)
                vstore(S, si0 + k, ni)
                acc = vadd(acc, vsub(vmul(vload(W, lo[D_C2_RE] + c0 + k), nr),
                                     vmul(vload(W, lo[D_C2_IM] + c0 + k), ni)))
            Y[b * cap + h] = vsum(acc) + dd[h] * u


@njit(**JIT)
def s4d_step_scalar(W, lo, S, so, U, Y, w, B, cap):
    """`s4d_step` for any N2, one mode at a time (LLVM vectorizes what it can)."""
    N2 = lo[D_N2]
    M = w * N2
    dar = W[lo[D_DA_RE]:lo[D_DA_RE] + M].reshape(w, N2)
    dai = W[lo[D_DA_IM]:lo[D_DA_IM] + M].reshape(w, N2)
    dbr = W[lo[D_DB_RE]:lo[D_DB_RE] + M].reshape(w, N2)
    dbi = W[lo[D_DB_IM]:lo[D_DB_IM] + M].reshape(w, N2)
    cr = W[lo[D_C2_RE]:lo[D_C2_RE] + M].reshape(w, N2)
    ci = W[lo[D_C2_IM]:lo[D_C2_IM] + M].reshape(w, N2)
    dd = W[lo[D_D]:lo[D_D] + w]
    for b in range(B):
        sr = S[so[0] + b * M:so[0] + (b + 1) * M].reshape(w, N2)
        si = S[so[1] + b * M:so[1] + (b + 1) * M].reshape(w, N2)
        u_ = U[b * cap:b * cap + w]
        y_ = Y[b * cap:b * cap + w]
        for h in range(w):
            u = u_[h]
            acc = np.float32(0.0)
            for n in range(N2):
                r = sr[h, n]
                i = si[h, n]
                nr = dar[h, n] * r - dai[h, n] * i + dbr[h, n] * u
                ni = dar[h, n] * i + dai[h, n] * r + dbi[h, n] * u
                sr[h, n] = nr
                si[h, n] = ni
                acc += cr[h, n] * nr - ci[h, n] * ni
            y_[h] = acc + dd[h] * u


@njit(**JIT)
def mamba_step(W, lo, S, so, U, Y, w, B, cap, T1, T2, tmp):
    """Mamba ("mamba" layout; mamba-ssm's step): xz = in_proj(u); conv state shift, depthwise
    conv, silu; x_proj -> (dt, B, C); dt = softplus(dt_proj(dt)); h = exp(dt A) h + dt B x;
    y = C.h + D x; y *= silu(z); out_proj(y). Row layout of T1: xz [0, 2E), x [2E, 3E),
    silu(z) [3E, 4E), y [4E, 5E), dt [5E, 6E), dbc [6E, 6E + R + 2N). T2's row is scratch: the
    SiLUs' and softplus' tails (first E of each half), and where N is not a multiple of 16, the
    E x N decays exp(dt A) of the step in one `vecmath.exp_floored` pass and its int scratch."""
    E, N, R, Kc = lo[M_E], lo[M_N], lo[M_R], lo[M_K]
    linear(W, lo[M_IN_W], lo[M_IN_B], w, 2 * E, U, 0, cap, T1, 0, tmp, B)
    convw = W[lo[M_CONV_W]:lo[M_CONV_W] + E * Kc].reshape(E, Kc)
    convb = W[lo[M_CONV_B]:lo[M_CONV_B] + E]
    Kp = Kc - 1  # the conv state holds the last d_conv - 1 pre-conv inputs
    for b in range(B):
        cs = S[so[0] + b * E * Kp:so[0] + (b + 1) * E * Kp].reshape(E, Kp)
        r = b * tmp
        xz = T1[r:r + 2 * E]
        xc = T1[r + 2 * E:r + 3 * E]
        if Kp == 3:  # d_conv 4, the usual: unrolled, so the loop over channels vectorizes
            for e in range(E):
                x0, x1, x2, x3 = cs[e, 0], cs[e, 1], cs[e, 2], xz[e]
                xc[e] = (convb[e] + x3 * convw[e, 3] + x0 * convw[e, 0] + x1 * convw[e, 1]
                         + x2 * convw[e, 2])
                cs[e, 0], cs[e, 1], cs[e, 2] = x1, x2, x3
        else:
            for e in range(E):
                acc = convb[e] + xz[e] * convw[e, Kp]
                for k in range(Kp):
                    acc += cs[e, k] * convw[e, k]
                for k in range(Kp - 1):
                    cs[e, k] = cs[e, k + 1]
                if Kp > 0:
                    cs[e, Kp - 1] = xz[e]
                xc[e] = acc
        silu(xc, E, T2[r:r + E], T2[r + E * N:r + E * N + E].view(np.int32))
    linear(W, lo[M_X_W], lo[M_X_B], E, R + 2 * N, T1, 2 * E, tmp, T1, 6 * E, tmp, B)
    linear(W, lo[M_DT_W], lo[M_DT_B], R, E, T1, 6 * E, tmp, T1, 5 * E, tmp, B)
    A = W[lo[M_A]:lo[M_A] + E * N].reshape(E, N)
    D = W[lo[M_D]:lo[M_D] + E]
    for b in range(B):
        h = S[so[1] + b * E * N:so[1] + (b + 1) * E * N].reshape(E, N)
        r = b * tmp
        xz = T1[r:r + 2 * E]
        xc = T1[r + 2 * E:r + 3 * E]
        y = T1[r + 4 * E:r + 5 * E]
        dt = T1[r + 5 * E:r + 6 * E]
        Bv = T1[r + 6 * E + R:r + 6 * E + R + N]
        Cv = T1[r + 6 * E + R + N:r + 6 * E + R + 2 * N]
        gate = T1[r + 3 * E:r + 4 * E]
        gate[:] = xz[E:]
        dA = T2[r:r + E * N]
        ibuf = T2[r + E * N:r + 2 * E * N].view(np.int32)
        silu(gate, E, dA, ibuf)
        softplus(dt, E, dA, ibuf)
        if N % LANES:
            for e in range(E):
                d = dt[e]
                row = dA[e * N:(e + 1) * N]
                for n in range(N):
                    row[n] = d * A[e, n]
            exp_floored(dA, E * N, EXP_FLOOR, ibuf)
            dA2 = dA.reshape(E, N)
            for e in range(E):
                dx = dt[e] * xc[e]
                acc = np.float32(0.0)
                for n in range(N):
                    hn = dA2[e, n] * h[e, n] + dx * Bv[n]
                    h[e, n] = hn
                    acc += hn * Cv[n]
                y[e] = (acc + D[e] * xc[e]) * gate[e]
            continue
        # N a multiple of 16 (16, the usual): the modes 16 at a time, each decay exponentiated in
        # registers where it is used (no pass over memory for the E x N of them)
        a0, h0, d0 = lo[M_A], so[1] + b * E * N, r + 6 * E + R
        for e in range(E):
            dv = vsplat(dt[e])
            dx = vsplat(dt[e] * xc[e])
            acc = vsplat(0.0)
            for k in range(0, N, LANES):
                i = e * N + k
                da = vexp_floored(vmul(dv, vload(W, a0 + i)), EXP_FLOOR)
                hn = vfma(da, vload(S, h0 + i), vmul(dx, vload(T1, d0 + k)))
                vstore(S, h0 + i, hn)
                acc = vfma(hn, vload(T1, d0 + N + k), acc)
            y[e] = (vsum(acc) + D[e] * xc[e]) * gate[e]
    linear(W, lo[M_OUT_W], lo[M_OUT_B], E, w, T1, 4 * E, tmp, Y, 0, cap, B)


@njit(**JIT)
def s4_rank1_row(Er, Ei, Gr, Gi, pr, pi, GPr, GPi, B2r, B2i, Cr, Ci, D, Sinv, xr_, xi_, vr, vi,
                 u_, y_, w, N2):
    for h in range(w):
        u = u_[h]
        xr = xr_[h]
        xi = xi_[h]
        a = np.float32(0.0)
        for n in range(N2):
            a += xr[n] * pr[n] + xi[n] * pi[n]
        a *= 2
        c = np.float32(0.0)
        for n in range(N2):
            wr = Er[h, n] * xr[n] - Ei[h, n] * xi[n] + B2r[n] * u - a * pr[n]
            wi = Er[h, n] * xi[n] + Ei[h, n] * xr[n] + B2i[n] * u - a * pi[n]
            v1 = Gr[h, n] * wr - Gi[h, n] * wi
            v2 = Gr[h, n] * wi + Gi[h, n] * wr
            vr[n] = v1
            vi[n] = v2
            c += v1 * pr[n] + v2 * pi[n]
        bb = Sinv[h, 0, 0] * 2 * c
        acc = np.float32(0.0)
        for n in range(N2):
            nr = vr[n] - bb * GPr[h, 0, n]
            ni = vi[n] - bb * GPi[h, 0, n]
            xr[n] = nr
            xi[n] = ni
            acc += Cr[h, n] * nr - Ci[h, n] * ni
        y_[h] = acc + D[h] * u


@njit(**JIT)
def s4_rank1_vec(W, lo, S, so, U, Y, w, B, cap, T1, tmp):
    """`s4_step` at rank 1 with N2 a multiple of 16: the modes 16 at a time, channel by channel,
    each row of the batch in turn while the channel's coefficients are in L1; v between the
    passes in T1 (its row: v_re [0, N2), v_im [N2, 2 N2))."""
    N2 = lo[S_N2]
    M = w * N2
    zero = vsplat(0.0)
    D = W[lo[S_D]:lo[S_D] + w]
    Sinv = W[lo[S_SINV]:lo[S_SINV] + w]
    pr0, pi0 = lo[S_P_RE], lo[S_P_IM]
    b2r0, b2i0 = lo[S_B2_RE], lo[S_B2_IM]
    for h in range(w):
        c0 = h * N2
        er0, ei0 = lo[S_E_RE] + c0, lo[S_E_IM] + c0
        gr0, gi0 = lo[S_G_RE] + c0, lo[S_G_IM] + c0
        gpr0, gpi0 = lo[S_GP_RE] + c0, lo[S_GP_IM] + c0
        cr0, ci0 = lo[S_C2_RE] + c0, lo[S_C2_IM] + c0
        for b in range(B):
            u = U[b * cap + h]
            uv = vsplat(u)
            xr0 = so[0] + b * M + c0
            xi0 = so[1] + b * M + c0
            v0 = b * tmp
            acc = zero
            for k in range(0, N2, LANES):
                acc = vfma(vload(S, xr0 + k), vload(W, pr0 + k),
                           vfma(vload(S, xi0 + k), vload(W, pi0 + k), acc))
            av = vsplat(2 * vsum(acc))
            acc = zero
            for k in range(0, N2, LANES):
                xr = vload(S, xr0 + k)
                xi = vload(S, xi0 + k)
                er = vload(W, er0 + k)
                ei = vload(W, ei0 + k)
                wr = vsub(vsub(vfma(er, xr, vmul(vload(W, b2r0 + k), uv)), vmul(ei, xi)),
                          vmul(av, vload(W, pr0 + k)))
                wi = vsub(vfma(er, xi, vfma(ei, xr, vmul(vload(W, b2i0 + k), uv))),
                          vmul(av, vload(W, pi0 + k)))
                gr = vload(W, gr0 + k)
                gi = vload(W, gi0 + k)
                v1 = vsub(vmul(gr, wr), vmul(gi, wi))
                v2 = vfma(gr, wi, vmul(gi, wr))
                vstore(T1, v0 + k, v1)
                vstore(T1, v0 + N2 + k, v2)
                acc = vfma(v1, vload(W, pr0 + k), vfma(v2, vload(W, pi0 + k), acc))
            bb = vsplat(Sinv[h] * 2 * vsum(acc))
            acc = zero
            for k in range(0, N2, LANES):
                nr = vsub(vload(T1, v0 + k), vmul(bb, vload(W, gpr0 + k)))
                ni = vsub(vload(T1, v0 + N2 + k), vmul(bb, vload(W, gpi0 + k)))
                vstore(S, xr0 + k, nr)
                vstore(S, xi0 + k, ni)
                acc = vsub(vfma(vload(W, cr0 + k), nr, acc), vmul(vload(W, ci0 + k), ni))
            Y[b * cap + h] = vsum(acc) + D[h] * u


@njit(**JIT)
def s4_step(W, lo, S, so, U, Y, w, B, cap, T1, tmp):
    """S4 DPLR ("s4" layout), the O(N) Woodbury step of backends/s4.py (`S4.advance`), per
    channel: a = 2 Re(P^* x); w = E x - P a + 2 B u; v = G w; c = 2 Re(P^* v); x' = v - GP Sinv c;
    y = Re(2C x') + D u. P (R, N/2) and B are shared by the channels."""
    N2, R = lo[S_N2], lo[S_R]
    if R == 1 and N2 % LANES == 0:
        s4_rank1_vec(W, lo, S, so, U, Y, w, B, cap, T1, tmp)
        return
    M = w * N2
    Er = W[lo[S_E_RE]:lo[S_E_RE] + M].reshape(w, N2)
    Ei = W[lo[S_E_IM]:lo[S_E_IM] + M].reshape(w, N2)
    Gr = W[lo[S_G_RE]:lo[S_G_RE] + M].reshape(w, N2)
    Gi = W[lo[S_G_IM]:lo[S_G_IM] + M].reshape(w, N2)
    Pr = W[lo[S_P_RE]:lo[S_P_RE] + R * N2].reshape(R, N2)
    Pi = W[lo[S_P_IM]:lo[S_P_IM] + R * N2].reshape(R, N2)
    GPr = W[lo[S_GP_RE]:lo[S_GP_RE] + M * R].reshape(w, R, N2)
    GPi = W[lo[S_GP_IM]:lo[S_GP_IM] + M * R].reshape(w, R, N2)
    B2r = W[lo[S_B2_RE]:lo[S_B2_RE] + N2]
    B2i = W[lo[S_B2_IM]:lo[S_B2_IM] + N2]
    Cr = W[lo[S_C2_RE]:lo[S_C2_RE] + M].reshape(w, N2)
    Ci = W[lo[S_C2_IM]:lo[S_C2_IM] + M].reshape(w, N2)
    D = W[lo[S_D]:lo[S_D] + w]
    Sinv = W[lo[S_SINV]:lo[S_SINV] + w * R * R].reshape(w, R, R)
    for b in range(B):
        xr_ = S[so[0] + b * M:so[0] + (b + 1) * M].reshape(w, N2)
        xi_ = S[so[1] + b * M:so[1] + (b + 1) * M].reshape(w, N2)
        vr = T1[b * tmp:b * tmp + N2]
        vi = T1[b * tmp + N2:b * tmp + 2 * N2]
        ac = T1[b * tmp + 2 * N2:b * tmp + 2 * N2 + R]
        bc = T1[b * tmp + 2 * N2 + R:b * tmp + 2 * N2 + 2 * R]
        u_ = U[b * cap:b * cap + w]
        y_ = Y[b * cap:b * cap + w]
        if R == 1:  # the usual rank: loops without the inner rank loop vectorize
            s4_rank1_row(Er, Ei, Gr, Gi, Pr[0], Pi[0], GPr, GPi, B2r, B2i, Cr, Ci, D, Sinv,
                         xr_, xi_, vr, vi, u_, y_, w, N2)
            continue
        for h in range(w):
            u = u_[h]
            xr = xr_[h]
            xi = xi_[h]
            for r in range(R):
                acc = np.float32(0.0)
                for n in range(N2):
                    acc += xr[n] * Pr[r, n] + xi[n] * Pi[r, n]
                ac[r] = 2 * acc
            for n in range(N2):
                wr = Er[h, n] * xr[n] - Ei[h, n] * xi[n] + B2r[n] * u
                wi = Er[h, n] * xi[n] + Ei[h, n] * xr[n] + B2i[n] * u
                for r in range(R):
                    wr -= ac[r] * Pr[r, n]
                    wi -= ac[r] * Pi[r, n]
                vr[n] = Gr[h, n] * wr - Gi[h, n] * wi
                vi[n] = Gr[h, n] * wi + Gi[h, n] * wr
            for r in range(R):
                acc = np.float32(0.0)
                for n in range(N2):
                    acc += vr[n] * Pr[r, n] + vi[n] * Pi[r, n]
                ac[r] = 2 * acc
            for r in range(R):
                acc = np.float32(0.0)
                for q in range(R):
                    acc += Sinv[h, r, q] * ac[q]
                bc[r] = acc
            acc = np.float32(0.0)
            for n in range(N2):
                nr = vr[n]
                ni = vi[n]
                for r in range(R):
                    nr -= bc[r] * GPr[h, r, n]
                    ni -= bc[r] * GPi[h, r, n]
                xr[n] = nr
                xi[n] = ni
                acc += Cr[h, n] * nr - Ci[h, n] * ni
            y_[h] = acc + D[h] * u


@njit(**JIT)
def backend_step(kind, W, lo, S, so, U, Y, w, B, cap, T1, T2):
    """One step of a layer of `kind`; `lo` is its whole LO row (fields and dimensions)."""
    if kind == S4D:
        s4d_step(W, lo, S, so, U, Y, w, B, cap)
    elif kind == S4:
        s4_step(W, lo, S, so, U, Y, w, B, cap, T1, T1.shape[0] // B)
    elif kind == MAMBA:
        mamba_step(W, lo, S, so, U, Y, w, B, cap, T1, T2, T1.shape[0] // B)


@njit(**JIT)
def add_rows(Y, X, w, B, cap, accumulate):
    """Y[b, :w] (+)= X[b, :w] over (B, cap) buffers, through row slices: flat computed indices
    carry wrap-around checks that keep LLVM from vectorizing."""
    for b in range(B):
        y = Y[b * cap:b * cap + w]
        x = X[b * cap:b * cap + w]
        if accumulate:
            for i in range(w):
                y[i] += x[i]
        else:
            for i in range(w):
                y[i] = x[i]


@njit(**JIT)
def run_tier(l, W, LO, S, SO, ci, X, Y, Hn, U, O, HID, T1, T2, w, B):
    """Y = tier_l(X) (both (B, cap) buffers)."""
    cap = ci[C_CAP]
    nl, ffe, glu = ci[C_NL], ci[C_FFE], ci[C_GLU]
    add_rows(Y, X, w, B, cap, False)
    for j in range(nl):
        lo = LO[l, j]
        layernorm(Y, Hn, W, lo[N1G], lo[N1B], w, B, cap)
        backend_step(ci[C_KIND], W, lo, S, SO[l, j], Hn, U, w, B, cap, T1, T2)
        if ci[C_OUTPROJ]:
            add_rows(Y, U, w, B, cap, True)
        else:
            gelu(U, w, B, cap)
            linear(W, lo[OLW], lo[OLB], w, w * (1 + glu), U, 0, cap, O, 0, cap, B)
            if glu:
                for b in range(B):
                    r = b * cap
                    for i in range(w):
                        Y[r + i] += O[r + i] / (1.0 + math.exp(-O[r + w + i]))
            else:
                add_rows(Y, O, w, B, cap, True)
        layernorm(Y, Hn, W, lo[N2G], lo[N2B], w, B, cap)
        linear(W, lo[F1W], lo[F1B], w, ffe * w, Hn, 0, cap, HID, 0, ffe * cap, B)
        gelu(HID, ffe * w, B, ffe * cap)
        linear(W, lo[F2W], lo[F2B], ffe * w, w, HID, 0, ffe * cap, O, 0, cap, B)
        add_rows(Y, O, w, B, cap, True)
    add_rows(Y, X, w, B, cap, True)


@njit(**JIT)
def select_token(L, g, inv_temp, top_k, top_p, z, srt):
    """Gumbel-max over the allowed set (same rules as sampling.select_torch). L, g: (256,)."""
    n = L.shape[0]
    if inv_temp == 0.0:
        for i in range(n):
            z[i] = L[i]
    else:
        for i in range(n):
            z[i] = L[i] * np.float32(inv_temp)
    if 0 < top_k < n:
        srt[:] = np.sort(z)
        kth = srt[n - top_k]
        for i in range(n):
            if z[i] < kth:
                z[i] = -np.inf
    if top_p < 1.0 and inv_temp != 0.0:
        m = -np.inf
        for i in range(n):
            m = max(m, z[i])
        tot = np.float32(0.0)
        for i in range(n):
            srt[i] = math.exp(z[i] - m)
            tot += srt[i]
        for i in range(n):
            srt[i] = srt[i] / tot
        order = np.argsort(-srt, kind="mergesort")
        c = np.float32(0.0)
        for r in range(n):
            i = order[r]
            if c >= top_p:
                z[i] = -np.inf
            c += srt[i]
    best = 0
    bv = -np.inf
    for i in range(n):
        v = z[i] if inv_temp == 0.0 else z[i] + g[i]
        if v > bv:
            bv = v
            best = i
    return best


@njit(**JIT)
def prior_step(W, po, S, SG, npool, b, token, lg, cdf, tail):
    """Feed `token` to row b's classical prior (prior.py) and add its log-probabilities of the
    next token to lg. State at SG[2 npool + 1 ..]: the last ORDER samples, the last RING absolute
    residuals, the samples seen. One exp per bin edge: sigmoid(z) and sigmoid(-z) both come
    from exp(-|z|)."""
    h = S[SG[2 * npool + 1] + b * ORDER:SG[2 * npool + 1] + (b + 1) * ORDER]
    r = S[SG[2 * npool + 2] + b * RING:SG[2 * npool + 2] + (b + 1) * RING]
    so = SG[2 * npool + 3] + b
    x = W[po + P_TABLE + token]
    pred = 0.0  # float64 sums, rounded, as prior._dot (the torch step's and read's rounding)
    for k in range(ORDER):
        pred += np.float64(W[po + P_COEF + k]) * h[k]
    e = abs(x - np.float32(pred))
    for k in range(ORDER - 1):
        h[k] = h[k + 1]
    h[ORDER - 1] = x
    for k in range(RING - 1):
        r[k] = r[k + 1]
    r[RING - 1] = e
    seen = min(S[so] + np.float32(1.0), np.float32(RING))
    S[so] = seen
    acc = 0.0
    for k in range(ORDER):
        acc += np.float64(W[po + P_COEF + k]) * h[k]
    pred = np.float32(acc)
    acc = 0.0
    for k in range(RING):
        acc += np.float64(W[po + P_MASK + k]) * r[k]
    total = np.float32(acc)
    c, floor, eps, window = W[po + P_SET], W[po + P_SET + 1], W[po + P_SET + 2], W[po + P_SET + 3]
    m = total / max(min(seen, window), np.float32(1.0))
    s = max(c * m, floor)
    for j in range(N_TOKENS + 1):
        z = (W[po + P_EDGES + j] - pred) / s
        q = math.exp(-min(abs(z), np.float32(ZMAX)))
        near = np.float32(1.0) / (np.float32(1.0) + q)  # sigmoid(|z|)
        far = q * near  # sigmoid(-|z|)
        cdf[j] = near if z >= 0 else far  # sigmoid(z)
        tail[j] = far if z >= 0 else near  # sigmoid(-z)
    keep, spread = np.float32(1.0) - eps, eps / np.float32(N_TOKENS)
    for k in range(N_TOKENS):  # prior.log_prob's product form
        d = min(W[po + P_WIDTH + k] / s, np.float32(80.0))
        p = cdf[k + 1] * tail[k] * -math.expm1(-d)
        lg[k] += math.log(keep * p + spread)


@njit(**JIT)
def run_steps(W, GO, LO, S, SG, SO, ci, widths, pool, tok, sched, n, noise, inv_temp, top_k, top_p,
              out, out_col, want_logits, logits_out, Xs, Y, Z, Hn, U, O, HID, T1, T2, Lg, zs, srt):
    """n steps of the model: feed tok (B,), sample, feed the sample. Step s runs on row s of the
    schedule table `sched` (`SaShiMi.schedule_table`: the top tier, each pool's slot).
    Writes tokens to out[b, out_col + s] and (if want_logits) logits to logits_out[s, b].
    Sampling settings are per row: inv_temp (B,) float64, top_k (B,) int64, top_p (B,) float64."""
    B = tok.shape[0]
    cap = ci[C_CAP]
    T = ci[C_T]
    npool = T - 1
    w0 = widths[0]
    cdf = np.empty(N_TOKENS + 1, np.float32)
    tail = np.empty(N_TOKENS + 1, np.float32)
    for s in range(n):
        top = sched[s, SCH_TOP]
        # ---- down path: embedding, pooled inputs of the tiers that run now ----
        for b in range(B):
            e = GO[G_EMB] + tok[b] * w0
            xs = Xs[b * cap:b * cap + w0]
            emb = W[e:e + w0]
            for c in range(w0):
                xs[c] = emb[c]
        for i in range(min(top + 1, npool)):  # the pools written now
            p = pool[i]
            wi = widths[i]
            wn = widths[i + 1]
            pos = sched[s, SCH_POS + i]
            buf = SG[2 * i]
            xo = i * B * cap
            for b in range(B):
                slot = S[buf + (b * p + pos) * wi:buf + (b * p + pos + 1) * wi]
                xs = Xs[xo + b * cap:xo + b * cap + wi]
                for c in range(wi):
                    slot[c] = xs[c]
            if i == 0:  # the first pool's linear map of a token is a table row: accumulate it
                acc = SG[2 * npool]
                for b in range(B):
                    tr = GO[G_T0] + (pos * N_TOKENS + tok[b]) * wn
                    row = W[tr:tr + wn]
                    a = S[acc + b * wn:acc + (b + 1) * wn]
                    for c in range(wn):
                        a[c] += row[c]
            if i == top:  # not full yet
                break
            xn = (i + 1) * B * cap
            if i == 0:
                acc = SG[2 * npool]
                bo = GO[9]
                for b in range(B):
                    for c in range(wn):
                        Xs[xn + b * cap + c] = S[acc + b * wn + c] + W[bo + c]
                        S[acc + b * wn + c] = 0.0
            else:
                linear(W, GO[8 + 4 * i], GO[9 + 4 * i], p * wi, wn, S, buf, p * wi,
                       Xs, xn, cap, B)
            for b in range(B):
                for c in range(p * wi):
                    S[buf + b * p * wi + c] = 0.0
        # ---- centre, then up path ----
        if top == npool:
            run_tier(npool, W, LO, S, SO, ci, Xs[npool * B * cap:], Y, Hn, U, O, HID, T1, T2,
                     widths[npool], B)
        for i in range(min(top + 1, npool) - 1, -1, -1):  # the finer tiers that run now
            p = pool[i]
            wi = widths[i]
            pos = sched[s, SCH_POS + i]
            ub = SG[2 * i + 1]
            xo = i * B * cap
            for b in range(B):
                z = Z[b * cap:b * cap + wi]
                piece = S[ub + (b * p + pos) * wi:ub + (b * p + pos + 1) * wi]
                xs = Xs[xo + b * cap:xo + b * cap + wi]
                for c in range(wi):
                    z[c] = piece[c] + xs[c]
            if i < top:  # the coarser tier ran: refresh this pool's pieces
                linear(W, GO[10 + 4 * i], GO[11 + 4 * i], widths[i + 1], p * wi, Y, 0, cap,
                       S, ub, p * wi, B)
            run_tier(i, W, LO, S, SO, ci, Z, Y, Hn, U, O, HID, T1, T2, wi, B)
        # ---- head and sampling ----
        layernorm(Y, Hn, W, GO[G_NG], GO[G_NB], w0, B, cap)
        linear(W, GO[G_HW], GO[G_HB], w0, N_TOKENS, Hn, 0, cap, Lg, 0, N_TOKENS, B)
        for b in range(B):
            lg = Lg[b * N_TOKENS:(b + 1) * N_TOKENS]
            if ci[C_PRIOR]:
                prior_step(W, GO[G_PRIOR], S, SG, npool, b, tok[b], lg, cdf, tail)
            if want_logits:
                logits_out[s, b, :] = lg
            k = select_token(lg, noise[s, b], inv_temp[b], top_k[b], top_p[b], zs, srt)
            tok[b] = k
            out[b, out_col + s] = k
