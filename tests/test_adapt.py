"""Adapting a model to a song while it reads it (`ssmgen.adapt`): each crop is scored before the
model learns from it, it does learn, `eval --adapt` leaves the model as it was and scores each
file on its own, and `continue` adapts to its prompt by default, recorded and reproducible."""

import hashlib
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import BACKENDS, make_checkpoint, ssmgen, write_tone
from ssmgen.adapt import (
    ADAPT_PASSES,
    Adaptation,
    adapt_to,
    adaptation_optimizer,
    read_adapting,
)
from ssmgen.checkpoint import load_model
from ssmgen.evaluate import score_files
from ssmgen.generate.continuation import continue_song


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", "s4d")


def _song(n: int, seed: int = 0, period: int = 37) -> np.ndarray:
    """A periodic pattern with a little noise: something a model can learn in a few steps."""
    rng = np.random.default_rng(seed)
    base = rng.integers(96, 160, period)
    return (np.resize(base, n) + rng.integers(-1, 2, n)).astype(np.int64)


def _crops(model, tokens, length, lr):
    return [(logits.clone(), y) for logits, y in
            read_adapting(model, tokens, length, adaptation_optimizer(model, lr))]


def test_each_crop_is_scored_before_the_model_learns_from_it(ckpt):
    """Two songs equal up to the middle of the third crop: everything scored before the songs
    part is the same (a step taken on a crop before scoring it would look ahead)."""
    a = _song(3 * 64)
    b = a.copy()
    b[160:] = 255 - b[160:]
    ya = _crops(load_model(ckpt)[0], a, 64, 1e-2)
    yb = _crops(load_model(ckpt)[0], b, 64, 1e-2)
    for (la, _), (lb, _) in zip(ya[:2], yb[:2]):
        assert torch.equal(la, lb)
    # the third crop's positions up to where the songs part (its inputs lag its targets by one;
    # equal to rounding: the crop is read by FFT, which mixes rounding across positions)
    torch.testing.assert_close(ya[2][0][:, :33], yb[2][0][:, :33], rtol=0, atol=1e-5)
    assert (ya[2][0][:, 33:] - yb[2][0][:, 33:]).abs().max() > 0.1


def test_the_first_crop_is_the_model_as_trained_and_later_ones_are_not(ckpt):
    model, _ = load_model(ckpt)
    song = _song(4 * 64)
    with torch.no_grad():
        plain, _ = model.forward_with_state(torch.from_numpy(np.r_[128, song[:63]])[None],
                                            model.initial_state(1))
    crops = _crops(model, song, 64, 1e-3)
    torch.testing.assert_close(crops[0][0], plain, rtol=1e-5, atol=1e-5)
    fresh, _ = load_model(ckpt)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_it_learns_the_song_pass_after_pass(tmp_path, backend):
    model, _ = load_model(make_checkpoint(tmp_path / "m.pt", backend))
    bits = adapt_to(model, _song(2048), 256, Adaptation(passes=3, lr=3e-3))
    assert len(bits) == 3 and all(math.isfinite(b) for b in bits)
    assert bits[2] < bits[1] < bits[0]


