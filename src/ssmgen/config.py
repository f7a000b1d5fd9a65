"""Configuration: YAML presets as small override files over `presets/base.yaml`.

`load_config("ablated", backend="s4d", overrides=["train.lr=1e-3"])` merges base <- preset (a name
shipped in `presets/` or a path to the user's own YAML) <- `--set` overrides, then validates every
key and type. Mistakes raise UserError with one line. YAML is read with `yaml.safe_load` only.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ssmgen.errors import UserError


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    pool: list[int] = field(default_factory=lambda: [4, 4])
    expand: int = 2
    ff_expand: int = 2
    glu: bool = False
    dropout: float = 0.0
    n_tokens: int = 256
    backend: str = "s4"
    backend_options: dict[str, dict] = field(default_factory=dict)
    #: Training length at the finest tier (a backend's `l_max` at each rate: S4 parameterizes its
    #: C for it). `load_config` sets it to train.sample_len; None in checkpoints made before it.
    seq_len: Optional[int] = None

    @property
    def frame(self) -> int:
        """Samples per step of the coarsest tier (16 for pool [4, 4])."""
        f = 1
        for p in self.pool:
            f *= p
        return f

    def options(self) -> dict:
        """Constructor options of the chosen backend."""
        return dict(self.backend_options.get(self.backend, {}))


@dataclass
class TrainConfig:
    batch_size: int = 1
    sample_len: int = 131072
    lr: float = 4e-3
    ssm_lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "plateau"
    warmup_steps: int = 0
    plateau_factor: float = 0.2
    plateau_patience: int = 5
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    val_every: int = 500
    val_max_samples: int = 1 << 20
    sample_seconds: float = 4.0
    prompt_seconds: float = 2.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"


@dataclass
class Config:
    model: ModelConfig
    train: TrainConfig
    preset: str = "custom"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        d = dict(d)
        unknown = set(d) - {"model", "train", "preset"}
        if unknown:
            raise UserError(f"{source}: unknown section '{sorted(unknown)[0]}' "
                            "(known: model, train)")
        cfg = cls(model=_build(ModelConfig, d.get("model") or {}, f"{source}: model"),
                  train=_build(TrainConfig, d.get("train") or {}, f"{source}: train"),
                  preset=str(d.get("preset", "custom")))
        _check(cfg, source)
        return cfg


CHOICES = {"train.schedule": ("plateau", "cosine", "constant"),
           "train.device": ("auto", "cpu", "cuda"),
           "train.amp": ("auto", "bf16", "off")}


def _check(cfg: Config, source: str) -> None:
    m, t = cfg.model, cfg.train
    for key, choices in CHOICES.items():
        value = getattr(t, key.split(".")[1])
        if value not in choices:
            raise UserError(f"{source}: {key} = {value!r}: use one of {', '.join(choices)}")
    positive = {"model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.expand": m.expand,
                "model.ff_expand": m.ff_expand, "train.batch_size": t.batch_size,
                "train.sample_len": t.sample_len, "train.lr": t.lr, "train.ssm_lr": t.ssm_lr,
                "train.val_every": t.val_every}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{source}: {key} = {value}: must be positive")
    if not m.pool or any(p < 1 for p in m.pool):
        raise UserError(f"{source}: model.pool = {m.pool}: factors must be >= 1")
    if m.n_tokens != 256:
        raise UserError(f"{source}: model.n_tokens = {m.n_tokens}: only 8-bit tokens (256) "
                        "are supported")
    if t.sample_len % m.frame:
        raise UserError(f"{source}: train.sample_len = {t.sample_len} must be a multiple of "
                        f"{m.frame} (the product of model.pool)")
    if m.seq_len is not None and (m.seq_len <= 0 or m.seq_len % m.frame):
        raise UserError(f"{source}: model.seq_len = {m.seq_len} must be a positive multiple of "
                        f"{m.frame} (the product of model.pool)")
    if not 0 <= m.dropout < 1:
        raise UserError(f"{source}: model.dropout = {m.dropout}: must be in [0, 1)")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, [a for a in args if a is not type(None)][0], where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected text, got {value!r}")
        return value
    return value


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

def preset_names() -> list[str]:
    """Presets shipped with the package (besides `base`)."""
    files = resources.files("ssmgen").joinpath("presets").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml") and p.name != "base.yaml")


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    return data


def read_preset(name_or_path: str) -> tuple[dict, str]:
    """The override dict of a shipped preset name or a user YAML path, and its display name."""
    if name_or_path in preset_names() or name_or_path == "base":
        text = resources.files("ssmgen").joinpath("presets", f"{name_or_path}.yaml").read_text()
        return _read_yaml(text, f"preset {name_or_path}"), name_or_path
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: no such preset file")
        return _read_yaml(path.read_text(encoding="utf-8"), str(path)), str(path)
    raise UserError(f"unknown preset '{name_or_path}': use one of {', '.join(preset_names())} "
                    "or a path to a .yaml file")


def merge(base: dict, override: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `--set section.key=value` (value parsed as YAML: 1e-3, true, [4, 4], s4d)."""
    if "=" not in assignment:
        raise UserError(f"--set '{assignment}': expected key=value, e.g. train.lr=1e-3")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or parts[0] not in ("model", "train"):
        raise UserError(f"--set '{assignment}': key must start with model. or train. "
                        "(e.g. model.d_model=32)")
    value = _read_yaml(f"v: {raw}", f"--set '{assignment}'")["v"]
    node: dict = {}
    cursor = node
    for p in parts[:-1]:
        cursor = cursor.setdefault(p, {})
    cursor[parts[-1]] = value
    return merge(data, node)


def load_config(preset: str = "ablated", backend: str | None = None,
                overrides: list[str] | None = None) -> Config:
    """Resolve a preset (name or YAML path) over the base, with optional backend and overrides."""
    base, _ = read_preset("base")
    over, name = read_preset(preset)
    data = merge(base, over)
    if backend:
        data = merge(data, {"model": {"backend": backend}})
    for item in overrides or []:
        data = apply_override(data, item)
    data["preset"] = name
    if data.get("model", {}).get("seq_len") is None:  # the length this model is trained at
        data = merge(data, {"model": {"seq_len": data.get("train", {}).get("sample_len")}})
    cfg = Config.from_dict(data, source=f"preset {name}")
    from ssmgen import backends
    if cfg.model.backend not in backends.available():
        raise UserError(f"unknown backend '{cfg.model.backend}': available are "
                        f"{', '.join(backends.available())}")
    return cfg
