"""The comparison page of `ssmgen continue`: OUT.html beside the outputs, the prompt and every
variation with a player, a waveform and a spectrogram (the seam, where the prompt ends, in red),
its settings, seed and levels. One file with its pictures inline (PNG data URIs); the players read
the WAVs beside it by relative name. No script, nothing fetched: it opens from disk.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from ssmgen.atomic import write_text
from ssmgen.listen import data_uri
from ssmgen.validate import short_number as short

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
.meta{color:#555;font-size:.92em;margin:.2em 0}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}
th:nth-child(2),td:nth-child(2),th:last-child,td.notes{text-align:left}
.clip{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:1em 0}
.clip h3{font-size:1em;margin:.1em 0 .4em} .clip img{display:block;width:100%;max-width:720px}
.clip audio{width:100%;max-width:720px;margin:.3em 0}
.axis{display:flex;justify-content:space-between;max-width:720px;font-size:.8em;color:#666}
.warn{color:#b00020;font-weight:600} .ok{color:#2e7d32}
code{font-size:.8em;background:#f4f4f4;padding:.1em .3em;word-break:break-all}
.legend span{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin:0 .3em}
"""


def _src(target: str | Path, page: Path) -> str:
    """`target` as a relative URL from the page's folder (bytes of any file name kept)."""
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(page.parent))
    return quote(os.fsencode(rel))


def _e(text) -> str:
    return html.escape(str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _levels(lv: dict) -> str:
    flat = "-" if lv.get("flatness") is None else f"{lv['flatness']:.2f}"
    return f"{lv['rms_dbfs']:.1f} dBFS / {flat}"


def _axis(total_s: float, seam_s: float | None) -> str:
    middle = f"<span>seam {seam_s:.2f} s</span>" if seam_s is not None else ""
    return f'<div class="axis"><span>0 s</span>{middle}<span>{total_s:.2f} s</span></div>'


def _clip(anchor: str, title: str, src: str, pictures: tuple[bytes, bytes], total_s: float,
          seam_s: float | None, extra: str = "") -> str:
    wave, spec = pictures
    return (f'<div class="clip" id="{anchor}"><h3>{title}</h3>'
            f'<audio controls preload="none" src="{src}"></audio>'
            f'<img class="wave" alt="waveform" src="{data_uri(wave)}">'
            f'<img class="spec" alt="spectrogram" src="{data_uri(spec)}">'
            f'{_axis(total_s, seam_s)}{extra}</div>')


def write_page(path: Path, *, song: Path, prompt_file: Path, prompt_pictures: tuple[bytes, bytes],
               variations: list[dict], pictures: list[tuple[bytes, bytes]], prompt_levels: dict,
               force: bool, inputs: Iterable[Path]) -> Path:
    """Write the page (atomically, under the output rules: an existing file only with --force)."""
    path = Path(path)
    first = variations[0]
    rate = first["rate"]
    prompt_s = first["prompt_end_s"] - first["prompt_start_s"]
    total_s = prompt_s + first["seconds"]
    rows, clips = [], []
    for i, (v, pics) in enumerate(zip(variations, pictures)):
        lv = v["level"]
        notes = ("; ".join(lv["warnings"]) if lv["warnings"] else "")
        note_html = (f'<span class="warn">{_e(notes)}</span>' if notes else
                     '<span class="ok">ok</span>')
        name = Path(v["output"]).name
        gain = f'{lv["gain_db"]:+.1f}' if lv["match"] else "off"
        rows.append(f'<tr><td>{i + 1}</td><td><a href="#v{i + 1}">{_e(name)}</a></td>'
                    f'<td>{short(v["temperature"])}</td><td>{v["top_k"]}</td><td>{short(v["top_p"])}</td>'
                    f'<td>{v["seed"]}</td><td>{gain}</td>'
                    f'<td>{_levels(lv["continuation"])}</td><td class="notes">{note_html}</td>'
                    '</tr>')
        title = (f"{i + 1}. {_e(name)}: temperature {short(v['temperature'])}, top-k "
                 f"{v['top_k']}, top-p {short(v['top_p'])}, seed {v['seed']}")
        extra = (f'<p class="meta">new audio {_levels(lv["continuation"])} (prompt\'s last '
                 f'{lv["window_s"]:g} s: {_levels(lv["prompt"])}); level match '
                 f'{gain + " dB" if lv["match"] else "off"}. {note_html}</p>'
                 f'<p class="meta">alone: <code>{_e(v["reproduce"])}</code></p>')
        clips.append(_clip(f"v{i + 1}", title, _src(v["output"], path), pics, total_s, prompt_s,
                           extra))
    grid = first["grid"]
    settings = (f"temperature {', '.join(short(t) for t in grid['temperature'])}; top-k "
                f"{', '.join(str(k) for k in grid['top_k'])}; top-p "
                f"{', '.join(short(p) for p in grid['top_p'])}; {grid['num']} each "
                f"(seeds {grid['seed']}..{grid['seed'] + grid['num'] - 1})")
    kind = ("--join: the song up to the seam, then the continuation at the song's rate" if
            first["join"] else "--only-new: the new audio only" if first["only_new"] else
            "the prompt, then the continuation")
    ck = Path(first["checkpoint"])
    model_name = (f"{ck.parent.parent.name}/{ck.parent.name}/{ck.name}"
                  if ck.parent.name == "checkpoints" else ck.name)
    prompt_title = (f"Prompt: {_e(Path(prompt_file).name)} (its last "
                    f"{first['level']['window_s']:g} s: {_levels(prompt_levels)})")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Continuations of {_e(song.name)}</title><style>{STYLE}</style></head><body>
<h1>Continuations of {_e(song.name)}</h1>
<p class="meta">Model <span title="{_e(first["checkpoint"])}">{_e(model_name)}</span>
(step {first["step"]}),
engine {_e(first["engine"])};
prompt {first["prompt_start_s"]:.2f}-{first["prompt_end_s"]:.2f} s of the song, then
{first["seconds"]:g} s of new audio at {rate} Hz. {len(variations)} variation(s) in one batch:
{_e(settings)}.</p>
<p class="meta">Each file holds {_e(kind)}. The pictures show the prompt and the continuation as
the model hears them (mono, {rate} Hz); the <span style="color:#d62728">red line</span> is the
seam. Same seed, same audio: each variation's command below makes it alone, sample for sample.
Levels: RMS in dBFS and spectral flatness (0 tonal, 1 noise).</p>
<h2>Prompt</h2>
{_clip("prompt", prompt_title, _src(prompt_file, path), prompt_pictures, prompt_s, None)}
<h2>Variations</h2>
<table id="variations"><thead><tr><th>#</th><th>file</th><th>temp</th><th>top-k</th>
<th>top-p</th><th>seed</th><th>level match dB</th><th>new: dBFS / flatness</th><th>notes</th></tr>
</thead><tbody>{''.join(rows)}</tbody></table>
{''.join(clips)}
</body></html>
"""
    return write_text(path, page, replace=force, inputs=inputs)
