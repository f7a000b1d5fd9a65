"""The page of a training run: `runs/NAME/index.html`, rewritten at each validation.

- What the run is: preset, backend, recipe, the dataset and its hours, the latest speed.
- The curves (inline SVG with axes, ticks and units: training steps against bits per sample),
  with the classical LPC coder's line for this dataset's validation split (`ssmgen.classical`,
  computed once and cached in the run folder) drawn across them.
- One listening clip per validation (a short continuation of a fixed validation prompt), each with
  a waveform and a spectrogram picture (PNG files beside the clip) and the seam marked.

No scripts, no external files: it opens from disk in any browser.
"""

from __future__ import annotations

import copy
import csv
import html
import json
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from ssmgen.atomic import write_bytes
from ssmgen.audio import atomic_write_text, decode, write_wav
from ssmgen.config import crops_text
from ssmgen.listen import spectrogram_png, waveform_png

BLUE, RED, GREY = "#1f77b4", "#d62728", "#555"


def write_listening_sample(run: Path, model, dataset, cfg, step: int, device) -> Path:
    """Continue the first `prompt_seconds` of the validation split (the train split if there is no
    validation audio) by `sample_seconds`; write prompt + continuation to samples/step_N.wav, its
    seam (samples/step_N.json) and its pictures (step_N.wave.png, step_N.spec.png)."""
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
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {"step": step, "rate": rate, "prompt_samples": n_prompt, "new_samples": n_new,
         "split": split, "temperature": 1.0, "seed": 0}))
    _write_pictures(path, audio, n_prompt, rate)
    return path


def _pictures(wav: Path) -> tuple[Path, Path]:
    return wav.with_suffix(".wave.png"), wav.with_suffix(".spec.png")


def _write_pictures(wav: Path, audio: np.ndarray, seam: int | None, rate: int) -> None:
    wave, spec = _pictures(wav)
    write_bytes(wave, waveform_png(audio, seam))
    write_bytes(spec, spectrogram_png(audio, seam, rate))


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- the curves -----------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten), the first at or below `lo`,
    the last at or above `hi`: the axis runs from the first to the last."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    count = int(round((last - first) / step))
    return [round(first + i * step, 12) for i in range(count + 1)]


def _duration(hours: float) -> str:
    return (f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 1
            else f"{hours * 3600:.1f} s")


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:g}"


def chart(rows: list[dict], classical: dict | None = None, width: int = 720,
          height: int = 320) -> str:
    """Inline SVG: train and validation bits per sample against the training step, with axes,
    ticks and units, and the classical coder's line if given."""
    series = {"train": [(float(r["step"]), float(r["train_bpb"])) for r in rows
                        if r.get("train_bpb")],
              "val": [(float(r["step"]), float(r["val_bpb"])) for r in rows if r.get("val_bpb")]}
    pts = [p for s in series.values() for p in s]
    if not pts:
        return "<p>No metrics yet.</p>"
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + ([classical["bpb"]] if classical else [])
    xt = nice_ticks(min(0.0, min(xs)), max(xs) if max(xs) > 0 else 1.0)
    yt = nice_ticks(min(ys), max(ys), 6)
    x0, x1 = xt[0], xt[-1]
    y0, y1 = yt[0], yt[-1]
    left, right, top, bottom = 64, 20, 28, 48
    pw, ph = width - left - right, height - top - bottom

    def X(v: float) -> float:
        return left + (v - x0) / ((x1 - x0) or 1) * pw

    def Y(v: float) -> float:
        return top + ph - (v - y0) / ((y1 - y0) or 1) * ph

    parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" '
             'stroke="#999"/>']
    for v in yt:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" '
                     f'stroke="#eee"/><text x="{left - 6}" y="{Y(v) + 4:.1f}" '
                     f'text-anchor="end">{_fmt(v)}</text>')
    for v in xt:
        parts.append(f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{top + ph}" y2="{top + ph + 5}" '
                     f'stroke="#999"/><text x="{X(v):.1f}" y="{top + ph + 18}" '
                     f'text-anchor="middle">{_fmt(v)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">training '
                 'step</text>')
    parts.append(f'<text transform="translate(16,{top + ph / 2}) rotate(-90)" '
                 'text-anchor="middle">bits per sample</text>')
    if classical:
        y = Y(classical["bpb"])
        parts.append(f'<line id="classical" x1="{left}" x2="{left + pw}" y1="{y:.1f}" '
                     f'y2="{y:.1f}" stroke="{GREY}" stroke-width="1.5" stroke-dasharray="6 4"/>'
                     f'<text x="{left + pw - 4}" y="{y - 5:.1f}" text-anchor="end" '
                     f'fill="{GREY}">classical LPC coder: {classical["bpb"]:.3f}</text>')
    for (name, pts_), colour in zip(series.items(), (BLUE, RED)):
        if not pts_:
            continue
        line = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts_)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{line}"/>')
        if name == "val":
            parts += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{colour}"/>'
                      for x, y in pts_]
    parts.append(f'<text x="{left + 8}" y="18" fill="{BLUE}">train (last steps\' loss)</text>'
                 f'<text x="{left + 190}" y="18" fill="{RED}">validation</text>')
    return (f'<svg id="curves" width="{width}" height="{height}" font-size="12" '
            f'font-family="sans-serif" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}'
            '</svg>')


