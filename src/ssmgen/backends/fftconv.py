"""The causal convolution the convolution backends (S4, S4D) share: one FFT product, zero-padded
so that nothing wraps around."""

from __future__ import annotations

import torch
from torch import Tensor


def causal_conv(u: Tensor, k: Tensor) -> Tensor:
    """y[..., t] = sum_{s<=t} k[..., s] u[..., t-s] by FFT, zero-padded to 2L (no wrap-around)."""
    L = u.shape[-1]
    n = 2 * L
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
