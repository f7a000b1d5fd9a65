"""Paired A/B of cpu-fast kernel versions: is a change to cpu_fast_kernels.py faster?

On a shared machine the speed of the same code drifts by up to 2x within minutes, which swamps a
10-20% change in separate medians. This runs the versions in alternation (the order reversed every
other round), many short runs each, and reports the median of the per-pair speed ratios: drift
slower than one pair cancels. A file against itself (or an unchanged backend) read 0.97-0.98.

    git show HEAD~1:src/ssmgen/generate/cpu_fast_kernels.py > /tmp/old_kernels.py
    python bench/ab_cpu_fast.py /tmp/old_kernels.py src/ssmgen/generate/cpu_fast_kernels.py \
        --preset ablated --backend mamba --samples 1024 --pairs 30

Each file is loaded as its own module (numba's on-disk cache off, so versions never mix); the
noise is drawn once and shared, so every run does the same work.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssmgen.config import load_config
from ssmgen.generate import cpu_fast
from ssmgen.generate.sampling import Sampler
from ssmgen.model import SaShiMi


def load_kernels(path: Path, tag: str, tmp: Path):
    src = path.read_text().replace("JIT = dict(cache=True", "JIT = dict(cache=False")
    copy = tmp / f"kernels_{tag}.py"
    copy.write_text(src)
    spec = importlib.util.spec_from_file_location(f"kernels_{tag}", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernels", nargs="+", type=Path, help="versions of cpu_fast_kernels.py; the "
                    "first is the baseline")
    ap.add_argument("--preset", default="ablated")
    ap.add_argument("--backend", default="s4d")
    ap.add_argument("--samples", type=int, default=1024, help="samples per run")
    ap.add_argument("--pairs", type=int, default=30, help="runs of each version")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = SaShiMi(load_config(args.preset, backend=args.backend).model).eval()
    state = model.initial_state(1)
    noise = Sampler(0.9, seed=1).noise(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        mods = [load_kernels(p, str(i), Path(tmp)) for i, p in enumerate(args.kernels)]
        engines = []
        for mod in mods:
            cpu_fast.K = mod
            engine = cpu_fast.CpuFastEngine(model, 1)
            engine.generate(state, np.array([128]), 64, Sampler(0.9, seed=1))  # compile
            engines.append(engine)
        rates = np.zeros((len(mods), args.pairs))
        for j in range(args.pairs):
            order = range(len(mods)) if j % 2 == 0 else reversed(range(len(mods)))
            for i in order:  # ABBA...: whatever favours the first or the last run cancels
                mod, engine = mods[i], engines[i]
                cpu_fast.K = mod
                sampler = Sampler(0.9, seed=1)
                sampler.noise = lambda k: noise[:k]
                t = time.perf_counter()
                engine.generate(state, np.array([128]), args.samples, sampler)
                rates[i, j] = args.samples / (time.perf_counter() - t)
    print(f"{args.preset} {args.backend}, batch 1, {args.pairs} runs of {args.samples} samples "
          "each, alternating")
    for i, p in enumerate(args.kernels):
        line = f"  {p}: median {np.median(rates[i]) / 16000:.3f}x real time"
        if i:
            ratio = rates[i] / rates[0]
            q1, q3 = np.quantile(ratio, [0.25, 0.75])
            line += f", paired ratio to the first {np.median(ratio):.3f} (IQR {q1:.3f}-{q3:.3f})"
        print(line)


if __name__ == "__main__":
    main()
