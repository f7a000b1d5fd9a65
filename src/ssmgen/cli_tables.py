"""The tables the command line prints (rich): what `ssmgen prep` made, what `ssmgen presets`
offers. Built here, printed by cli.py.
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
