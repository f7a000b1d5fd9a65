"""Checkpoints: written atomically, loaded with `torch.load(weights_only=True)` (plain data only).

A checkpoint holds everything `eval` and `continue` need, so nothing else has to travel with it:
weights, the full resolved config, the data format (rate, encoding, normalization) and, for
`--resume`, the optimizer, schedule, step and metrics.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ssmgen.atomic import atomic_output
from ssmgen.errors import UserError

FORMAT = "ssmgen-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plain data and tensors) to `path` atomically: temp file, fsync, rename."""
    path = Path(path)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    with atomic_output(path, fsync=True) as tmp:
        torch.save(data, tmp)
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint file from a checkpoint path or a run folder (its best, else last, checkpoint)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
            if (p / name).is_file():
                return p / name
        raise UserError(f"{p}: no checkpoint in this folder (expected checkpoints/best.pt)")
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint or run folder")
    return p


def _load_failure(e: Exception) -> str:
    """Why torch.load refused a file, in words for the user. torch's own message for a refused
    pickle advises loading with weights_only=False, which ssmgen never does."""
    msg = " ".join(str(e).split())
    if "Unsupported global" in msg:
        name = re.search(r"GLOBAL (\S+)", msg)
        what = f" ({name.group(1)})" if name else ""
        return (f"it holds Python objects{what}, not only tensors and plain data; ssmgen does not "
                "load those, because loading them could run code")
    if isinstance(e, pickle.UnpicklingError) or "load key" in msg:
        return "not a PyTorch checkpoint file"
    if "zip archive" in msg or isinstance(e, (OSError, EOFError)):
        return "truncated or damaged file"
    return f"{type(e).__name__}: {msg[:160]}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check an ssmgen checkpoint (a file or a run folder). Never executes code from it."""
    p = resolve(path)
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, foreign pickle: all one line for the user
        raise UserError(f"{p}: not a readable ssmgen checkpoint ({_load_failure(e)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{p}: not an ssmgen checkpoint")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{p}: written by a newer ssmgen (format {data['format_version']}); "
                        "upgrade ssmgen")
    data["path"] = str(p)
    return data


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint file or run folder."""
    from ssmgen.config import Config
    from ssmgen.model import SaShiMi

    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"], source=ckpt["path"])
    model = SaShiMi(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{ckpt['path']}: weights do not match its config "
                        f"({' '.join(str(e).split())[:160]})") from None
    return model.to(device).eval(), ckpt


def slim_checkpoint(src: str | Path, dst: str | Path, note: str = "") -> Path:
    """A copy of a checkpoint with only what `eval`, `continue` and `export` need (weights, config,
    data format, step, validation metrics): no optimizer or schedule, so it cannot be resumed but is
    a third of the size. `note` records how it was made (e.g. the training command)."""
    ckpt = load_checkpoint(src)
    keep = {k: ckpt[k] for k in ("model", "config", "data_format", "step", "val", "parameters",
                                 "seconds", "best_bpb") if k in ckpt}
    keep["note"] = note
    keep["dataset"] = ""
    return save_checkpoint(dst, keep)
