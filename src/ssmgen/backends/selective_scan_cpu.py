"""A compiled CPU selective scan (numba) with its own backward pass, for training Mamba on CPU.

Same recurrence, layouts and result as `selective_scan.selective_scan_ref` (the slow loop the
tests compare it with, gradients included):

    h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t,     y_t = C_t . h_t  (+ D u_t) (* silu(z_t))

Why a compiled loop: the scan is O(B D N L) scalar work with a sequential dependency in t. The
pure-PyTorch scans either step in Python (dispatch-bound) or materialize (B, D, K, N) tensors per
step (memory-bound); a plain loop per (batch, channel) with the N-vector state in registers does
the same arithmetic once, and every (batch, channel) pair is independent, so they run in
parallel (numba `prange`).

Backward is the reverse-time adjoint recursion. It needs h_{t-1} at every t; rather than store all
B D L N states (hundreds of MB for a training batch), forward keeps the state at every chunk start
(each `CHUNK` steps) and backward recomputes one chunk's states at a time into a small buffer.
dB and dC are sums over channels: each parallel task owns a group of channels and writes its own
partial sums, added up afterwards (no two tasks ever write the same memory).

The decays use the same exponent floor as the PyTorch scans (exp(x) = 0 below EXP_FLOOR, with a
zero gradient), which keeps float32 subnormals out of the loop. They are exponentiated a chunk at a
time in one vectorized pass (`vecmath.exp_floored`: within 1 ulp in float32, libm in float64)
before the recurrence runs over them: libm's exp, a call per element, had been most of the time.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ssmgen.backends.selective_scan import EXP_FLOOR, _finish

try:
    from numba import njit, prange

    from ssmgen.vecmath import exp_floored
    HAS_NUMBA = True
except ImportError:  # numba is a core dependency, but keep the pure path importable without it
    HAS_NUMBA = False

#: Steps between the states kept for the backward pass (its recompute buffer is CHUNK x N).
CHUNK = 64
#: Channel groups per batch row in backward: each group writes its own dB/dC partial sums.
GROUPS = 4

if HAS_NUMBA:
    JIT = dict(cache=True, nogil=True, error_model="numpy")

    # Rows as slices (erow, brow, crow) rather than computed flat indices: numba cannot prove
    # those non-negative, and the wrap-around checks kept LLVM from vectorizing the N-loop.
    # fastmath lets the sum over N vectorize too; `zero` keeps it in the input dtype (a float64
    # literal had made float32 sums float64). Measured gains: docs/benchmarks.md.
    @njit(parallel=True, fastmath=True, **JIT)
    def _forward(u, delta, A, Bl, Cl, h0, y, hlast, hkeep, chunk):  # pragma: no cover - compiled
        """u, delta (B, D, L); A (D, N); Bl, Cl (B, L, N); h0 (B, D, N). Writes y (B, D, L),
        hlast (B, D, N) and hkeep (B, D, K, N), the state before each chunk's first step."""
        nb, nd, L = u.shape
        N = A.shape[1]
        for i in prange(nb * nd):
            b, d = i // nd, i % nd
            h = h0[b, d].copy()
            zero = np.zeros(1, dtype=u.dtype)[0]
            ebuf = np.empty(chunk * N, dtype=u.dtype)
            ibuf = np.empty(chunk * N, dtype=np.int32)
            for k in range(hkeep.shape[2]):
                t0, t1 = k * chunk, min(L, (k + 1) * chunk)
                hkeep[b, d, k] = h
                _decays(delta, A, b, d, t0, t1, ebuf, ibuf)
                for t in range(t0, t1):
                    x = delta[b, d, t] * u[b, d, t]
                    acc = zero
                    j = t - t0
                    erow = ebuf[j * N:(j + 1) * N]
                    brow = Bl[b, t]
                    crow = Cl[b, t]
                    for n in range(N):
                        hn = erow[n] * h[n] + x * brow[n]
                        h[n] = hn
                        acc += hn * crow[n]
                    y[b, d, t] = acc
            hlast[b, d] = h

    @njit(**JIT)
    def _decays(delta, A, b, d, t0, t1, ebuf, ibuf):  # pragma: no cover - compiled
        """ebuf[(t - t0) N + n] = exp(delta[b, d, t] A[d, n]) (0 below EXP_FLOOR) for t0 <= t < t1,
        exponentiated in one vectorized pass (a libm call per element was most of the scan)."""
        N = A.shape[1]
        a = A[d]
        for t in range(t0, t1):
            dt = delta[b, d, t]
            j = t - t0
            row = ebuf[j * N:(j + 1) * N]
            for n in range(N):
                row[n] = dt * a[n]
        exp_floored(ebuf, (t1 - t0) * N, EXP_FLOOR, ibuf)

    @njit(parallel=True, fastmath=True, **JIT)  # rows as slices, as in _forward
    def _backward(u, delta, A, Bl, Cl, hkeep, dy, dhlast, chunk, groups,
                  du, ddelta, dA_part, dB_part, dC_part, dh0):  # pragma: no cover - compiled
        """The adjoint of `_forward`. g = dLoss/dh_t runs backwards in time:
        g <- g + dy_t C_t; the step's inputs get their gradients; g <- g * exp(delta_t A).
        dA_part (B, D, N) and dB_part, dC_part (groups, B, L, N) are summed by the caller."""
        nb, nd, L = u.shape
        N = A.shape[1]
        K = hkeep.shape[2]
        per = (nd + groups - 1) // groups
        for i in prange(nb * groups):
            b, gi = i // groups, i % groups
            hbuf = np.empty((chunk, N), dtype=u.dtype)
            eflat = np.empty(chunk * N, dtype=u.dtype)
            ebuf = eflat.reshape(chunk, N)
            ibuf = np.empty(chunk * N, dtype=np.int32)
            g = np.empty(N, dtype=u.dtype)
            zero = np.zeros(1, dtype=u.dtype)[0]
            for d in range(gi * per, min(nd, (gi + 1) * per)):
                g[:] = dhlast[b, d]
                arow = A[d]
                darow = dA_part[b, d]
                for k in range(K - 1, -1, -1):
                    t0 = k * chunk
                    t1 = min(L, t0 + chunk)
                    h = hkeep[b, d, k].copy()
                    _decays(delta, A, b, d, t0, t1, eflat, ibuf)  # recompute this chunk's decays
                    for t in range(t0, t1):  # and states
                        x = delta[b, d, t] * u[b, d, t]
                        erow = ebuf[t - t0]
                        brow = Bl[b, t]
                        hrow = hbuf[t - t0]
                        for n in range(N):
                            hn = erow[n] * h[n] + x * brow[n]
                            h[n] = hn
                            hrow[n] = hn
                    for t in range(t1 - 1, t0 - 1, -1):
                        j = t - t0
                        dyt = dy[b, d, t]
                        dt = delta[b, d, t]
                        ut = u[b, d, t]
                        erow, hrow = ebuf[j], hbuf[j]
                        hprev = hbuf[j - 1] if j > 0 else hkeep[b, d, k]
                        brow, crow = Bl[b, t], Cl[b, t]
                        dbrow, dcrow = dB_part[gi, b, t], dC_part[gi, b, t]
                        sd = zero
                        su = zero
                        for n in range(N):
                            gn = g[n] + dyt * crow[n]
                            dcrow[n] += dyt * hrow[n]
                            ge = gn * erow[n] * hprev[n]  # dLoss/d(delta_t A_n)
                            darow[n] += ge * dt
                            sd += ge * arow[n] + gn * ut * brow[n]
                            su += gn * dt * brow[n]
                            dbrow[n] += gn * dt * ut
                            g[n] = gn * erow[n]
                        ddelta[b, d, t] = sd
                        du[b, d, t] = su
                dh0[b, d] = g


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _CompiledScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk):
        nb, nd, L = u.shape
        N = A.shape[1]
        K = -(-L // chunk)
        Bl, Cl = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (B, L, N)
        h0_ = h0 if h0 is not None else u.new_zeros(nb, nd, N)
        y = u.new_empty(nb, nd, L)
        hlast = u.new_empty(nb, nd, N)
        hkeep = u.new_empty(nb, nd, K, N)
        _forward(_np(u), _np(delta), _np(A), _np(Bl), _np(Cl), _np(h0_), y.numpy(),
                 hlast.numpy(), hkeep.numpy(), chunk)
        ctx.save_for_backward(u, delta, A, Bl, Cl, hkeep)
        ctx.has_h0, ctx.chunk = h0 is not None, chunk
        return y, hlast

    @staticmethod
    def backward(ctx, dy, dhlast):
        u, delta, A, Bl, Cl, hkeep = ctx.saved_tensors
        nb, nd, L = u.shape
        N = A.shape[1]
        groups = min(GROUPS, nd)
        dy = torch.zeros_like(u) if dy is None else dy
        dhlast = u.new_zeros(nb, nd, N) if dhlast is None else dhlast
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA_part = u.new_zeros(nb, nd, N)
        dB_part = u.new_zeros(groups, nb, L, N)
        dC_part = u.new_zeros(groups, nb, L, N)
        dh0 = u.new_empty(nb, nd, N)
        _backward(_np(u), _np(delta), _np(A), _np(Bl), _np(Cl), _np(hkeep), _np(dy),
                  _np(dhlast), ctx.chunk, groups, du.numpy(), ddelta.numpy(), dA_part.numpy(),
                  dB_part.numpy(), dC_part.numpy(), dh0.numpy())
        dB = dB_part.sum(0).transpose(1, 2)
        dC = dC_part.sum(0).transpose(1, 2)
        return du, ddelta, dA_part.sum(0), dB, dC, (dh0 if ctx.has_h0 else None), None


def selective_scan_compiled(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Tensor | None = None, z: Tensor | None = None,
                            h0: Tensor | None = None, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """Same result as `selective_scan_ref`, compiled (CPU tensors, float32 or float64).
    `chunk`: steps between the states kept for backward. Returns (y (B, D, L), h_last (B, D, N))."""
    if not HAS_NUMBA:
        raise RuntimeError("the compiled selective scan needs numba (pip install numba)")
    if u.is_cuda:
        raise RuntimeError("the compiled selective scan runs on CPU tensors only")
    dtype = u.dtype
    args = [t.to(dtype) for t in (u, delta, A, B, C)]
    y, h = _CompiledScan.apply(*args, None if h0 is None else h0.to(dtype), chunk)
    return _finish(y, u, D, z), h
