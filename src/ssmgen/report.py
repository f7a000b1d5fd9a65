"""The listening page of a training run: `runs/NAME/index.html`, one audio player per validation
(a short continuation of a fixed validation prompt) and the loss / bpb curves as inline SVG. No
scripts, no external files: it opens from disk in any browser.
"""

from __future__ import annotations

import copy
import csv
import html
from pathlib import Path

import numpy as np

from ssmgen.audio import atomic_write_text, decode, write_wav


def write_listening_sample(run: Path, model, dataset, cfg, step: int, device) -> Path:
    """Continue the first `prompt_seconds` of the validation split (the train split if there is no
    validation audio) by `sample_seconds`; write prompt + continuation to samples/step_N.wav."""
    from ssmgen.generate.continuation import continue_tokens

    split = "val" if dataset.split_samples("val") else "train"
    segs = dataset.segments(split)
    rate = dataset.rate
    n_prompt = min(int(cfg.train.prompt_seconds * rate), segs[0].length)
    prompt = np.asarray(dataset.tokens(split)[segs[0].offset: segs[0].offset + n_prompt],
                        dtype=np.int64)[None]
    n_new = int(cfg.train.sample_seconds * rate)
    if next(model.parameters()).device.type != "cpu":
        # a few seconds of audio: the CPU's compiled engine beats eager GPU steps by far
        model = copy.deepcopy(model).cpu()
    new = continue_tokens(model, prompt, n_new, temperature=1.0, seed=0, engine="auto")
    audio = decode(np.concatenate([prompt[0], new[0]]).astype(np.uint8),
                   dataset.data_format()["encoding"])
    path = run / "samples" / f"step_{step:07d}.wav"
    write_wav(path, audio, rate)
    return path


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _polyline(points: list[tuple[float, float]], box: tuple[float, float, float, float],
              color: str) -> str:
    x0, x1, y0, y1 = box
    w, h, pad = 640, 240, 40
    sx = (w - 2 * pad) / ((x1 - x0) or 1)
    sy = (h - 2 * pad) / ((y1 - y0) or 1)
    pts = " ".join(f"{pad + (x - x0) * sx:.1f},{h - pad - (y - y0) * sy:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>'


def _chart(rows: list[dict]) -> str:
    series = {"train bpb": [(float(r["step"]), float(r["train_bpb"])) for r in rows
                            if r["train_bpb"]],
              "val bpb": [(float(r["step"]), float(r["val_bpb"])) for r in rows if r["val_bpb"]]}
    pts = [p for s in series.values() for p in s]
    if not pts:
        return "<p>No metrics yet.</p>"
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    box = (min(xs), max(xs), min(ys), max(ys))
    lines = "".join(_polyline(s, box, c) for s, c in zip(series.values(), ("#1f77b4", "#d62728")))
    legend = (f'<text x="50" y="20" fill="#1f77b4">train bpb</text>'
              f'<text x="150" y="20" fill="#d62728">val bpb</text>'
              f'<text x="50" y="235" font-size="11">step {box[0]:.0f} .. {box[1]:.0f}; '
              f'bpb {box[2]:.3f} .. {box[3]:.3f}</text>')
    return (f'<svg id="curves" width="640" height="240" xmlns="http://www.w3.org/2000/svg" '
            f'style="border:1px solid #ccc">{lines}{legend}</svg>')


def write_index(run: Path) -> Path:
    """(Re)write run/index.html from run/metrics.csv and run/samples/*.wav."""
    run = Path(run)
    rows = _read_metrics(run / "metrics.csv")
    by_step = {int(r["step"]): r for r in rows}
    items = []
    for wav in sorted((run / "samples").glob("step_*.wav")):
        step = int(wav.stem.split("_")[1])
        val = by_step.get(step, {}).get("val_bpb") or "-"
        items.append(f'<li><b>step {step}</b> (val bpb {html.escape(val)})<br>'
                     f'<audio controls preload="none" src="samples/{html.escape(wav.name)}">'
                     f'</audio></li>')
    config = ""
    marker = run / "run.json"  # how the run was started (workspace.mark_run)
    if marker.exists():
        config = f"<h2>Settings</h2><pre>{html.escape(marker.read_text())}</pre>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ssmgen run {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:760px;margin:2em auto}} li{{margin:.8em 0}}</style>
</head><body>
<h1>Run {html.escape(run.name)}</h1>
<h2>Curves</h2>
{_chart(rows)}
<h2>Listen</h2>
<p>Each clip: a fixed validation prompt, then the model's continuation at that step.</p>
<ol id="samples">{''.join(items) or '<li>No samples yet.</li>'}</ol>
{config}
</body></html>
"""
    return atomic_write_text(run / "index.html", page)
