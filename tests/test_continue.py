"""`ssmgen continue`: any song as the prompt, read in parallel, outputs and their sidecars."""

import json
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import BACKENDS, make_checkpoint, ssmgen, write_tone
from ssmgen.checkpoint import load_model
from ssmgen.data import shift_inputs
from ssmgen.generate.continuation import continue_song, read_prompt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", "s4d")


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_tone(tmp_path_factory.mktemp("song") / "My Song.wav", seconds=1.5, rate=44100,
                      channels=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_read_in_parallel_matches_stepping_through_it(tmp_path, backend):
    model, _ = load_model(make_checkpoint(tmp_path / "m.pt", backend))
    prompt = np.random.default_rng(0).integers(0, 256, 16 * 9 + 5)
    with torch.no_grad():
        state, first = read_prompt(model, prompt, 2)
        parallel = [model.step(torch.from_numpy(first), state)[0]]
        ref_state = model.initial_state(2)
        for tok in shift_inputs(prompt[None])[0]:
            _, ref_state = model.step(torch.full((2,), int(tok)), ref_state)
        stepped = [model.step(torch.full((2,), int(prompt[-1])), ref_state)[0]]
        # and a few more samples on both paths
        s_a, s_b = state, ref_state
        for tok in (7, 200, 128, 31, 99):
            la, s_a = model.step(torch.full((2,), tok), s_a if len(parallel) > 1 else
                                 model.step(torch.from_numpy(first), state)[1])
            lb, s_b = model.step(torch.full((2,), tok), s_b if len(stepped) > 1 else
                                 model.step(torch.full((2,), int(prompt[-1])), ref_state)[1])
            parallel.append(la)
            stepped.append(lb)
    for a, b in zip(parallel, stepped):
        assert (a - b).abs().max().item() <= 1e-4


def test_continue_writes_prompt_plus_new_audio_and_a_sidecar(ckpt, song, tmp_path):
    out = tmp_path / "out.wav"
    r = ssmgen("continue", song, "--model", ckpt, "--seconds", 0.25, "--prompt-seconds", 0.5,
               "--out", out, "--engine", "torch", "--quiet")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    audio, rate = sf.read(out)
    assert rate == 16000 and audio.ndim == 1 and len(audio) == 8000 + 4000
    side = json.loads(out.with_suffix(".json").read_text())
    assert (side["prompt_start_s"] == pytest.approx(1.0) and
            side["prompt_end_s"] == pytest.approx(1.5))
    assert side["seconds"] == 0.25 and side["seed"] == 0 and side["checkpoint"].endswith("model.pt")
    # an existing output is never overwritten without --force
    r = ssmgen("continue", song, "--model", ckpt, "--seconds", 0.1, "--out", out, "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr


def test_same_seed_same_audio_and_variations_differ(ckpt, song, tmp_path):
    kw = dict(seconds=0.1, prompt_seconds=0.3, engine="torch", progress=False, temperature=1.0)
    a = continue_song(song, ckpt, out=tmp_path / "a.wav", seed=5, **kw)
    b = continue_song(song, ckpt, out=tmp_path / "b.wav", seed=5, **kw)
    assert np.array_equal(sf.read(a["outputs"][0])[0], sf.read(b["outputs"][0])[0])
    v = continue_song(song, ckpt, out=tmp_path / "v.wav", seed=5, num=2, **kw)
    x1, x2 = (sf.read(p)[0] for p in v["outputs"])
    assert not np.array_equal(x1, x2)
    seeds = [s["seed"] for s in v["variations"]]
    assert len(set(seeds)) == 2
    # variation 0 of the batch is the same audio as the single run with the same seed
    assert np.array_equal(x1, sf.read(a["outputs"][0])[0])


def test_only_new_and_join(ckpt, song, tmp_path):
    kw = dict(seconds=0.2, prompt_seconds=0.3, engine="torch", progress=False)
    new = continue_song(song, ckpt, out=tmp_path / "new.wav", only_new=True, **kw)
    assert len(sf.read(new["outputs"][0])[0]) == 3200
    joined = continue_song(song, ckpt, out=tmp_path / "join.wav", join=True, at=1.0, **kw)
    audio, rate = sf.read(joined["outputs"][0])
    original, orig_rate = sf.read(song)
    assert rate == orig_rate == 44100 and audio.shape[1] == 2
    assert audio.shape[0] == pytest.approx(44100 + 0.2 * 44100, abs=2)
    # the song up to --at is untouched (up to 16-bit rounding)
    np.testing.assert_allclose(audio[:44100], original[:44100], atol=1.5 / 32768)


@pytest.mark.parametrize("make_bad,message", [
    (lambda p: p, "no such checkpoint"),
    (lambda p: (p.write_text("not a checkpoint"), p)[1], "not a readable ssmgen checkpoint"),
    (lambda p: (torch.save({"weights": torch.zeros(3)}, p), p)[1], "not an ssmgen checkpoint"),
    (lambda p: (torch.save({"obj": Fraction(1, 3)}, p), p)[1], "holds Python objects"),
    (lambda p: (torch.save({"w": torch.zeros(1000)}, p), p.write_bytes(p.read_bytes()[:-300]),
                p)[2], "truncated or damaged"),
])
def test_bad_checkpoints_give_one_line(song, tmp_path, make_bad, message):
    bad = make_bad(tmp_path / "bad.pt")
    r = ssmgen("continue", song, "--model", bad, "--seconds", 0.1, "--quiet",
               "--out", tmp_path / "o.wav")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "weights_only" not in r.stderr  # torch's advice to load unsafely never reaches users
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("content,message", [(b"", "empty file"),
                                             (b"hello, not audio" * 10, "not audio")])
def test_bad_songs_give_one_line(ckpt, tmp_path, content, message):
    bad = tmp_path / "song.wav"
    bad.write_bytes(content)
    r = ssmgen("continue", bad, "--model", ckpt, "--seconds", 0.1, "--quiet",
               "--out", tmp_path / "o.wav")
    assert r.returncode == 2 and message in r.stderr and str(bad) in r.stderr, r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_short_song_and_past_the_end(ckpt, tmp_path):
    short = write_tone(tmp_path / "short.flac", seconds=0.2, rate=22050, channels=1)
    r = continue_song(short, ckpt, out=tmp_path / "s.wav", seconds=0.05, engine="torch",
                      progress=False)
    assert r["prompt_seconds"] == pytest.approx(0.2, abs=1e-3)
    from ssmgen.errors import UserError
    with pytest.raises(UserError, match="past the end"):
        continue_song(short, ckpt, out=tmp_path / "t.wav", seconds=0.05, at=5.0, progress=False)
