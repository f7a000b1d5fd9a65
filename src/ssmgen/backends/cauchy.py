"""Cauchy sums, the inner loop of S4's kernel: S[h, k, j] = sum_n c[h, j, n] / (a[h, k] - b[k, n]).

For S4 the nodes are a = (2/dt_h)(1 - zeta_k) and b = (1 + zeta_k) Lambda_n at T roots of unity
zeta_k, and the few rows c (J = 4 for rank 1) are the Woodbury vectors. `cauchy_ref` builds the
(H, T, N) matrix of reciprocals and contracts it: plain PyTorch, obviously right, differentiable,
and what runs on GPUs. On CPU it is memory-bound: each complex elementwise pass (the difference,
the reciprocal, then four or five in its backward) reads and writes H T N complex numbers (67 MB
for one layer of the ablated model at T = 4096), and those passes were half of a training step.
`cauchy_compiled` (numba, with its own backward) makes one pass that keeps the reciprocals in
registers; the tests compare the two, gradients included. `cauchy_transposed` sums the same
reciprocals over the nodes k instead (S4's state after a training chunk, taken without gradients).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:
    from numba import njit, prange
    HAS_NUMBA = True
except ImportError:  # numba is a core dependency, but keep the pure path importable without it
    HAS_NUMBA = False

#: Channel groups in backward: each writes its own partial sum of the gradient of b.
GROUPS = 8


def cauchy_ref(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """S (H, T, J) = sum_n c[h, j, n] / (a[h, k] - b[k, n]) for a (H, T), b (T, N), c (H, J, N)."""
    q = 1 / (a.unsqueeze(-1) - b)  # (H, T, N)
    return q @ c.transpose(1, 2)


def cauchy_transposed_ref(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """U (H, J, N) = sum_k w[h, k, j] / (a[h, k] - b[k, n]) for a (H, T), b (T, N), w (H, T, J):
    the same reciprocals as `cauchy_ref`, summed over the nodes k instead of n."""
    q = 1 / (a.unsqueeze(-1) - b)  # (H, T, N)
    return w.transpose(1, 2) @ q


if HAS_NUMBA:
    JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})

    @njit(**JIT)
    def _recip(ar, ai, br, bi, qr, qi):  # pragma: no cover - compiled
        """q = 1 / (a - b_n) for a scalar a and the rows br, bi (vectorized over n)."""
        for n in range(br.shape[0]):
            wr = ar - br[n]
            wi = ai - bi[n]
            inv = 1.0 / (wr * wr + wi * wi)
            qr[n] = wr * inv
            qi[n] = -wi * inv

    @njit(parallel=True, **JIT)
    def _forward(ar, ai, br, bi, cr, ci, sr, si):  # pragma: no cover - compiled
        H, T = ar.shape
        N, J = br.shape[1], cr.shape[1]
        for h in prange(H):
            qr = np.empty(N, dtype=ar.dtype)
            qi = np.empty(N, dtype=ar.dtype)
            for k in range(T):
                _recip(ar[h, k], ai[h, k], br[k], bi[k], qr, qi)
                for j in range(J):
                    accr = 0.0
                    acci = 0.0
                    for n in range(N):
                        accr += qr[n] * cr[h, j, n] - qi[n] * ci[h, j, n]
                        acci += qr[n] * ci[h, j, n] + qi[n] * cr[h, j, n]
                    sr[h, k, j] = accr
                    si[h, k, j] = acci

    @njit(parallel=True, **JIT)
    def _backward(ar, ai, br, bi, cr, ci, gr, gi, dar, dai, dbr, dbi, dcr, dci):  # pragma: no cover
        """Adjoint of `_forward` (PyTorch's convention: the gradient of a complex input is
        dL/dRe + i dL/dIm). With q = 1/(a - b): dq = sum_j g_j conj(c_j); dw = -dq conj(q)^2;
        da = sum_n dw, db = -sum_h dw (per channel group, summed by the caller),
        dc_j = sum_k conj(q) g_j."""
        H, T = ar.shape
        N, J = br.shape[1], cr.shape[1]
        groups = dbr.shape[0]
        per = (H + groups - 1) // groups
        for gidx in prange(groups):
            qr = np.empty(N, dtype=ar.dtype)
            qi = np.empty(N, dtype=ar.dtype)
            er = np.empty(N, dtype=ar.dtype)
            ei = np.empty(N, dtype=ar.dtype)
            for h in range(gidx * per, min(H, (gidx + 1) * per)):
                for k in range(T):
                    _recip(ar[h, k], ai[h, k], br[k], bi[k], qr, qi)
                    er[:] = 0.0
                    ei[:] = 0.0
                    for j in range(J):
                        g_r = gr[h, k, j]
                        g_i = gi[h, k, j]
                        for n in range(N):  # dq += g conj(c); dc += conj(q) g
                            er[n] += g_r * cr[h, j, n] + g_i * ci[h, j, n]
                            ei[n] += g_i * cr[h, j, n] - g_r * ci[h, j, n]
                            dcr[h, j, n] += qr[n] * g_r + qi[n] * g_i
                            dci[h, j, n] += qr[n] * g_i - qi[n] * g_r
                    sa_r = 0.0
                    sa_i = 0.0
                    for n in range(N):  # dw = -dq conj(q)^2, conj(q)^2 = (qr^2 - qi^2) - 2i qr qi
                        pr = qr[n] * qr[n] - qi[n] * qi[n]
                        pi = -2.0 * qr[n] * qi[n]
                        wr = -(er[n] * pr - ei[n] * pi)
                        wi = -(er[n] * pi + ei[n] * pr)
                        sa_r += wr
                        sa_i += wi
                        dbr[gidx, k, n] -= wr
                        dbi[gidx, k, n] -= wi
                    dar[h, k] = sa_r
                    dai[h, k] = sa_i

    @njit(parallel=True, **JIT)
    def _transposed(ar, ai, br, bi, wr, wi, ur, ui):  # pragma: no cover - compiled
        """U[h, j, n] = sum_k w[h, k, j] q[h, k, n], accumulated in float64 (T terms)."""
        H, T = ar.shape
        N, J = br.shape[1], wr.shape[2]
        for h in prange(H):
            qr = np.empty(N, dtype=ar.dtype)
            qi = np.empty(N, dtype=ar.dtype)
            accr = np.zeros((J, N), dtype=np.float64)
            acci = np.zeros((J, N), dtype=np.float64)
            for k in range(T):
                _recip(ar[h, k], ai[h, k], br[k], bi[k], qr, qi)
                for j in range(J):
                    g_r = wr[h, k, j]
                    g_i = wi[h, k, j]
                    for n in range(N):
                        accr[j, n] += qr[n] * g_r - qi[n] * g_i
                        acci[j, n] += qr[n] * g_i + qi[n] * g_r
            for j in range(J):
                for n in range(N):
                    ur[h, j, n] = accr[j, n]
                    ui[h, j, n] = acci[j, n]


def _split(z: Tensor) -> tuple[np.ndarray, np.ndarray]:
    z = z.detach()
    return z.real.contiguous().numpy(), z.imag.contiguous().numpy()


class _CompiledCauchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        H, T = a.shape
        J = c.shape[1]
        real = a.real.dtype
        sr, si = a.new_empty((H, T, J), dtype=real), a.new_empty((H, T, J), dtype=real)
        _forward(*_split(a), *_split(b), *_split(c), sr.numpy(), si.numpy())
        ctx.save_for_backward(a, b, c)
        return torch.complex(sr, si)

    @staticmethod
    def backward(ctx, g):
        a, b, c = ctx.saved_tensors
        H = a.shape[0]
        groups = min(GROUPS, H)
        real = a.real.dtype
        da = [a.new_empty(a.shape, dtype=real) for _ in range(2)]
        db = [a.new_zeros((groups,) + b.shape, dtype=real) for _ in range(2)]
        dc = [a.new_zeros(c.shape, dtype=real) for _ in range(2)]
        _backward(*_split(a), *_split(b), *_split(c), *_split(g.to(a.dtype)),
                  *(t.numpy() for t in da + db + dc))
        return (torch.complex(*da), torch.complex(db[0].sum(0), db[1].sum(0)),
                torch.complex(*dc))


def cauchy_compiled(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Same result as `cauchy_ref`, compiled (CPU tensors, complex64 or complex128)."""
    if not HAS_NUMBA:
        raise RuntimeError("the compiled Cauchy sums need numba (pip install numba)")
    if a.device.type != "cpu":
        raise RuntimeError("the compiled Cauchy sums run on CPU tensors only")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), c.dtype)
    return _CompiledCauchy.apply(a.to(dtype), b.to(dtype), c.to(dtype))


def cauchy(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The Cauchy sums of `cauchy_ref`: compiled on CPU, PyTorch elsewhere."""
    if HAS_NUMBA and a.device.type == "cpu":
        return cauchy_compiled(a, b, c)
    return cauchy_ref(a, b, c)


def cauchy_transposed(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """The sums of `cauchy_transposed_ref`: compiled on CPU where no gradient is asked for (it has
    no backward), PyTorch otherwise."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, w))
    if not HAS_NUMBA or a.device.type != "cpu" or wants_grad:
        return cauchy_transposed_ref(a, b, w)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), w.dtype)
    a, b, w = a.to(dtype), b.to(dtype), w.to(dtype)
    H, J, N = a.shape[0], w.shape[2], b.shape[1]
    real = a.real.dtype
    ur, ui = a.new_empty((H, J, N), dtype=real), a.new_empty((H, J, N), dtype=real)
    _transposed(*_split(a), *_split(b), *_split(w), ur.numpy(), ui.numpy())
    return torch.complex(ur, ui)
