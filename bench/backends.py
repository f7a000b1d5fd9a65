"""Backend benchmark: forward+backward samples/s at L = 131072, H = 64 (batch 1), step time per
sample, peak memory. Run by hand:
`python bench/backends.py [--backends s4 s4d mamba] [--repeats 3]`.

Peak memory is the process's peak RSS (CPU; run one backend per process for a clean figure) or
torch.cuda.max_memory_allocated (GPU). Prints markdown rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from ssmgen import backends


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, H: int, L: int, repeats: int, device: str) -> dict:
    layer = backends.create(name, H).to(device)
    x = torch.randn(1, L, H, device=device, requires_grad=True)
    layer(x).sum().backward()  # warm-up (kernels, plans, caches)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        layer(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mb()
    layer.eval()
    steps = 2000
    with torch.no_grad(), torch.inference_mode():
        state = layer.initial_state(1, device=device)
        u = torch.randn(1, H, device=device)
        for _ in range(50):
            _, state = layer.step(u, state)
        t = time.perf_counter()
        for _ in range(steps):
            _, state = layer.step(u, state)
        if device == "cuda":
            torch.cuda.synchronize()
        step_us = (time.perf_counter() - t) / steps * 1e6
    return {"sps": L / statistics.median(times), "step_us": step_us, "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backends", nargs="*", default=["s4", "s4d", "mamba"])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# device {args.device}, {args.threads} threads, L={args.length}, H={args.channels}, "
          f"batch 1, median of {args.repeats}")
    print("| backend | fwd+bwd samples/s | step us/sample (1 thread) | peak memory MB |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.backends:
        r = bench(name, args.channels, args.length, args.repeats, args.device)
        print(f"| {name} | {r['sps']:,.0f} | {r['step_us']:.0f} | {r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
