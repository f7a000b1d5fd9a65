"""The causal convolution the convolution backends (S4, S4D) share: one FFT product, zero-padded
so that nothing wraps around.

`causal_conv` has its own backward: the adjoint of a causal convolution is a correlation, two
more real FFT products with the spectra kept from the forward pass. Autograd's own backward of
`rfft` runs a full complex FFT of the padded length and zero-fills a buffer as large; on CPU those
were the largest single costs of an S4D training step (docs/benchmarks.md, "train").
`causal_conv_ref` is the plain version autograd differentiates; the tests compare the two,
gradients included.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_conv_ref(u: Tensor, k: Tensor) -> Tensor:
    """y[..., t] = sum_{s<=t} k[..., s] u[..., t-s] by FFT, zero-padded to 2L (no wrap-around)."""
    L = u.shape[-1]
    n = 2 * L
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor) -> Tensor:
        L = u.shape[-1]
        n = 2 * L
        uf, kf = torch.fft.rfft(u, n=n), torch.fft.rfft(k, n=n)
        ctx.save_for_backward(uf, kf)
        ctx.shapes = (u.shape, k.shape, u.dtype, k.dtype)
        return torch.fft.irfft(uf * kf, n=n)[..., :L]

    @staticmethod
    def backward(ctx, g: Tensor):
        # dL/du_j = sum_{t>=j} g_t k_{t-j} and dL/dk_s = sum_{t>=s} g_t u_{t-s}: correlations,
        # circular over 2L without wrap-around since k and u vanish past L
        uf, kf = ctx.saved_tensors
        u_shape, k_shape, u_dtype, k_dtype = ctx.shapes
        L = u_shape[-1]
        n = 2 * L
        gf = torch.fft.rfft(g, n=n)
        du = dk = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft((gf * kf.conj()).sum_to_size(*u_shape[:-1], gf.shape[-1]),
                                 n=n)[..., :L].to(u_dtype)
        if ctx.needs_input_grad[1]:
            dk = torch.fft.irfft((gf * uf.conj()).sum_to_size(*k_shape[:-1], gf.shape[-1]),
                                 n=n)[..., :L].to(k_dtype)
        return du, dk


def causal_conv(u: Tensor, k: Tensor) -> Tensor:
    """`causal_conv_ref`'s result, with a backward of real FFTs only (the module docstring).
    u (..., L), k broadcastable against it with the same last dimension."""
    if not (u.requires_grad or k.requires_grad) or not torch.is_grad_enabled():
        return causal_conv_ref(u, k)
    return _CausalConv.apply(u, k)
