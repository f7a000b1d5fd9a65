"""Generation speed: samples/s and real-time factor (16000 samples/s = 1.0x) per engine, preset,
backend and batch size, and the time to read an 8 s prompt (`model.forward_with_state`).

    .venv/bin/python bench/generate.py                       # everything available
    .venv/bin/python bench/generate.py --engines cpu-fast --presets ablated --batch 1 --seconds 2

Weights are random (speed does not depend on them). Each figure is the median of --repeats runs
(default 3); the first cpu-fast call, which compiles (or loads the numba cache), is timed apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ssmgen import backends
from ssmgen.config import load_config
from ssmgen.generate import Sampler, available_engines, create_engine
from ssmgen.model import SaShiMi

RATE = 16000


def _has_backend(name: str) -> bool:
    try:
        backends.get(name)
        return True
    except Exception:
        return False


def bench_prompt(model: SaShiMi, seconds: float, repeats: int) -> float:
    tokens = torch.randint(0, 256, (1, int(seconds * RATE)))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model.forward_with_state(tokens, model.initial_state(1), logits=False)  # as continue
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_engine(model: SaShiMi, engine: str, batch: int, seconds: float, repeats: int):
    eng = create_engine(engine, model, batch, "cpu")
    with torch.no_grad():
        _, state = model.forward_with_state(torch.randint(0, 256, (batch, 1003)),
                                            model.initial_state(batch))
    first = np.zeros(batch, np.int64)
    t = time.perf_counter()
    eng.generate(state, first, 16, Sampler(seed=0, batch_size=batch))  # compile / warm up
    warm = time.perf_counter() - t
    n = max(16, int(seconds * RATE))
    rates = []
    for r in range(repeats):
        sampler = Sampler(seed=r, batch_size=batch)
        t = time.perf_counter()
        eng.generate(state, first, n, sampler)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="*", default=None, help="default: all available")
    ap.add_argument("--presets", nargs="*", default=["ablated", "sashimi"])
    ap.add_argument("--backends", nargs="*", default=["s4d", "s4", "mamba"])
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--seconds", type=float, default=2.0, help="audio generated per run")
    ap.add_argument("--torch-seconds", type=float, default=0.25,
                    help="audio per run for the (slow) torch engine")
    ap.add_argument("--prompt-seconds", type=float, default=8.0, help="0 skips the prompt read")
    ap.add_argument("--prompt-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = args.engines or available_engines("cpu")
    print(f"torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'preset':8} {'backend':7} {'engine':9} {'batch':>5} {'samples/s':>10} "
          f"{'x real time':>11} {'aggregate':>9} {'first call s':>12}")
    for preset in args.presets:
        for name in args.backends:
            if not _has_backend(name):
                print(f"{preset:8} {name:7} (backend not present: skipped)")
                continue
            torch.manual_seed(0)
            model = SaShiMi(load_config(preset, backend=name).model).eval()
            if args.prompt_seconds > 0:
                pr = bench_prompt(model, args.prompt_seconds, args.prompt_repeats or args.repeats)
                print(f"{preset:8} {name:7} prompt read {args.prompt_seconds:g} s: {pr:.3f} s",
                      flush=True)
            for engine in engines:
                for batch in args.batch:
                    secs = args.torch_seconds if engine == "torch" else args.seconds
                    try:
                        rate, warm = bench_engine(model, engine, batch, secs, args.repeats)
                    except NotImplementedError as e:
                        print(f"{preset:8} {name:7} {engine:9} {batch:5d} unsupported: {e}")
                        continue
                    print(f"{preset:8} {name:7} {engine:9} {batch:5d} {rate:10.0f} "
                          f"{rate / RATE:10.3f}x {batch * rate / RATE:8.3f}x {warm:12.2f}",
                          flush=True)


if __name__ == "__main__":
    main()
