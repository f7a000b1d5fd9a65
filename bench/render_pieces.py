#!/usr/bin/env python3
"""Render more public-domain pieces, the way ../shared/data/pieces was rendered, for training
data whose licence lets us ship a model trained on it (issue 19: "the rendered pieces, more of
them").

The renderer is ../shared/data/make_piano_set.py's own `render` (music21's bundled scores turned
into MIDI with an instrument, a tempo and varied velocities, synthesized by FluidSynth with the
FluidR3 GM soundfont, mixed to mono, 16 kHz, peak -1 dBFS, 16-bit FLAC; deterministic), imported
from there, not copied. This script only chooses the scores: Bach chorales that are not in
pieces/ (most on piano, some on organ, strings and guitar, in a fixed order), one more piano
piece, and two early Mozart string quartets. The held-out prompt's piece (Clara Schumann's
polonaise op. 1 no. 3, example_prompt.flac) is never rendered.

Needs what make_piano_set.py needs: the Debian packages fluidsynth fluid-soundfont-gm sox
libsox-fmt-all and `pip install music21` (not a dependency of ssmgen; a separate environment
will do).

    python bench/render_pieces.py --out more_pieces [--shared ../shared] [--chorales 70]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HELD_OUT = "schumann_clara/polonaise_op1n3"  # example_prompt.flac: never trained on
KEYBOARD = [  # (file name, corpus id, tempo in quarter notes per minute)
    ("clara_schumann_polonaise_op1_no4_piano", "schumann_clara/polonaise_op1n4", 108),
]
QUARTETS = [f"mozart/k155/movement{i}.mxl" for i in (1, 2, 3)] + \
           [f"mozart/k156/movement{i}.mxl" for i in (1, 2, 3, 4)]
# instrumentation of the n-th chorale: piano for most, as in pieces/ (13 of its 20 are piano)
CYCLE = ["piano", "piano", "piano", "organ", "piano", "strings", "piano", "guitar"]
# a render takes seconds; one that runs on (fluidsynth sometimes never reaches a MIDI file's end,
# writing gigabytes) is stopped, its process group killed and its temporary files removed
TIMEOUT_S = 90


def load_renderer(shared: Path):
    path = shared / "data" / "make_piano_set.py"
    if not path.is_file():
        sys.exit(f"{path}: not found (--shared names the folder that holds data/make_piano_set.py)")
    spec = importlib.util.spec_from_file_location("make_piano_set", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chorales(known: set[str], n: int) -> list[str]:
    """The first `n` chorale ids of the corpus (sorted by BWV number), skipping those pieces/
    already holds."""
    from music21 import corpus

    ids = set()
    for p in corpus.corpora.CoreCorpus().getPaths():
        rel = str(p).split("/corpus/")[1]
        if re.fullmatch(r"bach/bwv\d+\.\d+\.mxl", rel):
            ids.add(rel[: -len(".mxl")])
    order = sorted(ids, key=lambda s: tuple(int(x) for x in s[len("bach/bwv"):].split(".")))
    return [c for c in order if c not in known][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the .flac files")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--chorales", type=int, default=70, help="how many more chorales")
    args = ap.parse_args()
    if not 0 <= args.chorales <= 1000:
        ap.error(f"--chorales {args.chorales}: expected 0 to 1000")
    known = {pid for _, pid, _, _ in load_renderer(args.shared).PIECES}
    jobs = [(name, pid, "piano", bpm) for name, pid, bpm in KEYBOARD]
    for i, pid in enumerate(chorales(known, args.chorales)):
        kind = CYCLE[i % len(CYCLE)]
        jobs.append((f"bach_chorale_{pid.split('/')[1]}_{kind}", pid, kind, 76))
    for pid in QUARTETS:
        k, mvt = pid.split("/")[1], pid.split("/")[2][: -len(".mxl")]
        jobs.append((f"mozart_quartet_{k}_{mvt}", pid, "string quartet", 100))
    assert HELD_OUT not in {pid for _, pid, _, _ in jobs}
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for name, pid, kind, bpm in jobs:
        out = args.out / f"{name}.flac"
        if out.exists():
            continue
        secs = render_one(args.shared, name, pid, kind, bpm, out)
        if secs is not None:
            total += secs
            print(f"| {name}.flac | {pid} | {kind} | {bpm} | {secs:.1f} |", flush=True)
    print(f"rendered {total / 60:.1f} min into {args.out}")


def render_one(shared: Path, name: str, pid: str, kind: str, bpm: int, out: Path) -> float | None:
    """Render one piece in a child process with its own temporary folder and process group,
    stopped after TIMEOUT_S; its length in seconds, or None (said on stdout) when it failed."""
    partial = Path(str(out) + ".tmp.flac")  # where the renderer writes before its rename
    if partial.exists():  # not ours to overwrite or remove
        print(f"{pid}: skipped ({partial} exists)", flush=True)
        return None
    tmp = Path(tempfile.mkdtemp(prefix="render-"))
    cmd = [sys.executable, __file__, "--one", name, pid, kind, str(bpm), "--out", str(out),
           "--shared", str(shared)]
    proc = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        stdout, stderr = "", f"still rendering after {TIMEOUT_S} s"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0 or not out.exists():
        why = (stderr.strip().splitlines() or ["failed"])[-1]
        print(f"{pid}: skipped ({why})", flush=True)
        partial.unlink(missing_ok=True)  # a render of ours that died half way
        return None
    return float(stdout.strip().splitlines()[-1])


def child(argv: list[str]) -> None:
    """--one NAME PID KIND BPM --out FILE --shared DIR: render one piece, print its seconds."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shared", type=Path)
    a = ap.parse_args(argv)
    name, pid, kind, bpm = a.one
    mps = load_renderer(a.shared)
    print(mps.render(name, pid, kind, float(bpm), str(a.out), mps.DEFAULT_SF2))


if __name__ == "__main__":
    if "--one" in sys.argv:
        child(sys.argv[1:])
    else:
        main()
