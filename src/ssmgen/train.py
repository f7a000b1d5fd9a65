"""Training: the loop, optimizer groups, schedules, validation, checkpoints, exact resume, DDP.

Exact resume by construction: every step's randomness (which crops, dropout) is seeded from
(seed, step), not carried from step to step, and the optimizer and schedule states are restored
from the checkpoint. A run killed at any moment and resumed from its last checkpoint replays the
same steps and ends at bitwise the same weights (on CPU).

Beyond one machine: `torchrun --nproc_per_node N -m ssmgen train ...` runs DistributedDataParallel
(NCCL on GPU, gloo on CPU). Every rank draws the same global batch and takes its own slice, so N
processes compute the same update as one process with the same global batch. Rank 0 writes.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssmgen.checkpoint import load_checkpoint, save_checkpoint
from ssmgen.config import Config
from ssmgen.data import Dataset
from ssmgen.errors import UserError
from ssmgen.evaluate import evaluate_model
from ssmgen.model import SaShiMi, count_parameters
from ssmgen.progress import progress_bar

log = logging.getLogger("ssmgen.train")
METRICS = ["step", "seconds", "lr", "loss", "train_bpb", "samples_per_s", "val_bpb", "val_acc1",
           "val_acc3", "val_acc5", "val_acc10"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------
# Schedule: warm-up, then plateau (the paper's), cosine or constant. Plain-data state.
# ------------------------------------------------------------------------------------------------

class Schedule:
    """Learning-rate multiplier per step, plus ReduceLROnPlateau-style drops on validation."""

    def __init__(self, cfg: Config) -> None:
        t = cfg.train
        self.kind, self.warmup, self.min_lr, self.base_lr = t.schedule, t.warmup_steps, t.min_lr, t.lr
        self.total = t.max_steps
        self.factor, self.patience = t.plateau_factor, t.plateau_patience
        self.scale, self.best, self.bad = 1.0, math.inf, 0

    def multiplier(self, step: int) -> float:
        m = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "cosine" and self.total:
            progress = min(1.0, max(0.0, (step - self.warmup) / max(1, self.total - self.warmup)))
            floor = self.min_lr / self.base_lr
            m *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return m * self.scale

    def on_validation(self, metric: float) -> None:
        if self.kind != "plateau":
            return
        if metric < self.best - 1e-4:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.scale *= self.factor
                self.bad = 0
                log.info("validation bpb has not improved: learning rate x %s", self.factor)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.best, self.bad = float(d["scale"]), float(d["best"]), int(d["bad"])


def make_optimizer(model: SaShiMi, cfg: Config) -> torch.optim.AdamW:
    """AdamW with the SSM parameters in their own group (reference: lr 1e-3, no weight decay)."""
    ssm = {id(p) for p in model.ssm_parameters()}
    rest = [p for p in model.parameters() if id(p) not in ssm]
    groups = [{"params": rest, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
               "base_lr": cfg.train.lr},
              {"params": [p for p in model.parameters() if id(p) in ssm], "lr": cfg.train.ssm_lr,
               "weight_decay": 0.0, "base_lr": cfg.train.ssm_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999))


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: use auto, cpu or cuda")
    return torch.device(name)


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory(model: SaShiMi, batch: int, length: int) -> int:
    """A rough upper estimate of training memory in bytes: activations of every layer at its
    tier's rate (about 40 floats per channel per position, FFT buffers included) plus weights and
    AdamW state."""
    cfg = model.cfg
    per_position, rate = 0.0, 1.0
    for level, width in enumerate(model.widths):
        per_position += 40 * width * cfg.n_layers * rate
        rate /= cfg.pool[level] if level < len(cfg.pool) else 1
    return int(4 * (batch * length * per_position + 4 * count_parameters(model)))


def default_run_dir(cfg: Config) -> Path:
    preset = Path(cfg.preset).stem
    return Path("runs") / f"{preset}-{cfg.model.backend}-{datetime.now():%Y%m%d-%H%M%S}"


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def train(data: str | Path, cfg: Config, out: str | Path | None = None, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train a model on a prepared dataset; returns a summary (run folder, steps, best bpb).

    With `resume`, continues the run in `out` from its last checkpoint (its config wins, except
    train.max_steps / train.max_minutes as given in `cfg`).
    """
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    run = Path(out) if out else default_run_dir(cfg)
    ckpt_dir = run / "checkpoints"
    state = None
    if resume:
        if not (ckpt_dir / "last.pt").is_file():
            raise UserError(f"{run}: nothing to resume (no checkpoints/last.pt)")
        state = load_checkpoint(ckpt_dir / "last.pt")
        limits = (cfg.train.max_steps, cfg.train.max_minutes)
        cfg = Config.from_dict(state["config"], source=str(ckpt_dir / "last.pt"))
        cfg.train.max_steps, cfg.train.max_minutes = limits
    elif (ckpt_dir / "last.pt").exists():
        raise UserError(f"{run}: a run already lives here (use --resume to continue it, or --out)")
    if cfg.train.max_steps is None and cfg.train.max_minutes is None:
        raise UserError("say how long to train: --max-steps or --max-minutes")
    if state is None and cfg.model.seq_len is None:  # a config not made by load_config
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 seq_len=cfg.train.sample_len))
    if cfg.train.batch_size % world:
        raise UserError(f"--batch-size {cfg.train.batch_size} is not divisible by the "
                        f"{world} processes")

    dataset = Dataset(data)
    dataset.check_trainable(cfg.train.sample_len)
    device = resolve_device(cfg.train.device)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)

    torch.manual_seed(cfg.train.seed)
    model = SaShiMi(cfg.model).to(device)
    need, have = estimate_memory(model, cfg.train.batch_size // world, cfg.train.sample_len), \
        _available_memory(device)
    if have is not None and need > have:
        raise UserError(f"not enough memory for batch {cfg.train.batch_size} x "
                        f"{cfg.train.sample_len} samples on {device} (needs about "
                        f"{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free): lower "
                        "--batch-size or --sample-len")
    optimizer = make_optimizer(model, cfg)
    schedule = Schedule(cfg)
    step, elapsed, best = 0, 0.0, math.inf
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, elapsed, best = int(state["step"]), float(state["seconds"]), float(state["best_bpb"])
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)

    is_main = rank == 0
    if is_main:
        run.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(run / "metrics.csv", step)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if device.type == "cuda" and cfg.train.amp in ("auto", "bf16") else nullcontext())
    per_rank = cfg.train.batch_size // world
    meta = {"config": cfg.to_dict(), "data_format": dataset.data_format(),
            "dataset": str(Path(data).resolve()), "parameters": count_parameters(model)}

    def checkpoint(tag: str, val: dict | None) -> None:
        payload = {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "schedule": schedule.state_dict(), "step": step, "seconds": elapsed,
                   "best_bpb": best, "val": val or {}}
        save_checkpoint(ckpt_dir / f"{tag}.pt", payload)

    def validate_and_save(loss_value: float) -> None:
        nonlocal best, t_log, n_log
        rate = n_log * cfg.train.batch_size * cfg.train.sample_len / (time.perf_counter() - t_log)
        val = None
        if is_main:
            val = _validate(model, dataset, cfg, device)
            if val:
                schedule.on_validation(val["bpb"])
                best = min(best, val["bpb"])
            _append_metrics(run / "metrics.csv", step, elapsed, optimizer, loss_value, rate, val)
            checkpoint("last", val)
            if val is None or val["bpb"] <= best:
                checkpoint("best", val)
            _listening(run, model, dataset, cfg, step, device)
        if world > 1:
            _sync_schedule(schedule)
        t_log, n_log = time.perf_counter(), 0
        model.train()

    stop = _StopFlag()
    validated_at, value = step, math.nan
    limit_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes is not None else math.inf
    max_steps = cfg.train.max_steps if cfg.train.max_steps is not None else 1 << 62
    reason = "max steps"
    started, t_log, n_log = time.perf_counter() - elapsed, time.perf_counter(), 0
    model.train()
    with stop, progress_bar(progress and is_main,
                            extra="loss {task.fields[loss]:.3f}  bpb {task.fields[bpb]:.3f}") as bar:
        task = bar.add_task("training", total=cfg.train.max_steps, completed=step, loss=math.nan,
                            bpb=math.nan, unit="steps")
        while step < max_steps:
            # Every rank must stop at the same step: rank 0's clock and Ctrl-C decide.
            stopping = _agree(world, 2 if stop.requested else
                              1 if time.perf_counter() - started >= limit_s else 0)
            if stopping:
                reason = "interrupted" if stopping == 2 else "time limit"
                break
            seed = _step_seed(cfg.train.seed, step)
            inputs, targets = dataset.random_crops(cfg.train.batch_size, cfg.train.sample_len,
                                                   np.random.default_rng(seed))
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            x = torch.from_numpy(inputs[sl]).to(device)
            y = torch.from_numpy(targets[sl]).to(device)
            torch.manual_seed(seed)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * schedule.multiplier(step)
            with amp:
                logits = net(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step}: stopped; the last good checkpoint "
                    f"is {ckpt_dir / 'last.pt'} (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            step += 1
            n_log += 1
            elapsed = time.perf_counter() - started
            value = loss.item()
            bar.update(task, advance=1, loss=value, bpb=value / math.log(2))
            if step % cfg.train.val_every == 0 or step == max_steps:
                validate_and_save(value)
                validated_at = step
        if reason == "time limit" and step > validated_at:
            validate_and_save(value)  # a timed run ends with a validated checkpoint too
            validated_at = step
    if is_main and step > validated_at:
        checkpoint("last", None)  # interrupted between validations: keep every finished step
        if not (ckpt_dir / "best.pt").exists():
            checkpoint("best", None)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    if reason == "interrupted":
        raise KeyboardInterrupt
    return {"run": str(run), "steps": step, "seconds": elapsed, "best_bpb": best,
            "stopped": reason, "checkpoint": str(ckpt_dir / "last.pt")}


