"""SaShiMi (Goel et al. 2022, "It's Raw! Audio Generation with State-Space Models"), with a plug-in
sequence backend.

Tiers run at rates L, L/4, L/16 (pool [4, 4]) with 64, 128, 256 channels (expand 2). The down path
only pools (DownPool: 4 steps reshaped into channels, then a linear map); all residual pairs
(sequence block + feed-forward block) sit in the centre tier and in each up tier. UpPool is a linear
map, a shift right by one coarse step (which keeps the model causal), and a reshape back. Each
DownPool input is added to the matching UpPool output, and each tier's stack has a residual around
it.

Three modes, as for a backend:
- ``model(tokens) -> logits``: parallel (training, evaluation);
- ``model.initial_state(batch)``, ``model.step(token, state) -> (logits, state)``: one sample;
- ``model.forward_with_state(tokens, state) -> (logits, state)``: parallel over a chunk from a
  state, returning the state after it (every layer's state and every pool's buffer), computed in
  parallel. This is how a prompt is read.

Within a frame of 16 samples the schedule is fixed: the tier at rate L/P runs on the step t with
(t + 1) % P == 0, which is why the fast engines work in blocks of 16. That arithmetic is written
once, in `tier_schedule` (`SaShiMi.schedule`); the eager step, the ONNX graphs, the parallel read's
pool bookkeeping and the cpu-fast kernel all take the schedule from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmgen import backends
from ssmgen.config import ModelConfig
from ssmgen.ordinal import TokenEmbedding, TokenHead
from ssmgen.prior import STATE as PRIOR_STATE
from ssmgen.prior import LinearPredictionPrior


@dataclass
class ModelState:
    """The recurrent state of a whole model: `t` samples consumed so far, and named tensors
    (every backend layer's state, every pool's buffer) in a fixed order."""

    t: int
    tensors: dict[str, Tensor]

    def names(self) -> list[str]:
        return list(self.tensors)


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------

class SequenceBlock(nn.Module):
    """Pre-LayerNorm residual: x + Linear(GELU(backend(LN(x)))). The backend includes its D skip.
    A backend with its own output projection (Mamba) gets no GELU + linear after it."""

    def __init__(self, d: int, cfg: ModelConfig, seq_len: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        options = cfg.options()
        if seq_len is not None and backends.get(cfg.backend).takes_length:
            options["l_max"] = seq_len
        self.layer = backends.create(cfg.backend, d, **options)
        self.glu = cfg.glu
        if self.layer.has_output_projection:
            self.output_linear = None
        else:
            self.output_linear = nn.Linear(d, 2 * d if cfg.glu else d)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def _post(self, y: Tensor) -> Tensor:
        if self.output_linear is not None:
            # contiguous: a convolution backend returns a transposed view, and GELU's backward
            # on a strided input with a contiguous gradient takes a slow scalar path on CPU
            y = self.output_linear(F.gelu(y.contiguous()))
            if self.glu:
                y = F.glu(y, dim=-1)
        return self.dropout(y)

    def forward(self, x: Tensor) -> Tensor:
        return x + self._post(self.layer(self.norm(x)))

    def forward_with_state(self, x: Tensor, state, carried: bool = False):
        """`carried`: as training with carried states reads it (`read_carried`: the state after
        x comes without gradients)."""
        read = self.layer.read_carried if carried else self.layer.forward_with_state
        y, state = read(self.norm(x), state)
        return x + self._post(y), state

    def step(self, x: Tensor, state):
        y, state = self.layer.step(self.norm(x), state)
        return x + self._post(y), state

    def final_state(self, x: Tensor, state):
        """The layer's state after x, without the block's output."""
        return self.layer.final_state(self.norm(x), state)


class FFBlock(nn.Module):
    """Pre-LayerNorm residual feed-forward: x + Linear(GELU(Linear(LN(x))))."""

    def __init__(self, d: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.ff_expand * d)
        self.fc2 = nn.Linear(cfg.ff_expand * d, d)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x))))))


class Tier(nn.Module):
    """n_layers residual pairs (sequence block, FF block) with a residual around the whole stack."""

    def __init__(self, d: int, cfg: ModelConfig, seq_len: int | None = None) -> None:
        super().__init__()
        self.seq = nn.ModuleList(SequenceBlock(d, cfg, seq_len) for _ in range(cfg.n_layers))
        self.ff = nn.ModuleList(FFBlock(d, cfg) for _ in range(cfg.n_layers))

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for seq, ff in zip(self.seq, self.ff):
            y = ff(seq(y))
        return y + x

    def forward_with_state(self, x: Tensor, states: list, output: bool = True,
                           carried: bool = False) -> tuple[Tensor | None, list]:
        """`output=False` (the finest tier when no logits are wanted): the last sequence layer
        yields only its state, and its block's output and the last FF block are skipped.
        `carried`: as training with carried states reads it (`SequenceBlock`)."""
        y, new = x, []
        for j, (seq, ff, s) in enumerate(zip(self.seq, self.ff, states)):
            if not output and j == len(self.seq) - 1:
                return None, new + [seq.final_state(y, s)]
            y, s = seq.forward_with_state(y, s, carried)
            y = ff(y)
            new.append(s)
        return y + x, new

    def step(self, x: Tensor, states: list) -> tuple[Tensor, list]:
        y, new = x, []
        for seq, ff, s in zip(self.seq, self.ff, states):
            y, s = seq.step(y, s)
            y = ff(y)
            new.append(s)
        return y + x, new


class DownPool(nn.Module):
    """(B, L, H) -> (B, L // pool, H * expand): `pool` consecutive steps into channels, linear.

    Recurrently the pool's buffer (B, pool, H) collects one tier input per step in slot `pos`
    (`put`) and is pooled when full (`pool_buffer`). Both are written without index assignment or
    reshapes by the batch size (a constant slot mask and `torch.where`, a flatten), so a traced
    `SaShiMi.step` stays a lean ONNX graph with a dynamic batch."""

    def __init__(self, d: int, pool: int, expand: int) -> None:
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(d * pool, d * expand)
        # slots[p]: (1, pool, 1) mask of slot p (not a weight: no state_dict entry)
        self.register_buffer("slots", torch.eye(pool, dtype=torch.bool).reshape(pool, 1, pool, 1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1] // self.pool
        return self.linear(x[:, : n * self.pool].reshape(x.shape[0], n, self.pool * x.shape[2]))

    def put(self, buf: Tensor, x: Tensor, pos: int | Tensor) -> Tensor:
        """`buf` (B, pool, H) with slot `pos` (a python int, or a 0-d int64 tensor in the ONNX
        single-step graph) replaced by x (B, H)."""
        at = self.slots[pos] if isinstance(pos, int) else self.slots.index_select(
            0, pos.reshape(1))[0]
        return torch.where(at, x.unsqueeze(1), buf)

    def pool_buffer(self, buf: Tensor) -> Tensor:
        """The next tier's input (B, H * expand) from a full buffer (B, pool, H)."""
        return self.linear(buf.flatten(1))


class UpPool(nn.Module):
    """(B, n, H * expand) -> pieces for the finer tier: linear to H * pool per coarse step. The
    shift by one coarse step happens where the pieces are used (`upsample`)."""

    def __init__(self, d: int, pool: int, expand: int) -> None:
        super().__init__()
        self.pool, self.d = pool, d
        self.linear = nn.Linear(d * expand, d * pool)

    def upsample(self, x: Tensor, prev: Tensor, length: int) -> Tensor:
        """Fine-rate sequence of `length` steps: step j gets piece j % pool of coarse frame
        j // pool - 1; frame -1 is `prev` (B, pool, H), the pieces carried in the state."""
        B = x.shape[0]
        frames = torch.cat([prev.reshape(B, 1, -1), self.linear(x)], dim=1)
        return frames.reshape(B, -1, self.d)[:, :length]

    def pieces(self, y: Tensor) -> Tensor:
        """The pieces (B, pool, H) of one coarse output y (B, H * expand), for the recurrent
        buffer. The shape is given by constants (-1 for the batch), never by y's batch size, so a
        traced graph has no shape arithmetic."""
        return self.linear(y).reshape(-1, self.pool, self.d)

    @staticmethod
    def piece(buf: Tensor, pos: int | Tensor) -> Tensor:
        """Piece `pos` (B, H) of a buffer (B, pool, H); `pos` a python int or a 0-d tensor."""
        if isinstance(pos, int):
            return buf[:, pos]
        return buf.index_select(1, pos.reshape(1)).squeeze(1)


# ------------------------------------------------------------------------------------------------
# The tier schedule
# ------------------------------------------------------------------------------------------------

def tier_schedule(pool: Sequence[int], t):
    """What the recurrent step does at step `t` (samples consumed before it), for pooling factors
    `pool`: `(top, pos)`.

    - ``pos[i] = (t // (pool[0] * ... * pool[i-1])) % pool[i]``: the slot of DownPool i that
      this step's input of tier i fills, which is also the number of tier-i inputs the buffer
      already holds (so the parallel read leaves ``pos[i]`` of them at phase t), and the piece
      of UpPool i that tier i reads at this step.
    - ``top``: the coarsest tier that runs: tier i runs iff ``i <= top``, i.e. iff
      ``(t + 1) % (pool[0] * ... * pool[i-1]) == 0``. DownPool i is written iff ``i <= top`` and
      pooled (full, then emptied) iff ``i < top``; UpPool i is read iff ``i <= top`` and, after
      it was read, refreshed from tier i + 1's output iff ``i < top`` (the causal shift).

    The one place this arithmetic is written. `t` may be a python int (the eager step and the
    traced block graph, where the schedule is static), a numpy int64 array (a table per step for
    the cpu-fast kernel) or a 0-d int64 tensor (the ONNX single-step graph, phase as an input):
    only integer `//`, `%`, `*` and `+` are used, which mean the same for all three.
    """
    pos, period, top, runs = [], 1, 0, 1
    for p in pool:
        k = (t // period) % p
        pos.append(k)
        # (k + 1) // p is 1 iff this pool fills up now (k == p - 1), else 0: integer arithmetic
        # only, since ONNX has no arithmetic on booleans. runs stays 1 while every pool so far
        # fills up, i.e. while the next tier runs too.
        runs = runs * ((k + 1) // p)
        top = top + runs
        period *= p
    return top, pos


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

class SaShiMi(nn.Module):
    """Token-level SaShiMi: tokens (B, L) int64 in [0, 256) -> logits (B, L, 256)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.d_model * cfg.expand ** i for i in range(len(cfg.pool) + 1)]
        self.widths = widths
        self.embedding = TokenEmbedding(cfg.n_tokens, cfg.d_model, cfg.ordinal_input)
        self.down = nn.ModuleList(DownPool(widths[i], p, cfg.expand)
                                  for i, p in enumerate(cfg.pool))
        # Training length at each tier's rate (for backends that take it, see SequenceBackend).
        lengths = [None] * len(widths)
        if cfg.seq_len is not None:
            lengths = [cfg.seq_len // math.prod(cfg.pool[:i]) for i in range(len(widths))]
        self.center = Tier(widths[-1], cfg, lengths[-1])
        self.up = nn.ModuleList(UpPool(widths[i], p, cfg.expand) for i, p in enumerate(cfg.pool))
        self.tiers = nn.ModuleList(Tier(widths[i], cfg, lengths[i]) for i in range(len(cfg.pool)))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = TokenHead(cfg.d_model, cfg.n_tokens, cfg.ordinal_output)
        self.prior = LinearPredictionPrior() if cfg.prior == "lpc" else None
        if self.prior is not None:  # start exactly at the classical coder (the prior alone)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def frame(self) -> int:
        return self.cfg.frame

    def schedule(self, t):
        """`tier_schedule` of this model's pools at step `t` (python int, numpy array or tensor):
        (top, pos), the coarsest tier that runs and each pool's slot."""
        return tier_schedule(self.cfg.pool, t)

    def schedule_table(self, t0: int, n: int) -> np.ndarray:
        """The schedule of steps t0 .. t0 + n - 1 as an int64 table (n, 1 + len(pool)): column 0
        the top tier, column 1 + i pool i's slot (the cpu-fast kernel reads it as data)."""
        top, pos = self.schedule(np.arange(t0, t0 + n, dtype=np.int64))
        return np.stack([top, *pos], axis=1).astype(np.int64)

    def ssm_parameters(self) -> list[nn.Parameter]:
        """Parameters of every backend's state-space part (their own optimizer group)."""
        out = []
        for m in self.modules():
            if isinstance(m, backends.SequenceBackend):
                out.extend(m.ssm_parameters())
        return out

    def _tier(self, level: int) -> Tier:
        return self.center if level == len(self.cfg.pool) else self.tiers[level]

    # --- parallel ---------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, state: ModelState | None = None):
        """Logits (B, L, 256) for `tokens` from a fresh state; given a `state`, (logits, the state
        after them) as `forward_with_state` gives, the state detached: training with carried
        states calls the model this way (so that DistributedDataParallel sees the call) and cuts
        the graph there, which lets each layer skip its final state's gradients
        (`read_carried`)."""
        if state is not None:
            return self.forward_with_state(tokens, state, carried=True)
        logits, _ = self._parallel(tokens, None)
        return logits

    def forward_with_state(self, tokens: Tensor, state: ModelState, *, logits: bool = True,
                           carried: bool = False) -> tuple[Tensor | None, ModelState]:
        """Logits for `tokens` and the state after them, read in parallel. If the state is not at a
        frame boundary (t % 16 != 0), the few samples up to the boundary are stepped first.
        `logits=False` skips the output head (reading a prompt needs only the state).
        `carried`: the state after them detached, its gradients never made (`forward`)."""
        outs = []
        while state.t % self.frame and tokens.shape[1]:
            out, state = self.step(tokens[:, 0], state)
            outs.append(out.unsqueeze(1))
            tokens = tokens[:, 1:]
        if tokens.shape[1]:
            out, state = self._parallel(tokens, state, head=logits, carried=carried)
            outs.append(out)
        if carried:
            state = ModelState(state.t, {n: v.detach() for n, v in state.tensors.items()})
        return (torch.cat(outs, dim=1) if logits else None), state

    def _parallel(self, tokens: Tensor, state: ModelState | None, head: bool = True,
                  carried: bool = False):
        cfg, B = self.cfg, tokens.shape[0]
        S = state.tensors if state is not None else None
        new: dict[str, Tensor] = {}
        xs = [self.embedding(tokens)]
        if S is not None:  # each DownPool keeps the inputs the next step's schedule says it holds
            _, held = self.schedule(int(state.t) + tokens.shape[1])
        for i, down in enumerate(self.down):  # down path: pooling only
            x = xs[-1]
            if S is not None:
                r = held[i]
                buf = x.new_zeros(B, cfg.pool[i], x.shape[2])
                buf[:, :r] = x[:, x.shape[1] - r:]
                new[f"down{i}"] = buf
            xs.append(down(x))
        level = len(cfg.pool)
        y = self._run_tier(level, xs[level], S, new, carried=carried)
        for i in reversed(range(level)):  # up path
            up = self.up[i]
            prev = S[f"up{i}"] if S is not None else xs[i].new_zeros(B, cfg.pool[i], self.widths[i])
            z = up.upsample(y, prev, xs[i].shape[1]) + xs[i]
            if S is not None:
                new[f"up{i}"] = (up.linear(y[:, -1]).reshape(B, cfg.pool[i], -1)
                                 if y.shape[1] else prev)
            y = self._run_tier(i, z, S, new, output=head or i > 0, carried=carried)
        logits = self.head(self.norm(y)) if head else None
        if self.prior is not None:
            logp, prior_state = self.prior.parallel(
                tokens, {n: S[n] for n in self._prior_names()} if S is not None else None, head)
            logits = logits + logp if head else None
            new.update(prior_state)
        if state is None:
            return logits, None
        return logits, ModelState(state.t + tokens.shape[1], self._ordered(new))

    def _run_tier(self, level: int, x: Tensor, S, new: dict, output: bool = True,
                  carried: bool = False) -> Tensor:
        tier = self._tier(level)
        if S is None:
            return tier(x) if x.shape[1] else x
        if not x.shape[1]:  # a chunk too short to reach this tier: its states carry over
            for prefix, names_j in self._layer_names(level):
                for n in names_j:
                    new[f"{prefix}.{n}"] = S[f"{prefix}.{n}"]
            return x
        names = self._layer_names(level)
        states = [tuple(S[f"{prefix}.{n}"] for n in names_j) for prefix, names_j in names]
        y, states = tier.forward_with_state(x, states, output, carried)
        for (prefix, names_j), s in zip(names, states):
            for n, t in zip(names_j, s):
                new[f"{prefix}.{n}"] = t
        return y

    # --- recurrent --------------------------------------------------------------------------------
    def _layer_names(self, level: int) -> list[tuple[str, list[str]]]:
        tag = "center" if level == len(self.cfg.pool) else f"tier{level}"
        return [(f"{tag}.{j}", seq.layer.state_names())
                for j, seq in enumerate(self._tier(level).seq)]

    def _ordered(self, d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: d[name] for name in self.state_names()}

    def state_names(self) -> list[str]:
        """Names of the state tensors in their fixed order (stable across runs and exports)."""
        names = []
        for level in reversed(range(len(self.cfg.pool) + 1)):
            for prefix, ns in self._layer_names(level):
                names += [f"{prefix}.{n}" for n in ns]
        names += [f"down{i}" for i in range(len(self.cfg.pool))]
        names += [f"up{i}" for i in range(len(self.cfg.pool))]
        return names + self._prior_names()

    def _prior_names(self) -> list[str]:
        return [f"prior.{n}" for n, _ in PRIOR_STATE] if self.prior is not None else []

    def initial_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """The state before the first sample: zero layer states and zero pool buffers."""
        p = self.head.weight
        device, dtype = device or p.device, dtype or p.dtype
        t: dict[str, Tensor] = {}
        for level in range(len(self.cfg.pool) + 1):
            for (prefix, names), seq in zip(self._layer_names(level), self._tier(level).seq):
                for n, s in zip(names, seq.layer.initial_state(batch_size, device, dtype)):
                    t[f"{prefix}.{n}"] = s
        for i, pool in enumerate(self.cfg.pool):
            t[f"down{i}"] = torch.zeros(batch_size, pool, self.widths[i], device=device,
                                        dtype=dtype)
            t[f"up{i}"] = torch.zeros(batch_size, pool, self.widths[i], device=device, dtype=dtype)
        if self.prior is not None:
            t.update(self.prior.initial_state(batch_size, device, dtype))
        return ModelState(0, self._ordered(t))

    def restart_rows(self, state: ModelState, rows: Tensor) -> ModelState:
        """`state` with the rows of the bool mask `rows` (B,) back at the initial state, detached
        from the graph that made it (where truncated backpropagation cuts)."""
        first = self.initial_state(len(rows), rows.device).tensors
        return ModelState(state.t, {
            n: torch.where(rows.reshape(-1, *[1] * (v.dim() - 1)), first[n].to(v.dtype),
                           v.detach()) for n, v in state.tensors.items()})

    def step(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """One sample: token (B,) -> logits (B, 256) and the next state, on the schedule of
        `tier_schedule` (tier i runs when (t + 1) % (P_0 ... P_(i-1)) == 0; the up path reads its
        pooled piece before refreshing it). Written so that tracing it gives a lean graph: the
        schedule is python ints, pool buffers are updated with `torch.where` and flattened or
        reshaped by constants, so `export` traces this very method for its block graph."""
        S, npool = state.tensors, len(self.cfg.pool)
        top, pos = self.schedule(int(state.t))  # python ints: a static schedule when traced
        new = dict(S)
        xs = [self.embedding(token)]
        for i in range(min(top + 1, npool)):  # the pools written now, and the inputs they make
            buf = self.down[i].put(S[f"down{i}"], xs[-1], pos[i])
            if i < top:  # full: pooled, then emptied (as a parallel read leaves it)
                xs.append(self.down[i].pool_buffer(buf))
                buf = torch.zeros_like(buf)
            new[f"down{i}"] = buf
        y = self._step_tier(npool, xs[npool], S, new) if top == npool else None
        for i in reversed(range(min(top + 1, npool))):
            piece = self.up[i].piece(S[f"up{i}"], pos[i])
            if i < top:  # the coarser tier ran: refresh this pool's pieces for the next frame
                new[f"up{i}"] = self.up[i].pieces(y)
            y = self._step_tier(i, piece + xs[i], S, new)
        return self.output_step(y, token, S, new), ModelState(state.t + 1, new)

    def output_step(self, y: Tensor, token: Tensor, S: dict, new: dict) -> Tensor:
        """One step's logits from the finest tier's output `y`: the head, plus the prior's
        log-probabilities after `token` when the model has one (its next state into `new`)."""
        logits = self.head(self.norm(y))
        if self.prior is not None:
            logp, prior_state = self.prior.step(token, {n: S[n] for n in self._prior_names()})
            logits = logits + logp
            new.update(prior_state)
        return logits

    def _step_tier(self, level: int, x: Tensor, S: dict, new: dict) -> Tensor:
        names = self._layer_names(level)
        states = [tuple(S[f"{prefix}.{n}"] for n in ns) for prefix, ns in names]
        y, states = self._tier(level).step(x, states)
        for (prefix, ns), s in zip(names, states):
            for n, v in zip(ns, s):
                new[f"{prefix}.{n}"] = v
        return y


def count_parameters(model: nn.Module, folded: bool = False) -> int:
    """Trainable parameters; `folded`: of the model as it computes, the ordinal maps folded into
    its input table and head (what the paper counts)."""
    n = sum(p.numel() for p in model.parameters())
    if folded and isinstance(model, SaShiMi):
        n -= model.embedding.map_size() + model.head.map_size()
    return n
