"""Configuration: YAML presets as small override files over `presets/base.yaml`, and training
recipes that follow the device.

`load_config("ablated", backend="s4d", overrides=["train.lr=1e-3"], recipe="auto")` merges
base <- recipe <- preset <- backend <- `--set` overrides, then validates every key, type and range
(numbers finite and in range, one line naming the field). A preset is the model (a name shipped
in `presets/`, one in the working folder's `presets/`, or a path to a YAML file); a recipe
(`recipes/*.yaml`: cpu, gpu, paper) is how it is trained, chosen for the device unless the user
(or the preset, with a top-level `recipe:` key) names one. YAML is read with the safe loader
only, and a document whose aliases expand past a small bound is refused before it is built.
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
from ssmgen.tokens import N_TOKENS
from ssmgen.validate import bounded_size, number


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    pool: list[int] = field(default_factory=lambda: [4, 4])
    expand: int = 2
    ff_expand: int = 2
    glu: bool = False
    dropout: float = 0.0
    n_tokens: int = N_TOKENS
    backend: str = "s4"
    backend_options: dict[str, dict] = field(default_factory=dict)
    #: Training length at the finest tier (a backend's `l_max` at each rate: S4 parameterizes its
    #: C for it). `load_config` sets it to train.sample_len; None in checkpoints made before it.
    seq_len: Optional[int] = None
    #: "lpc": a linear-prediction coder fitted on the training data gives the logits a prior
    #: (`prior.py`); "none": the paper's model.
    prior: str = "none"
    #: Add a learned map of smooth functions of each code's position to its embedding
    #: (`ordinal.TokenEmbedding`); False: the paper's plain table.
    ordinal_input: bool = False
    #: The same for the output layer's rows (`ordinal.TokenHead`): neighbouring codes' logits
    #: share a smooth learned part; False: the paper's plain layer.
    ordinal_output: bool = False

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
    #: crops per step (global batch), or "auto": as many as fit the device (at most AUTO_BATCH_MAX)
    batch_size: Union[int, str] = 1
    sample_len: int = 131072
    lr: float = 4e-3
    ssm_lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "plateau"
    warmup_steps: int = 0
    plateau_factor: float = 0.2
    plateau_patience: int = 5
    min_lr: float = 1e-6
    #: share of the run (of --max-steps, else of --max-minutes) at its end over which the learning
    #: rate falls linearly to zero (`optim.Schedule`); 0: off
    cooldown: float = 0.0
    grad_clip: float = 1.0
    #: "adamw"; "muon": Muon on the hidden weight matrices, AdamW on the rest (`optim.py`)
    optimizer: str = "adamw"
    #: decay of a running average of the weights used for validation and the best checkpoint
    #: (`ema.py`); 0: off
    ema: float = 0.0
    #: consecutive crops of one file that each batch row reads, its state carried from one crop
    #: to the next (truncated backpropagation through time, `data.CropStreams`); 1: every crop
    #: from a fresh state (the paper's)
    carry_crops: int = 1
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
    recipe: str = "custom"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        d = dict(d)
        unknown = set(d) - {"model", "train", "preset", "recipe"}
        if unknown:
            raise UserError(f"{source}: unknown section '{sorted(unknown)[0]}' "
                            "(known: model, train, recipe)")
        cfg = cls(model=_build(ModelConfig, d.get("model") or {}, f"{source}: model"),
                  train=_build(TrainConfig, d.get("train") or {}, f"{source}: train"),
                  preset=str(d.get("preset", "custom")), recipe=str(d.get("recipe", "custom")))
        _check(cfg, source)
        return cfg


CHOICES = {"model.prior": ("none", "lpc"),
           "train.schedule": ("plateau", "cosine", "constant"),
           "train.optimizer": ("adamw", "muon"),
           "train.device": ("auto", "cpu", "cuda"),
           "train.amp": ("auto", "bf16", "off")}
AUTO_BATCH_MAX = 16  # "auto" batches stop here: beyond it more steps beat bigger ones

#: The range of every numeric field: (low, high, low excluded, whole number). One table, checked
#: wherever a config is made (presets, --set, the command's own options, checkpoints).
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "model.d_model": (1, 8192, False, True),
    "model.n_layers": (1, 64, False, True),
    "model.pool": (1, 64, False, True),
    "model.expand": (1, 8, False, True),
    "model.ff_expand": (1, 16, False, True),
    "model.dropout": (0, 1, False, False),
    "model.seq_len": (1, 1 << 26, False, True),
    "train.batch_size": (1, 4096, False, True),
    "train.sample_len": (1, 1 << 26, False, True),
    "train.lr": (0, 1, True, False),
    "train.ssm_lr": (0, 1, True, False),
    "train.weight_decay": (0, 10, False, False),
    "train.warmup_steps": (0, 1e9, False, True),
    "train.plateau_factor": (0, 1, True, False),
    "train.plateau_patience": (0, 1e6, False, True),
    "train.min_lr": (0, 1, False, False),
    "train.cooldown": (0, 0.9, False, False),
    "train.grad_clip": (0, 1e6, False, False),
    "train.ema": (0, 0.99999, False, False),
    "train.carry_crops": (1, 1 << 20, False, True),
    "train.max_steps": (1, 1 << 62, False, True),
    "train.max_minutes": (0, 1e7, True, False),
    "train.val_every": (1, 1e9, False, True),
    "train.val_max_samples": (1, 1 << 40, False, True),
    "train.sample_seconds": (0, 600, False, False),
    "train.prompt_seconds": (0, 600, False, False),
    "train.seed": (0, 2**63 - 1, False, True),
}
#: The command-line option that sets a field, named beside it in errors.
FLAGS = {"train.batch_size": "--batch-size", "train.sample_len": "--sample-len", "train.lr": "--lr",
         "train.max_steps": "--max-steps", "train.max_minutes": "--max-minutes",
         "train.seed": "--seed", "train.device": "--device"}


def crops_text(batch_size: Any, sample_len: Any, carry_crops: Any = 1) -> str:
    """How a recipe reads its training data, said the same way everywhere (the run's first lines,
    its page, `ssmgen presets`): '8 x 2048 samples per step, state carried over 64 crops'."""
    carry = f", state carried over {carry_crops} crops" if (carry_crops or 1) > 1 else ""
    return f"{batch_size} x {sample_len} samples per step{carry}"


def field_name(key: str) -> str:
    """A field's name for messages, with the option that sets it: 'train.lr (--lr)'."""
    return f"{key} ({FLAGS[key]})" if key in FLAGS else key


