"""The tables and reports the command line prints (rich): what `ssmgen prep` made, what `ssmgen
presets` offers, `ssmgen eval`'s figures, what adapting did in `ssmgen continue`. Built here,
printed by cli.py.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ssmgen.validate import one_line


def prep_summary(manifest: dict, out_dir: Path) -> tuple[Table, str]:
    """The dataset's table (per split: files, hours, level, silence, clipping) and the line of
    what was kept and skipped, as `ssmgen prep` prints them."""
    table = Table(title=f"dataset {one_line(str(out_dir))}", show_edge=False)
    table.add_column("split")
    table.add_column("files", justify="right")
    table.add_column("hours", justify="right")
    table.add_column("level dBFS", justify="right")
    table.add_column("silence", justify="right")
    table.add_column("clipped", justify="right")
    for name, s in manifest["splits"].items():
        table.add_row(name, str(s["files"]), f"{s['hours']:.3f}",
                      _fmt(s.get("rms_dbfs"), "{:.1f}"), _fmt(s.get("silence_share"), "{:.1%}"),
                      _fmt(s.get("clipped_share"), "{:.3%}"))
    reasons: dict[str, int] = {}
    for s in manifest.get("skipped", []):
        reasons[s["reason_kind"]] = reasons.get(s["reason_kind"], 0) + 1
    line = f"kept {len(manifest['files'])} file(s)"
    if reasons:
        line += "; skipped " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items()))
    return table, line


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def presets_table() -> Table:
    """Every preset (built-in and ./presets) with its parameter count per backend, its shape and
    the recipe it trains with here, as `ssmgen presets` prints it."""
    from ssmgen import backends
    from ssmgen.config import USER_PRESETS, crops_text, load_config, preset_names
    from ssmgen.model import SaShiMi, count_parameters

    names = backends.available()
    table = Table(show_edge=False)
    table.add_column("preset")
    for b in names:
        table.add_column(f"params ({b})", justify="right")
    table.add_column("shape")
    table.add_column("recipe here")
    own = sorted(p.stem for p in USER_PRESETS.glob("*.yaml")) if USER_PRESETS.is_dir() else []
    for p in sorted(set(preset_names()) | set(own)):
        counts = []
        for b in names:
            try:
                model = SaShiMi(load_config(p, backend=b).model)
                counts.append(f"{count_parameters(model, folded=True):,}")
            except Exception as e:  # a broken plug-in must not hide the other rows
                counts.append(f"({type(e).__name__})")
        cfg = load_config(p)
        m, t = cfg.model, cfg.train
        table.add_row(f"{p} (./presets)" if p in own else p, *counts,
                      f"d_model {m.d_model}, {m.n_layers} layers/tier, pool {m.pool}",
                      f"{cfg.recipe}: {crops_text(t.batch_size, t.sample_len, t.carry_crops)}, "
                      f"lr {t.lr:g}")
    return table


def eval_lines(r: dict) -> list[str]:
    """`ssmgen eval`'s report of a result (`evaluate.evaluate` or `evaluate_audio`): a line per
    file when there are several, then chunked, streamed and adapting figures, then the classical
    coder's line beside the model's best streamed figure."""
    def line(name: str, r: dict) -> str:
        return (f"{one_line(name)}: {r['bpb']:.4f} bits per sample (8-bit, so bits per byte) "
                f"over {r['samples']:,} samples; accuracy top-1 {r['acc1']:.1%}, top-3 "
                f"{r['acc3']:.1%}, top-5 {r['acc5']:.1%}, top-10 {r['acc10']:.1%}")
    files = r.get("files", [])
    lines = [line(f["file"], f) for f in files] if len(files) > 1 else []
    what = files[0]["file"] if len(files) == 1 else "all files" if files else r["split"]
    lines.append(line(f"{what}, in chunks of {r['chunk_len']:,}", r))
    if "streamed" in r:
        lines.append(line(f"{what}, streamed", r["streamed"]))
    if "adapted" in r:
        lines.append(line(f"{what}, streamed adapting to each file", r["adapted"]))
    c = r.get("classical")
    if c:
        best = next((k for k in ("adapted", "streamed") if k in r), None)
        ours = f"{r[best]['bpb']:.2f} {best}" if best else f"{r['bpb']:.2f}"
        lines.append(f"{ours} bits per sample; a classical LPC coder: {c['bpb']:.2f} on the "
                     f"same {'files' if files else 'split'} (order {c['order']}, {c['dist']} "
                     f"residual with a running scale; fitted on the train split, tuned on "
                     f"{c['tuned_on']})")
    return lines


def adapt_text(adapt: dict) -> str:
    """What adapting to the prompt did (`continue_song`'s summary['adapt']), as a clause of
    `ssmgen continue`'s closing line; empty when it did not adapt."""
    if not adapt["bits"]:
        return ""
    passes = f"{adapt['passes']} pass{'es' if adapt['passes'] > 1 else ''}"
    bits = " -> ".join(f"{b:.2f}" for b in adapt["bits"])
    return (f"; adapting to the prompt took {adapt['elapsed_s']:.1f} s ({passes}, {bits} bits "
            "per sample)")
