"""Which config a run trains with when it does not start from nothing: a resumed run's own
(`resume_config`: the stored config wins, except the stop limits and device), or the model a
fine-tuning run starts from (`init_model_config`, and `same_model`, which refuses a preset that
would build another model).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ssmgen.checkpoint import load_checkpoint
from ssmgen.config import RECIPE_MODEL_FIELDS, Config, ModelConfig
from ssmgen.errors import UserError

log = logging.getLogger("ssmgen.train")


def resume_config(stored: Config, cfg: Config | None, source: str) -> Config:
    """The config of a resumed run: the stored one, with the stop limits and device of `cfg`.
    Any other field `cfg` sets differently is ignored, and said so."""
    resumed = Config.from_dict(stored.to_dict(), source=source)
    if cfg is None:
        return resumed
    given = Config.from_dict(cfg.to_dict(), source=source)
    for key in ("max_steps", "max_minutes", "device"):
        setattr(resumed.train, key, getattr(given.train, key))
    a, b = resumed.to_dict(), given.to_dict()
    for section in ("model", "train"):
        for key in a[section]:
            if a[section][key] != b[section][key] and key != "seq_len":
                log.warning("resuming with the run's own %s.%s = %r (not %r)", section, key,
                            a[section][key], b[section][key])
    return resumed


def init_model_config(init: str | Path) -> tuple[dict, ModelConfig]:
    """(checkpoint, model config) of the model `--init` names: a checkpoint file, a run folder or
    a bundled model's name."""
    from ssmgen.workspace import resolve_model

    ckpt = load_checkpoint(resolve_model(str(init)).path)
    return ckpt, Config.from_dict(ckpt["config"], source=ckpt["path"]).model


def same_model(given: ModelConfig, init: ModelConfig, where: str) -> None:
    """UserError naming the first field in which the model to train differs from the `--init`
    model (its weights could not be loaded, or would mean something else). Dropout is training,
    not the model: it may change; seq_len and the ordinal maps (a recipe's choice of how the
    weights are parameterized) follow the weights."""
    a, b = dataclasses.asdict(given), dataclasses.asdict(init)
    a["backend_options"], b["backend_options"] = given.options(), init.options()
    for key in a:
        if key not in ("seq_len", "dropout", *RECIPE_MODEL_FIELDS) and a[key] != b[key]:
            raise UserError(f"--init {where}: its model has {key} = {b[key]!r}, the preset asks "
                            f"for {a[key]!r}; fine-tuning needs the same model (leave out "
                            "--preset/--backend to take the model's own)")
