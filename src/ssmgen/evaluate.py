"""Bits per byte and top-k accuracy of a model over a whole split.

bits per byte = mean cross-entropy (nats) / ln 2 over every position of the split, computed in
full-length chunks in parallel mode, aligned exactly as training crops are (`data.shift_inputs`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssmgen.data import Dataset
from ssmgen.errors import UserError
from ssmgen.progress import progress_bar

TOPK = (1, 3, 5, 10)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: Dataset, split: str, chunk_len: int, *,
                   device: torch.device | str = "cpu", max_samples: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """{'bpb', 'acc1', 'acc3', 'acc5', 'acc10', 'samples'} over `split` (or its first
    `max_samples` positions)."""
    total = dataset.split_samples(split)
    if total == 0:
        raise UserError(f"{dataset.root}: the {split} split is empty")
    if max_samples is not None:
        total = min(total, max_samples)
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    hits = dict.fromkeys(TOPK, 0)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"eval {split}", total=total, unit="samples", rate=dataset.rate)
        for inputs, targets in dataset.eval_chunks(split, chunk_len, max_samples):
            x = torch.from_numpy(inputs).to(device)
            y = torch.from_numpy(targets).to(device)
            logits = model(x).float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum").item()
            top = logits.topk(max(TOPK), dim=-1).indices
            match = top == y.unsqueeze(-1)
            for k in TOPK:
                hits[k] += int(match[..., :k].any(-1).sum())
            n += y.numel()
            bar.update(task, advance=y.numel())
    model.train(was_training)
    out = {"bpb": nll / n / math.log(2), "samples": n}
    out.update({f"acc{k}": hits[k] / n for k in TOPK})
    return out


def evaluate(checkpoint: str | Path, split: str = "test", *, data: str | Path | None = None,
             chunk_len: int | None = None, device: str = "auto", max_samples: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint (file or run folder) on a split of its dataset (or of `data`)."""
    from ssmgen.checkpoint import load_model
    from ssmgen.train import resolve_device

    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    data_dir = Path(data) if data else Path(ckpt.get("dataset", ""))
    if not data and not data_dir.is_dir():
        raise UserError(f"{ckpt['path']}: its dataset {data_dir} is not here; pass --data")
    dataset = Dataset(data_dir)
    fmt = dataset.data_format()
    if fmt != ckpt["data_format"]:
        raise UserError(f"{data_dir}: its format {fmt} differs from the model's "
                        f"{ckpt['data_format']}")
    length = chunk_len or int(ckpt["config"]["train"]["sample_len"])
    result = evaluate_model(model, dataset, split, length, device=dev, max_samples=max_samples,
                            progress=progress)
    result.update({"split": split, "checkpoint": ckpt["path"], "dataset": str(data_dir),
                   "step": int(ckpt.get("step", 0)), "chunk_len": length})
    return result
