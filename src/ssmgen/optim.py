"""The optimizer and the learning-rate schedule of a training run (plain-data state, so a
checkpoint resumes both exactly)."""

from __future__ import annotations

import logging
import math

import torch

from ssmgen.config import Config
from ssmgen.model import SaShiMi

log = logging.getLogger("ssmgen.train")



class Schedule:
    """Learning-rate multiplier per step, plus ReduceLROnPlateau-style drops on validation."""

    def __init__(self, cfg: Config) -> None:
        t = cfg.train
        self.kind, self.warmup, self.min_lr, self.base_lr = (t.schedule, t.warmup_steps,
                                                             t.min_lr, t.lr)
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


def sync_schedule(schedule: Schedule) -> None:
    """Rank 0 validated; every rank adopts its schedule so learning rates stay identical."""
    import torch.distributed as dist
    t = torch.tensor([schedule.scale, schedule.best, float(schedule.bad)], dtype=torch.float64)
    dist.broadcast(t, 0)
    schedule.scale, schedule.best, schedule.bad = float(t[0]), float(t[1]), int(t[2])
