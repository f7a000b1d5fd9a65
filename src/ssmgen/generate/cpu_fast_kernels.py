"""Numba kernels of the cpu-fast engine: the whole SaShiMi recurrent step over flat float32 arrays.

Every array is 1-D; `cpu_fast.py` packs the weights (`W`) and state (`S`) and passes int64 offset
tables. Activations are (B, CAP) row-major scratch buffers. The matrix products live in
`cpu_fast_linear`, the backend steps and the LO row layout in `cpu_fast_backends`; here are the
tiers, the classical prior's step, sampling and the loop over steps.

Two things come as data rather than being written here: the tier schedule (a table per step, made
by `SaShiMi.schedule_table`) and where each backend field lies (`cpu_fast_backends`' LO positions,
derived from `backends.base.FAST_LAYOUTS`, the table the backends' `fast_step()` follows).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ssmgen.generate.cpu_fast_backends import (
    F1B,
    F1W,
    F2B,
    F2W,
    N1B,
    N1G,
    N2B,
    N2G,
    OLB,
    OLW,
    backend_step,
)
from ssmgen.generate.cpu_fast_linear import JIT, linear
from ssmgen.prior import ORDER, RING, ZMAX
from ssmgen.tokens import N_TOKENS

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
