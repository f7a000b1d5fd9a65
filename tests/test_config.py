"""Presets, overrides and their one-line errors."""

from dataclasses import replace

import pytest

from ssmgen.config import load_config, preset_names
from ssmgen.errors import UserError


def test_shipped_presets():
    assert {"tiny", "ablated", "sashimi"} <= set(preset_names())
    paper = load_config("ablated", recipe="paper")
    assert (paper.model.d_model, paper.model.n_layers, paper.model.pool, paper.model.glu) == \
        (64, 2, [4, 4], False)
    assert (paper.train.batch_size, paper.train.sample_len, paper.train.lr, paper.train.ssm_lr,
            paper.train.warmup_steps, paper.train.schedule) == (1, 131072, 4e-3, 1e-3, 0, "plateau")
    assert load_config("sashimi").model.n_layers == 8
    cpu = load_config("ablated-cpu")  # the same model, the CPU-budget recipe
    # ... parameterized for training with the ordinal maps, which fold away (the same function)
    assert (cpu.model.ordinal_input, cpu.model.ordinal_output) == (True, True)
    assert (paper.model.ordinal_input, paper.model.ordinal_output) == (False, False)
    assert replace(cpu.model, seq_len=None, ordinal_input=False, ordinal_output=False) == \
        replace(paper.model, seq_len=None)
    # The model records the length it is trained at (S4's C~ is parameterized for it).
    assert (paper.model.seq_len, cpu.model.seq_len) == (131072, 2048)
    assert load_config("tiny", overrides=["train.sample_len=256"]).model.seq_len == 256
    assert (cpu.train.batch_size, cpu.train.sample_len, cpu.train.lr, cpu.train.warmup_steps,
            cpu.train.carry_crops) == (8, 2048, 2e-3, 100, 64)
    assert paper.train.carry_crops == 1  # the paper's crops each start from a fresh state


def test_the_recipe_follows_the_device_unless_named(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    here = load_config("ablated")
    assert here.recipe == "cpu" and here.train == load_config("ablated-cpu").train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = load_config("ablated")
    assert (gpu.recipe, gpu.train.batch_size, gpu.train.sample_len) == ("gpu", "auto", 131072)
    # The device the run asks for decides; a preset's own recipe and --recipe win over it.
    assert load_config("ablated", overrides=["train.device=cpu"]).recipe == "cpu"
    assert load_config("ablated-cpu").recipe == "cpu"
    assert load_config("ablated", recipe="paper").train.batch_size == 1
    # A preset's own train fields win over the recipe (tiny trains small everywhere).
    assert load_config("tiny").train.sample_len == 2048
    with pytest.raises(UserError, match="--recipe fast: use auto or one of cpu, gpu, paper"):
        load_config("ablated", recipe="fast")


def test_working_folder_presets_come_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "ablated.yaml").write_text("model:\n  d_model: 48\n")
    (tmp_path / "presets" / "mine.yaml").write_text("model:\n  n_layers: 3\n")
    assert load_config("ablated").model.d_model == 48
    assert load_config("mine").model.n_layers == 3
    from ssmgen.config import preset_text
    assert "d_model: 48" in preset_text("ablated") and "n_layers: 3" in preset_text("mine")


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
