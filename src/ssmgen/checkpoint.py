"""Checkpoints: written atomically, loaded with `torch.load(weights_only=True)` (plain data only).

A checkpoint holds everything `eval` and `continue` need, so nothing else has to travel with it:
weights, the full resolved config, the data format (rate, encoding, normalization) and, for
`--resume`, the optimizer, schedule, step and metrics.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ssmgen.atomic import write_bytes
from ssmgen.errors import UserError
from ssmgen.runtime import check_memory
from ssmgen.validate import bounded_size, plain_children

FORMAT = "ssmgen-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plain data and tensors) to `path` atomically: temp file, fsync, rename."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    buf = io.BytesIO()  # torch.save hides a full disk's OSError: serialize first, then write
    torch.save(data, buf)
    return write_bytes(path, buf.getvalue(), fsync=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint file from a checkpoint path or a run folder (its best, else last,
    checkpoint)."""
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
    if isinstance(e, PermissionError):
        return "no permission to read it"
    if isinstance(e, IsADirectoryError):
        return "it is a folder"
    if "Unsupported global" in msg or "Unsupported operand" in msg or "GLOBAL" in msg:
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
    """Load and check an ssmgen checkpoint (a file or a run folder). Never executes code from it;
    refuses, in one line naming the file, one that lacks what eval and continue need, whose
    config is malformed or whose weights are not finite."""
    p = resolve(path)
    if not p.is_file():
        raise UserError(f"{p}: not a checkpoint file")
    check_memory(2 * p.stat().st_size, f"{p}: loading this {p.stat().st_size / 2**30:.1f} GiB file",
                 "it is larger than this machine can hold")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, foreign pickle: all one line for the user
        raise UserError(f"{p}: not a readable ssmgen checkpoint ({_load_failure(e)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{p}: not an ssmgen checkpoint")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{p}: written by a newer ssmgen (format {version}); upgrade ssmgen")
    _check_contents(data, p)
    data["path"] = str(p)
    return data


def _check_contents(data: dict, p: Path) -> None:
    from ssmgen.audio import ENCODINGS, NORMALIZATIONS

    for key, kind in (("model", dict), ("config", dict), ("data_format", dict)):
        if not isinstance(data.get(key), kind):
            raise UserError(f"{p}: damaged checkpoint ({'no' if key not in data else 'a bad'} "
                            f"'{key}' entry)")
    for key in ("config", "data_format"):  # shared references must not expand without bound
        bounded_size(data[key], plain_children, f"{p}: its {key}")
    fmt = data["data_format"]
    rate = fmt.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= 384000:
        raise UserError(f"{p}: damaged checkpoint (data format rate {rate!r})")
    if fmt.get("encoding") not in ENCODINGS:
        raise UserError(f"{p}: unknown encoding {fmt.get('encoding')!r} in its data format "
                        f"(known: {', '.join(ENCODINGS)})")
    if fmt.get("normalization") not in NORMALIZATIONS:
        raise UserError(f"{p}: unknown normalization {fmt.get('normalization')!r} in its data "
                        f"format (known: {', '.join(NORMALIZATIONS)})")
    for name, t in data["model"].items():
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{p}: damaged checkpoint (weight {name!s:.60} is not a tensor)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{p}: its weights hold NaN or infinite values ({name}); the run "
                            "that wrote it diverged. Use an earlier checkpoint")
    step = data.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{p}: damaged checkpoint (step {step!r})")
    if isinstance(data.get("best_bpb"), float) and math.isnan(data["best_bpb"]):
        raise UserError(f"{p}: damaged checkpoint (best_bpb is NaN)")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint file or run folder. The model's
    size is checked against memory, and the weights' shapes against its config, before the model
    is built."""
    from ssmgen.config import Config
    from ssmgen.sizing import new_model

    ckpt = load_checkpoint(path)
    where = ckpt["path"]
    try:
        cfg = Config.from_dict(ckpt["config"], source=where)
        from ssmgen import backends
        backends.get(cfg.model.backend)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    shapes = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    model = new_model(cfg.model, what=where, fix="it is larger than this machine can hold",
                      shapes=shapes)
    load_weights(model, ckpt["model"], where)
    return model.to(device).eval(), ckpt


def load_weights(model, weights: dict, where: str | Path) -> None:
    """`model.load_state_dict(weights)` for weights read from the file `where`, which is data:
    weights that do not fit the model, or a classical prior whose numbers are out of range, are
    refused in one line naming the file."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{where}: weights do not match its config "
                        f"({' '.join(str(e).split())[:160]})") from None
    problem = model.prior.problem() if model.prior is not None else None
    if problem:
        raise UserError(f"{where}: its classical prior is not usable ({problem})")


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
