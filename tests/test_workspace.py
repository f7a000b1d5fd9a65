"""The user's own commands, verbatim, in an empty folder: `prep ./my_audio`, `train --preset
ablated`, `continue song.wav --seconds 10 --temp 0.8` (then `eval` and `export --out m.onnx` with no
model), each reading what the one before wrote; and the working folder's conventions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from helpers import make_dataset, ssmgen, write_tone

pytestmark = pytest.mark.xdist_group("workspace")


def note_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note:")]


def test_the_three_commands_verbatim_in_an_empty_folder(tmp_path):
    ws = tmp_path / "ws"
    (ws / "my_audio" / "live").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):  # mono and stereo, two rates, a nested folder, one broken file
        write_tone(ws / "my_audio" / ("live" if i % 2 else "") / f"take{i}.wav", seconds=3.0,
                   rate=(16000, 44100)[i % 2], channels=1 + i % 2,
                   freq=float(rng.integers(150, 600)))
    (ws / "my_audio" / "broken.wav").write_bytes(b"RIFF....WAVEfmt ")
    write_tone(ws / "song.wav", seconds=2.0, rate=22050, channels=2, freq=330)

    r = ssmgen("prep", "./my_audio", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert (ws / "data" / "my_audio" / "manifest.json").is_file()

    r = ssmgen("train", "--preset", "ablated", "--max-steps", "5", cwd=ws)
    assert r.returncode == 0, r.stderr
    notes = " ".join(note_lines(r.stderr))
    assert "dataset data/my_audio" in notes, r.stderr  # says which dataset it took
    # and how it trains
    assert "recipe cpu (8 x 2048 samples per step, state carried over 64 crops" in notes, r.stderr
    assert "stops after 5 steps" in notes, r.stderr
    runs = sorted((ws / "runs").iterdir())
    assert [p.name for p in runs] == ["ablated-s4d-1"], runs
    marker = json.loads((runs[0] / "run.json").read_text())
    assert (marker["preset"], marker["backend"], marker["recipe"]) == ("ablated", "s4d", "cpu")
    assert marker["dataset"] == str((ws / "data" / "my_audio").resolve())
    assert (runs[0] / "checkpoints" / "best.pt").is_file()

    r = ssmgen("continue", "song.wav", "--seconds", "10", "--temp", "0.8", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "runs/ablated-s4d-1" in " ".join(note_lines(r.stderr)), r.stderr
    out, rate = sf.read(ws / "song-continued.wav")
    assert rate == 16000 and abs(len(out) - 12 * 16000) <= 2  # the whole 2 s song, then 10 s new
    sidecar = json.loads((ws / "song-continued.json").read_text())
    assert sidecar["checkpoint"].endswith("runs/ablated-s4d-1/checkpoints/best.pt")
    assert sidecar["temperature"] == 0.8 and sidecar["seconds"] == 10

    r = ssmgen("eval", "--json", cwd=ws)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["checkpoint"].endswith("runs/ablated-s4d-1/checkpoints/best.pt")
    assert result["dataset"] == str((ws / "data" / "my_audio").resolve()) and result["bpb"] > 0

    r = ssmgen("export", "--out", "m.onnx", "--verify-steps", "64", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert (ws / "m.onnx").is_file() and "identical tokens" in r.stdout

    # a second training is a new run, never the first one again
    r = ssmgen("train", "--preset", "ablated", "--max-steps", "1", "-q", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (ws / "runs").iterdir()) == ["ablated-s4d-1", "ablated-s4d-2"]


def test_where_nothing_fits_say_what_to_type(tmp_path):
    r = ssmgen("train", "--max-steps", "1", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: no dataset prepared in this folder yet: run `ssmgen prep YOUR_AUDIO_FOLDER` "
        "first, or name one: `ssmgen train DATASET`"]
    r = ssmgen("eval", cwd=tmp_path)  # the bundled model records no dataset
    assert r.returncode == 2 and "--data" in r.stderr.splitlines()[-1]


def test_train_takes_the_dataset_prep_wrote_last(tmp_path):
    for name in ("older", "newer"):
        make_dataset(tmp_path / "data" / name, files=(("train", 2), ("val", 1), ("test", 1)))
        os.utime(tmp_path / "data" / name / "manifest.json",
                 ns=(1_000_000_000 * (2 if name == "newer" else 1),) * 2)
    r = ssmgen("train", "--preset", "tiny", "--max-steps", "1", "--set", "train.sample_seconds=0",
               "--set", "train.val_max_samples=2048", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dataset data/newer (newest of 2 under data/)" in r.stderr
    marker = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    assert marker["dataset"].endswith("data/newer")


def test_prep_default_folder_and_rerun_updates_it(tmp_path, write_audio):
    src = tmp_path / "My Band!"
    for i in range(3):
        write_audio(src / f"t{i}.wav", 1.5, 16000, 200 + 100 * i)
    assert ssmgen("prep", src, "-q", cwd=tmp_path).returncode == 0
    ds = tmp_path / "data" / "My-Band"
    first = json.loads((ds / "manifest.json").read_text())
    write_audio(src / "t3.wav", 1.5, 16000, 900)
    assert ssmgen("prep", src, "-q", cwd=tmp_path).returncode == 0
    second = json.loads((ds / "manifest.json").read_text())
    assert (first["totals"]["files_kept"], second["totals"]["files_kept"]) == (3, 4)
    assert second["totals"]["files_reused"] == 3  # incremental, as with --out


def test_presets_show_and_a_working_folder_preset(tmp_path):
    r = ssmgen("presets", "--show", "ablated", cwd=tmp_path)
    assert r.returncode == 0 and "d_model: 64" in r.stdout
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mine.yaml").write_text(r.stdout.replace("n_layers: 2", "n_layers: 1"))
    r = ssmgen("presets", cwd=tmp_path)
    assert r.returncode == 0 and "mine (./presets)" in r.stdout, r.stdout
    r = ssmgen("presets", "--show", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr


def test_bundled_model_by_name(tmp_path):
    song = write_tone(tmp_path / "s.wav", seconds=1.0, rate=16000, channels=1)
    r = ssmgen("continue", song, "--model", "ablated-s4d-pieces", "--seconds", "0.2", "-q",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bundled model ablated-s4d-pieces" in r.stderr
    r = ssmgen("doctor")
    assert "bundled models" in r.stdout and "ablated-s4d-pieces" in r.stdout
