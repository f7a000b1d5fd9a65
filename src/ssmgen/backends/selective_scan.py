"""Selective scans in pure PyTorch (Mamba's S6 recurrence), for CPU training and as references.

Per batch b, channel d and state n, with the input-dependent step delta_t > 0 and A_dn < 0:

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,      y_t = C_t . h_t  (+ D u_t) (* silu(z_t))

Layouts follow mamba-ssm's `selective_scan_fn`: u, delta, z (B, D, L); B, C (B, N, L); A (D, N);
D (D,); the state h (B, D, N). `delta` is the final step (softplus and bias already applied).

`selective_scan_chunked` (the default) is a two-level scan: L = K chunks x T positions.

1. Local scans from a zero state, sequential over the T positions of a chunk but vectorized over
   all K chunks at once (T Python steps on (B, D, K, N) tensors).
2. The chunk-start states, sequential over the K chunks on (B, D, N) tensors:
   s_{k+1} = exp(A * sum_chunk delta) s_k + hend_k.
3. The contribution of the start state inside each chunk, C_t . (exp(A * cum_t) s_k), where cum_t
   is the in-chunk cumulative delta: no dependency, computed in blocks of positions.

Every exponent is A times a sum of positive deltas, so it is <= 0: no overflow for any dt, and an
underflow only ever means "this decayed to 0", which is the right answer. There is no division
and no exp(-cum). Work is O(B D N L) like the plain loop, but ~T + K + T/8 Python steps instead of
L. `selective_scan_ref` is the one-step-at-a-time loop the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: exp(x) for x below this is flushed to exactly 0 (error < 1e-26 relative): keeps float32
#: subnormals, which are 10-100x slower on x86, out of the decays and everything they multiply.
EXP_FLOOR = -60.0


def decay_exp(x: Tensor) -> Tensor:
    """exp(x) for x <= 0, exactly 0 below EXP_FLOOR (no subnormal results, no NaN gradient)."""
    return torch.exp(x.clamp(min=EXP_FLOOR)).masked_fill(x < EXP_FLOOR, 0.0)


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + D.unsqueeze(-1) * u
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Tensor | None = None, z: Tensor | None = None,
                       h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The obvious loop, one sample at a time. Returns (y (B, D, L), h_last (B, D, N))."""
    b, d, L = u.shape
    h = h0 if h0 is not None else u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        h = dA * h + (delta[:, :, t] * u[:, :, t]).unsqueeze(-1) * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) if ys else u.new_zeros(b, d, 0)
    return _finish(y, u, D, z), h


def selective_scan_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Tensor | None = None, z: Tensor | None = None,
                              h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The loop of `selective_scan_ref`, tuned: inputs unbound once along L (indexing a slice per
    step makes autograd allocate a full-size gradient per step, O(L^2) in backward)."""
    b, d, L = u.shape
    h = h0 if h0 is not None else u.new_zeros(b, d, A.shape[1])
    dA = delta.permute(2, 0, 1).unsqueeze(-1)  # (L, B, D, 1)
    du = (delta * u).permute(2, 0, 1).unsqueeze(-1)  # (L, B, D, 1)
    Bs = B.permute(2, 0, 1).unsqueeze(-1)  # (L, B, N, 1)
    Cs = C.permute(2, 0, 1).unsqueeze(-1)
    ys = []
    for dl, x, bt, ct in zip(dA.unbind(0), du.unbind(0), Bs.unbind(0), Cs.unbind(0)):
        h = decay_exp(dl * A) * h + x * bt.transpose(-1, -2)
        ys.append((h @ ct).squeeze(-1))
    y = torch.stack(ys, -1) if ys else u.new_zeros(b, d, 0)
    return _finish(y, u, D, z), h


def default_chunk(L: int) -> int:
    """T ~ sqrt(2 L) (balances the 2 T in-chunk steps against the K = L / T chunk steps),
    rounded to a multiple of 8, within [8, 256]."""
    return int(min(256, max(8, 8 * round(math.sqrt(2 * max(L, 1)) / 8))))


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None,
                           h0: Tensor | None = None, chunk: int | None = None,
                           block: int = 8) -> tuple[Tensor, Tensor]:
    """Same result as `selective_scan_ref` (see the module docstring for the method)."""
    b, d, L = u.shape
    N = A.shape[1]
    if L == 0:
        h = h0 if h0 is not None else u.new_zeros(b, d, N)
        return u.new_zeros(b, d, 0), h
    T = min(chunk or default_chunk(L), L)
    K = -(-L // T)
    pad = K * T - L  # padded steps have delta = 0: the state passes through unchanged

    def loop_major(x: Tensor) -> Tensor:  # (B, X, L) -> (T, B, K, X)
        return F.pad(x, (0, pad)).unflatten(-1, (K, T)).permute(3, 0, 2, 1).contiguous()

    dl = loop_major(delta)  # (T, B, K, D)
    du = loop_major(delta * u)  # (T, B, K, D)
    Bt = loop_major(B)  # (T, B, K, N)
    Ct = loop_major(C)  # (T, B, K, N)
    A_ = A.unsqueeze(0)  # (1, D, N) against (B, K, D, N) below

    # 1. local scans from zero, all chunks at once; h: (B, K, D, N)
    h = None
    ys = []
    for j in range(T):
        dBu = du[j].unsqueeze(-1) * Bt[j].unsqueeze(-2)  # (B, K, D, N)
        h = dBu if h is None else decay_exp(dl[j].unsqueeze(-1) * A_) * h + dBu
        ys.append(torch.einsum("bkdn,bkn->bkd", h, Ct[j]))
    y = torch.stack(ys, 0)  # (T, B, K, D)
    hend = h  # (B, K, D, N)

    # 2. chunk-start states
    cum = dl.cumsum(0)  # (T, B, K, D): in-chunk cumulative delta
    decay = decay_exp(cum[-1].unsqueeze(-1) * A_)  # (B, K, D, N)
    s = h0 if h0 is not None else None
    starts = []
    for k in range(K):
        starts.append(s)
        s = hend[:, k] if s is None else decay[:, k] * s + hend[:, k]
    h_last = s
    if h0 is None:
        starts[0] = torch.zeros_like(hend[:, 0])
    S = torch.stack(starts, 1)  # (B, K, D, N)

    # 3. y_t += C_t . (exp(A cum_t) s_k), in blocks of positions
    corr = []
    for j0 in range(0, T, block):
        c = cum[j0:j0 + block].unsqueeze(-1) * A_  # (b, B, K, D, N)
        corr.append(torch.einsum("tbkdn,tbkn->tbkd", decay_exp(c) * S, Ct[j0:j0 + block]))
    y = y + torch.cat(corr, 0)
    y = y.permute(1, 3, 2, 0).reshape(b, d, K * T)[..., :L]
    return _finish(y, u, D, z), h_last
