"""The eager reference engine: `model.step` in a loop, sampling with torch ops from the shared
noise stream. Simple and obviously correct; the fast engines are tested against it."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ssmgen.generate.base import CHUNK
from ssmgen.generate.sampling import Sampler
from ssmgen.model import ModelState, SaShiMi


class TorchEngine:
    name = "torch"

    def __init__(self, model: SaShiMi, batch_size: int, device=None) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else model.head.weight.device

    @torch.no_grad()
    def generate(self, state: ModelState, first_token: np.ndarray, n: int, sampler: Sampler,
                 progress: Callable[[int], None] | None = None,
                 logits_out: np.ndarray | None = None) -> tuple[np.ndarray, ModelState]:
        """n tokens (B, n) uint8 and the final state. `logits_out` (n, B, 256), if given, receives
        every step's logits (for tests)."""
        B = len(first_token)
        state = ModelState(state.t, {k: v.to(self.device) for k, v in state.tensors.items()})
        token = torch.as_tensor(np.asarray(first_token, np.int64), device=self.device)
        out = np.empty((B, n), np.uint8)
        done = 0
        while done < n:
            m = min(CHUNK, n - done)
            g = torch.from_numpy(sampler.noise(m)).to(self.device)
            for i in range(m):
                logits, state = self.model.step(token, state)
                if logits_out is not None:
                    logits_out[done + i] = logits.float().cpu().numpy()
                token = sampler.select(logits, g[i])
                out[:, done + i] = token.cpu().numpy()
            done += m
            if progress is not None:
                progress(done)
        return out, state
