"""Bits per byte and top-k accuracy of a model over a whole split, or over any audio files.

bits per byte = mean cross-entropy (nats) / ln 2 over every position of the split, computed in
full-length chunks in parallel mode, aligned exactly as training crops are (`data.shift_inputs`):
the paper's protocol. Streamed, the state is carried through each file instead, so every position
sees the whole file before it: how `continue` uses a model (docs/architecture.md says why both).
Audio files (`evaluate_audio`) are read as training files were and scored the same way: a song
the model never heard is the honest held-out check.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ssmgen.adapt import adaptation_optimizer, checked_lr, read_adapting, weights_kept
from ssmgen.data import SPLITS, Dataset, token_chunks
from ssmgen.errors import UserError
from ssmgen.progress import progress_bar
from ssmgen.runtime import check_memory, resolve_device
from ssmgen.validate import number

TOPK = (1, 3, 5, 10)


def score_files(model: torch.nn.Module, files: Iterable[np.ndarray], length: int, *,
                total: int, label: str, rate: int, streamed: bool = False,
                adapt_lr: float | None = None, device: torch.device | str = "cpu",
                progress: bool = True) -> dict[str, Any]:
    """{'bpb', 'acc1', 'acc3', 'acc5', 'acc10', 'samples'} over every position of each file's
    tokens, read in parallel mode in chunks of `length`. Chunked (the paper's protocol): each
    chunk from a fresh state, aligned as a training crop. `streamed`: the state carried from
    chunk to chunk through each file, so a position sees the whole file before it, as `continue`
    reads a prompt and generates (and as the classical coder adapts). `adapt_lr`: streamed, and
    the model adapts to each file while reading it (`adapt.read_adapting`: each chunk scored
    before it is learnt from), from its own weights at each file's start and left as it was.
    `label` names the progress bar; how the files are read is added to it."""
    label += " adapting" if adapt_lr is not None else " streamed" if streamed else ""
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    hits = dict.fromkeys(TOPK, 0)
    keep = weights_kept(model) if adapt_lr is not None else nullcontext(lambda: None)
    with progress_bar(progress) as bar, keep as restore:
        task = bar.add_task(label, total=total, unit="samples", rate=rate)
        for tokens in files:
            if adapt_lr is not None:
                restore()
                chunks = read_adapting(model, tokens, length,
                                       adaptation_optimizer(model, adapt_lr))
            else:
                chunks = _read(model, tokens, length, streamed, device)
            for logits, y in chunks:
                logits = logits.float()
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                       reduction="sum").item()
                top = logits.topk(max(TOPK), dim=-1).indices
                match = top == y.unsqueeze(-1)
                for k in TOPK:
                    hits[k] += int(match[..., :k].any(-1).sum())
                n += y.numel()
                bar.update(task, advance=y.numel())
    model.train(was_training)
    if n == 0:
        raise UserError(f"{label}: nothing to evaluate")
    out = {"bpb": nll / n / math.log(2), "samples": n}
    out.update({f"acc{k}": hits[k] / n for k in TOPK})
    return out


@torch.no_grad()
def _read(model: torch.nn.Module, tokens: np.ndarray, length: int, streamed: bool,
          device: torch.device | str):
    """Each chunk's (logits, targets) of one file, chunked or streamed (`score_files`)."""
    state = model.initial_state(1, device=device) if streamed else None
    for inputs, targets in token_chunks(tokens, length, streamed=streamed):
        x = torch.from_numpy(inputs).to(device)
        y = torch.from_numpy(targets).to(device)
        if streamed:
            logits, state = model.forward_with_state(x, state)
        else:
            logits = model(x)
        yield logits, y


def evaluate_model(model: torch.nn.Module, dataset: Dataset, split: str, chunk_len: int, *,
                   device: torch.device | str = "cpu", max_samples: int | None = None,
                   progress: bool = True, streamed: bool = False,
                   adapt_lr: float | None = None) -> dict[str, Any]:
    """{'bpb', 'acc1', 'acc3', 'acc5', 'acc10', 'samples'} over `split` (or `max_samples`
    positions of it: a prefix of every file, `Dataset.file_tokens`), chunked, `streamed` or
    streamed adapting to each file (`adapt_lr`; `score_files`)."""
    total = dataset.split_samples(split)
    if total == 0:
        raise UserError(f"{dataset.root}: the {split} split is empty")
    if max_samples is not None:
        total = min(total, max_samples)
    return score_files(model, dataset.file_tokens(split, max_samples), chunk_len, total=total,
                       label=f"eval {split}", rate=dataset.rate, streamed=streamed,
                       adapt_lr=adapt_lr, device=device, progress=progress)


def _run_folder(checkpoint_path: str | Path) -> Path | None:
    """The run folder a checkpoint lives in (RUN/checkpoints/NAME.pt of a marked run), if any:
    where the classical line is cached."""
    from ssmgen.workspace import is_run

    p = Path(checkpoint_path)
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return run if is_run(run) else None


def classical_for(dataset: Dataset, split: str, checkpoint_path: str | Path, *,
                  max_samples: int | None = None, extra=None) -> dict | None:
    """The classical LPC coder's line for the same tokens (`ssmgen.classical`), cached in the
    checkpoint's run folder when it has one; None when the dataset has no train split."""
    from ssmgen.classical import classical_line

    return classical_line(dataset, split, max_samples=max_samples,
                          cache_dir=_run_folder(checkpoint_path), extra=extra)


def evaluate(checkpoint: str | Path, split: str = "test", *, data: str | Path | None = None,
             chunk_len: int | None = None, device: str = "auto", max_samples: int | None = None,
             progress: bool = True, classical: bool = True, streamed: bool = True,
             adapt_lr: float | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (file or run folder) on a split of its dataset (or of `data`), in
    chunks of `chunk_len` (default: the training chunk). `streamed`: also score with the state
    carried through each file (result['streamed'], `score_files`). `adapt_lr`: also streamed
    with the model adapting to each file as it reads it (result['adapted']). `classical`: also
    score the same positions with the classical LPC coder fitted on the dataset's train split
    (result['classical'])."""
    from ssmgen.checkpoint import load_model

    if split not in SPLITS:
        raise UserError(f"--split {split}: use one of {', '.join(SPLITS)}")
    if max_samples is not None:
        number("--max-samples", max_samples, low=1, integer=True)
    _check_adapt_lr(adapt_lr)
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    if data:
        data_dir = Path(data)
    elif not ckpt.get("dataset"):  # e.g. a slimmed checkpoint
        raise UserError(f"{ckpt['path']}: it does not record the dataset it trained on; pass "
                        "--data DATASET (or --audio FILE to score audio files)")
    else:
        data_dir = Path(ckpt["dataset"])
        if not data_dir.is_dir():
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
    if streamed:
        result["streamed"] = evaluate_model(model, dataset, split, length, device=dev,
                                            max_samples=max_samples, progress=progress,
                                            streamed=True)
    if adapt_lr is not None:
        result["adapted"] = evaluate_model(model, dataset, split, length, device=dev,
                                           max_samples=max_samples, progress=progress,
                                           streamed=True, adapt_lr=adapt_lr)
        result["adapted"]["lr"] = adapt_lr
    if classical:
        result["classical"] = classical_for(dataset, split, ckpt["path"],
                                            max_samples=max_samples)
    return result


def _check_adapt_lr(lr: float | None) -> None:
    if lr is not None:
        checked_lr(lr)


def _weighted(results: list[dict]) -> dict[str, Any]:
    """Figures over several files, sample-weighted, as one split of them would give."""
    n = sum(r["samples"] for r in results)
    out: dict[str, Any] = {"samples": n}
    for key in ["bpb"] + [f"acc{k}" for k in TOPK]:
        out[key] = sum(r[key] * r["samples"] for r in results) / n
    return out


def evaluate_audio(checkpoint: str | Path, files: list[str | Path], *, chunk_len: int | None = None,
                   device: str = "auto", progress: bool = True, classical: bool = True,
                   streamed: bool = True, adapt_lr: float | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on audio files (any format, rate and channels), each read exactly as
    training files were (`audio.read_song_tokens`) and scored as an eval split is, in chunks of
    `chunk_len` (default: the training chunk). Returns the overall figures and one entry per file
    under 'files'. `streamed`: also with the state carried through each file (overall and per
    file under 'streamed'). `adapt_lr`: also adapting to each file as it is read (under
    'adapted', overall and per file). `classical`: when the checkpoint's dataset is here, the
    classical LPC coder fitted on its train split scores the same files (result['classical'])."""
    from ssmgen.audio import probe, read_song_tokens
    from ssmgen.checkpoint import load_model

    if not files:
        raise UserError("no audio files to evaluate")
    _check_adapt_lr(adapt_lr)
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    fmt = ckpt["data_format"]
    length = chunk_len or int(ckpt["config"]["train"]["sample_len"])
    rate = int(fmt["rate"])
    infos = [probe(f) for f in files]  # every file checked first: a bad one fails in seconds
    need = sum(i.frames / i.samplerate * rate for i in infos) * 1.1  # one byte per token
    check_memory(need, f"scoring {len(files)} file(s) ({need / rate / 3600:.1f} h of audio)",
                 "score fewer or shorter files at a time")
    songs = [(str(f), read_song_tokens(f, fmt)) for f in files]
    per_file = []
    for name, tokens in songs:
        def score(carry: bool, lr: float | None = None) -> dict[str, Any]:
            return score_files(model, [tokens], length, total=len(tokens), rate=rate,
                               label=f"eval {Path(name).name}", streamed=carry,
                               adapt_lr=lr, device=dev, progress=progress)
        r = {"file": name, **score(False)}
        if streamed:
            r["streamed"] = score(True)
        if adapt_lr is not None:
            r["adapted"] = score(True, adapt_lr)
        per_file.append(r)
    result: dict[str, Any] = {"split": "files", **_weighted(per_file)}
    for how in ("streamed", "adapted"):
        if how in per_file[0]:
            result[how] = _weighted([r[how] for r in per_file])
    if adapt_lr is not None:
        result["adapted"]["lr"] = adapt_lr
    result.update({"checkpoint": ckpt["path"], "step": int(ckpt.get("step", 0)),
                   "chunk_len": length, "files": per_file})
    data_dir = Path(ckpt.get("dataset") or "")
    if classical and ckpt.get("dataset") and data_dir.is_dir():
        dataset = Dataset(data_dir)
        if dataset.data_format() == fmt:
            result["classical"] = classical_for(dataset, "files", ckpt["path"],
                                                extra=[t for _, t in songs])
    return result
