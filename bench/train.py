"""Training benchmark: samples/s and peak memory of whole training steps (forward, backward,
AdamW) for presets x backends. Run by hand:
`python bench/train.py [--presets ablated sashimi] [--backends s4 s4d mamba] [--batch 4 --length 4096]`.
Prints markdown rows for docs/benchmarks.md (median of --repeats timed steps after a warm-up).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def one(preset: str, backend: str, batch: int, length: int, repeats: int, device: str) -> dict:
    from ssmgen.config import load_config
    from ssmgen.model import SaShiMi
    from ssmgen.train import make_optimizer

    # trained at this length: S4 parameterizes its C for it (model.seq_len)
    cfg = load_config(preset, backend=backend, overrides=[f"train.sample_len={length}"])
    model = SaShiMi(cfg.model).to(device)
    opt = make_optimizer(model, cfg)
    x = torch.randint(0, 256, (batch, length), device=device)

    def step():
        loss = F.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"sps": batch * length / statistics.median(times), "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="*", default=["ablated", "sashimi"])
    ap.add_argument("--backends", nargs="*", default=["s4", "s4d", "mamba"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one measurement, so peak RSS is its own
        r = one(*args.one, args.batch, args.length, args.repeats, args.device)
        print(f"{r['sps']} {r['peak_mb']}")
        return
    print(f"# device {args.device}, {torch.get_num_threads()} threads, batch {args.batch} x "
          f"{args.length}, median of {args.repeats} steps")
    print("| preset | backend | samples/s | peak memory MB (process) |")
    print("| --- | --- | ---: | ---: |")
    for preset in args.presets:
        for backend in args.backends:
            out = subprocess.run([sys.executable, __file__, "--one", preset, backend,
                                  "--batch", str(args.batch), "--length", str(args.length),
                                  "--repeats", str(args.repeats), "--device", args.device],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"| {preset} | {backend} | failed: {out.stderr.strip().splitlines()[-1]} | |")
                continue
            sps, peak = map(float, out.stdout.split())
            print(f"| {preset} | {backend} | {sps:,.0f} | {peak:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