def _check(cfg: Config, source: str) -> None:
    m, t = cfg.model, cfg.train
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(m if section == "model" else t, name)
        if value not in choices:
            raise UserError(f"{source}: {field_name(key)} = {value!r}: use one of "
                            f"{', '.join(choices)}")
    if m.dropout >= 1:
        raise UserError(f"{source}: model.dropout = {m.dropout}: must be below 1")
    for key, (low, high, low_open, whole) in RANGES.items():
        section, name = key.split(".")
        value = getattr(m if section == "model" else t, name)
        if value is None or (key == "train.batch_size" and value == "auto"):
            continue
        if key == "train.batch_size" and isinstance(value, str):
            raise UserError(f"{source}: {field_name(key)} = {value!r}: a whole number or auto")
        for v in (value if isinstance(value, list) else [value]):
            try:
                number(field_name(key), v, low=low, high=high, low_open=low_open, integer=whole)
            except UserError as e:
                raise UserError(f"{source}: {e}") from None
    if not 1 <= len(m.pool) <= 6:
        raise UserError(f"{source}: model.pool = {m.pool}: give 1 to 6 pooling factors")
    if m.n_tokens != N_TOKENS:
        raise UserError(f"{source}: model.n_tokens = {m.n_tokens}: only 8-bit tokens ({N_TOKENS}) "
                        "are supported")
    if t.sample_len % m.frame:
        raise UserError(f"{source}: {field_name('train.sample_len')} = {t.sample_len} must be a "
                        f"multiple of {m.frame} (the product of model.pool)")
    if m.seq_len is not None and m.seq_len % m.frame:
        raise UserError(f"{source}: model.seq_len = {m.seq_len} must be a positive multiple of "
                        f"{m.frame} (the product of model.pool)")
    _check_backend_options(m.backend_options, source)


def _check_backend_options(options: dict, source: str) -> None:
    """Every backend's options: a mapping of names to plain values, numbers finite; sizes
    (`d_state`, `d_conv`, `expand`, `rank`) whole and in a sane range. A backend checks the
    meaning of its own options when it is built."""
    for backend, opts in options.items():
        if not isinstance(opts, dict):
            raise UserError(f"{source}: model.backend_options.{backend}: expected a mapping")
        for key, value in opts.items():
            name = f"model.backend_options.{backend}.{key}"
            if isinstance(value, bool) or isinstance(value, str) or value is None:
                continue
            if key in ("d_state", "d_conv", "expand", "rank"):
                high = {"d_state": 4096, "d_conv": 64, "expand": 16, "rank": 16}[key]
                number(f"{source}: {name}", value, low=1, high=high, integer=True)
            elif isinstance(value, (int, float)):
                number(f"{source}: {name}", value)
            else:
                raise UserError(f"{source}: {name} = {value!r}: expected a number, text or "
                                "true/false")


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
    if origin is Union:  # Optional[X], or int-or-text (batch_size: 4 or auto)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options[:-1]:
            try:
                return _coerce(value, a, where)
            except UserError:
                pass
        return _coerce(value, options[-1], where)
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
        if isinstance(value, str):  # YAML 1.1 reads 1e6 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
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


