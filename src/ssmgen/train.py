"""Training: the loop, validation, checkpoints, exact resume, carried states, DDP (the optimizer
and schedule: `optim.py`; the run folder's other files: `run_folder.py`).

Exact resume by construction: every step's randomness (which crops, dropout) is seeded from
(seed, step), not carried from step to step; what does carry (the optimizer and schedule states,
and with train.carry_crops the crop cursors and each row's model state) is restored from the
checkpoint. A run killed at any moment and resumed from its last checkpoint replays the same
steps and ends at bitwise the same weights (on CPU).

Beyond one machine: `torchrun --nproc_per_node N -m ssmgen train ...` runs DistributedDataParallel
(NCCL on GPU, gloo on CPU). Every rank draws the same global batch and takes its own slice, so N
processes compute the same update as one process with the same global batch (each rank carries
its own rows' states; last.pt gathers them). Rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssmgen.atomic import remove_stale_temps
from ssmgen.checkpoint import load_checkpoint, load_weights, save_checkpoint
from ssmgen.config import Config
from ssmgen.data import CropStreams, Dataset
from ssmgen.ema import WeightAverage
from ssmgen.errors import UserError
from ssmgen.evaluate import evaluate_model
from ssmgen.model import ModelState, SaShiMi, count_parameters
from ssmgen.optim import Schedule, make_optimizer, sync_schedule
from ssmgen.progress import progress_bar
from ssmgen.run_config import init_model_config, resume_config, same_model
from ssmgen.run_folder import (
    announce,
    append_metrics,
    check_run_folder,
    classical_line_for,
    truncate_metrics,
    write_listening,
)
from ssmgen.runtime import check_memory, resolve_device
from ssmgen.sizing import auto_batch, new_model, training_bytes
from ssmgen.workspace import is_run, mark_run, new_run

log = logging.getLogger("ssmgen.train")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def train(data: str | Path, cfg: Config | None, out: str | Path | None = None, *,
          resume: bool = False, init: str | Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train a model on a prepared dataset; returns a summary (run folder, steps, best bpb).

    `out`: the run folder (default: a new ./runs/PRESET-BACKEND-N). It must be new, empty or a run
    of ours. With `resume`, continues the run in `out` from its last checkpoint: its own config
    wins, except the stop limits and device given in `cfg` (None: the run's own). With `init` (a
    checkpoint, a run folder or a bundled model's name), starts from that model's weights with a
    fresh optimizer and schedule (fine-tuning): its model config must equal `cfg.model`, and its
    data format the dataset's. With neither train.max_steps nor train.max_minutes, training runs
    until Ctrl-C (which saves first).
    """
    trainer = Trainer(data, cfg, out, resume=resume, init=init, progress=progress)
    return trainer.run()