def test_scoring_adapting_leaves_the_model_as_it_was_and_each_file_on_its_own(ckpt):
    model, _ = load_model(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = _song(700, 1), _song(500, 2, period=23)
    kw = dict(rate=16000, progress=False, adapt_lr=1e-3)
    both = score_files(model, [a, b], 128, total=1200, label="t", **kw)
    one = score_files(model, [a], 128, total=700, label="t", **kw)
    two = score_files(model, [b], 128, total=500, label="t", **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert both["samples"] == 1200
    assert both["bpb"] == pytest.approx((700 * one["bpb"] + 500 * two["bpb"]) / 1200, rel=1e-6)
    # adapting pays on a song that repeats itself
    streamed = score_files(model, [_song(4096, 3)], 256, total=4096, label="t", rate=16000,
                           progress=False, streamed=True)
    adapted = score_files(model, [_song(4096, 3)], 256, total=4096, label="t", rate=16000,
                          progress=False, adapt_lr=3e-3)
    assert adapted["bpb"] < streamed["bpb"] - 0.1


def test_eval_adapt_reports_a_third_figure(ckpt, tmp_path):
    song = write_tone(tmp_path / "tone.wav", seconds=0.5, rate=16000, channels=1)
    r = ssmgen("eval", ckpt, "--audio", song, "--adapt", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["adapted"]["samples"] == out["streamed"]["samples"] == 8000
    assert out["adapted"]["lr"] == 1e-4 and "adapted" in out["files"][0]
    r = ssmgen("eval", ckpt, "--audio", song, "--adapt", "--quiet")
    assert r.returncode == 0 and "adapting to each file" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (["continue", "SONG", "--adapt-passes", "-1"], "--adapt-passes -1: must be"),
    (["continue", "SONG", "--adapt-lr", "nan"], "--adapt-lr nan: must be"),
    (["continue", "SONG", "--adapt-lr", "2"], "--adapt-lr 2"),
    (["eval", "CKPT", "--audio", "SONG", "--adapt", "--adapt-lr", "0"], "--adapt-lr 0"),
    (["eval", "CKPT", "--audio", "SONG", "--adapt-lr", "nan"], "--adapt-lr nan"),
    (["eval", "CKPT", "--audio", "SONG", "--adapt-lr", "0.001"], "applies with --adapt"),
    (["continue", "SONG", "--no-adapt", "--adapt-passes", "3"], "--no-adapt: drop"),
])
def test_bad_adaptation_settings_are_one_line(ckpt, tmp_path, args, fragment):
    song = write_tone(tmp_path / "s.wav", seconds=0.3, rate=16000, channels=1)
    args = [str(song) if a == "SONG" else str(ckpt) if a == "CKPT" else a for a in args]
    if args[0] == "continue":
        args += ["--model", str(ckpt), "--out", str(tmp_path / "o.wav")]
    r = ssmgen(*args)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_continue_adapts_by_default_records_it_and_never_touches_the_model_file(ckpt, tmp_path):
    song = write_tone(tmp_path / "song.wav", seconds=1.0, rate=22050, channels=2)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    kw = dict(seconds=0.1, prompt_seconds=0.5, progress=False, temperature=1.0, seed=3)
    r = continue_song(song, ckpt, out=tmp_path / "a.wav", engine="torch", **kw)
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["adapt"]["passes"] == ADAPT_PASSES and len(side["adapt"]["bits"]) == ADAPT_PASSES
    assert side["adapt"]["crop"] == load_model(ckpt)[1]["config"]["train"]["sample_len"]
    assert f"--adapt-passes {ADAPT_PASSES} --adapt-lr 0.0001" in side["reproduce"]
    assert r["adapt"]["elapsed_s"] > 0
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    # the adapted model continues differently from the model as trained
    off = continue_song(song, ckpt, out=tmp_path / "b.wav", engine="torch",
                        adapt=Adaptation(passes=0), **kw)
    assert off["adapt"]["bits"] == [] and "--no-adapt" in off["variations"][0]["reproduce"]
    assert not np.array_equal(sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0])


def test_every_engine_continues_the_adapted_model_alike(ckpt, tmp_path):
    pytest.importorskip("numba")
    song = write_tone(tmp_path / "song.wav", seconds=1.0, rate=16000, channels=1)
    kw = dict(seconds=0.1, prompt_seconds=0.5, progress=False, temperature=1.0, seed=1)
    continue_song(song, ckpt, out=tmp_path / "t.wav", engine="torch", **kw)
    continue_song(song, ckpt, out=tmp_path / "f.wav", engine="cpu-fast", **kw)
    assert np.array_equal(sf.read(tmp_path / "t.wav")[0], sf.read(tmp_path / "f.wav")[0])
