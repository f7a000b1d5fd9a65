"""The classical line: what a linear-prediction coder needs, in bits per sample, for the same
tokens a model is scored on. A model that does not beat it has not learned much.

The coder (the best classical row of `../shared/tools/baselines.py`, rewritten small and blocked):

- **Prediction.** LPC of order 32 fitted on the train split in the linear domain (tokens decoded),
  by the autocorrelation method (normal equations over every train file, at most `FIT_SAMPLES`
  samples spread over the files): x^_t = sum_k a_k x_(t-k), zeros before a file's start.
- **Residual model.** A discretized logistic (or Laplace: whichever the tuning prefers) centred on
  x^_t, over the token's bin [lo_q, hi_q) in the linear domain (the end bins reach to infinity),
  with a running scale s_t = max(c * mean|e| over the last W residuals, floor); mixed with a
  uniform eps / 256 so no token costs more than about log2(256 / eps) bits.
- **Tuning.** dist, W and c (on a grid), then floor, then eps are chosen on (a middle piece of
  every file of) the val split; then the split asked for is scored: bits per sample = mean
  -log2 p(token).

Everything runs on numpy in blocks of `BLOCK` samples (with the history a block needs carried in),
so memory stays bounded whatever the split's size. `classical_line()` caches its result in a
folder of the caller's (a run folder), keyed by the dataset's manifest and the split.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ssmgen.atomic import write_text
from ssmgen.audio import MU, decode

ORDER = 32
BLOCK = 1 << 20
#: Train samples the LPC fit reads at most (spread over the files): plenty for 33 correlations.
FIT_SAMPLES = 16_000_000
#: Val samples the tuning reads at most (the middle of every file).
TUNE_SAMPLES = 1 << 18
WINDOWS = (8, 32, 128, 512)
SCALES = (0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.5)
FLOORS = (3e-5, 1e-4, 3e-4)
EPSILONS = (1e-5, 1e-4, 1e-3)
DISTS = ("logistic", "laplace")
CACHE_NAME = "classical.json"
CACHE_VERSION = 2  # 2: a capped split is a prefix of every file (data.fair_shares)


# --- the pieces -------------------------------------------------------------------------------

def bin_edges(encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """The linear-domain interval [lo_k, hi_k) of the values that encode to token k (the end bins
    reach to -inf and +inf: clipped values land there)."""
    k = np.arange(256, dtype=np.float64)
    if encoding == "mulaw":
        inv = lambda f: np.sign(f) * ((1 + MU) ** np.abs(f) - 1) / MU  # noqa: E731
        lo, hi = inv((k - 0.5) / MU * 2 - 1), inv((k + 0.5) / MU * 2 - 1)
    elif encoding == "linear":
        lo, hi = k / 128 - 1, (k + 1) / 128 - 1
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    lo[0], hi[-1] = -np.inf, np.inf
    return lo, hi


def _table(encoding: str) -> np.ndarray:
    return decode(np.arange(256, dtype=np.uint8), encoding).astype(np.float64)


def autocorrelation(segments: Iterable[np.ndarray], order: int, table: np.ndarray) -> np.ndarray:
    """r[k] = sum over files and t of x_t x_(t-k), k = 0..order (x: tokens decoded by `table`)."""
    r = np.zeros(order + 1)
    for seg in segments:
        for s in range(0, len(seg), BLOCK):
            h = min(order, s)
            x = table[np.asarray(seg[s - h:s + BLOCK])]
            for k in range(order + 1):
                t0 = max(h, k)
                # einsum, not np.dot: BLAS wakes its thread pool per call, which on a busy
                # machine cost 8 ms per product here (100x the arithmetic)
                r[k] += float(np.einsum("i,i->", x[t0:], x[t0 - k:len(x) - k]))
    return r


def lpc_fit(r: np.ndarray) -> np.ndarray:
    """Prediction coefficients a_1..a_p from autocorrelations r_0..r_p (normal equations)."""
    p = len(r) - 1
    R = r[np.abs(np.subtract.outer(np.arange(p), np.arange(p)))]
    R[np.diag_indices(p)] *= 1 + 1e-9
    R[np.diag_indices(p)] += 1e-12
    return np.linalg.solve(R, r[1:])


def interval_prob(lo, hi, mu, s, dist: str) -> np.ndarray:
    """P(lo <= X < hi) for X ~ dist(mu, s), computed on the side away from 1 (stable in both
    tails)."""
    a, b = (lo - mu) / s, (hi - mu) / s
    with np.errstate(over="ignore", invalid="ignore"):
        if dist == "laplace":
            up, down = a >= 0, b <= 0
            mid = ~up & ~down
            return np.where(up, 0.5 * (np.exp(-np.where(up, a, 0)) - np.exp(-np.where(up, b, 0))),
                            np.where(down, 0.5 * (np.exp(np.where(down, b, 0))
                                                  - np.exp(np.where(down, a, 0))),
                                     1 - 0.5 * np.exp(-np.where(mid, b, 0))
                                     - 0.5 * np.exp(np.where(mid, a, 0))))
        sig = lambda z: np.exp(-np.logaddexp(0.0, -z))  # noqa: E731
        up = a > 0
        return np.where(up, sig(-a) - sig(-b), sig(b) - sig(a))


class Residuals:
    """Per block of a file: the tokens, the prediction and the running mean |residual| for one
    window W (what scoring needs; precomputed once so the tuning can try many c, floor, dist)."""

    def __init__(self, segments: Sequence[np.ndarray], a: np.ndarray, table: np.ndarray,
                 window: int) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        p = len(a)
        kernel = np.r_[0.0, a]
        for seg in segments:
            for s in range(0, len(seg), BLOCK):
                h = min(s, p + window)  # history: W residuals, each needing p samples
                q = np.asarray(seg[s - h:s + BLOCK]).astype(np.int64)
                x = table[q]
                pred = np.convolve(x, kernel)[:len(x)]
                e = np.abs(x - pred)
                r0 = max(0, h - window)  # residuals before r0 lack history (unused unless s==0)
                cs = np.r_[0.0, np.cumsum(e[r0:])]
                t = np.arange(h, len(x))
                lo = np.maximum(t - window, 0 if s == 0 else r0)
                m = (cs[t - r0] - cs[lo - r0]) / np.maximum(t - lo, 1)
                self.parts.append((q[h:], pred[h:], m))

    def bits(self, edges, dist: str, c: float, floor: float, eps: float) -> tuple[float, int]:
        """(total bits, samples) with scale max(c m, floor)."""
        total, n = 0.0, 0
        lo, hi = edges
        for q, pred, m in self.parts:
            p = interval_prob(lo[q], hi[q], pred, np.maximum(c * m, floor), dist)
            p = (1 - eps) * np.clip(np.nan_to_num(p), 0, 1) + eps / 256
            total -= float(np.sum(np.log2(p)))
            n += len(q)
        return total, n


def _middle(segments: Sequence[np.ndarray], total: int) -> list[np.ndarray]:
    """A deterministic piece of every file, `total` samples in all: the middle of each."""
    per = max(1, total // max(1, len(segments)))
    return [seg[max(0, (len(seg) - per) // 2):][:per] for seg in segments]


def _spread(segments: Sequence[np.ndarray], total: int) -> list[np.ndarray]:
    """At most `total` samples, the same share of every file (its start)."""
    n = sum(len(s) for s in segments)
    if n <= total:
        return list(segments)
    share = total / n
    return [seg[:max(1, int(len(seg) * share))] for seg in segments]


# --- the coder --------------------------------------------------------------------------------

def fit(train: Sequence[np.ndarray], tune: Sequence[np.ndarray], encoding: str,
        order: int = ORDER, dists: Sequence[str] = DISTS) -> dict:
    """Fit the LPC on `train` files and choose the residual model (among `dists`) on `tune`
    files: the coder's settings as plain data."""
    table = _table(encoding)
    fit_on = _spread(train, FIT_SAMPLES)
    a = lpc_fit(autocorrelation(fit_on, order, table))
    edges = bin_edges(encoding)
    tune = _middle(tune, TUNE_SAMPLES)
    # dist, W and c on a grid (floor and eps at middle values), then floor, then eps: the bits
    # are flat in the last two, so this finds the full grid's choice at a third of its cost
    residuals = {w: Residuals(tune, a, table, w) for w in WINDOWS}
    _, dist, w, c = min((residuals[w].bits(edges, dist, c, FLOORS[1], EPSILONS[1])[0], dist, w, c)
                        for w in WINDOWS for dist in dists for c in SCALES)
    res = residuals[w]
    fl = min(FLOORS, key=lambda f: res.bits(edges, dist, c, f, EPSILONS[1])[0])
    eps = min(EPSILONS, key=lambda e: res.bits(edges, dist, c, fl, e)[0])
    return {"order": order, "coefficients": a.tolist(), "dist": dist, "window": w, "scale": c,
            "floor": fl, "eps": eps, "encoding": encoding,
            "fit_samples": int(sum(len(s) for s in fit_on))}


