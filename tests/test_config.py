"""Presets, overrides and their one-line errors."""

from dataclasses import replace

import pytest

from ssmgen.config import load_config, preset_names
from ssmgen.errors import UserError


def test_shipped_presets():
    assert {"tiny", "ablated", "sashimi"} <= set(preset_names())
    cfg = load_config("ablated")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.pool, cfg.model.glu) == (64, 2, [4, 4], False)
    assert (cfg.train.batch_size, cfg.train.sample_len, cfg.train.lr, cfg.train.ssm_lr) == (1, 131072, 4e-3, 1e-3)
    assert load_config("sashimi").model.n_layers == 8
    cpu = load_config("ablated-cpu")  # the same model, the CPU-budget recipe
    assert replace(cpu.model, seq_len=None) == replace(cfg.model, seq_len=None)
    # The model records the length it is trained at (S4's C~ is parameterized for it).
    assert (cfg.model.seq_len, cpu.model.seq_len) == (131072, 4096)
    assert load_config("tiny", overrides=["train.sample_len=256"]).model.seq_len == 256
    assert (cpu.train.batch_size, cpu.train.sample_len, cpu.train.lr, cpu.train.warmup_steps) == (4, 4096, 1e-3, 100)


def test_overrides_and_backend():
    cfg = load_config("tiny", backend="s4d", overrides=["train.lr=1e-3", "model.pool=[2, 2]",
                                                         "train.sample_len=64"])
    assert cfg.model.backend == "s4d" and cfg.train.lr == 1e-3 and cfg.model.pool == [2, 2]


def test_user_yaml(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("model:\n  d_model: 32\ntrain:\n  batch_size: 2\n")
    cfg = load_config(str(p))
    assert cfg.model.d_model == 32 and cfg.train.batch_size == 2 and cfg.model.n_layers == 2


@pytest.mark.parametrize("args,message", [
    (dict(overrides=["model.d_modle=3"]), "unknown key 'd_modle'"),
    (dict(overrides=["train.lr=fast"]), "train.lr: expected a number"),
    (dict(overrides=["train.schedule=linear"]), "train.schedule = 'linear'"),
    (dict(overrides=["lr=3"]), "key must start with model. or train."),
    (dict(overrides=["train.sample_len=1000"]), "multiple of 16"),
    (dict(backend="lstm"), "unknown backend 'lstm'"),
    (dict(preset="huge"), "unknown preset 'huge'"),
])
def test_one_line_errors(args, message):
    preset = args.pop("preset", "tiny")
    with pytest.raises(UserError, match=message) as e:
        load_config(preset, **args)
    assert "\n" not in str(e.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(p))
