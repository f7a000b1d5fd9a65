"""The optimizer and the learning-rate schedule of a training run (plain-data state, so a
checkpoint resumes both exactly)."""

from __future__ import annotations

import logging
import math

import torch

from ssmgen.backends import SequenceBackend
from ssmgen.config import Config
from ssmgen.model import SaShiMi

log = logging.getLogger("ssmgen.train")



class Schedule:
    """Learning-rate multiplier per step: warm-up, the schedule's shape, ReduceLROnPlateau-style
    drops on validation, and a linear cooldown to zero over the last `train.cooldown` of the run.

    The cooldown's place is known from the start with --max-steps; a run limited by minutes
    starts it when that share of its minutes is left (`start_cooldown`, decided by the loop's
    clock), for as many steps as the same share of the run took so far. Its place is kept in the
    state, so a resumed run goes on as the interrupted one would have.
    """

    def __init__(self, cfg: Config) -> None:
        t = cfg.train
        self.kind, self.warmup, self.min_lr, self.base_lr = (t.schedule, t.warmup_steps,
                                                             t.min_lr, t.lr)
        self.total = t.max_steps
        self.factor, self.patience = t.plateau_factor, t.plateau_patience
        self.scale, self.best, self.bad = 1.0, math.inf, 0
        self.cooldown = t.cooldown
        self.cool_start: int | None = None  # first step of the cooldown
        self.cool_end: int | None = None    # the step the run ends at (lr reaches 0 there)
        self.timed = False                  # started by the clock (kept in the state)
        if self.cooldown > 0 and self.total:
            self.cool_end = self.total
            self.cool_start = self.total - max(1, round(self.cooldown * self.total))

    def multiplier(self, step: int) -> float:
        m = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "cosine" and self.total:
            progress = min(1.0, max(0.0, (step - self.warmup) / max(1, self.total - self.warmup)))
            floor = self.min_lr / self.base_lr
            m *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.cool_start is not None and step >= self.cool_start:
            m *= max(0.0, (self.cool_end - step) / (self.cool_end - self.cool_start))
        return m * self.scale

    def wants_cooldown(self, step: int, elapsed_s: float, limit_s: float) -> bool:
        """Whether a run limited to `limit_s` seconds should start its cooldown at `step`, having
        trained `elapsed_s` (not if it already cools down)."""
        return (self.cooldown > 0 and math.isfinite(limit_s)
                and elapsed_s >= (1 - self.cooldown) * limit_s
                and (self.cool_start is None or self.cool_start > step))

    def cooled_down(self, step: int) -> bool:
        """Whether a cooldown the clock started has ended at `step` (the run stops there)."""
        return self.timed and step >= self.cool_end

    def start_cooldown(self, step: int) -> int:
        """Start the cooldown at `step` (the minutes left are `train.cooldown` of the run): it lasts
        what that share of the run's steps is, never past a planned end. Returns the end step."""
        n = max(1, round(step * self.cooldown / (1 - self.cooldown)))
        end = step + n if self.cool_end is None else min(self.cool_end, step + n)
        self.cool_start, self.cool_end = step, max(end, step + 1)
        self.timed = True
        return self.cool_end

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
        # a cooldown planned from --max-steps follows the config (a resumed run may change it);
        # one the clock started is kept
        cool = [self.cool_start, self.cool_end] if self.timed else None
        return {"scale": self.scale, "best": self.best, "bad": self.bad, "cool": cool}

    def load_state_dict(self, d: dict, step: int | None = None) -> None:
        """`step`: where the resumed run stands. A clock-started cooldown that had not ended goes
        on; one that ended belongs to a run that finished, and the new limit plans its own."""
        self.scale, self.best, self.bad = float(d["scale"]), float(d["best"]), int(d["bad"])
        cool = d.get("cool")
        if cool is not None and (step is None or step < int(cool[1])):
            self.cool_start, self.cool_end = (int(v) for v in cool)
            self.timed = True


class MuonAdamW:
    """Muon (Jordan et al. 2024, `torch.optim.Muon`) on the hidden weight matrices and AdamW on
    the other parameters, as one optimizer for the training loop: `param_groups` (the loop sets
    each group's lr from its "base_lr"), `zero_grad`, `step`, and a state dict holding both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        # read each time: load_state_dict gives both optimizers new group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.muon.load_state_dict(d["muon"])
        self.adamw.load_state_dict(d["adamw"])


def hidden_matrices(model: SaShiMi) -> list[torch.nn.Parameter]:
    """The weights Muon updates: the matrices of the linear layers between the sequence layers
    (each sequence block's output map, the feed-forward blocks, the pools). The token table and
    the output head stay with AdamW, as Muon's authors prescribe, and so does everything inside a
    backend (its state-space parameters, and Mamba's projections, which make its B, C and dt:
    with Muon on them Mamba learnt far slower, docs/benchmarks.md)."""
    keep = {id(p) for m in model.modules() if isinstance(m, SequenceBackend)
            for p in m.parameters()}
    keep |= {id(p) for m in (model.embedding, model.head) for p in m.parameters()}
    return [m.weight for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in keep]


def make_optimizer(model: SaShiMi, cfg: Config) -> torch.optim.AdamW | MuonAdamW:
    """AdamW with the SSM parameters in their own group (reference: lr 1e-3, no weight decay);
    with `train.optimizer: muon`, the hidden matrices (`hidden_matrices`) move to Muon at the
    same rate (its update scaled to AdamW's size, "match_rms_adamw")."""
    t = cfg.train
    ssm = {id(p) for p in model.ssm_parameters()}
    hidden = hidden_matrices(model) if t.optimizer == "muon" else []
    skip = ssm | {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in skip]
    groups = [{"params": rest, "lr": t.lr, "weight_decay": t.weight_decay, "base_lr": t.lr},
              {"params": [p for p in model.parameters() if id(p) in ssm], "lr": t.ssm_lr,
               "weight_decay": 0.0, "base_lr": t.ssm_lr}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999))
    if not hidden:
        return adamw
    muon = torch.optim.Muon([{"params": hidden, "lr": t.lr, "base_lr": t.lr}], lr=t.lr,
                            weight_decay=t.weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw)


def sync_schedule(schedule: Schedule) -> None:
    """Rank 0 validated; every rank adopts its schedule so learning rates stay identical."""
    import torch.distributed as dist
    t = torch.tensor([schedule.scale, schedule.best, float(schedule.bad)], dtype=torch.float64)
    dist.broadcast(t, 0)
    schedule.scale, schedule.best, schedule.bad = float(t[0]), float(t[1]), int(t[2])