def score(coder: dict, segments: Sequence[np.ndarray]) -> tuple[float, int]:
    """(bits per sample, samples) of the coder over `segments` (files: history resets at each)."""
    table = _table(coder["encoding"])
    res = Residuals(segments, np.asarray(coder["coefficients"]), table, coder["window"])
    total, n = res.bits(bin_edges(coder["encoding"]), coder["dist"], coder["scale"],
                        coder["floor"], coder["eps"])
    return (total / n if n else math.nan), n


# --- on a dataset -----------------------------------------------------------------------------

def split_files(dataset, split: str, max_samples: int | None = None) -> list[np.ndarray]:
    """The files of a split as token arrays (memory-mapped views), capped at `max_samples`
    positions in all as the evaluation of a model caps them (`Dataset.file_tokens`)."""
    return list(dataset.file_tokens(split, max_samples))


def dataset_coder(dataset, dists: Sequence[str] = DISTS) -> dict | None:
    """The coder fitted on `dataset`'s train split and tuned on its val split (train when it has
    none), with its coefficients; None when the train split is empty."""
    train = split_files(dataset, "train")
    if not train:
        return None
    val = split_files(dataset, "val")
    coder = fit(train, val or train, dataset.data_format()["encoding"], dists=dists)
    return {**coder, "tuned_on": "val" if val else "train"}