class Trainer:
    """One training run: the preflight checks (everything that can be refused is refused before
    the run folder is created), then the loop, validation, checkpoints and the listening page."""

    def __init__(self, data: str | Path, cfg: Config | None, out: str | Path | None, *,
                 resume: bool, progress: bool, init: str | Path | None = None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.progress = progress
        if resume and out is None:
            raise UserError("--resume needs the run folder: --out RUN")
        if resume and init is not None:
            raise UserError("--init starts a new run from a model's weights; --resume "
                            "continues a run: give one of them")
        self.run_dir = Path(out) if out is not None else None
        self.state = None
        if self.run_dir is not None and self.is_main:
            check_run_folder(self.run_dir, resume)
        if resume:
            last = self.run_dir / "checkpoints" / "last.pt"
            self.state = load_checkpoint(last)
            missing = [k for k in ("optimizer", "schedule", "seconds", "best_bpb")
                       if k not in self.state]
            if missing:
                raise UserError(f"{last}: cannot resume from it (no {missing[0]}: a slimmed or "
                                "damaged checkpoint)")
            stored = Config.from_dict(self.state["config"], source=str(last))
            cfg = resume_config(stored, cfg, str(last))
        elif cfg is None:
            raise UserError("train: give a config (or resume=True)")
        self.init = None
        if init is not None:
            self.init, init_model = init_model_config(init)
            same_model(cfg.model, init_model, self.init["path"])
            # the weights' parameterization (S4's C~ is for the length it was trained at)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                init_model, dropout=cfg.model.dropout))
        if cfg.model.seq_len is None and self.state is None:  # a config not made by load_config
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                     seq_len=cfg.train.sample_len))
        self.cfg = cfg
        self.dataset = Dataset(data)
        self.data = Path(data)
        if self.init is not None and self.dataset.data_format() != self.init["data_format"]:
            raise UserError(f"{data}: its format {self.dataset.data_format()} differs from the "
                            f"--init model's {self.init['data_format']}; prepare the audio with "
                            "the model's rate and encoding (ssmgen prep --rate/--encoding)")
        if self.state is not None and self.dataset.data_format() != self.state["data_format"]:
            raise UserError(f"{data}: its format "
                            f"{self.dataset.data_format()} differs from the run's "
                            f"{self.state['data_format']}; resume on the run's own dataset "
                            f"({self.state.get('dataset') or 'recorded in its checkpoint'})")
        self.device = resolve_device(cfg.train.device)

    # --- preflight ------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, world = self.cfg, self.world
        torch.manual_seed(cfg.train.seed)
        model = new_model(cfg.model, copies=4, what=f"preset {cfg.preset}",
                          fix="choose a smaller model", device="cpu")
        params = count_parameters(model)
        if cfg.train.batch_size == "auto":
            cfg.train.batch_size = auto_batch(cfg, params, self.device, world)
        if cfg.train.batch_size % world:
            raise UserError(f"--batch-size {cfg.train.batch_size} is not divisible by the "
                            f"{world} processes")
        self.dataset.check_trainable(cfg.train.sample_len)
        check_memory(training_bytes(cfg, params, cfg.train.batch_size // world),
                     f"training {cfg.train.batch_size} x {cfg.train.sample_len} samples per step",
                     "lower --batch-size or --sample-len", self.device)
        if self.init is not None:  # fine-tuning: the weights, not the optimizer or schedule
            load_weights(model, self.init["model"], self.init["path"])
        if model.prior is not None and self.state is None:  # a new run, or fine-tuning
            _fit_prior(model, self.dataset)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.schedule = Schedule(cfg)
        self.step, self.elapsed, self.best = 0, 0.0, math.inf
        if self.state is not None:
            load_weights(self.model, self.state["model"], self.run_dir / "checkpoints" / "last.pt")
            self.optimizer.load_state_dict(self.state["optimizer"])
            self.step, self.elapsed = int(self.state["step"]), float(self.state["seconds"])
            self.schedule.load_state_dict(self.state["schedule"], self.step)
            self.best = float(self.state["best_bpb"])
        # Which crops each row reads, and (with train.carry_crops > 1) this rank's rows' carried
        # states: both resume from the checkpoint, so a resumed run replays the same steps.
        self.streams = CropStreams(cfg.train.batch_size, cfg.train.carry_crops)
        self.carried: ModelState | None = None
        if self.state is not None and "carry" in self.state:
            self._load_carry(self.state["carry"])
        # the average starts from the weights training starts from (init, or the resumed ones)
        self.ema = WeightAverage(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        if self.ema is not None and self.state is not None and "ema" in self.state:
            self.ema.load_state_dict(self.state["ema"])

    def _open_run(self) -> bool:
        """Create (or adopt) the run folder, mark it as ours; True if this call created it."""
        cfg = self.cfg
        created = False
        if self.run_dir is None:
            self.run_dir = new_run(cfg.preset, cfg.model.backend)
            created = True
        elif not self.run_dir.exists():
            try:
                self.run_dir.mkdir(parents=True)
            except OSError as e:
                raise UserError(f"{self.run_dir}: cannot create the run folder "
                                f"({e.strerror or e})") from None
            created = True
        if self.state is None or not is_run(self.run_dir):
            mark_run(self.run_dir, {"preset": cfg.preset, "backend": cfg.model.backend,
                                    "recipe": cfg.recipe, "dataset": str(self.data.resolve()),
                                    "init": self.init["path"] if self.init else None,
                                    "config": cfg.to_dict()})
        for folder in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "samples"):
            remove_stale_temps(folder)  # what a killed run left half-written
        return created

    # --- carried states -------------------------------------------------------------------------
    def _rows(self) -> slice:
        per_rank = self.cfg.train.batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def _carry_payload(self) -> dict | None:
        """The crop cursors and the whole batch's carried states (gathered from every rank: call
        it on all of them), for last.pt; None when states are not carried."""
        if self.cfg.train.carry_crops == 1 or self.carried is None:
            return None
        tensors = {}
        for name, v in self.carried.tensors.items():
            v = v.detach().contiguous()
            if self.world > 1:
                import torch.distributed as dist
                parts = [torch.empty_like(v) for _ in range(self.world)]
                dist.all_gather(parts, v)
                v = torch.cat(parts)
            tensors[name] = v.cpu()
        return {"cursors": self.streams.state_dict(), "t": self.carried.t, "state": tensors}

    def _load_carry(self, carry: dict) -> None:
        where = self.run_dir / "checkpoints" / "last.pt"
        try:
            self.streams.load_state_dict(carry["cursors"])
            names = self.model.state_names()
            if list(carry["state"]) != names:
                raise ValueError("its states are not this model's")
            self.carried = ModelState(int(carry["t"]), {
                n: carry["state"][n][self._rows()].to(self.device) for n in names})
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: cannot resume its carried states ({e})") from None

    def _next_batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, ModelState | None]:
        """This rank's inputs and targets of the step seeded `seed`, and with carried states the
        state its rows start from (a row whose episode starts here: the initial state)."""
        inputs, targets, fresh = self.streams.next(self.dataset, self.cfg.train.sample_len,
                                                   np.random.default_rng(seed))
        rows = self._rows()
        x = torch.from_numpy(inputs[rows]).to(self.device)
        y = torch.from_numpy(targets[rows]).to(self.device)
        if self.cfg.train.carry_crops == 1:
            return x, y, None
        state = self.carried or self.model.initial_state(len(x), self.device)
        return x, y, self.model.restart_rows(state, torch.from_numpy(fresh[rows]).to(self.device))

    # --- checkpoints and validation -------------------------------------------------------------
    def checkpoint(self, tag: str, val: dict | None, carry: dict | None = None) -> None:
        payload = {"config": self.cfg.to_dict(), "data_format": self.dataset.data_format(),
                   "dataset": str(self.data.resolve()), "parameters": count_parameters(self.model),
                   "init": self.init["path"] if self.init else None,
                   "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "schedule": self.schedule.state_dict(), "step": self.step,
                   "seconds": self.elapsed, "best_bpb": self.best, "val": val or {}}
        if self.ema is not None:
            payload["ema"] = self.ema.state_dict()
        if carry is not None:
            payload["carry"] = carry
        save_checkpoint(self.run_dir / "checkpoints" / f"{tag}.pt", payload)
        self.saved = True

    def _averaged(self):
        """The averaged weights in the model inside the block (validation, best.pt, the
        listening sample), with --set train.ema; nothing changes without."""
        return self.ema.applied(self.model) if self.ema is not None else nullcontext()

    def validate_and_save(self, loss_value: float) -> dict | None:
        cfg, now = self.cfg, time.perf_counter()
        rate = self.n_log * cfg.train.batch_size * cfg.train.sample_len / max(now - self.t_log,
                                                                             1e-9)
        val, carry = None, self._carry_payload()
        if self.is_main:
            with self._averaged():  # validation, best.pt, the listening sample: the average
                val = _validate(self.model, self.dataset, cfg, self.device)
                if val:
                    self.schedule.on_validation(val["bpb"])
                    self.best = min(self.best, val["bpb"])
                append_metrics(self.run_dir / "metrics.csv", self.step, self.elapsed,
                               self.optimizer, loss_value, rate, val)
                if val is None or val["bpb"] <= self.best:
                    self.checkpoint("best", val)
                write_listening(self.run_dir, self.model, self.dataset, cfg, self.step,
                                self.device, self.classical)
            self.checkpoint("last", val, carry)  # the raw weights, for --resume
        if self.world > 1:
            sync_schedule(self.schedule)
        self.t_log, self.n_log = time.perf_counter(), 0
        self.model.train()
        return val

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, world = self.cfg, self.world
        if world > 1:
            import torch.distributed as dist
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        try:
            self._build()
        except BaseException:
            if world > 1:
                import torch.distributed as dist
                dist.destroy_process_group()
            raise
        created, self.saved, self.classical = False, False, None
        if self.is_main:
            created = self._open_run()
            announce(self.run_dir, cfg, self.dataset, self.device, self.state is not None,
                     self.init["path"] if self.init else None)
            self.classical = classical_line_for(self.run_dir, self.dataset, cfg)
        try:
            return self._loop(world)
        except BaseException:
            if created and not self.saved:  # a failed start leaves no empty run behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        finally:
            if world > 1:
                import torch.distributed as dist
                dist.destroy_process_group()

    def _loop(self, world: int) -> dict[str, Any]:
        cfg, model, device = self.cfg, self.model, self.device
        net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                          else None)
        ckpt_dir = self.run_dir / "checkpoints" if self.run_dir else Path("checkpoints")
        if self.is_main:
            truncate_metrics(self.run_dir / "metrics.csv", self.step)
        amp = (torch.autocast("cuda", dtype=torch.bfloat16)
               if device.type == "cuda" and cfg.train.amp in ("auto", "bf16") else nullcontext())
        per_step = cfg.train.batch_size * cfg.train.sample_len
        stop = _StopFlag()
        validated_at, value, last_val = self.step, math.nan, math.nan
        limit_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes is not None else math.inf
        max_steps = cfg.train.max_steps if cfg.train.max_steps is not None else 1 << 62
        reason = "max steps"
        started = time.perf_counter() - self.elapsed
        self.t_log, self.n_log = time.perf_counter(), 0
        model.train()
        total = cfg.train.max_steps * per_step if cfg.train.max_steps is not None else None
        with stop, progress_bar(self.progress and self.is_main, endless=total is None,
                                extra="step {task.fields[step]}  train bpb {task.fields[loss]:.3f}"
                                      "  val bpb {task.fields[val]:.3f}") as bar:
            task = bar.add_task("training", total=total, completed=self.step * per_step,
                                loss=math.nan, val=math.nan, step=self.step, unit="samples")
            while self.step < max_steps:
                # Every rank must stop (and start a timed cooldown) at the same step: rank 0's
                # clock and Ctrl-C decide.
                spent = time.perf_counter() - started
                if stop.requested:
                    flag = 2
                elif spent >= limit_s or self.schedule.cooled_down(self.step):
                    flag = 1
                else:
                    flag = 3 if self.schedule.wants_cooldown(self.step, spent, limit_s) else 0
                stopping = _agree(world, flag)
                if stopping == 3:
                    log.info("cooldown: the learning rate falls to 0 from step %d to %d",
                             self.step, self.schedule.start_cooldown(self.step))
                elif stopping:
                    reason = "interrupted" if stopping == 2 else "time limit"
                    break
                seed = _step_seed(cfg.train.seed, self.step)
                x, y, state = self._next_batch(seed)
                torch.manual_seed(seed)
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * self.schedule.multiplier(self.step)
                with amp:
                    if state is None:
                        logits = net(x)
                    else:  # the state after this crop starts the row's next one (detached
                        logits, self.carried = net(x, state)  # by restart_rows next step)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {self.step}: stopped; the last good "
                        f"checkpoint is {ckpt_dir / 'last.pt'} (try a lower --lr)")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(model)
                self.step += 1
                self.n_log += 1
                self.elapsed = time.perf_counter() - started
                value = loss.item()
                if self.step % cfg.train.val_every == 0 or self.step == max_steps:
                    val = self.validate_and_save(value)
                    last_val = val["bpb"] if val else last_val
                    validated_at = self.step
                bar.update(task, advance=per_step, loss=value / math.log(2), val=last_val,
                           step=self.step)
            if reason == "time limit" and self.step > validated_at:
                self.validate_and_save(value)  # a timed run ends with a validated checkpoint too
                validated_at = self.step
        carry = self._carry_payload() if self.step > validated_at else None
        if self.is_main and self.step > validated_at:
            self.checkpoint("last", None, carry)  # interrupted between validations: keep every step
            if not (ckpt_dir / "best.pt").exists():
                with self._averaged():
                    self.checkpoint("best", None)
        if reason == "interrupted":
            raise KeyboardInterrupt
        return {"run": str(self.run_dir), "steps": self.step, "seconds": self.elapsed,
                "best_bpb": self.best, "stopped": reason, "checkpoint": str(ckpt_dir / "last.pt"),
                "recipe": cfg.recipe, "batch_size": cfg.train.batch_size,
                "sample_len": cfg.train.sample_len}


