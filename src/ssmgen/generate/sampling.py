"""Sampling shared by every generation engine: Gumbel-max over pre-drawn noise.

    token = argmax_{i in allowed} (logits_i / temperature + g_i),   g = -log(-log(U)),

which draws exactly from softmax(logits / temperature) restricted to the allowed set (top-k, top-p).
The noise is drawn up front, so every engine (eager torch, numba, CUDA graph) consumes the same
stream and, given the same logits, picks the same tokens.

Each batch row b has its own generator, seeded from ``SeedSequence(seed, spawn_key=(b,))`` (what
``SeedSequence(seed).spawn(B)[b]`` gives), so variation b is the same audio whatever the batch size.
``Sampler.seeds`` records the derived 64-bit seed of each row; ``Sampler(row_seeds=[s])`` replays
one variation on its own.
"""

from __future__ import annotations

import numpy as np
import torch

N_TOKENS = 256


def row_seed(seed: int, row: int) -> int:
    """The derived seed of batch row `row` (independent of the batch size)."""
    ss = np.random.SeedSequence(seed, spawn_key=(row,))
    return int(ss.generate_state(1, np.uint64)[0])


class Sampler:
    """Temperature / top-k / top-p sampling with a per-row noise stream (see module doc).

    temperature 0 means argmax (the noise is still drawn, so the stream stays aligned)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 1, row_seeds: list[int] | None = None) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.seed = seed
        self.seeds = (list(row_seeds) if row_seeds is not None
                      else [row_seed(seed, b) for b in range(batch_size)])
        self.batch_size = len(self.seeds)
        self._gens = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]

    @property
    def inv_temperature(self) -> float:
        """Multiplier of the logits (0 for argmax: the engines then ignore the noise)."""
        return 1.0 / self.temperature if self.temperature > 0 else 0.0

    def noise(self, n_steps: int) -> np.ndarray:
        """The next `n_steps` of Gumbel noise, (n_steps, B, 256) float32. Drawing in pieces gives
        the same stream as drawing at once (doubles are consumed in order)."""
        out = np.empty((n_steps, self.batch_size, N_TOKENS), np.float32)
        for b, gen in enumerate(self._gens):
            u = gen.random((n_steps, N_TOKENS))
            np.log(u, out=u)
            np.negative(u, out=u)
            np.log(u, out=u)
            np.negative(u, out=out[:, b])  # U == 0 gives -inf: never picked
        return out

    # --- the reference selection (torch ops), used by the torch engine ---------------------------
    def select(self, logits: torch.Tensor, g: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Tokens (B,) int64 from logits (B, 256) and this step's noise g (B, 256)."""
        return select_torch(logits, torch.as_tensor(g), self.inv_temperature, self.top_k,
                            self.top_p)


def allowed_mask_torch(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean mask (B, 256) of the tokens allowed by top-k then top-p, z = logits / temperature.

    top-k keeps every token >= the k-th largest value; top-p keeps the smallest set of largest
    probabilities whose sum reaches p (a token is kept when the mass strictly before it is < p)."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        keep &= z >= kth
    if top_p < 1.0:
        zz = z.masked_fill(~keep, float("-inf"))
        p = torch.softmax(zz, dim=-1)
        ps, idx = torch.sort(p, dim=-1, descending=True)
        before = torch.cumsum(ps, dim=-1) - ps
        keep_sorted = before < top_p
        keep &= torch.zeros_like(keep).scatter(-1, idx, keep_sorted)
    return keep


def select_torch(logits: torch.Tensor, g: torch.Tensor, inv_temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> torch.Tensor:
    """Gumbel-max selection; inv_temperature 0 means argmax of the (masked) logits."""
    logits = logits.float()
    if inv_temperature == 0.0:
        z = logits
        keep = allowed_mask_torch(z, top_k, 1.0)
        return z.masked_fill(~keep, float("-inf")).argmax(-1)
    z = logits * inv_temperature
    keep = allowed_mask_torch(z, top_k, top_p)
    return (z + g.to(z.dtype)).masked_fill(~keep, float("-inf")).argmax(-1)