def dataset_key(dataset) -> str:
    """What identifies a dataset's contents: the hash of its manifest (prep rewrites it)."""
    return hashlib.sha256((Path(dataset.root) / "manifest.json").read_bytes()).hexdigest()[:16]


def classical_line(dataset, split: str, *, max_samples: int | None = None,
                   cache_dir: str | Path | None = None, extra: Sequence[np.ndarray] | None = None
                   ) -> dict | None:
    """The coder fitted on `dataset`'s train split, tuned on its val split (train when it has
    none), scored on `split` (or on the token arrays `extra`, e.g. audio files): {'bpb',
    'samples', 'split', ...the coder's settings}. None when the train split is empty or there is
    nothing to score. With `cache_dir`, the result is kept in CACHE_NAME there and read back."""
    label = "files" if extra is not None else split
    key = f"v{CACHE_VERSION}:{dataset_key(dataset)}:{label}:{max_samples}"
    if extra is not None:
        key += ":" + hashlib.sha256(b"".join(hashlib.sha256(np.asarray(e).tobytes()).digest()
                                             for e in extra)).hexdigest()[:16]
    cache = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    entries = _read_cache(cache)
    if key in entries:
        return entries[key]
    targets = list(extra) if extra is not None else split_files(dataset, split, max_samples)
    if not sum(len(t) for t in targets):
        return None
    t0 = time.perf_counter()
    coder = dataset_coder(dataset)
    if coder is None:  # no train split
        return None
    bpb, n = score(coder, targets)
    result = {"bpb": bpb, "samples": n, "split": label, "seconds": time.perf_counter() - t0,
              **{k: v for k, v in coder.items() if k != "coefficients"}}
    if cache is not None:
        entries[key] = result
        write_text(cache, json.dumps({"format": "ssmgen-classical", "entries": entries},
                                     indent=1, allow_nan=False))
    return result


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data.get("entries", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)
                and isinstance(v.get("bpb"), (int, float)) and math.isfinite(v["bpb"])}
    except (OSError, ValueError):
        return {}  # a damaged cache is recomputed (and rewritten: the run folder is ours)
