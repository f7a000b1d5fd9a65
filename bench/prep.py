"""Benchmark `ssmgen prep`: throughput in audio-seconds per wall-second (x real time) and peak RSS
of the whole process tree, median of 3 runs, on a folder of music (default: ../shared/data/pieces)
and on a synthesized 1-hour 44.1 kHz stereo WAV. Prints markdown rows for docs/benchmarks.md.

    .venv/bin/python bench/prep.py [FOLDER] [--runs 3] [--jobs N] [--no-hour]

Each run is a fresh process (so RSS is per run) preparing into a fresh folder (no reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys, time
from ssmgen.prep import prepare
src, out, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
m = prepare(src, out, jobs=jobs, progress=False)
wall = time.perf_counter() - t
kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"wall": wall, "audio_s": sum(f["duration"] for f in m["files"]),
                  "rss_mib": kib / 1024,
                  "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_once(src: Path, jobs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ssmgen-bench-") as tmp:
        r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "data"),
                            str(jobs)], capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])


def bench(label: str, src: Path, runs: int, jobs: int) -> str:
    results = [run_once(src, jobs) for _ in range(runs)]
    walls = [r["wall"] for r in results]
    med = statistics.median(walls)
    audio = results[0]["audio_s"]
    rss = max(r["rss_mib"] for r in results)
    return (f"| {label} | {audio / 60:.1f} min | {jobs} | {med:.2f} s "
            f"({', '.join(f'{w:.2f}' for w in walls)}) | {audio / med:.0f}x | {rss:.0f} MiB |")


def make_hour(folder: Path) -> Path:
    """A 1-hour 44.1 kHz stereo 16-bit WAV (635 MB), written in blocks."""
    import numpy as np
    import soundfile as sf

    path = folder / "hour" / "one hour.wav"
    path.parent.mkdir(parents=True)
    rate, block = 44100, 44100 * 10
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, 2, "PCM_16") as f:
        for i in range(360):
            t = (np.arange(block) + i * block) / rate
            x = 0.3 * np.sin(2 * np.pi * 220 * (1 + (i % 12) / 12) * t)
            x += 0.05 * rng.standard_normal(block)
            f.write(np.stack([x, 0.8 * x], axis=1).astype(np.float32))
    return path.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(ROOT.parent / "shared" / "data" / "pieces"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-hour", action="store_true", help="skip the 1-hour WAV")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print("| input | audio | jobs | wall, median of runs | speed | peak RSS (process tree) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(bench(Path(args.folder).name, Path(args.folder), args.runs, args.jobs), flush=True)
    if not args.no_hour:
        with tempfile.TemporaryDirectory(prefix="ssmgen-bench-hour-") as tmp:
            print(bench("1 h 44.1 kHz stereo WAV", make_hour(Path(tmp)), args.runs, args.jobs),
                  flush=True)


if __name__ == "__main__":
    main()
