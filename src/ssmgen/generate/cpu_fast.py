"""The cpu-fast engine: the whole recurrent SaShiMi step in one numba function.

`pack_model` flattens every weight the step needs into one contiguous float32 array `W` (linear
maps transposed to (in, out) for axpy-style products, each block 64-byte aligned) with int64 offset
tables; the model state becomes one float32 array `S` holding every state tensor in its torch layout
(plus an accumulator for the first down-pool). What is a pure function of the token is a table:
the first DownPool's linear map of an embedding is precomputed for the 256 tokens and each position
in the pool (`T0`), so the step adds one row per sample instead of a 256x128 product per 4 samples.

Each sequence layer hands over its step through the fast-step contract (`SequenceBackend.fast_step`,
`backends.base.FAST_LAYOUTS`): named real tensors of a declared layout, which are checked and packed
as they are, in the table's order, with the layout's dimensions after their offsets; this module
computes nothing from a backend's parameters itself.

`run_steps` (cpu_fast_kernels.py) runs a chunk of steps, sampling included, with no allocation; the
engine calls it per chunk of `CHUNK` samples with that chunk's rows of the model's schedule
(`SaShiMi.schedule_table`, so any phase works) and reports progress between chunks.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from ssmgen.backends.base import FAST_LAYOUTS, SequenceBackend, check_fast_step
from ssmgen.errors import UserError
from ssmgen.generate import cpu_fast_backends as KB
from ssmgen.generate import cpu_fast_kernels as K
from ssmgen.generate import cpu_fast_linear as KL
from ssmgen.generate.base import CHUNK
from ssmgen.generate.sampling import Sampler
from ssmgen.model import ModelState, SaShiMi
from ssmgen.prior import STATE as PRIOR_STATE
from ssmgen.tokens import N_TOKENS

ALIGN = KL.ALIGN


def supports(model: SaShiMi) -> bool:
    """Whether every sequence layer of `model` declares a step form this engine packs."""
    return all(getattr(m, "fast_kind", None) in FAST_LAYOUTS for m in model.modules()
               if isinstance(m, SequenceBackend))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


class _Flat:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.n = 0

    def add(self, a) -> int:
        a = np.ascontiguousarray(a, dtype=np.float32).ravel()
        off = self.n
        pad = (-a.size) % ALIGN
        self.parts.append(a)
        if pad:
            self.parts.append(np.zeros(pad, np.float32))
        self.n += a.size + pad
        return off

    def add_linear(self, wt) -> int:
        """A (in, out) map, stored in the column panels the product kernel reads."""
        return self.add(KL.panel_order(np.asarray(wt, dtype=np.float32)))

    def array(self) -> np.ndarray:
        """The packed array, with KL.PANEL zeros after the last block: the product kernel reads a
        bias, and each input's row of a map's narrower last panel, a whole panel (64 floats) at a
        time, past the end of a shorter one."""
        return np.concatenate(self.parts + [np.zeros(KL.PANEL, np.float32)])


def _linear(f: _Flat, lin: torch.nn.Linear) -> tuple[int, int]:
    return f.add_linear(_np(lin.weight).T), f.add(_np(lin.bias))


def _backend_fields(f: _Flat, layer, width: int) -> tuple[list[int], dict[str, int]]:
    """Pack `layer.fast_step()` as it is: the offsets of its tensors in the layout's order, then
    the layout's dimensions (what the kernel reads at `KB.lo_slots(kind)`), and the dimensions by
    name. UserError (one line) for a layer without a packable step form or whose tensors do not
    follow the layout."""
    kind = getattr(layer, "fast_kind", None)
    name = type(layer).__name__
    if kind not in FAST_LAYOUTS:
        raise UserError(f"engine cpu-fast: backend {name} declares no step form it can pack "
                        f"(fast_kind {kind!r}; known: {', '.join(FAST_LAYOUTS)}); use --engine "
                        "torch")
    with torch.no_grad():
        tensors = layer.fast_step()
    try:
        dims = check_fast_step(kind, tensors, width)
    except ValueError as e:
        raise UserError(f"engine cpu-fast: backend {name}: {e}; use --engine torch") from None
    layout = FAST_LAYOUTS[kind]
    offsets = [(f.add_linear if fld.linear else f.add)(_np(tensors[fld.name]))
               for fld in layout.fields]
    return offsets + [dims[d] for d in layout.dims], dims


class Packed:
    """A model's weights and offset tables for the kernels."""

    def __init__(self, model: SaShiMi) -> None:
        cfg = model.cfg
        self.model = model
        f = _Flat()
        T = len(cfg.pool) + 1
        widths = list(model.widths)
        first = model.center.seq[0].layer
        kind = getattr(first, "fast_kind", None)
        if kind not in FAST_LAYOUTS:
            _backend_fields(f, first, widths[-1])  # raises the clear error
        GO = np.zeros(8 + 4 * len(cfg.pool), np.int64)
        emb = _np(model.embedding.table())
        GO[K.G_EMB] = f.add(emb)
        GO[K.G_NG], GO[K.G_NB] = f.add(_np(model.norm.weight)), f.add(_np(model.norm.bias))
        hw, hb = model.head.folded()
        GO[K.G_HW], GO[K.G_HB] = f.add_linear(_np(hw).T), f.add(_np(hb))
        for i, p in enumerate(cfg.pool):
            GO[8 + 4 * i], GO[9 + 4 * i] = _linear(f, model.down[i].linear)
            GO[10 + 4 * i], GO[11 + 4 * i] = _linear(f, model.up[i].linear)
        w0, p0 = widths[0], cfg.pool[0]
        self.down0_wt = _np(model.down[0].linear.weight).T.astype(np.float64)  # (p0 * w0, w1)
        table = np.einsum("tc,pco->pto", emb.astype(np.float64),
                          self.down0_wt.reshape(p0, w0, -1))
        GO[K.G_T0] = f.add(table)
        if model.prior is not None:
            pr = model.prior
            GO[K.G_PRIOR] = f.add(np.concatenate([_np(pr.coef), _np(pr.mask), _np(pr.table),
                                                  _np(pr.lo), _np(pr.hi)[-1:], _np(pr.width),
                                                  _np(pr.settings)]))
        LO = np.zeros((T, cfg.n_layers, KB.LO_WIDTH), np.int64)
        wmax = max(widths)
        tmp = 0
        for l in range(T):
            tier = model._tier(l)
            for j, (seq, ff) in enumerate(zip(tier.seq, tier.ff)):
                lo = LO[l, j]
                lo[KB.N1G], lo[KB.N1B] = f.add(_np(seq.norm.weight)), f.add(_np(seq.norm.bias))
                if seq.output_linear is not None:
                    lo[KB.OLW], lo[KB.OLB] = _linear(f, seq.output_linear)
                lo[KB.N2G], lo[KB.N2B] = f.add(_np(ff.norm.weight)), f.add(_np(ff.norm.bias))
                lo[KB.F1W], lo[KB.F1B] = _linear(f, ff.fc1)
                lo[KB.F2W], lo[KB.F2B] = _linear(f, ff.fc2)
                if getattr(seq.layer, "fast_kind", None) != kind:  # one backend per model
                    raise UserError(f"engine cpu-fast: the model mixes step forms ({kind!r} and "
                                    f"{getattr(seq.layer, 'fast_kind', None)!r}); use --engine "
                                    "torch")
                fields, dims = _backend_fields(f, seq.layer, widths[l])
                lo[KB.BK:KB.BK + len(fields)] = fields
                tmp = max(tmp, KB.scratch_floats(kind, dims, wmax))
        self.W = f.array()
        self.GO, self.LO = GO, LO
        ci = np.zeros(16, np.int64)
        ci[K.C_T], ci[K.C_NL], ci[K.C_FFE], ci[K.C_GLU] = T, cfg.n_layers, cfg.ff_expand, cfg.glu
        ci[K.C_KIND] = KB.KIND_IDS[kind]
        ci[K.C_OUTPROJ] = int(first.has_output_projection)
        ci[K.C_CAP] = 2 * wmax
        ci[K.C_PRIOR] = int(model.prior is not None)
        self.ci = ci
        self.widths = np.array(widths, np.int64)
        self.pool = np.array(cfg.pool, np.int64)
        self.tmp_size = tmp  # per-row scratch of the backend step (T1, T2)
        self.names = model.state_names()

    # --- state conversion -------------------------------------------------------------------------
    def state_in(self, state: ModelState):
        """Flat state S, the offsets of each named tensor, SG (pool buffers) and SO (layers)."""
        model, cfg = self.model, self.model.cfg
        f = _Flat()
        offs = {}
        for name in self.names:
            offs[name] = f.add(_np(state.tensors[name]))
        buf0 = _np(state.tensors["down0"]).astype(np.float64)
        B = buf0.shape[0]
        acc = buf0.reshape(B, -1) @ self.down0_wt
        npool = len(cfg.pool)
        SG = np.zeros(2 * npool + 4, np.int64)
        for i in range(npool):
            SG[2 * i], SG[2 * i + 1] = offs[f"down{i}"], offs[f"up{i}"]
        SG[2 * npool] = f.add(acc)
        if model.prior is not None:  # its state: hist, res, seen (prior.STATE's order)
            SG[2 * npool + 1:] = [offs[f"prior.{n}"] for n, _ in PRIOR_STATE]
        SO = np.zeros((npool + 1, cfg.n_layers, 8), np.int64)
        for l in range(npool + 1):
            for j, (prefix, ns) in enumerate(model._layer_names(l)):
                for k, n in enumerate(ns):
                    SO[l, j, k] = offs[f"{prefix}.{n}"]
        return f.array(), offs, SG, SO

    def state_out(self, S: np.ndarray, offs: dict, like: ModelState, t: int) -> ModelState:
        tensors = {}
        for name in self.names:
            ref = like.tensors[name]
            a = S[offs[name]:offs[name] + ref.numel()].reshape(tuple(ref.shape))
            tensors[name] = torch.from_numpy(a.copy()).to(ref.dtype)
        return ModelState(t, tensors)


