"""`ssmgen continue`: any song as the prompt, read in parallel, outputs and their sidecars."""

import json
from fractions import Fraction
from pathlib import Path

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


# --- the comparison grid, its page, the stream and the level at the seam (issue 21) ---------------

GRID = dict(temperature=[0.7, 1.0], top_k=[0, 20], top_p=[1.0, 0.9], num=2, seed=5)


@pytest.fixture(scope="module")
def grid(ckpt, song, tmp_path_factory):
    """One grid (2 x 2 x 2 settings x --num 2 = 16 variations), made once for the tests below; the
    batches `_generate` was asked for are recorded."""
    import ssmgen.generate.continuation as C

    folder = tmp_path_factory.mktemp("grid")
    calls = []
    real = C._generate

    def spy(model, prompt, n_new, sampler, engine, num, *a, **kw):
        calls.append((num, sampler.batch_size))
        return real(model, prompt, n_new, sampler, engine, num, *a, **kw)
    C._generate = spy
    try:
        r = continue_song(song, ckpt, out=folder / "c.wav", seconds=0.1, prompt_seconds=0.3,
                          progress=False, **GRID)
    finally:
        C._generate = real
    return r, calls, folder


def test_a_grid_is_one_batch_each_with_its_settings_and_seed(grid):
    r, calls, folder = grid
    assert calls == [(16, 16)]  # one prompt read, one batch
    assert r["page"] == str(folder / "c.html") and (folder / "c-prompt.wav").is_file()
    names = [p.split("/")[-1] for p in r["outputs"]]
    assert names[:3] == ["c-t0.7-k0-p1-1.wav", "c-t0.7-k0-p1-2.wav", "c-t0.7-k0-p0.9-1.wav"]
    assert names[-1] == "c-t1-k20-p0.9-2.wav" and len(set(names)) == 16
    for path, v in zip(r["outputs"], r["variations"]):
        side = json.loads((folder / path.split("/")[-1]).with_suffix(".json").read_text())
        assert side == v
        assert side["seed"] == 5 + int(path[-5]) - 1  # variation j of every setting: seed + j
        assert f"--seed {side['seed']}" in side["reproduce"]
        assert side["level"]["match"] is False and side["level"]["gain_db"] == 0
        assert set(side["level"]["prompt"]) == {"rms_dbfs", "flatness"}
    audio = [sf.read(p)[0] for p in r["outputs"]]
    assert not np.array_equal(audio[0], audio[2])  # the settings matter


@pytest.mark.parametrize("engine", ["torch", "cpu-fast"])
def test_a_variation_made_in_a_grid_is_the_same_audio_alone(grid, ckpt, song, tmp_path, engine):
    r, _, folder = grid
    for i in (3, 14):  # (temp 0.7, top-k 0, top-p 0.9, seed 6) and (1.0, 20, 0.9, seed 5)
        v = r["variations"][i]
        alone = continue_song(song, ckpt, out=tmp_path / f"a{i}.wav", seconds=0.1,
                              prompt_seconds=0.3, progress=False, engine=engine,
                              temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"],
                              seed=v["seed"])
        assert alone["variations"][0]["reproduce"] == v["reproduce"]
        assert (tmp_path / f"a{i}.wav").read_bytes() == Path(r["outputs"][i]).read_bytes()
        assert alone["page"] is None  # one variation: no page unless asked


