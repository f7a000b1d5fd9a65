"""Paired A/B of cpu-fast versions: is a change to the engine faster, or at least not slower?

On a shared machine the speed of the same code drifts by up to 2x within minutes, which swamps a
10-20% change in separate medians. This runs the versions in alternation (the order reversed every
other round), many short runs each, and reports the median of the per-pair speed ratios: drift
slower than one pair cancels. The same code also runs a few percent faster or slower in one
process than in another (where its arrays happen to lie in memory, measured: 0.965 for a copy of
the same source tree in a second process, one process each): so each version runs in several
processes (`--procs`, default 3), taken in turn, and a run of the baseline under a second name is
the control that shows what "no change" reads in the same session.

A version is either

- a source folder (the ``src`` of a checkout, a worktree or an extracted commit): its whole
  ``ssmgen`` package is used, packer, model and kernels, so versions may differ anywhere;
- a ``cpu_fast_kernels.py`` file: loaded into this tree's package in place of its kernels (the
  kernels must take what this tree's packer passes them; the products and backend steps it imports,
  ``cpu_fast_linear`` and ``cpu_fast_backends``, stay this tree's: to compare a change there, name
  source folders).

To compare the code of an older commit with the working tree, extract the old one outside the
repository and name both source folders::

    rm -rf /tmp/ab-old && mkdir /tmp/ab-old && git archive HEAD~3 src | tar -x -C /tmp/ab-old
    cp -r /tmp/ab-old /tmp/ab-old2      # the control: the baseline again, in other processes
    python bench/ab_cpu_fast.py /tmp/ab-old/src src /tmp/ab-old2/src --backend s4 --pairs 40

or, for a change to the kernels alone::

    git show HEAD~1:src/ssmgen/generate/cpu_fast_kernels.py > /tmp/old_kernels.py
    python bench/ab_cpu_fast.py /tmp/old_kernels.py src/ssmgen/generate/cpu_fast_kernels.py \
        --preset ablated --backend mamba --samples 1024 --pairs 30

Each version runs in processes of its own (started with its source folder first on PYTHONPATH
and numba's on-disk cache in a private temporary folder per version, so versions never mix), each
compiled or loaded from that cache up front, then waiting while the others run: only one process
computes at a time. Every version loads the
same weights (drawn here, with this tree's code) and consumes the same noise, so every run does
the same work.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RATE = 16000  # samples per second of audio, for "x real time"


def _load_kernels(path: Path, tmp: Path):
    """`path` as a module of its own, with numba's on-disk cache off (a copy in `tmp`)."""
    src = path.read_text().replace("JIT = dict(cache=True", "JIT = dict(cache=False")  # pre-split
    copy = tmp / "kernels_override.py"  # its own numba cache, in the private `tmp`
    copy.write_text(src)
    spec = importlib.util.spec_from_file_location("kernels_override", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(args) -> None:
    """One version: build the engine, compile, then time one generation per line on stdin."""
    import torch

    from ssmgen.config import load_config
    from ssmgen.generate import cpu_fast
    from ssmgen.generate.sampling import Sampler
    from ssmgen.model import SaShiMi

    torch.set_num_threads(1)
    if args.kernels:
        cpu_fast.K = _load_kernels(Path(args.kernels), Path(args.tmp))
    model = SaShiMi(load_config(args.preset, backend=args.backend).model)
    model.load_state_dict(torch.load(Path(args.tmp) / "weights.pt", weights_only=True))
    model.eval()
    state = model.initial_state(1)
    noise = np.load(Path(args.tmp) / "noise.npy")
    first = np.array([128])

    def sampler():
        s = Sampler(temperature=0.9, seed=1, batch_size=1)
        s.noise = lambda k: noise[:k]  # the same noise for every run and version
        return s

    engine = cpu_fast.CpuFastEngine(model, 1)
    engine.generate(state, first, 64, sampler())  # compile
    print("ready", flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        engine.generate(state, first, args.samples, sampler())
        print(time.perf_counter() - t, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("versions", nargs="+", type=Path, help="source folders or kernels files; "
                    "the first is the baseline")
    ap.add_argument("--preset", default="ablated")
    ap.add_argument("--backend", default="s4d")
    ap.add_argument("--samples", type=int, default=1024, help="samples per run")
    ap.add_argument("--pairs", type=int, default=30, help="runs of each version")
    ap.add_argument("--procs", type=int, default=3, help="processes per version, taken in turn")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kernels", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from ssmgen.config import load_config
    from ssmgen.generate.sampling import Sampler
    from ssmgen.model import SaShiMi

    here = Path(__file__).resolve().parents[1] / "src"
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = SaShiMi(load_config(args.preset, backend=args.backend).model)
        procs: list[list[subprocess.Popen]] = []  # procs[version][k]
        try:
            for i, v in enumerate(args.versions):
                d = Path(tmp) / f"v{i}"
                d.mkdir()
                torch.save(model.state_dict(), d / "weights.pt")
                np.save(d / "noise.npy", Sampler(temperature=0.9, seed=1).noise(args.samples))
                src, extra = (v, []) if v.is_dir() else (here, ["--kernels", str(v.resolve())])
                env = dict(os.environ, PYTHONPATH=str(src.resolve()),
                           NUMBA_CACHE_DIR=str(d / "nb"))
                cmd = [sys.executable, str(Path(__file__).resolve()), *map(str, args.versions),
                       "--worker", "--preset", args.preset, "--backend", args.backend,
                       "--samples", str(args.samples), "--tmp", str(d), *extra]
                procs.append([])
                for _ in range(args.procs):  # one at a time: the first compiles, the rest load
                    p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
                    procs[-1].append(p)
                    if p.stdout.readline().strip() != "ready":
                        raise SystemExit(f"{v}: the worker failed (see above)")
            rates = np.zeros((len(procs), args.pairs))
            for j in range(args.pairs):
                order = range(len(procs)) if j % 2 == 0 else reversed(range(len(procs)))
                for i in order:  # ABBA...: whatever favours the first or the last run cancels
                    p = procs[i][(j // 2) % args.procs]  # each process for one A-B-B-A block
                    p.stdin.write("run\n")
                    p.stdin.flush()
                    rates[i, j] = args.samples / float(p.stdout.readline())
        finally:
            for p in (p for ps in procs for p in ps):
                p.stdin.close()
                p.wait()
    print(f"{args.preset} {args.backend}, batch 1, {args.pairs} runs of {args.samples} samples "
          f"each, alternating, {args.procs} processes per version")
    for i, v in enumerate(args.versions):
        line = f"  {v}: median {np.median(rates[i]) / RATE:.3f}x real time"
        if i:
            ratio = rates[i] / rates[0]
            q1, q3 = np.quantile(ratio, [0.25, 0.75])
            line += f", paired ratio to the first {np.median(ratio):.3f} (IQR {q1:.3f}-{q3:.3f})"
        per = [np.median(rates[i][(np.arange(args.pairs) // 2) % args.procs == k]) / RATE
               for k in range(args.procs)]
        print(line + f"; per process {', '.join(f'{r:.3f}x' for r in per)}")


if __name__ == "__main__":
    main()