def _validate(model: SaShiMi, dataset: Dataset, cfg: Config, device) -> dict | None:
    split = "val" if dataset.split_samples("val") else None
    if split is None:
        return None
    # streamed: the state carried through each file, as `continue` uses the model (chunks from a
    # fresh state hid how a model does over a whole song); best.pt and the plateau follow it
    return evaluate_model(model, dataset, split, cfg.train.sample_len, device=device,
                          max_samples=cfg.train.val_max_samples, progress=False, streamed=True)


def _agree(world: int, flag: int) -> int:
    """Rank 0's `flag`, on every rank (one tiny broadcast per step under DDP)."""
    if world == 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([flag], dtype=torch.int64)
    dist.broadcast(t, 0)
    return int(t.item())


def _fit_prior(model: SaShiMi, dataset: Dataset) -> None:
    """The model's classical prior fitted on this dataset's train split (refitted when
    fine-tuning: the predictor belongs to the data, the network learns what it misses)."""
    from ssmgen.classical import dataset_coder
    t0 = time.perf_counter()
    coder = dataset_coder(dataset, dists=("logistic",))
    if coder is None:
        raise UserError(f"{dataset.root}: no training split to fit the model's prior on")
    model.prior.load_coder(coder)
    log.info("prior: LPC-%d fitted on the train split, window %d, scale %.2f (%.1f s)",
             coder["order"], coder["window"], coder["scale"], time.perf_counter() - t0)


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
