"""Training benchmark: samples/s and peak memory of whole training steps (forward, backward,
AdamW) for presets x backends. Run by hand:
`python bench/train.py [--presets ablated sashimi] [--backends s4 s4d mamba]
[--batch 4 --length 4096] [--carry 1]`.
Prints markdown rows for docs/benchmarks.md (median of --repeats timed steps after a warm-up).

Without --batch / --length each preset is timed with the recipe `ssmgen train --preset P` uses
on the device (`load_config`, as the command line calls it: the cpu recipe's 8 x 2048 with
carried states on a CPU, the gpu recipe's 131072-sample crops, as many as fit, on CUDA), with bf16
autocast on CUDA as `ssmgen train` does (`train.amp`). With carried states (train.carry_crops > 1,
or --carry N) each step reads its crops from a non-zero state, as training does. On CPU each
measurement runs in its own process, so its peak RSS is its own; on CUDA they share one (peak GPU
memory is reset per measurement). A failing measurement (e.g. out of memory) is reported, the
others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def recipe(preset: str, backend: str, batch: int | None = None, length: int | None = None,
           device: str = "auto", carry: int | None = None):
    """The config `ssmgen train --preset PRESET --backend BACKEND [--batch-size] [--sample-len]`
    trains with on `device` (cli.train builds it with load_config in the same way: the recipe
    follows the device)."""
    from ssmgen.config import load_config

    overrides = [f"train.device={device}"]
    overrides += [f"train.batch_size={batch}"] if batch else []
    # trained at this length: S4 parameterizes its C for it (model.seq_len follows sample_len)
    overrides += [f"train.sample_len={length}"] if length else []
    overrides += [f"train.carry_crops={carry}"] if carry else []
    return load_config(preset, backend=backend, overrides=overrides)


def one(preset: str, backend: str, batch: int | None, length: int | None, repeats: int,
        device: str, amp: str | None = None, max_seconds: float = 3.0,
        carry: int | None = None) -> dict:
    from ssmgen.model import SaShiMi
    from ssmgen.optim import make_optimizer

    cfg = recipe(preset, backend, batch, length, device, carry)
    model = SaShiMi(cfg.model).to(device)
    if cfg.train.batch_size == "auto":  # the gpu recipe: as many crops as fit, as train() does
        from ssmgen.model import count_parameters
        from ssmgen.sizing import auto_batch
        cfg.train.batch_size = auto_batch(cfg, count_parameters(model), torch.device(device), 1)
    batch, length = cfg.train.batch_size, cfg.train.sample_len
    amp = amp or cfg.train.amp
    bf16 = device == "cuda" and amp in ("auto", "bf16")  # as ssmgen.train picks it
    opt = make_optimizer(model, cfg)
    x_host = torch.randint(0, 256, (batch, length))
    state = None
    if cfg.train.carry_crops > 1:  # a state carried from a previous crop, as training has it
        with torch.no_grad():
            _, state = model(x_host.to(device), model.initial_state(batch, device))
        state = model.restart_rows(state, torch.zeros(batch, dtype=torch.bool, device=device))

    def step():  # ssmgen.train's step: crops to the device, autocast forward, fp32 loss, clip
        x = x_host.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = model(x) if state is None else model(x, state)[0]
        loss = F.cross_entropy(logits.float().reshape(-1, 256), x.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        return loss.item()  # the loop reads the loss every step (a sync on CUDA)

    t = time.perf_counter()
    step()  # first step: kernels, cuFFT plans, optimizer state
    first = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()
    one_step = time.perf_counter() - t
    # no more timed steps than fit in about max_seconds, but at least 2
    times = [one_step] + [0.0] * max(1, min(repeats, int(max_seconds / max(one_step, 1e-6))) - 1)
    for i in range(1, len(times)):
        t = time.perf_counter()
        step()
        times[i] = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"sps": batch * length / statistics.median(times), "peak_mb": peak, "batch": batch,
            "length": length, "carry": cfg.train.carry_crops, "amp": "bf16" if bf16 else "fp32",
            "steps": len(times), "first_step_s": first}


def _emit(path: str | None, row: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="*", default=["ablated", "sashimi"])
    ap.add_argument("--backends", nargs="*", default=["s4", "s4d", "mamba"])
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's recipe")
    ap.add_argument("--length", type=int, default=None, help="default: the preset's recipe")
    ap.add_argument("--carry", type=int, default=None,
                    help="train.carry_crops (1: every crop from a fresh state); default: the "
                    "recipe's")
    ap.add_argument("--amp", choices=["auto", "bf16", "off"], default=None,
                    help="default: the preset's train.amp (auto: bf16 on CUDA)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=3.0,
                    help="fewer timed steps than --repeats where steps are slow (at least 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jsonl", default=None, help="append one JSON line per measurement here")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one measurement, so peak RSS is its own
        print(json.dumps(one(*args.one, args.batch, args.length, args.repeats, args.device,
                             args.amp, args.max_seconds, args.carry)))
        return
    print(f"# device {args.device}, {torch.get_num_threads()} threads, median of up to "
          f"{args.repeats} steps")
    print("| preset | backend | batch x length | carried over | amp | samples/s | peak memory MB |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: |")
    failed = 0
    for preset in args.presets:
        for backend in args.backends:
            row = {"kind": "train", "preset": preset, "backend": backend, "device": args.device}
            try:
                if args.device == "cuda":
                    r = one(preset, backend, args.batch, args.length, args.repeats, args.device,
                            args.amp, args.max_seconds, args.carry)
                else:
                    cmd = [sys.executable, __file__, "--one", preset, backend, "--repeats",
                           str(args.repeats), "--device", args.device, "--max-seconds",
                           str(args.max_seconds)]
                    for flag, value in (("--batch", args.batch), ("--length", args.length),
                                        ("--amp", args.amp), ("--carry", args.carry)):
                        cmd += [flag, str(value)] if value else []
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        lines = out.stderr.strip().splitlines() or [f"exit {out.returncode}"]
                        raise RuntimeError(lines[-1])
                    r = json.loads(out.stdout.strip().splitlines()[-1])
            except Exception as e:  # e.g. out of memory: reported, the next one still runs
                failed += 1
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                r = None
            if r is None:
                _emit(args.jsonl, row)
                print(f"| {preset} | {backend} | | | | failed: {row['error']} | |", flush=True)
                if args.device == "cuda":  # out of the except block: its traceback held the
                    gc.collect()           # failed step's tensors
                    torch.cuda.empty_cache()
                continue
            row.update(samples_per_s=r["sps"], peak_mb=r["peak_mb"], batch=r["batch"],
                       length=r["length"], carry=r["carry"], amp=r["amp"], steps=r["steps"],
                       first_step_s=r["first_step_s"])
            _emit(args.jsonl, row)
            print(f"| {preset} | {backend} | {r['batch']} x {r['length']} | {r['carry']} | "
                  f"{r['amp']} | "
                  f"{r['sps']:,.0f} | {r['peak_mb']:,.0f} |", flush=True)
    if failed:
        print(f"{failed} measurement(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