# --- the page -------------------------------------------------------------------------------------

def _settings(run: Path, rows: list[dict], classical: dict | None) -> str:
    marker = run / "run.json"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    cfg = info.get("config") or {}
    train = cfg.get("train") or {}
    hours = "-"
    try:
        manifest = json.loads((Path(info.get("dataset", "")) / "manifest.json").read_text(
            encoding="utf-8"))
        h = {k: float(v.get("hours", 0)) for k, v in manifest.get("splits", {}).items()}
        hours = (f"{_duration(sum(h.values()))} of audio ("
                 + ", ".join(f"{k} {_duration(v)}" for k, v in h.items()) + ")")
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    speed = next((r["samples_per_s"] for r in reversed(rows) if r.get("samples_per_s")), "")
    crops = crops_text(train.get("batch_size"), train.get("sample_len"), train.get("carry_crops"))
    items = [("preset", info.get("preset")), ("backend", info.get("backend")),
             ("recipe", f"{info.get('recipe')} ({crops}, lr {train.get('lr')})"),
             ("dataset", f"{info.get('dataset')}: {hours}"),
             ("speed", f"{float(speed):,.0f} samples/s (training, latest)" if speed else "-"),
             ("steps so far", rows[-1]["step"] if rows else "0")]
    if classical:
        items.append(("classical coder", f"{classical['bpb']:.3f} bits per sample on the "
                      f"validation split (LPC order {classical['order']}, {classical['dist']} "
                      f"residual, running scale over {classical['window']} samples; fitted on "
                      "train)"))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items)
    return (f'<table id="settings">{body}</table><details><summary>every setting (run.json)'
            f'</summary><pre>{html.escape(json.dumps(info, indent=2))}</pre></details>')


def _clip(run: Path, wav: Path, val: str) -> str:
    step = int(wav.stem.split("_")[1])
    seam, rate = None, None
    try:
        meta = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
        seam, rate = int(meta["prompt_samples"]), int(meta["rate"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    wave, spec = _pictures(wav)
    if not (wave.is_file() and spec.is_file()):  # a clip from before pictures: draw them now
        try:
            audio, file_rate = sf.read(os.fsencode(wav), dtype="float32")
            _write_pictures(wav, audio, seam, rate or file_rate)
            rate = rate or file_rate
        except (OSError, RuntimeError, sf.LibsndfileError):
            pass
    caption = ""
    if seam is not None and rate:
        caption = f" the prompt ends at {seam / rate:.2f} s (red line)"
    pics = "".join(f'<img class="{c}" alt="{c}" src="samples/{html.escape(p.name)}">'
                   for c, p in (("wave", wave), ("spec", spec)) if p.is_file())
    return (f'<li><b>step {step}</b> (val bits per sample {html.escape(val)});{caption}<br>'
            f'<audio controls preload="none" src="samples/{html.escape(wav.name)}"></audio>'
            f'{pics}</li>')


STYLE = """body{font-family:sans-serif;max-width:780px;margin:2em auto;padding:0 1em}
li{margin:1em 0} img{display:block;width:100%;max-width:720px;margin-top:2px}
#settings th{text-align:left;padding-right:1em;vertical-align:top} audio{width:100%;max-width:720px}
"""


def write_index(run: Path, classical: dict | None = None) -> Path:
    """(Re)write run/index.html from run/metrics.csv, run/run.json and run/samples/*.wav;
    `classical`: the classical coder's line to draw (`ssmgen.classical.classical_line`)."""
    run = Path(run)
    rows = _read_metrics(run / "metrics.csv")
    by_step = {int(r["step"]): r for r in rows}
    items = [_clip(run, wav, by_step.get(int(wav.stem.split("_")[1]), {}).get("val_bpb") or "-")
             for wav in sorted((run / "samples").glob("step_*.wav"))]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ssmgen run {html.escape(run.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Run {html.escape(run.name)}</h1>
{_settings(run, rows, classical)}
<h2>Curves</h2>
<p>Bits per sample (cross-entropy of the next 8-bit sample; lower is better) against the training
step. The dashed line is a classical linear-prediction coder on the same validation samples: a
model below it has learned more than linear prediction.</p>
{chart(rows, classical)}
<h2>Listen</h2>
<p>Each clip: a fixed validation prompt, then the model's continuation at that step (temperature
1, seed 0). Pictures: waveform (prompt blue, continuation orange) and spectrogram; the red line is
the seam.</p>
<ol id="samples">{''.join(items) or '<li>No samples yet.</li>'}</ol>
</body></html>
"""
    return atomic_write_text(run / "index.html", page)
