"""The cpu-fast engine's backend steps (S4D, S4 rank 1, Mamba) and the LO row that says where a
layer's weights lie: the common fields, then the backend's fields in the order of
`backends.base.FAST_LAYOUTS` (the table each backend's `fast_step()` follows)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ssmgen.backends.base import FAST_LAYOUTS
from ssmgen.backends.selective_scan import EXP_FLOOR
from ssmgen.generate.cpu_fast_linear import ALIGN, JIT, linear
from ssmgen.simd import LANES, vadd, vfma, vload, vmul, vsplat, vstore, vsub, vsum
from ssmgen.vecmath import exp_floored, silu, softplus, vexp_floored

# Backend kinds: the position of each fast step form in FAST_LAYOUTS
KIND_IDS = {kind: i for i, kind in enumerate(FAST_LAYOUTS)}
S4D, S4, MAMBA = KIND_IDS["s4d"], KIND_IDS["s4"], KIND_IDS["mamba"]

# LO (per layer weight offsets) fields
N1G, N1B, OLW, OLB, N2G, N2B, F1W, F1B, F2W, F2B, BK = range(11)  # BK: first backend field


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
