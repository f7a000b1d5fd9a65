"""The working folder's conventions: where `prep` puts datasets and `train` puts runs, and which
dataset or model a command uses when none is named (docs/architecture.md, "The working folder").

    ./data/NAME/        a dataset: `ssmgen prep ./NAME` writes it (NAME: the source folder's name)
    ./runs/PRESET-BACKEND-N/  a run: `ssmgen train` starts a new one each time (N counts up)
    ./presets/NAME.yaml your own presets, found before the shipped ones

`train` with no dataset takes the one prep wrote most recently under ./data; `eval`, `continue`
and `export` with no model take the run trained most recently under ./runs (its best
checkpoint), else the model that ships with ssmgen. Each says which, in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from ssmgen.data import is_dataset
from ssmgen.errors import UserError

DATA = Path("data")
RUNS = Path("runs")
RUN_MARKER = "run.json"  # marks a folder as a run of ours (and records how it was started)
RUN_FORMAT = "ssmgen-run"
BUNDLED_DEFAULT = "ablated-s4d-mix"


@dataclass
class Choice:
    """A path chosen for the user, and the one line that says why."""

    path: Path
    why: str


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")
    return name or "audio"


def dataset_for(src: str | Path) -> Path:
    """Where `ssmgen prep SRC` writes when no --out is given: ./data/<SRC's folder name>."""
    if (DATA / "manifest.json").is_file():
        raise UserError(f"{DATA}: is a dataset itself, so datasets cannot go inside it; pass "
                        "--out FOLDER")
    return DATA / _safe_name(Path(src).resolve().name)


def newest_dataset() -> Choice:
    """The dataset prep wrote most recently under ./data (its manifest is written last)."""
    found = [d for d in ([DATA] + sorted(DATA.glob("*/"))) if d.is_dir() and is_dataset(d)]
    if not found:
        raise UserError("no dataset prepared in this folder yet: run `ssmgen prep "
                        "YOUR_AUDIO_FOLDER` first, or name one: `ssmgen train DATASET`")
    times = {d: (d / "manifest.json").stat().st_mtime_ns for d in found}
    best = max(found, key=times.get)
    if list(times.values()).count(times[best]) > 1:
        raise UserError("several datasets under ./data were written at the same moment; name "
                        "one: `ssmgen train data/NAME`")
    others = f" (newest of {len(found)} under {DATA}/)" if len(found) > 1 else ""
    return Choice(best, f"dataset {best}{others}")


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

def is_run(folder: Path) -> bool:
    """A folder marked as a run of ours (or one made before the mark: it holds our checkpoint)."""
    try:
        m = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
        return isinstance(m, dict) and m.get("format") == RUN_FORMAT
    except (OSError, ValueError):
        return False


def new_run(preset: str, backend: str) -> Path:
    """Create and return a new run folder ./runs/PRESET-BACKEND-N (N one above any so far; never
    an existing folder, even with two trainings starting at once)."""
    stem = f"{_safe_name(Path(preset).stem)}-{_safe_name(backend)}"
    pattern = re.compile(rf"^{re.escape(stem)}-(\d+)$")
    taken = [int(m[1]) for p in RUNS.glob(f"{stem}-*") if (m := pattern.match(p.name))]
    n = max(taken, default=0) + 1
    try:
        RUNS.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{RUNS}: cannot hold runs ({e.strerror or e}); pass --out RUN_FOLDER") \
            from None
    while True:
        run = RUNS / f"{stem}-{n}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            n += 1
        except OSError as e:
            raise UserError(f"{run}: cannot create the run folder ({e.strerror or e})") from None


def mark_run(run: Path, info: dict) -> None:
    """Write the run's marker: what it is and how it was started (preset, backend, recipe,
    dataset, the resolved config)."""
    from ssmgen.atomic import write_text

    data = {"format": RUN_FORMAT, "format_version": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"), **info}
    write_text(run / RUN_MARKER, json.dumps(data, indent=2, allow_nan=False))


def _run_checkpoint(run: Path) -> Path | None:
    for name in ("last.pt", "best.pt"):
        if (run / "checkpoints" / name).is_file():
            return run / "checkpoints" / name
    return None


def newest_run() -> Path | None:
    """The run under ./runs whose checkpoint was written most recently (None if there is none)."""
    found = []
    for run in sorted(RUNS.glob("*/")) if RUNS.is_dir() else []:
        ckpt = _run_checkpoint(run)  # runs made before the marker count too
        if ckpt is not None:
            found.append((ckpt.stat().st_mtime_ns, run))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def bundled_models() -> dict[str, Path]:
    """Trained models shipped inside the package: name -> checkpoint file."""
    try:
        folder = resources.files("ssmgen").joinpath("models")
        return {p.name[:-3]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".pt")}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def resolve_model(spec: str | Path | None) -> Choice:
    """The model a command uses: `spec` (a checkpoint, a run folder or a bundled model's name),
    or with none, the newest run here, else the bundled model."""
    if spec is not None:
        path = Path(spec)
        bundled = bundled_models()
        if not path.exists() and str(spec) in bundled:
            return Choice(bundled[str(spec)], f"the bundled model {spec}")
        return Choice(path, str(path))
    run = newest_run()
    if run is not None:
        return Choice(run, f"{run} (the run trained most recently here; --model to choose)")
    bundled = bundled_models()
    if BUNDLED_DEFAULT in bundled:
        return Choice(bundled[BUNDLED_DEFAULT], f"the bundled model {BUNDLED_DEFAULT} (no run in "
                      "this folder yet; --model to choose)")
    raise UserError("no model here: train one (`ssmgen train`) or name one with --model")
