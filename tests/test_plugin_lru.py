"""A third-party backend plug-in end to end: backends/ssmgen-lru (the Linear Recurrent Unit),
installed as its own package, driven only through the real command line.

Skipped when the plug-in is not installed (`pip install -e backends/ssmgen-lru`); the plug-in's own
unit tests (the layer against its reference) are in backends/ssmgen-lru/tests.
"""

import json
import os
from importlib.metadata import entry_points

import pytest
import soundfile as sf

from helpers import make_dataset, ssmgen, write_tone

if "lru" not in {ep.name for ep in entry_points(group="ssmgen.backends")}:
    pytest.skip("the ssmgen-lru plug-in is not installed (pip install -e backends/ssmgen-lru)",
                allow_module_level=True)

# One worker trains the model once for the whole module (`make test` runs --dist loadgroup).
pytestmark = pytest.mark.xdist_group("plugin-lru")

TRAIN = ["--preset", "tiny", "--backend", "lru", "--batch-size", "2", "--sample-len", "1024",
         "--max-steps", "4", "--set", "train.val_every=2", "--set", "train.val_max_samples=4096",
         "--set", "train.sample_seconds=0", "--quiet",
         # backend options reach the plug-in's constructor like a built-in's
         "--set", "model.backend_options.lru.d_state=32",
         "--set", "model.backend_options.lru.r_max=0.9995"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin-lru")
    data = make_dataset(root / "data")
    out = root / "run"
    r = ssmgen("train", data, *TRAIN, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_tone(tmp_path_factory.mktemp("song") / "song.wav", seconds=1.0, rate=22050)


def test_presets_lists_the_plugin_with_its_parameter_counts():
    from ssmgen.config import load_config
    from ssmgen.model import SaShiMi, count_parameters

    # a wide console, so that rich does not abbreviate the counts
    r = ssmgen("presets", env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    assert "params (lru)" in r.stdout
    for preset in ("tiny", "ablated"):
        n = count_parameters(SaShiMi(load_config(preset, backend="lru").model), folded=True)
        row = next(line for line in r.stdout.splitlines() if line.strip().startswith(preset + " "))
        assert f"{n:,}" in row


def test_training_writes_an_lru_checkpoint_with_the_options(run):
    import torch

    from ssmgen.checkpoint import load_model

    metrics = (run / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 3  # header and the validations at steps 2 and 4
    model, ckpt = load_model(run)
    assert ckpt["step"] == 4 and ckpt["config"]["model"]["backend"] == "lru"
    layers = [m for m in model.modules() if type(m).__name__ == "LRU"]
    assert len(layers) == 3  # one per tier in tiny
    assert all(m.d_state == 32 and m.r_max == 0.9995 for m in layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_continue_with_the_torch_engine(run, song, tmp_path):
    out = tmp_path / "out.wav"
    r = ssmgen("continue", song, "--model", run, "--seconds", 0.25, "--prompt-seconds", 0.5,
               "--engine", "torch", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["engine"] == "torch" and meta["seconds"] == 0.25
    info = sf.info(str(out))
    # the prompt the model heard (0.5 s) and 0.25 s of new audio, at the model's rate
    assert info.samplerate == 16000 and info.frames == 12000


def test_continue_with_engine_auto_falls_back_to_torch(run, song, tmp_path):
    out = tmp_path / "auto.wav"
    r = ssmgen("continue", song, "--model", run, "--seconds", 0.25, "--prompt-seconds", 0.5,
               "--engine", "auto", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.with_suffix(".json").read_text())["engine"] == "torch"


def test_engine_cpu_fast_refuses_the_plugin_in_one_line(run, song, tmp_path):
    r = ssmgen("continue", song, "--model", run, "--seconds", 0.25, "--engine", "cpu-fast",
               "--out", tmp_path / "fast.wav", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "lru" in r.stderr.lower()


def test_export_to_onnx_verified_against_torch(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "lru.onnx"
    r = ssmgen("export", run, "--out", out, "--verify-steps", 512)
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())  # the console may wrap the line anywhere
    assert "backend lru" in said and "identical tokens" in said
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map
    assert meta["backend"] == "lru"
    shapes = json.loads(meta["state_shapes"])
    assert shapes["center.0.re"] == shapes["center.0.im"] == ["B", 32]
