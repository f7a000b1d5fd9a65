"""The cuda-graph engine: one frame of the recurrent model (16 samples, the whole tier schedule)
captured once as a CUDA graph, sampling inside it, replayed frame after frame.

Eager stepping on a GPU is launch-bound: a few hundred tiny kernels per sample, each waiting on
the host. A CUDA graph replays the same kernels with one launch per frame, and because the Gumbel
noise is uploaded in advance (`CHUNK` steps at a time, device-to-device copies per frame) and the
sampled tokens stay on the device until a progress report, there is no host sync per sample.

Why one frame: `model.step`'s work depends on t only through t mod 16 (which tiers run), so the
16 steps from a frame boundary are the same kernels every time. Samples before the first boundary
and after the last full frame are stepped eagerly (exactly the torch engine's code).

Given the same noise it picks the same tokens as the torch engine (the same `model.step` and
`select_torch` ops, recorded instead of dispatched); `tests/test_engines.py` checks it where CUDA
is present. Not yet run on a GPU by this project (none was lent): `auto` does not pick it yet.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ssmgen.errors import UserError
from ssmgen.generate.base import CHUNK
from ssmgen.generate.sampling import RowSettings, Sampler, select_rows
from ssmgen.model import ModelState, SaShiMi
from ssmgen.tokens import N_TOKENS, SILENCE_TOKEN


class CudaGraphEngine:
    name = "cuda-graph"

    def __init__(self, model: SaShiMi, batch_size: int, device=None) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else model.head.weight.device
        if self.device.type != "cuda":
            raise UserError(f"engine 'cuda-graph' needs a CUDA device (got {self.device})")
        self.frame = model.frame
        self._captured: dict[tuple, tuple] = {}

    # --- eager steps (outside frames) ------------------------------------------------------------
    def _eager(self, state: ModelState, token: torch.Tensor, noise: torch.Tensor,
               rows: RowSettings):
        logits, state = self.model.step(token, state)
        return select_rows(logits, noise, rows), state

    # --- capture ----------------------------------------------------------------------------------
    def _graph(self, template: ModelState, key: tuple, rows: RowSettings):
        """(graph, static state dict, static token, static noise, static tokens out) for the
        per-row sampling settings `key` (`Sampler.key()`; `rows` on this device, built before
        capture so that nothing is copied from the host inside it), captured on first use."""
        if key in self._captured:
            return self._captured[key]
        B, F = self.batch_size, self.frame
        st = {k: v.clone() for k, v in template.tensors.items()}
        tok = torch.full((B,), SILENCE_TOKEN, dtype=torch.long, device=self.device)
        noise = torch.zeros(F, B, N_TOKENS, device=self.device)
        out = torch.zeros(B, F, dtype=torch.long, device=self.device)

        def frame() -> None:
            state, token = ModelState(0, dict(st)), tok
            for i in range(F):
                token, state = self._eager(state, token, noise[i], rows)
                out[:, i] = token
            for k, v in state.tensors.items():
                st[k].copy_(v)
            tok.copy_(token)

        # Warm up on a side stream (allocator, cuBLAS handles, every backend's step cache), as
        # torch.cuda.graphs requires; then record one frame.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                frame()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                frame()
        except RuntimeError as e:
            raise UserError(f"engine 'cuda-graph': capture failed ({e}); use --engine torch") \
                from None
        self._captured[key] = (graph, st, tok, noise, out)
        return self._captured[key]

    # --- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, state: ModelState, first_token: np.ndarray, n: int, sampler: Sampler,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, ModelState]:
        """n tokens (B, n) uint8 and the final state."""
        B, F = len(first_token), self.frame
        if B != self.batch_size:
            raise ValueError(f"engine built for batch {self.batch_size}, got {B} rows")
        key, rows = sampler.key(), sampler.rows(self.device)
        state = ModelState(state.t, {k: v.to(self.device) for k, v in state.tensors.items()})
        token = torch.as_tensor(np.asarray(first_token, np.int64), device=self.device)
        out = np.empty((B, n), np.uint8)
        synced = False  # do the graph's static buffers hold the current state?
        done = 0
        while done < n:
            m = min(CHUNK, n - done)
            g = torch.from_numpy(sampler.noise(m)).to(self.device, non_blocking=True)
            pieces, i = [], 0
            while i < m:
                if state.t % F == 0 and m - i >= F:  # a whole frame from a boundary: replay
                    if not synced:  # (re)load the graph's static buffers from the state
                        graph, st, tok, noise, frame_out = self._graph(state, key, rows)
                        for k, v in state.tensors.items():
                            st[k].copy_(v)
                        tok.copy_(token)
                        synced = True
                    noise.copy_(g[i:i + F])
                    graph.replay()
                    pieces.append(frame_out.clone())
                    state = ModelState(state.t + F, st)  # the static buffers hold the state
                    token = tok
                    i += F
                else:  # eager (model.step is functional): before a boundary, or a short tail
                    token, state = self._eager(state, token, g[i], rows)
                    pieces.append(token.unsqueeze(1))
                    synced = False
                    i += 1
            out[:, done:done + m] = torch.cat(pieces, 1).cpu().numpy()
            done += m
            if progress is not None:
                progress(done)
        tensors = {k: v.clone() for k, v in state.tensors.items()}
        return out, ModelState(state.t, tensors)
