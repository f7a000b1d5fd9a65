"""Sampling shared by every generation engine: Gumbel-max over pre-drawn noise.

    token = argmax_{i in allowed} (logits_i / temperature + g_i),   g = -log(-log(U)),

which draws exactly from softmax(logits / temperature) restricted to the allowed set (top-k, top-p).
The noise is drawn up front, so every engine (eager torch, numba, CUDA graph) consumes the same
stream and, given the same logits, picks the same tokens.

**Seeds.** Each batch row has its own seed and its own generator, ``Generator(PCG64(row_seed))``
(PCG64 seeds itself through ``SeedSequence(row_seed)``, so neighbouring integers give independent
streams). ``Sampler(seed=S, batch_size=B)`` gives rows the seeds S, S + 1, ..., S + B - 1: row b of
any batch is exactly what ``--seed S+b --num 1`` makes alone. ``Sampler(row_seeds=[...])`` names
each row's seed (a comparison grid gives variation j of every setting the seed S + j).

**Per-row settings.** temperature, top_k and top_p may be one value for every row or one per row
(a grid of settings generated in one batch); every engine applies them row by row, with the same
arithmetic whatever the other rows hold, so a row's audio never depends on its batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ssmgen.tokens import N_TOKENS


def row_seed(seed: int, row: int) -> int:
    """The seed of batch row `row` of `Sampler(seed=seed)`: seed + row (independent of the batch
    size; `--seed seed+row --num 1` makes the same audio alone)."""
    return int(seed) + int(row)


def _per_row(value, n: int, what: str, dtype) -> np.ndarray:
    a = np.asarray(value, dtype=dtype)
    if a.ndim == 0:
        return np.full(n, a, dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{what}: expected one value or {n} (one per row), got {a.shape}")
    return a.copy()


class Sampler:
    """Temperature / top-k / top-p sampling with a per-row noise stream (see module doc).

    temperature 0 means argmax (the noise is still drawn, so the stream stays aligned).
    `temperature`, `top_k`, `top_p`: one value, or a sequence with one value per row."""

    def __init__(self, temperature: float | Sequence[float] = 1.0,
                 top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
                 seed: int = 0, batch_size: int = 1, row_seeds: Sequence[int] | None = None
                 ) -> None:
        self.seed = seed
        self.seeds = ([int(s) for s in row_seeds] if row_seeds is not None
                      else [row_seed(seed, b) for b in range(batch_size)])
        B = self.batch_size = len(self.seeds)
        self.temperatures = _per_row(temperature, B, "temperature", np.float64)
        self.top_ks = _per_row(top_k, B, "top_k", np.int64)
        self.top_ps = _per_row(top_p, B, "top_p", np.float64)
        if (self.temperatures < 0).any() or not np.isfinite(self.temperatures).all():
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if not ((self.top_ps > 0) & (self.top_ps <= 1)).all():
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if (self.top_ks < 0).any():
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        #: Multipliers of the logits per row (0 for argmax: the engines then ignore the noise).
        self.inv_temperatures = np.where(self.temperatures > 0,
                                         1.0 / np.maximum(self.temperatures, 1e-300), 0.0)
        self._gens = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]
        self._rows: dict[str, RowSettings] = {}

    # --- one setting for every row (what callers that do not build grids read) ------------------
    def _uniform(self, a: np.ndarray, name: str):
        if len(a) and (a != a[0]).any():
            raise ValueError(f"{name} differs between rows: use the per-row arrays")
        return a[0].item() if len(a) else None

    @property
    def temperature(self) -> float:
        return self._uniform(self.temperatures, "temperature")

    @property
    def inv_temperature(self) -> float:
        return self._uniform(self.inv_temperatures, "temperature")

    @property
    def top_k(self) -> int:
        return self._uniform(self.top_ks, "top_k")

    @property
    def top_p(self) -> float:
        return self._uniform(self.top_ps, "top_p")

    def key(self) -> tuple:
        """The per-row settings as a hashable value (an engine caches what it builds for them)."""
        return (tuple(self.inv_temperatures.tolist()), tuple(self.top_ks.tolist()),
                tuple(self.top_ps.tolist()))

    def rows(self, device) -> RowSettings:
        """The per-row settings as tensors on `device` (built once per device)."""
        dev = str(torch.device(device))
        if dev not in self._rows:
            self._rows[dev] = RowSettings(self.inv_temperatures, self.top_ks, self.top_ps,
                                          device)
        return self._rows[dev]

    def noise(self, n_steps: int, rows: Sequence[int] | None = None) -> np.ndarray:
        """The next `n_steps` of Gumbel noise, (n_steps, B, 256) float32. Drawing in pieces gives
        the same stream as drawing at once (doubles are consumed in order). `rows`: only these
        rows' streams ((n_steps, len(rows), 256); each row has its own generator, so groups of
        rows may be drawn apart, in any order, in threads of their own)."""
        rows = range(self.batch_size) if rows is None else rows
        out = np.empty((n_steps, len(rows), N_TOKENS), np.float32)
        for b, r in enumerate(rows):
            u = self._gens[r].random((n_steps, N_TOKENS))
            np.log(u, out=u)
            np.negative(u, out=u)
            np.log(u, out=u)
            np.negative(u, out=out[:, b])  # U == 0 gives -inf: never picked
        return out

    # --- the reference selection (torch ops), used by the torch engine ---------------------------
    def select(self, logits: torch.Tensor, g: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Tokens (B,) int64 from logits (B, 256) and this step's noise g (B, 256)."""
        return select_rows(logits, torch.as_tensor(g), self.rows(logits.device))