def _threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _row_slice(state: ModelState, r0: int, r1: int) -> ModelState:
    return ModelState(state.t, {k: v[r0:r1] for k, v in state.tensors.items()})


class _Rows:
    """A contiguous group of batch rows on its own: its state, scratch, tokens and sampling
    settings. Rows never mix in the model, so two groups run at once in two threads."""

    def __init__(self, engine: CpuFastEngine, state: ModelState, tok: np.ndarray,
                 sampler: Sampler, r0: int, r1: int, want: bool) -> None:
        p = engine.packed
        self.r0, self.r1 = r0, r1
        self.like = _row_slice(state, r0, r1)
        self.S, self.offs, self.SG, self.SO = p.state_in(self.like)
        self.scratch = engine._scratch(r1 - r0)
        self.tok = tok[r0:r1].copy()
        self.settings = (sampler.inv_temperatures[r0:r1].copy(), sampler.top_ks[r0:r1].copy(),
                         sampler.top_ps[r0:r1].copy())
        self.lbuf = np.zeros((CHUNK if want else 1, r1 - r0 if want else 1, N_TOKENS),
                             np.float32)

    def run(self, p: Packed, sched: np.ndarray, m: int, noise: np.ndarray, out: np.ndarray,
            done: int, want: bool) -> None:
        K.run_steps(p.W, p.GO, p.LO, self.S, self.SG, self.SO, p.ci, p.widths, p.pool, self.tok,
                    sched, m, noise, *self.settings, out, done, want, self.lbuf, *self.scratch)


