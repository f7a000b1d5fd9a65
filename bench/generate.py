"""Generation speed: samples/s and real-time factor (16000 samples/s = 1.0x) per engine, preset,
backend and batch size, and the time to read an 8 s prompt (`model.forward_with_state`).

    .venv/bin/python bench/generate.py                       # everything available
    .venv/bin/python bench/generate.py --engines cpu-fast --presets ablated --batch 1 --seconds 2
    .venv/bin/python bench/generate.py --engines torch --presets ablated --backends s4d --batch 1 \
        --threads 1 --prompt-seconds 0 --set model.ordinal_input=false model.ordinal_output=false
    python3 bench/generate.py --device cuda --engines torch cuda-graph --batch 1 32 \
        --run-seconds 0.4 --repeats 2 --jsonl speed.jsonl   # the GPU check's call

Weights are random (speed does not depend on them). Each figure is the median of --repeats runs
(default 3); the first call (numba compile or cache load for cpu-fast, graph capture for
cuda-graph, cuDNN/cuFFT plans on a GPU) is timed apart. With --run-seconds, each run generates
only as many samples as fit in about that much wall time (at most --seconds of audio), so a slow
configuration cannot eat a fixed time slot. A measurement that fails is reported, the others
still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np
import torch

from ssmgen import backends
from ssmgen.config import load_config
from ssmgen.generate import Sampler, available_engines, create_engine
from ssmgen.model import SaShiMi

RATE = 16000
WARM = 64  # first-call samples: from the odd prompt phase, this reaches and replays a whole frame


def _has_backend(name: str) -> bool:
    try:
        backends.get(name)
        return True
    except Exception:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_prompt(model: SaShiMi, seconds: float, repeats: int, device: torch.device) -> float:
    tokens = torch.randint(0, 256, (1, int(seconds * RATE)), device=device)
    times = []
    with torch.no_grad():
        # one untimed read first: cuFFT plans and the backends' kernel caches are per length
        model.forward_with_state(tokens, model.initial_state(1), logits=False)
        _sync(device)
        for _ in range(repeats):
            t = time.perf_counter()
            model.forward_with_state(tokens, model.initial_state(1), logits=False)  # as continue
            _sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_engine(model: SaShiMi, engine: str, batch: int, seconds: float, repeats: int,
                 device: torch.device,
                 run_seconds: float | None = None) -> tuple[float, float, int]:
    """(median samples/s per stream, first-call seconds, samples per timed run)."""
    eng = create_engine(engine, model, batch, device)
    with torch.no_grad():  # prompt of odd length: eager steps up to a frame boundary, as continue
        _, state = model.forward_with_state(torch.randint(0, 256, (batch, 1003), device=device),
                                            model.initial_state(batch))
    first = np.zeros(batch, np.int64)
    t = time.perf_counter()
    eng.generate(state, first, WARM, Sampler(seed=0, batch_size=batch))  # compile / capture
    _sync(device)
    warm = time.perf_counter() - t
    n = max(16, int(seconds * RATE))
    if run_seconds:  # size the runs by a steady-state pilot
        t = time.perf_counter()
        eng.generate(state, first, WARM, Sampler(seed=1, batch_size=batch))
        _sync(device)
        pilot = WARM / (time.perf_counter() - t)
        n = min(n, max(WARM, int(pilot * run_seconds)))
    rates = []
    for r in range(repeats):
        sampler = Sampler(seed=r, batch_size=batch)
        t = time.perf_counter()
        eng.generate(state, first, n, sampler)  # returns host tokens: the work is done
        _sync(device)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), warm, n


def _emit(path: str | None, row: dict) -> None:
    """One JSON line per measurement, written as it is made: a killed run keeps what it measured."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="*", default=None, help="default: all available")
    ap.add_argument("--presets", nargs="*", default=["ablated", "sashimi"])
    ap.add_argument("--backends", nargs="*", default=["s4d", "s4", "mamba"])
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seconds", type=float, default=2.0, help="audio generated per run")
    ap.add_argument("--torch-seconds", type=float, default=0.25,
                    help="audio per run for the (slow) torch engine")
    ap.add_argument("--run-seconds", type=float, default=None,
                    help="wall time per run: fewer samples than --seconds where that is slow")
    ap.add_argument("--prompt-seconds", type=float, default=8.0, help="0 skips the prompt read")
    ap.add_argument("--prompt-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every model, as train's --set")
    ap.add_argument("--jsonl", default=None, help="append one JSON line per measurement here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    engines = args.engines or available_engines(device)
    failed = 0
    print(f"device {device}; torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'preset':8} {'backend':7} {'engine':10} {'batch':>5} {'samples/s':>10} "
          f"{'x real time':>11} {'aggregate':>9} {'first call s':>12}")
    for preset in args.presets:
        for name in args.backends:
            if not _has_backend(name):
                print(f"{preset:8} {name:7} (backend not present: skipped)")
                continue
            torch.manual_seed(0)
            cfg = load_config(preset, backend=name, overrides=args.set)
            model = SaShiMi(cfg.model).to(device).eval()
            if args.prompt_seconds > 0:
                row = {"kind": "prompt", "preset": preset, "backend": name,
                       "device": str(device), "prompt_seconds": args.prompt_seconds}
                try:
                    pr = bench_prompt(model, args.prompt_seconds,
                                      args.prompt_repeats or args.repeats, device)
                    row["read_s"] = pr
                    print(f"{preset:8} {name:7} prompt read {args.prompt_seconds:g} s: {pr:.3f} s",
                          flush=True)
                except Exception as e:  # reported, and the engines are still measured
                    failed += 1
                    row["error"] = f"{type(e).__name__}: {e}"
                    print(f"{preset:8} {name:7} prompt read failed: {row['error']}", flush=True)
                _emit(args.jsonl, row)
            for engine in engines:
                for batch in args.batch:
                    secs = args.torch_seconds if engine == "torch" else args.seconds
                    row = {"kind": "generate", "preset": preset, "backend": name,
                           "engine": engine, "batch": batch, "device": str(device)}
                    try:
                        rate, warm, n = bench_engine(model, engine, batch, secs, args.repeats,
                                                     device, args.run_seconds)
                    except Exception as e:  # one failing configuration must not hide the rest
                        failed += 1
                        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                        rate = None
                    if rate is None:
                        print(f"{preset:8} {name:7} {engine:10} {batch:5d} failed: {row['error']}",
                              flush=True)
                        _emit(args.jsonl, row)
                        if device.type == "cuda":  # after the except block, whose traceback
                            gc.collect()           # held the failed run's tensors
                            torch.cuda.empty_cache()
                        continue
                    row.update(samples_per_s=rate, realtime=rate / RATE,
                               aggregate=batch * rate / RATE, first_call_s=warm, samples=n)
                    _emit(args.jsonl, row)
                    print(f"{preset:8} {name:7} {engine:10} {batch:5d} {rate:10.0f} "
                          f"{rate / RATE:10.3f}x {batch * rate / RATE:8.3f}x {warm:12.2f}",
                          flush=True)
            del model
    if failed:
        print(f"{failed} measurement(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