def test_the_page_opens_in_a_real_headless_browser(grid, tmp_path):
    import base64
    import re
    import shutil
    import subprocess

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs it)")
    r, _, folder = grid
    page = Path(r["page"])
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-background-networking", "--disable-component-update",
                          "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    sources = re.findall(r'<audio[^>]*src="([^"]+)"', dom.stdout)
    assert len(sources) == 17  # the prompt and 16 variations
    for src in sources:
        audio, rate = sf.read(folder / src)  # every player's file is there and decodes
        assert rate == 16000 and len(audio) >= 0.3 * 16000
    pictures = re.findall(r'<img class="(wave|spec)"[^>]*src="data:image/png;base64,([^"]+)"',
                          dom.stdout)
    assert len(pictures) == 2 * 17
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for _, p in pictures)
    assert "seam 0.30 s" in dom.stdout and dom.stdout.count('class="clip"') == 17
    for v in r["variations"]:
        assert f"seed {v['seed']}" in dom.stdout
    assert "<script" not in page.read_text() and "http" not in page.read_text()


def test_the_page_and_its_prompt_are_outputs_like_any_other(ckpt, song, tmp_path):
    kw = dict(seconds=0.05, prompt_seconds=0.2, progress=False, engine="torch", num=2)
    from ssmgen.errors import UserError
    for name in ("p.html", "p-prompt.wav"):
        (tmp_path / name).write_text("mine")
        with pytest.raises(UserError, match=f"{name}: already exists"):
            continue_song(song, ckpt, out=tmp_path / "p.wav", **kw)
        assert sorted(x.name for x in tmp_path.iterdir()) == [name]  # nothing was written
        (tmp_path / name).unlink()
    (tmp_path / "p.html").mkdir()  # not a regular file: never, even with --force
    with pytest.raises(UserError, match="is a folder"):
        continue_song(song, ckpt, out=tmp_path / "p.wav", force=True, **kw)
    (tmp_path / "p.html").rmdir()
    continue_song(song, ckpt, out=tmp_path / "p.wav", **kw)
    continue_song(song, ckpt, out=tmp_path / "p.wav", force=True, **kw)  # ours, with --force
    r = continue_song(song, ckpt, out=tmp_path / "q.wav", page=False, **kw)
    assert r["page"] is None and not (tmp_path / "q.html").exists()


def test_streaming_equals_the_file_output(ckpt, song, tmp_path):
    import io
    kw = dict(seconds=0.3, prompt_seconds=0.25, progress=False, seed=4, temperature=0.9,
              engine="cpu-fast")  # pieces of 1024 samples from an unaligned start: t = 4000
    buf = io.BytesIO()
    r = continue_song(song, ckpt, out="-", stream=buf, **kw)
    assert r["streamed"] and r["outputs"] == [] and not list(tmp_path.iterdir())
    continue_song(song, ckpt, out=tmp_path / "f.wav", **kw)
    assert buf.getvalue() == (tmp_path / "f.wav").read_bytes()
    buf = io.BytesIO()
    continue_song(song, ckpt, out="-", stream=buf, only_new=True, **kw)
    new, rate = sf.read(io.BytesIO(buf.getvalue()))
    assert len(new) == 4800 and np.array_equal(new, sf.read(tmp_path / "f.wav")[0][4000:])


def test_a_stream_is_read_while_it_is_being_written(ckpt, song, tmp_path):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-m", "ssmgen", "continue", str(song), "--model",
                          str(ckpt), "--seconds", "0.5", "--prompt-seconds", "0.25", "--engine",
                          "torch", "--seed", "2", "--out", "-", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = p.stdout.read(44 + 2 * 4000 + 2 * 1024)  # header, prompt, the first piece
    alive = p.poll() is None  # 7 more pieces to go
    rest = p.stdout.read()
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    assert alive, "the first samples arrived only after generation had ended"
    assert head[:4] == b"RIFF" and int.from_bytes(head[40:44], "little") == 2 * (4000 + 8000)
    streamed, rate = sf.read(__import__("io").BytesIO(head + rest))
    assert rate == 16000 and len(streamed) == 12000
    assert "streamed" in err and "seed 2" in err and len(err.strip().splitlines()) == 1
    continue_song(song, ckpt, out=tmp_path / "f.wav", seconds=0.5, prompt_seconds=0.25,
                  engine="torch", seed=2, progress=False)
    assert np.array_equal(streamed, sf.read(tmp_path / "f.wav")[0])


def test_level_match_at_the_seam(ckpt, tmp_path):
    # loud, then a quiet ending: the prompt (the ending) is far below the song's peak, which the
    # model's view is normalized to, so the new audio starts out much louder than the prompt
    t = np.arange(int(1.5 * 44100)) / 44100
    x = np.sin(2 * np.pi * 220 * t) * np.where(t < 0.5, 0.9, 0.03)
    song = tmp_path / "song.wav"
    sf.write(song, np.stack([x, 0.8 * x], 1), 44100)
    kw = dict(seconds=0.5, prompt_seconds=0.5, progress=False, engine="torch", seed=1)
    joined = continue_song(song, ckpt, out=tmp_path / "j.wav", join=True, **kw)
    off = continue_song(song, ckpt, out=tmp_path / "k.wav", join=True, match_level=False, **kw)
    lv, raw_lv = joined["variations"][0]["level"], off["variations"][0]["level"]
    assert lv["match"] is True and raw_lv["match"] is False and raw_lv["gain_db"] == 0
    before = raw_lv["continuation"]["rms_dbfs"]
    wanted = lv["prompt"]["rms_dbfs"] - before
    assert wanted < -1, (lv, raw_lv)  # the case this test is about
    assert lv["gain_db"] == pytest.approx(max(-12.0, wanted), abs=0.05)  # capped at -12 dB
    assert lv["continuation"]["rms_dbfs"] == pytest.approx(before + lv["gain_db"], abs=0.05)
    assert "--no-match-level" in off["variations"][0]["reproduce"]
    on, _ = sf.read(tmp_path / "j.wav")
    raw, _ = sf.read(tmp_path / "k.wav")
    n = 44100 * 3 // 2  # the song up to the seam is untouched; only the new part moves
    assert np.array_equal(on[:n], raw[:n]) and not np.allclose(on[n:], raw[n:])
    g = 10 ** (lv["gain_db"] / 20)
    assert np.sqrt(np.mean(on[n:] ** 2)) == pytest.approx(g * np.sqrt(np.mean(raw[n:] ** 2)),
                                                          rel=0.02)
    plain = continue_song(song, ckpt, out=tmp_path / "m.wav", match_level=True, **kw)
    assert plain["variations"][0]["level"]["gain_db"] == lv["gain_db"]  # without --join too


@pytest.mark.parametrize("kw,fragment", [
    (dict(temperature=[0.7, 0.7]), "--temp 0.7,0.7: lists 0.7 twice"),
    (dict(top_p=[0.9, 0]), "--top-p 0: must be in (0, 1]"),
    (dict(top_k=[0, 257]), "--top-k 257"),
    (dict(temperature=[]), "--temp: give at least one value"),
    (dict(num=4096, temperature=[0.5, 1]), "8192 variations"),
    (dict(seed=2**63 - 1, num=2), "--seed 9223372036854775807"),
    (dict(out="-", num=2), "--out - streams one variation"),
    (dict(out="-", join=True), "--join needs a file"),
    (dict(out="-", match_level=True), "the level match needs the whole continuation"),
    (dict(out="-", page=True), "--out - writes no page"),
])
def test_grid_and_stream_mistakes_are_one_line(ckpt, song, tmp_path, kw, fragment):
    import io

    from ssmgen.errors import UserError
    kw.setdefault("out", tmp_path / "o.wav")
    with pytest.raises(UserError) as e:
        continue_song(song, ckpt, seconds=0.1, progress=False, stream=io.BytesIO(), **kw)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_lists_on_the_command_line():
    from ssmgen.cli import _number_list
    from ssmgen.errors import UserError
    assert _number_list("--temp", "0.7, 0.8,1") == [0.7, 0.8, 1.0]
    assert _number_list("--top-k", "0,40", integer=True) == [0, 40]
    for text, integer in (("0.7,,1", False), ("", False), ("5,1.5", True), ("1e3", True)):
        with pytest.raises(UserError, match="comma-separated list"):
            _number_list("--x", text, integer)