class CpuFastEngine:
    """`threads`: at most this many threads (default: 2, or 1 on a one-core machine). A batch of
    one row runs in one thread (the next chunk's noise is drawn in a second one meanwhile); a
    larger batch is split into that many groups of rows, each run by its own thread from start to
    end (the kernel releases the GIL), drawing its own rows' noise between its chunks."""

    name = "cpu-fast"

    def __init__(self, model: SaShiMi, batch_size: int, device=None,
                 threads: int | None = None) -> None:
        self.packed = Packed(model.eval())
        self.batch_size = batch_size
        self.threads = max(1, threads if threads is not None else min(2, _threads()))
        self.compile_seconds: float | None = None

    def _scratch(self, B: int):
        p = self.packed
        cap, T = int(p.ci[K.C_CAP]), int(p.ci[K.C_T])
        ffe = int(p.ci[K.C_FFE])
        z = lambda n: np.zeros(n, np.float32)  # noqa: E731
        return (z(T * B * cap), z(B * cap), z(B * cap), z(B * cap), z(B * cap), z(B * cap),
                z(B * ffe * cap), z(B * p.tmp_size), z(B * p.tmp_size), z(B * N_TOKENS),
                z(N_TOKENS), z(N_TOKENS))

    def generate(self, state: ModelState, first_token: np.ndarray, n: int, sampler: Sampler,
                 progress: Callable[[int], None] | None = None,
                 logits_out: np.ndarray | None = None) -> tuple[np.ndarray, ModelState]:
        """n tokens (B, n) uint8 and the final state; `logits_out` (n, B, 256) gets the logits."""
        tok = np.array(first_token, dtype=np.int64).reshape(-1)
        B = tok.shape[0]
        want = logits_out is not None
        k = min(self.threads, B)
        bounds = [B * g // k for g in range(k + 1)]
        groups = [_Rows(self, state, tok, sampler, bounds[g], bounds[g + 1], want)
                  for g in range(k)]
        out = np.empty((B, n), np.uint8)
        pool = ThreadPoolExecutor(k)
        try:
            if k == 1:
                self._run(groups[0], state.t, n, sampler, out, logits_out, progress, pool)
            else:
                self._run_groups(groups, state.t, n, sampler, out, logits_out, progress, pool)
        finally:
            pool.shutdown()
        parts = [self.packed.state_out(g.S, g.offs, g.like, state.t + n) for g in groups]
        if len(parts) == 1:
            return out, parts[0]
        return out, ModelState(state.t + n, {name: torch.cat([q.tensors[name] for q in parts])
                                             for name in parts[0].tensors})

    def _chunk(self, g: _Rows, t: int, done: int, m: int, noise: np.ndarray, out: np.ndarray,
               logits_out: np.ndarray | None) -> None:
        """Steps done .. done + m of group g (the schedule from the model's own table)."""
        p = self.packed
        t_start = time.perf_counter()
        g.run(p, p.model.schedule_table(t + done, m), m, noise, out[g.r0:g.r1], done,
              logits_out is not None)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - t_start
        if logits_out is not None:
            logits_out[done:done + m, g.r0:g.r1] = g.lbuf[:m]

    def _run(self, g: _Rows, t: int, n: int, sampler: Sampler, out, logits_out, progress,
             pool: ThreadPoolExecutor) -> None:
        """One group in this thread; the next chunk's noise is drawn in `pool` meanwhile."""
        pending = pool.submit(sampler.noise, min(CHUNK, n))
        done = 0
        while done < n:
            m = min(CHUNK, n - done)
            noise = pending.result()
            if done + m < n:
                pending = pool.submit(sampler.noise, min(CHUNK, n - done - m))
            self._chunk(g, t, done, m, noise, out, logits_out)
            done += m
            if progress is not None:
                progress(done)

    def _run_groups(self, groups: list[_Rows], t: int, n: int, sampler: Sampler, out, logits_out,
                    progress, pool: ThreadPoolExecutor) -> None:
        """Each group in a thread of its own, all its chunks, drawing its rows' noise itself
        between them: no group waits for another (on a busy machine, a thread that lost its core
        for a while does not stall the other). Progress: the samples every row has."""
        done = [0] * len(groups)
        errors: list[BaseException] = []
        cond = threading.Condition()

        def work(i: int, g: _Rows) -> None:
            rows = range(g.r0, g.r1)
            d = 0
            try:
                while d < n:
                    m = min(CHUNK, n - d)
                    self._chunk(g, t, d, m, sampler.noise(m, rows=rows), out, logits_out)
                    d += m
                    with cond:
                        done[i] = d
                        cond.notify()
            except BaseException as e:
                with cond:
                    errors.append(e)
                    cond.notify()

        jobs = [pool.submit(work, i, g) for i, g in enumerate(groups)]
        reported = 0
        while reported < n:
            with cond:
                cond.wait_for(lambda: min(done) > reported or errors)
                if errors:
                    break
                reported = min(done)
            if progress is not None:
                progress(reported)
        for j in jobs:
            j.result()
        if errors:
            raise errors[0]
