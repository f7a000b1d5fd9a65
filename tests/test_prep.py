"""`ssmgen.prep.prepare` on a messy folder the test builds: formats, rates, channels, odd names,
broken and useless files, duplicates, hidden files, a symlink loop; then splits, determinism,
reuse, atomicity and the one-line errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import ssmgen.prep as prep_mod
from conftest import synth
from ssmgen.audio import decode, encode, load_mono, normalization_gain
from ssmgen.errors import UserError
from ssmgen.prep import prepare

HAS_MP3 = "MP3" in sf.available_formats()

# relpath -> (seconds, rate, freq, channels, format, subtype)
GOOD = {
    "songs/a tone.wav": (2.0, 44100, 440, 2, "WAV", "PCM_16"),
    "songs/deep/b.flac": (2.0, 48000, 330, 1, "FLAC", "PCM_16"),
    "Ümlaut ñame/c 24bit.wav": (1.5, 22050, 550, 1, "WAV", "PCM_24"),
    "floaty.wav": (1.5, 8000, 660, 3, "WAV", "FLOAT"),
    "d.ogg": (2.0, 44100, 770, 2, "OGG", "VORBIS"),
    "e.aiff": (2.0, 16000, 880, 1, "AIFF", "PCM_16"),
    "UPPER.WAV": (1.5, 16000, 220, 1, "WAV", "PCM_16"),
}
if HAS_MP3:
    GOOD["f.mp3"] = (2.0, 44100, 990, 1, "MP3", "MPEG_LAYER_III")

SKIPS = {
    "empty.wav": "empty",
    "x.wav": "not audio",
    "short.wav": "too short",
    "silent.wav": "silent",
    "zdup/a copy.wav": "duplicate",     # same bytes as songs/a tone.wav
    "e_as_wav.wav": "duplicate",       # other bytes, same decoded audio as e.aiff
    "badly truncated.flac": "truncated",
}


def build_messy(root: Path) -> Path:
    src = root / "src"
    for rel, (secs, rate, freq, ch, fmt, sub) in GOOD.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, synth(secs, rate, freq, ch), rate, format=fmt, subtype=sub)
    # kept with a warning: a FLAC cut at 70% (decodes 1.37 s of 3 s), a WAV whose header lies
    noisy = synth(3.0, 48000, 1100, noise=0.05)
    sf.write(src / "trunc.flac", noisy, 48000)
    data = (src / "trunc.flac").read_bytes()
    (src / "trunc.flac").write_bytes(data[: int(len(data) * 0.7)])
    (src / "badly truncated.flac").write_bytes(data[: int(len(data) * 0.4)])  # 0.68 s decode
    sf.write(src / "trunc.wav", synth(3.0, 16000, 1300), 16000, subtype="PCM_16")
    data = (src / "trunc.wav").read_bytes()
    (src / "trunc.wav").write_bytes(data[: int(len(data) * 0.6)])
    # useless
    (src / "empty.wav").write_bytes(b"")
    (src / "x.wav").write_text("hello, I am not a sound\n")
    sf.write(src / "short.wav", synth(0.2, 16000, 440), 16000)
    sf.write(src / "silent.wav", np.zeros(32000, np.float32), 16000)
    (src / "zdup").mkdir()
    shutil.copy(src / "songs/a tone.wav", src / "zdup/a copy.wav")
    sf.write(src / "e_as_wav.wav", synth(2.0, 16000, 880), 16000, subtype="PCM_16")
    # hidden: never mentioned
    sf.write(src / ".hidden.wav", synth(2.0, 16000, 100), 16000)
    (src / "._a tone.wav").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / ".git").mkdir()
    sf.write(src / ".git/g.wav", synth(2.0, 16000, 120), 16000)
    # a symlink loop and a link back to the root
    os.symlink("..", src / "songs/loop")
    os.symlink(".", src / "self")
    return src


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    src = build_messy(root)
    logger = logging.getLogger("ssmgen.prep")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        manifest = prepare(src, root / "data", jobs=2, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return src, root / "data", manifest, [r.getMessage() for r in records]


def arrays(data: Path) -> dict[str, np.ndarray]:
    return {s: np.load(data / f"{s}.npy", allow_pickle=False) for s in ("train", "val", "test")}


def file_tokens(data: Path, manifest: dict, rel: str) -> np.ndarray:
    a = arrays(data)
    f = next(f for f in manifest["files"] if f["path"] == rel)
    segs = sorted(f.get("segments") or [dict(f, start=0)], key=lambda s: s["start"])
    return np.concatenate([a[s["split"]][s["offset"]:s["offset"] + s["length"]] for s in segs])


def test_manifest_kept_and_skipped(messy):
    src, data, m, _ = messy
    assert json.loads((data / "manifest.json").read_text()) == m
    assert m["format"] == "ssmgen-dataset" and m["format_version"] == 1
    assert (m["rate"], m["encoding"], m["bits"], m["normalization"]) == (16000, "mulaw", 8, "peak")
    assert m["split_mode"] == "by_file" and m["seed"] == 0
    assert m["split_shares"] == pytest.approx([0.9, 0.05, 0.05])
    kept = {f["path"] for f in m["files"]}
    assert kept == set(GOOD) | {"trunc.flac", "trunc.wav"}
    kinds = {s["path"]: s["reason_kind"] for s in m["skipped"]}
    assert kinds == SKIPS
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons["zdup/a copy.wav"] == "duplicate of songs/a tone.wav"
    assert reasons["e_as_wav.wav"] == "duplicate of e.aiff"
    everything = json.dumps(m)
    for hidden in (".hidden", "._a tone", ".DS_Store", ".git", "loop/", "self/"):
        assert hidden not in everything
    for key in ("created", "ssmgen_version", "totals", "warnings"):
        assert key in m
    assert m["totals"]["files_kept"] == len(kept) and m["totals"]["files_skipped"] == len(SKIPS)


def test_file_entries(messy):
    _, _, m, _ = messy
    by = {f["path"]: f for f in m["files"]}
    for rel, (secs, rate, _, ch, _, _) in GOOD.items():
        f = by[rel]
        assert (f["orig_rate"], f["orig_channels"]) == (rate, ch), rel
        assert f["duration"] == pytest.approx(secs, abs=0.06), rel
        assert f["length"] == pytest.approx(secs * 16000, abs=0.06 * 16000), rel
        assert len(f["content_hash"]) == 40 and len(f["audio_hash"]) == 40
        for key in ("gain", "peak", "rms_dbfs", "silence_share", "clipped_share", "split",
                    "offset"):
            assert key in f, (rel, key)
        assert f["gain"] * f["peak"] == pytest.approx(1.0)
    # a sine at full scale after peak normalization: RMS -3 dBFS, no silence, no clipping
    assert by["UPPER.WAV"]["rms_dbfs"] == pytest.approx(-3.01, abs=0.1)
    assert by["UPPER.WAV"]["gain"] == pytest.approx(2.0, rel=1e-3)
    assert by["UPPER.WAV"]["silence_share"] == 0.0 and by["UPPER.WAV"]["clipped_share"] == 0.0


def test_arrays_match_offsets(messy):
    _, data, m, _ = messy
    a = arrays(data)
    for name, s in m["splits"].items():
        assert a[name].dtype == np.uint8 and a[name].ndim == 1
        assert len(a[name]) == s["samples"] > 0 and s["files"] >= 1
        assert s["hours"] == pytest.approx(s["samples"] / 16000 / 3600)
        assert s["rms_dbfs"] < 0 and 0 <= s["silence_share"] <= 1
        runs = sorted((f["offset"], f["length"]) for f in m["files"] if f["split"] == name)
        pos = 0
        for off, n in runs:
            assert off == pos
            pos += n
        assert pos == len(a[name])
    mm = np.load(data / "train.npy", mmap_mode="r")  # what train/eval do
    assert mm.shape == a["train"].shape


def test_tokens_are_the_tone(messy):
    _, data, m, _ = messy
    x = decode(file_tokens(data, m, "UPPER.WAV"), "mulaw")
    t = np.arange(len(x)) / 16000
    assert np.abs(x - np.sin(2 * np.pi * 220 * t)).max() < 0.05  # peak 0.5 scaled to 1.0
    for rel in ("songs/deep/b.flac", "floaty.wav", "songs/a tone.wav", "trunc.flac"):
        y = decode(file_tokens(data, m, rel), "mulaw")
        spectrum = np.abs(np.fft.rfft(y))
        freq = np.argmax(spectrum) * 16000 / len(y)
        expected = GOOD[rel][2] if rel in GOOD else 1100
        assert abs(freq - expected) < 2, rel


def test_tokens_equal_a_prompt_of_the_same_file(messy):
    """Peak policy: a prompt scaled by its own whole-file peak gives exactly the training tokens."""
    src, data, m, _ = messy
    for rel in ("songs/a tone.wav", "songs/deep/b.flac", "floaty.wav"):
        x, _ = load_mono(src / rel, 16000)
        gain = normalization_gain(float(np.max(np.abs(x))), "peak")
        assert np.array_equal(encode(x * gain, "mulaw"), file_tokens(data, m, rel)), rel


def test_truncated_files(messy):
    _, _, m, logs = messy
    by = {f["path"]: f for f in m["files"]}
    for rel, promised in (("trunc.flac", 3.0), ("trunc.wav", 3.0)):
        assert by[rel]["truncated"] is True
        assert f"header promises {promised:.2f} s" in by[rel]["warning"]
        assert any(w.startswith(f"{rel}: truncated") for w in m["warnings"])
    assert 1.0 < by["trunc.flac"]["length"] / 16000 < 2.0
    assert by["trunc.wav"]["length"] / 16000 == pytest.approx(1.8, abs=0.01)
    bad = next(s for s in m["skipped"] if s["path"] == "badly truncated.flac")
    assert "header promises 3.00 s" in bad["reason"]


def test_warnings_logged(messy):
    _, _, m, logs = messy
    for s in m["skipped"]:
        assert f"{s['path']}: skipped: {s['reason']}" in logs
    assert not any(".hidden" in line or "._a" in line for line in logs)
    little = [w for w in m["warnings"] if "need at least 5 min" in w]
    assert little and "1 h+ recommended" in little[0] and little[0] in logs


def test_deterministic_and_seeded(messy, tmp_path):
    src, data, m, _ = messy
    m2 = prepare(src, tmp_path / "again", jobs=1, progress=False)
    assert [(f["path"], f["split"]) for f in m2["files"]] == \
        [(f["path"], f["split"]) for f in m["files"]]
    for name in ("train", "val", "test"):
        assert (tmp_path / "again" / f"{name}.npy").read_bytes() == \
            (data / f"{name}.npy").read_bytes()
    assignments = set()
    for seed in range(4):
        ms = prepare(src, tmp_path / f"seed{seed}", seed=seed, jobs=1, progress=False)
        assignments.add(tuple(f["split"] for f in ms["files"]))
        assert ms["seed"] == seed
    assert len(assignments) > 1


# ------------------------------------------------------------------------------------------------
# Reuse, force, atomicity
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_src(tmp_path, write_audio):
    src = tmp_path / "src"
    for i, f in enumerate((300, 400, 500, 600)):
        write_audio(src / f"t{i}.wav", 1.2, 22050, f)
    return src


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = prep_mod.decode_file

    def counting(path, work_file, settings):
        calls.append(Path(path).name)
        return real(path, work_file, settings)

    monkeypatch.setattr(prep_mod, "decode_file", counting)
    return calls


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_rerun_reuses_and_picks_up_new_files(small_src, tmp_path, count_decodes, write_audio):
    out = tmp_path / "data"
    m1 = prepare(small_src, out, jobs=1, progress=False)
    assert len(count_decodes) == 4 and m1["totals"]["files_reused"] == 0
    before = snapshot(out)
    m2 = prepare(small_src, out, jobs=1, progress=False)
    assert len(count_decodes) == 4 and m2["totals"]["files_reused"] == 4
    after = snapshot(out)
    for name in ("train.npy", "val.npy", "test.npy"):
        assert after[name] == before[name]
    assert m2["files"] == m1["files"]
    write_audio(small_src / "new" / "t4.wav", 1.2, 16000, 700)
    m3 = prepare(small_src, out, jobs=1, progress=False)
    assert count_decodes[4:] == ["t4.wav"] and m3["totals"]["files_reused"] == 4
    assert "new/t4.wav" in {f["path"] for f in m3["files"]}
    prepare(small_src, out, jobs=1, force=True, progress=False)
    assert len(count_decodes) == 10
    prepare(small_src, out, jobs=1, encoding="linear", progress=False)  # other settings: redo
    assert len(count_decodes) == 15
    assert not list(tmp_path.glob("data.*"))


def test_reuse_across_processes(small_src, tmp_path):
    out = tmp_path / "data"
    prepare(small_src, out, jobs=2, progress=False)
    m = prepare(small_src, out, jobs=2, progress=False)
    assert m["totals"]["files_reused"] == 4


def test_crash_keeps_old_dataset(small_src, tmp_path, monkeypatch, write_audio):
    out = tmp_path / "data"
    prepare(small_src, out, jobs=1, progress=False)
    before = snapshot(out)
    write_audio(small_src / "t9.wav", 1.5, 16000, 900)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prep_mod, "carry_user_files", boom)  # after the arrays are written
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(small_src, out, jobs=1, force=True, progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]

    monkeypatch.undo()
    real, n = prep_mod.decode_file, []

    def interrupt(*a):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(prep_mod, "decode_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(small_src, out, jobs=1, force=True, progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]


def test_stale_build_folder_removed(small_src, tmp_path):
    stale = tmp_path / "data.tmp-999999999"
    stale.mkdir()
    (stale / ".ssmgen-build").write_text("")
    (stale / "train.npy").write_bytes(b"half")
    foreign = tmp_path / "data.tmp-12"  # not ours: no marker, left alone
    foreign.mkdir()
    prepare(small_src, tmp_path / "data", jobs=1, progress=False)
    assert not stale.exists() and foreign.exists()


def test_by_time_split_for_one_or_two_files(tmp_path, write_audio, caplog):
    src = tmp_path / "one"
    write_audio(src / "only.flac", 4.0, 16000, 440, fmt="FLAC")
    with caplog.at_level(logging.INFO, logger="ssmgen.prep"):
        m = prepare(src, tmp_path / "d1", jobs=1, progress=False)
    assert m["split_mode"] == "by_time"
    assert any("splitting each by time" in r.getMessage() for r in caplog.records)
    f = m["files"][0]
    segs = f["segments"]
    assert [s["split"] for s in segs] == ["train", "val", "test"]
    assert [s["length"] for s in segs] == [57600, 3200, 3200]
    assert [s["start"] for s in segs] == [0, 57600, 60800]
    a = arrays(tmp_path / "d1")
    x, _ = load_mono(src / "only.flac", 16000)
    whole = encode(x * normalization_gain(float(np.abs(x).max()), "peak"), "mulaw")
    assert np.array_equal(np.concatenate([a["train"], a["val"], a["test"]]), whole)
    assert all(m["splits"][s]["files"] == 1 for s in ("train", "val", "test"))

    write_audio(src / "second.wav", 2.0, 44100, 660)
    m2 = prepare(src, tmp_path / "d1", jobs=1, progress=False)
    assert m2["split_mode"] == "by_time" and m2["totals"]["files_reused"] == 1
    assert all(len(f["segments"]) == 3 for f in m2["files"])
    a = arrays(tmp_path / "d1")
    assert len(a["val"]) == 3200 + 1600 and len(a["test"]) == 3200 + 1600
    assert np.array_equal(file_tokens(tmp_path / "d1", m2, "only.flac"), whole)


def test_three_files_fill_every_split(tmp_path, write_audio):
    src = tmp_path / "three"
    for i in range(3):
        write_audio(src / f"{i}.wav", 1.1, 16000, 300 + 100 * i)
    m = prepare(src, tmp_path / "d", jobs=1, progress=False)
    assert m["split_mode"] == "by_file"
    assert [m["splits"][s]["files"] for s in ("train", "val", "test")] == [1, 1, 1]


def test_empty_output_split_still_written(tmp_path, write_audio):
    src = tmp_path / "s"
    for i in range(3):
        write_audio(src / f"{i}.wav", 1.1, 16000, 300 + 100 * i)
    m = prepare(src, tmp_path / "d", split=(1, 0, 0), jobs=1, progress=False)
    assert m["splits"]["val"]["samples"] == 0 and m["splits"]["val"]["rms_dbfs"] is None
    assert np.load(tmp_path / "d" / "val.npy").shape == (0,)


# ------------------------------------------------------------------------------------------------
# User mistakes
# ------------------------------------------------------------------------------------------------

def one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text and match in text, text
    return text


def test_user_errors(tmp_path, small_src):
    out = tmp_path / "data"
    one_line_error(lambda: prepare(tmp_path / "nope", out), "nope: no such folder")
    one_line_error(lambda: prepare(small_src / "t0.wav", out), "t0.wav: not a folder")
    one_line_error(lambda: prepare(small_src, small_src / "data"), "inside the source folder")
    one_line_error(lambda: prepare(small_src, small_src), "inside the source folder")
    one_line_error(lambda: prepare(small_src, small_src.parent), "holds the source folder")
    one_line_error(lambda: prepare(small_src, out, seed=-1), "--seed -1")
    one_line_error(lambda: prepare(small_src, out, split=(float("nan"), 5, 5)), "--split")
    one_line_error(lambda: prepare(small_src, out, jobs=0), "--jobs 0")
    one_line_error(lambda: prepare(small_src, out, encoding="alaw"), "alaw")
    one_line_error(lambda: prepare(small_src, out, normalization="rms"), "rms")
    one_line_error(lambda: prepare(small_src, out, rate=0), "--rate 0")
    one_line_error(lambda: prepare(small_src, out, split=(0, 1, 1)), "--split")
    useless = tmp_path / "useless"
    useless.mkdir()
    (useless / "notes.wav").write_text("la la la")
    (useless / "nothing.mp3").write_bytes(b"")
    one_line_error(lambda: prepare(useless, out, jobs=1, progress=False),
                   "useless: no usable audio (skipped 1 empty, 1 not audio; "
                   "e.g. notes.wav: not audio")
    (tmp_path / "blank").mkdir()
    one_line_error(lambda: prepare(tmp_path / "blank", out), "no files")
    assert not out.exists() and not list(tmp_path.glob("data.*"))


def test_never_overwrites_a_foreign_folder(tmp_path, small_src):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    one_line_error(lambda: prepare(small_src, out, progress=False), "not an ssmgen dataset")
    assert (out / "thesis.txt").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    one_line_error(lambda: prepare(small_src, tmp_path / "afile"), "not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(small_src, empty, jobs=1, progress=False)["totals"]["files_kept"] == 4


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_not_writable(tmp_path, small_src):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(lambda: prepare(small_src, locked / "data"), "not writable")
    finally:
        locked.chmod(0o700)