class RowSettings:
    """Per-row sampling settings as tensors on one device, plus the python-level facts the
    selection branches on (computed once, so no host sync happens per step: a CUDA graph can
    capture `select_rows`)."""

    def __init__(self, inv_temperature, top_k, top_p, device=None) -> None:
        inv = np.asarray(inv_temperature, np.float64).reshape(-1)
        k = np.asarray(top_k, np.int64).reshape(-1)
        p = np.asarray(top_p, np.float64).reshape(-1)
        self.inv = torch.tensor(inv, dtype=torch.float32, device=device)[:, None]
        self.sampled = torch.tensor(inv > 0, device=device)[:, None]
        self.all_argmax = bool((inv == 0).all())
        self.any_argmax = bool((inv == 0).any())
        k_on = (k > 0) & (k < N_TOKENS)
        self.kmax = int(k[k_on].max()) if k_on.any() else 0
        self.k_index = torch.tensor(np.clip(k, 1, max(self.kmax, 1)) - 1, dtype=torch.int64,
                                    device=device)[:, None]
        self.k_on = torch.tensor(k_on, device=device)[:, None]
        p_on = (p < 1.0) & (inv > 0)  # argmax ignores top-p
        self.any_p = bool(p_on.any())
        self.p = torch.tensor(p, dtype=torch.float32, device=device)[:, None]
        self.p_off = torch.tensor(~p_on, device=device)[:, None]


def allowed_mask_rows(z: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Boolean mask (B, 256) of the tokens each row allows by top-k then top-p, z = logits /
    temperature (the logits themselves for an argmax row).

    top-k keeps every token >= the k-th largest value; top-p keeps the smallest set of largest
    probabilities whose sum reaches p (a token is kept when the mass strictly before it is < p)."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if rows.kmax:
        kth = torch.topk(z, rows.kmax, dim=-1).values.gather(-1, rows.k_index)
        keep &= (z >= kth) | ~rows.k_on
    if rows.any_p:
        zz = z.masked_fill(~keep, float("-inf"))
        p = torch.softmax(zz, dim=-1)
        ps, idx = torch.sort(p, dim=-1, descending=True, stable=True)
        before = torch.cumsum(ps, dim=-1) - ps
        keep_sorted = (before < rows.p) | rows.p_off
        keep &= torch.zeros_like(keep).scatter(-1, idx, keep_sorted)
    return keep


def select_rows(logits: torch.Tensor, g: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Gumbel-max selection with per-row settings; a row with inverse temperature 0 takes the
    argmax of its (top-k masked) logits and ignores its noise."""
    logits = logits.float()
    if rows.all_argmax:
        z = logits
    else:
        z = logits * rows.inv
        if rows.any_argmax:
            z = torch.where(rows.sampled, z, logits)
    keep = allowed_mask_rows(z, rows)
    if not rows.all_argmax:
        scored = z + g.to(z.dtype)
        z = torch.where(rows.sampled, scored, z) if rows.any_argmax else scored
    return z.masked_fill(~keep, float("-inf")).argmax(-1)


def allowed_mask_torch(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`allowed_mask_rows` with one top-k and top-p for every row."""
    B = z.shape[0]
    return allowed_mask_rows(z, RowSettings(np.ones(B), np.full(B, top_k), np.full(B, top_p),
                                            z.device))


def select_torch(logits: torch.Tensor, g: torch.Tensor, inv_temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> torch.Tensor:
    """`select_rows` with one setting for every row; inv_temperature 0 means argmax."""
    B = logits.shape[0]
    return select_rows(logits, g, RowSettings(np.full(B, inv_temperature), np.full(B, top_k),
                                              np.full(B, top_p), logits.device))