def _validate(model: SaShiMi, dataset: Dataset, cfg: Config, device) -> dict | None:
    split = "val" if dataset.split_samples("val") else None
    if split is None:
        return None
    return evaluate_model(model, dataset, split, cfg.train.sample_len, device=device,
                          max_samples=cfg.train.val_max_samples, progress=False)


def _agree(world: int, flag: int) -> int:
    """Rank 0's `flag`, on every rank (one tiny broadcast per step under DDP)."""
    if world == 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([flag], dtype=torch.int64)
    dist.broadcast(t, 0)
    return int(t.item())


def _sync_schedule(schedule: Schedule) -> None:
    """Rank 0 validated; every rank adopts its schedule so learning rates stay identical."""
    import torch.distributed as dist
    t = torch.tensor([schedule.scale, schedule.best, float(schedule.bad)], dtype=torch.float64)
    dist.broadcast(t, 0)
    schedule.scale, schedule.best, schedule.bad = float(t[0]), float(t[1]), int(t[2])


def _listening(run: Path, model: SaShiMi, dataset: Dataset, cfg: Config, step: int, device) -> None:
    """A short continuation of a fixed validation prompt, and the refreshed listening page."""
    from ssmgen.report import write_listening_sample, write_index
    if cfg.train.sample_seconds > 0:  # 0 turns listening samples off
        try:
            write_listening_sample(run, model, dataset, cfg, step, device)
        except UserError as e:
            log.warning("no listening sample at step %d: %s", step, e)
    write_index(run)


def _append_metrics(path: Path, step, seconds, optimizer, loss, rate, val) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(METRICS)
        v = val or {}
        w.writerow([step, f"{seconds:.1f}", f"{optimizer.param_groups[0]['lr']:.3g}", f"{loss:.5f}",
                    f"{loss / math.log(2):.5f}", f"{rate:.0f}"] +
                   [f"{v[k]:.5f}" if k in v else "" for k in ("bpb", "acc1", "acc3", "acc5", "acc10")])
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    if len(keep) != len(rows):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(keep)


class _StopFlag:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