def recipe_names() -> list[str]:
    """Training recipes shipped with the package (cpu, gpu, paper)."""
    files = resources.files("ssmgen").joinpath("recipes").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


#: Where a working folder keeps its own presets: searched before the shipped ones.
USER_PRESETS = Path("presets")


def _yaml_children(node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return None


def _read_yaml(text: str, source: str) -> dict:
    """A YAML mapping read with the safe loader; refused if its aliases would expand it past
    `validate.MAX_PLAIN_NODES` (checked on the composed nodes, before anything is built)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        bounded_size(node, _yaml_children, source)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply; refusing it") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    return data


def _shipped(folder: str, name: str) -> str:
    return resources.files("ssmgen").joinpath(folder, f"{name}.yaml").read_text()


def read_preset(name_or_path: str) -> tuple[dict, str]:
    """The override dict of a preset and its display name: a YAML path, a preset in the working
    folder's `presets/` (searched first), or one shipped with ssmgen."""
    if name_or_path == "base":
        return _read_yaml(_shipped("presets", "base"), "preset base"), "base"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not path.exists():
            raise UserError(f"{path}: no such preset file")
        if not path.is_file():
            raise UserError(f"{path}: not a regular file; a preset is a YAML file")
        return _read_yaml(_read_text(path), str(path)), str(path)
    own = USER_PRESETS / f"{name_or_path}.yaml"
    if own.is_file():
        return _read_yaml(_read_text(own), str(own)), name_or_path
    if name_or_path in preset_names():
        return _read_yaml(_shipped("presets", name_or_path), f"preset {name_or_path}"), name_or_path
    raise UserError(f"unknown preset '{name_or_path}': use one of {', '.join(preset_names())}, "
                    "a file in ./presets/ or a path to a .yaml file")


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > 1 << 20:
            raise UserError(f"{path}: over 1 MB; not a preset")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


def preset_text(name_or_path: str) -> str:
    """A preset's YAML as written, for `ssmgen presets --show NAME` (to copy and edit)."""
    read_preset(name_or_path)  # the same checks and errors as using it
    path = Path(name_or_path)
    if path.is_file():
        return _read_text(path)
    own = USER_PRESETS / f"{name_or_path}.yaml"
    if own.is_file():
        return _read_text(own)
    return _shipped("presets", name_or_path)


#: The model fields a recipe may set: how the weights are parameterized while training, not what
#: the model computes (the ordinal maps fold into a plain table and head: `ordinal.TokenEmbedding`).
RECIPE_MODEL_FIELDS = ("ordinal_input", "ordinal_output")


def read_recipe(name: str) -> dict:
    """A recipe's override dict (train fields, and the model fields of RECIPE_MODEL_FIELDS)."""
    if name not in recipe_names():
        raise UserError(f"--recipe {name}: use auto or one of {', '.join(recipe_names())}")
    data = _read_yaml(_shipped("recipes", name), f"recipe {name}")
    if set(data) - {"train", "model"} or set(data.get("model") or {}) - set(RECIPE_MODEL_FIELDS):
        raise UserError(f"recipe {name}: may only set train fields and model."
                        f"{', model.'.join(RECIPE_MODEL_FIELDS)}")
    return data


def device_recipe(device: str = "auto") -> str:
    """The recipe that trains well on `device` (auto: this machine's): gpu on CUDA, else cpu."""
    if device == "auto":
        import torch
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device == "cuda" else "cpu"


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
                overrides: list[str] | None = None, recipe: str | None = None) -> Config:
    """Resolve a preset (name or YAML path) with a training recipe over the base, with an
    optional backend and `--set` overrides. `recipe`: a name from `recipe_names()`, or None /
    "auto" for the preset's own choice, else the one that fits the device."""
    base, _ = read_preset("base")
    over, name = read_preset(preset)
    own_recipe = over.pop("recipe", None)
    if recipe in (None, "auto"):
        if own_recipe is not None:
            recipe = str(own_recipe)
        else:  # the device the run asks for decides (an override may name one)
            probe = merge(base, over)
            for item in overrides or []:
                probe = apply_override(probe, item)
            recipe = device_recipe(str(probe.get("train", {}).get("device", "auto")))
    data = merge(merge(base, read_recipe(recipe)), over)
    if backend:
        data = merge(data, {"model": {"backend": backend}})
    for item in overrides or []:
        data = apply_override(data, item)
    data["preset"], data["recipe"] = name, recipe
    if data.get("model", {}).get("seq_len") is None:  # the length this model is trained at
        data = merge(data, {"model": {"seq_len": data.get("train", {}).get("sample_len")}})
    cfg = Config.from_dict(data, source=f"preset {name}")
    from ssmgen import backends
    if cfg.model.backend not in backends.available():
        raise UserError(f"unknown backend '{cfg.model.backend}': available are "
                        f"{', '.join(backends.available())}")
    return cfg
