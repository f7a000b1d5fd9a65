"""Powers of per-channel N x N matrices (H, N, N), as S4's parallel machinery needs them: repeated
squaring, Krylov columns [M^k V] and Horner sums by doubling (log-depth products, no stepping),
in float64 where the device has it. Powers of a contraction decay towards subnormal numbers,
which make CPU matmuls ~100x slower, so every product is flushed (`flush`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def hi_dtype(device) -> torch.dtype:
    """The dtype of the dense N x N work: float64 (float32 on MPS, which has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def flush(M: Tensor) -> Tensor:
    """Zero entries below sqrt(smallest normal): powers of a contraction decay towards subnormal
    numbers, which make CPU matmuls ~100x slower (seconds for 64 x 64 blocks); the products of
    the kept entries stay normal. The dropped entries are < 1e-150 (float64), far below rounding."""
    return torch.where(M.abs() < math.sqrt(torch.finfo(M.dtype).tiny), 0.0, M)


def powers(M: Tensor, n: int) -> list[Tensor]:
    """[M, M^2, M^4, ...] up to the highest power of two <= n."""
    sq = [M]
    while 2 ** len(sq) <= n:
        sq.append(flush(sq[-1] @ sq[-1]))
    return sq


def matpow(sq: list[Tensor], n: int) -> Tensor:
    out = None
    for k, Mk in enumerate(sq):
        if n >> k & 1:
            out = Mk if out is None else flush(out @ Mk)
    if out is None:
        out = torch.eye(sq[0].shape[-1], dtype=sq[0].dtype, device=sq[0].device).expand_as(sq[0])
    return out


def krylov(M: Tensor, V: Tensor, n: int) -> Tensor:
    """[M^k V for k < n] as (H, d, n, c) for M (H, d, d), V (H, d, c): doubling, log n matmuls
    with the powers side by side in the columns (no broadcast copies of M)."""
    c = V.shape[-1]
    out, Mk = flush(V), M
    while out.shape[-1] < n * c:
        out = torch.cat([out, flush(Mk @ out)], -1)
        Mk = flush(Mk @ Mk)
    return out[..., : n * c].unflatten(-1, (n, c))


def horner(M: Tensor, S: Tensor) -> Tensor:
    """sum_b M^(n-1-b) S[:, :, b] for S (H, d, n, c): a pairwise tree, log n matmuls."""
    n = S.shape[2]
    m = 1 << max(0, (n - 1).bit_length())
    S = torch.cat([S.new_zeros(S.shape[:2] + (m - n,) + S.shape[3:]), S], 2)  # zeros first: no-op
    Mk = M
    while S.shape[2] > 1:
        S = (Mk @ S[:, :, 0::2].flatten(2)).unflatten(-1, (-1, S.shape[3])) + S[:, :, 1::2]
        S, Mk = flush(S), flush(Mk @ Mk)
    return S[:, :, 0]
