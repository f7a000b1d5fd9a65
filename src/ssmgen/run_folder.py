"""A training run's folder besides its checkpoints: the check before writing into it, the first
lines a run says, metrics.csv, the classical coder's line and the listening page."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from ssmgen.atomic import write_failure, write_text
from ssmgen.checkpoint import load_checkpoint
from ssmgen.config import Config, crops_text
from ssmgen.data import Dataset
from ssmgen.errors import UserError
from ssmgen.model import SaShiMi
from ssmgen.workspace import is_run

log = logging.getLogger("ssmgen.train")
METRICS = ["step", "seconds", "lr", "loss", "train_bpb", "samples_per_s", "val_bpb", "val_acc1",
           "val_acc3", "val_acc5", "val_acc10"]


def check_run_folder(run: Path, resume: bool) -> None:
    """A run folder must be ours: refuse (one line) a folder of the user's own files, an existing
    run without --resume, or --resume where there is nothing to resume."""
    last = run / "checkpoints" / "last.pt"
    if run.exists() and not run.is_dir():
        raise UserError(f"{run}: exists and is not a folder (choose another --out)")
    if resume:
        if not last.is_file():
            raise UserError(f"{run}: nothing to resume (no checkpoints/last.pt)")
        if not is_run(run):  # made before runs were marked: its checkpoint must be ours
            load_checkpoint(last)
        return
    if not run.is_dir() or not any(run.iterdir()):
        return
    if last.is_file():
        if not is_run(run):
            load_checkpoint(last)  # one line if it is not ours
        raise UserError(f"{run}: a run already lives here (use --resume to continue it, or "
                        "another --out)")
    if not is_run(run):
        first = sorted(p.name for p in run.iterdir())[0]
        raise UserError(f"{run}: holds files that are not a run of ssmgen (e.g. {first}); "
                        "refusing to write into it: choose another --out")


def announce(run: Path, cfg: Config, dataset: Dataset, device: torch.device,
             resumed: bool, init: str | None = None) -> None:
    """Say, before the first step, where the run goes, how it trains and how it will stop."""
    t = cfg.train
    warm = f", {t.warmup_steps} warm-up steps" if t.warmup_steps else ""
    limited = t.max_steps is not None or t.max_minutes is not None
    cool = f", falling to 0 over the last {t.cooldown:.0%}" if t.cooldown and limited else ""
    log.info("%s %s: preset %s, backend %s, recipe %s (%s, lr %g%s, schedule %s%s) on %s%s",
             "resuming" if resumed else "training into", run, cfg.preset, cfg.model.backend,
             cfg.recipe, crops_text(t.batch_size, t.sample_len, t.carry_crops), t.lr, warm,
             t.schedule, cool, device.type, f", starting from {init}" if init else "")
    if t.max_steps is None and t.max_minutes is None:
        log.info("no --max-steps or --max-minutes: training runs until you press Ctrl-C, which "
                 "saves a checkpoint first; validation every %d steps", t.val_every)
    else:
        parts = ([f"{t.max_steps} steps"] if t.max_steps is not None else []) + \
            ([f"{t.max_minutes:g} min"] if t.max_minutes is not None else [])
        log.info("stops after %s (Ctrl-C saves and stops earlier)", " or ".join(parts))


def classical_line_for(run: Path, dataset: Dataset, cfg: Config) -> dict | None:
    """The classical coder's line on the validation positions, for the run's page: computed once
    before the first step (then read back from run/classical.json), so no validation waits on
    it. None without a validation split, or (with a warning) if it cannot be computed."""
    from ssmgen.classical import classical_line
    if not dataset.split_samples("val"):
        return None
    try:
        return classical_line(dataset, "val", max_samples=cfg.train.val_max_samples,
                              cache_dir=run)
    except (UserError, OSError, ValueError, np.linalg.LinAlgError) as e:
        log.warning("no classical line on the run's page: %s", e)
        return None


def write_listening(run: Path, model: SaShiMi, dataset: Dataset, cfg: Config, step: int,
                    device, classical: dict | None = None) -> None:
    """A short continuation of a fixed validation prompt, and the refreshed page."""
    from ssmgen.report import write_index, write_listening_sample
    if cfg.train.sample_seconds > 0:  # 0 turns listening samples off
        try:
            write_listening_sample(run, model, dataset, cfg, step, device)
        except UserError as e:
            log.warning("no listening sample at step %d: %s", step, e)
    write_index(run, classical)


def append_metrics(path: Path, step, seconds, optimizer, loss, rate, val) -> None:
    """One row per validation, appended and fsynced (a row is small: appending cannot tear more
    than the last line, which `truncate_metrics` drops on resume)."""
    v = val or {}
    row = [step, f"{seconds:.1f}", f"{optimizer.param_groups[0]['lr']:.3g}", f"{loss:.5f}",
           f"{loss / math.log(2):.5f}", f"{rate:.0f}"] + \
        [f"{v[k]:.5f}" if k in v else "" for k in ("bpb", "acc1", "acc3", "acc5", "acc10")]
    text = io.StringIO()
    w = csv.writer(text)
    if not path.exists():
        w.writerow(METRICS)
    w.writerow(row)
    try:
        with open(path, "a", newline="") as f:
            f.write(text.getvalue())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_failure(path, e) from None


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from (they will be redone) and
    a row a kill cut short; rewritten atomically."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [METRICS] + [r for r in rows[1:] if len(r) == len(METRICS) and r[0].isdigit()
                        and int(r[0]) <= step]
    if keep != rows:
        text = io.StringIO()
        csv.writer(text).writerows(keep)
        write_text(path, text.getvalue())
