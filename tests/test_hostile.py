"""Hostile input and data safety, through the real command line: nothing we did not write is ever
lost or replaced, a write error of ours is never blamed on the user's file, and every user mistake
is one line and exit 2 (docs/architecture.md, "Never lose what we did not write").

Each test names the class of issue 17 it covers. Disk-full is simulated with RLIMIT_FSIZE (the
kernel then fails our writes past a size with EFBIG, as a full disk fails them with ENOSPC)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import make_checkpoint, make_dataset, ssmgen, write_tone

pytestmark = pytest.mark.xdist_group("hostile")

TRAIN_FAST = ["--preset", "tiny", "--backend", "s4d", "--batch-size", "2", "--sample-len", "1024",
              "--set", "train.val_max_samples=4096", "--set", "train.sample_seconds=0", "--quiet"]


def one_line_error(r, *fragments, code: int = 2) -> str:
    """The command failed with `code` and exactly one line on stderr holding every fragment."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def limit_file_size(n: int):
    """preexec_fn: our process may write no file past n bytes (EFBIG, like a full disk)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", backend="s4d")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture
def song(tmp_path):
    return write_tone(tmp_path / "song.wav", seconds=1.0, rate=16000, channels=1)


# --- 1. a full disk during prep is ours, never the user's file ------------------------------------

def test_disk_full_during_prep_stops_and_keeps_the_old_dataset(tmp_path):
    src = tmp_path / "audio"
    src.mkdir()
    for i in range(3):
        write_tone(src / f"t{i}.wav", seconds=1.5, rate=16000, channels=1, freq=200 + 100 * i)
    out = tmp_path / "ds"
    assert ssmgen("prep", src, "--out", out, "-q", "-j", "1").returncode == 0
    before = snapshot(out)
    write_tone(src / "t3.wav", seconds=1.5, rate=16000, channels=1, freq=700)
    r = ssmgen("prep", src, "--out", out, "-q", "-j", "2", "--force",
               preexec_fn=limit_file_size(20_000))
    line = one_line_error(r, str(out), "could not write the dataset", "File too large",
                          "previous dataset is untouched")
    assert "skipped" not in line
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio", "ds"]  # no build left behind


# --- 2. outputs: never a non-regular file, never replaced without --force -------------------------

def test_export_never_replaces_what_it_did_not_write(tmp_path, ckpt):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    one_line_error(ssmgen("export", ckpt, "--out", fifo, "--force", "--verify-steps", 32),
                   "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    one_line_error(ssmgen("export", ckpt, "--out", link, "--force", "--verify-steps", 32),
                   "symbolic link")
    assert link.is_symlink() and target.read_text() == "mine"
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"an older export")
    one_line_error(ssmgen("export", ckpt, "--out", existing, "--verify-steps", 32),
                   "already exists", "--force")
    assert existing.read_bytes() == b"an older export"
    one_line_error(ssmgen("export", ckpt, "--out", ckpt, "--force", "--verify-steps", 32),
                   "is an input of this command")
    r = ssmgen("export", ckpt, "--out", existing, "--force", "--verify-steps", 32)
    assert r.returncode == 0, r.stderr
    assert existing.read_bytes()[:20] != b"an older export"


def test_disk_full_in_export_and_continue_is_one_line_and_leaves_nothing(tmp_path, ckpt, song):
    out = tmp_path / "m.onnx"
    r = ssmgen("export", ckpt, "--out", out, "--verify-steps", 32,
               preexec_fn=limit_file_size(30_000))
    one_line_error(r, str(out), "could not write", "File too large")
    r = ssmgen("continue", song, "--model", ckpt, "--seconds", 2, "--out", tmp_path / "c.wav",
               "--engine", "torch", "-q", preexec_fn=limit_file_size(30_000))
    one_line_error(r, "c.wav", "could not write", "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.wav"]


# --- 3. a run folder is ours or refused ----------------------------------------------------------

def test_train_refuses_a_folder_of_the_users_own_files(tmp_path, data):
    mine = tmp_path / "site"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "index.html").write_text("<p>my page</p>")
    (mine / "metrics.csv").write_text("my,numbers\n")
    (mine / "checkpoints" / "best.pt").write_bytes(b"my own file")
    before = snapshot(mine)
    one_line_error(ssmgen("train", data, *TRAIN_FAST, "--max-steps", 2, "--out", mine),
                   "not a run of ssmgen", "choose another --out")
    assert snapshot(mine) == before
    # an empty folder is fine, and becomes a marked run
    empty = tmp_path / "empty"
    empty.mkdir()
    r = ssmgen("train", data, *TRAIN_FAST, "--max-steps", 2, "--out", empty)
    assert r.returncode == 0, r.stderr
    assert json.loads((empty / "run.json").read_text())["format"] == "ssmgen-run"
    one_line_error(ssmgen("train", data, *TRAIN_FAST, "--max-steps", 2, "--out", empty),
                   "a run already lives here", "--resume")


# --- 4. re-running prep keeps the user's own files in the dataset folder --------------------------

def test_prep_rerun_carries_the_users_files(tmp_path):
    src = tmp_path / "audio"
    src.mkdir()
    for i in range(3):
        write_tone(src / f"t{i}.wav", seconds=1.5, rate=16000, channels=1, freq=200 + 100 * i)
    out = tmp_path / "ds"
    assert ssmgen("prep", src, "--out", out, "-q").returncode == 0
    (out / "notes.txt").write_text("which mics I used")
    (out / "mine").mkdir()
    (out / "mine" / "take.txt").write_text("take 3")
    write_tone(src / "t3.wav", seconds=1.5, rate=16000, channels=1, freq=900)
    for extra in ([], ["--force"]):
        r = ssmgen("prep", src, "--out", out, "-q", *extra)
        assert r.returncode == 0, r.stderr
        assert (out / "notes.txt").read_text() == "which mics I used"
        assert (out / "mine" / "take.txt").read_text() == "take 3"
    assert json.loads((out / "manifest.json").read_text())["totals"]["files_kept"] == 4


# --- 5. continue: the sidecar counts as an output; --force never makes an input an output ---------

def test_continue_never_replaces_a_sidecar_or_the_song(tmp_path, ckpt, song):
    out = tmp_path / "c.wav"
    (tmp_path / "c.json").write_text('{"mine": true}')
    one_line_error(ssmgen("continue", song, "--model", ckpt, "--seconds", 0.1, "--out", out,
                          "-q"), "c.json", "already exists")
    assert not out.exists() and json.loads((tmp_path / "c.json").read_text()) == {"mine": True}
    before = song.read_bytes()
    one_line_error(ssmgen("continue", song, "--model", ckpt, "--seconds", 0.1, "--out", song,
                          "--force", "-q"), "is an input of this command")
    hard = tmp_path / "same.wav"
    os.link(song, hard)  # the same file under another name is still the input
    one_line_error(ssmgen("continue", song, "--model", ckpt, "--seconds", 0.1, "--out", hard,
                          "--force", "-q"), "is an input of this command")
    assert song.read_bytes() == before
    # the comparison page and the prompt it plays are outputs too
    for name in ("c.html", "c-prompt.wav"):
        (tmp_path / name).write_text("my page")
        one_line_error(ssmgen("continue", song, "--model", ckpt, "--seconds", 0.1, "--out", out,
                              "--num", 2, "-q"), name, "already exists")
        assert (tmp_path / name).read_text() == "my page" and not out.exists()
        (tmp_path / name).unlink()


# --- 6. YAML: alias expansion is bounded everywhere ----------------------------------------------

def test_nested_billion_laughs_is_refused_at_once(tmp_path, data):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model:\n  backend_options:\n    s4d:\n      deep:\n" +
                    "".join(f"        {line}\n" for line in lines))
    t = time.time()
    one_line_error(ssmgen("train", data, "--preset", bomb, "--max-steps", 1, "-q"),
                   "bomb.yaml", "expands to more than")
    assert time.time() - t < 20
    rec = tmp_path / "loop.yaml"
    rec.write_text("model: &m\n  backend_options:\n    s4d: *m\n")
    one_line_error(ssmgen("train", data, "--preset", rec, "--max-steps", 1, "-q"),
                   "loop.yaml", "refers to itself")
    one_line_error(ssmgen("train", data, "--set", "model.backend_options=" + "[" * 3000, "-q",
                          "--max-steps", 1), "--set")


# --- 7. numbers: finite and in range where they are parsed ---------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["train", "DATA", "--set", "train.lr=nan", "--max-steps", "1"], "train.lr (--lr) nan"),
    (["train", "DATA", "--lr", "inf", "--max-steps", "1"], "train.lr (--lr) inf"),
    (["train", "DATA", "--set", "train.warmup_steps=-5", "--max-steps", "1"],
     "train.warmup_steps -5"),
    (["train", "DATA", "--max-steps", "0"], "--max-steps) 0"),
    (["train", "DATA", "--max-minutes", "nan"], "--max-minutes) nan"),
    (["train", "DATA", "--seed", "-1", "--max-steps", "1"], "--seed) -1"),
    (["train", "DATA", "--set", "model.d_model=1e6", "--max-steps", "1"], "model.d_model 1000000"),
    (["train", "DATA", "--set", "model.backend_options.s4d.d_state=0", "--max-steps", "1"],
     "d_state 0"),
    (["continue", "SONG", "--model", "CKPT", "--temp", "nan"], "--temp nan"),
    (["continue", "SONG", "--model", "CKPT", "--temp", "inf"], "--temp inf"),
    (["continue", "SONG", "--model", "CKPT", "--top-p", "nan"], "--top-p nan"),
    (["continue", "SONG", "--model", "CKPT", "--seconds", "-1"], "--seconds -1"),
    (["continue", "SONG", "--model", "CKPT", "--at", "nan"], "--at nan"),
    (["continue", "SONG", "--model", "CKPT", "--seed", "-3"], "--seed -3"),
    (["continue", "SONG", "--model", "CKPT", "--temp", "0.8,nan"], "--temp nan"),
    (["continue", "SONG", "--model", "CKPT", "--top-k", "5,1.5"], "--top-k '5,1.5'"),
    (["continue", "SONG", "--model", "CKPT", "--out", "-", "--top-k", "0,5"],
     "--out - streams one variation"),  # (the other list and stream cases: test_continue.py)
    (["export", "CKPT", "--out", "OUT", "--verify-steps", "0"], "--verify-steps 0"),
    (["export", "CKPT", "--out", "OUT", "--opset", "99"], "--opset 99"),
    (["prep", "SRC", "--out", "OUT", "--split", "nan/5/5"], "--split"),
    (["prep", "SRC", "--out", "OUT", "--seed", "-1"], "--seed -1"),
    (["continue", "SONG", "--model", "CKPT", "--seconds", "abc"], "--seconds"),  # Click's own
])
def test_every_number_is_checked_where_it_is_parsed(tmp_path, data, ckpt, song, args, fragment):
    src = tmp_path / "src"
    src.mkdir()
    subst = {"DATA": data, "CKPT": ckpt, "SONG": song, "OUT": tmp_path / "out.x", "SRC": src}
    r = ssmgen(*[subst.get(a, a) for a in args], cwd=tmp_path)
    one_line_error(r, fragment)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.x").exists()


# --- 8. --resume: the run's own settings and data format ----------------------------------------

def test_resume_refuses_other_settings_and_other_data(tmp_path, data):
    run = tmp_path / "run"
    assert ssmgen("train", data, *TRAIN_FAST, "--max-steps", 2, "--out", run).returncode == 0
    for flag in (["--preset", "ablated"], ["--backend", "mamba"], ["--lr", "1e-4"],
                 ["--set", "train.seed=4"]):
        one_line_error(ssmgen("train", data, "--resume", "--out", run, "--max-steps", 4, *flag),
                       f"drop {flag[0]}")
    other = make_dataset(tmp_path / "other", rate=8000)
    one_line_error(ssmgen("train", other, "--resume", "--out", run, "--max-steps", 4),
                   "differs from the run's")
    r = ssmgen("train", "--resume", "--out", run, "--max-steps", 4, "-q")  # its own dataset
    assert r.returncode == 0, r.stderr


# --- 9. a checkpoint with NaN weights is refused when loading ------------------------------------

def test_nan_weights_are_refused(tmp_path, ckpt, song):
    d = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in d["model"].items() if v.is_floating_point())
    d["model"][name] = d["model"][name].clone().fill_(float("nan"))
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    one_line_error(ssmgen("continue", song, "--model", bad, "--seconds", 0.1, "-q"),
                   "bad.pt", "NaN or infinite", name)
    one_line_error(ssmgen("export", bad, "--out", tmp_path / "m.onnx"), "NaN or infinite")


# --- 10. requests larger than the machine: estimated before allocating ---------------------------

def test_requests_larger_than_the_machine_are_refused_before_allocating(tmp_path, ckpt, song,
                                                                        data):
    t = time.time()
    one_line_error(ssmgen("continue", song, "--model", ckpt, "--seconds", "1e7", "-q",
                          "--out", tmp_path / "a.wav"), "--seconds", "WAV file holds")
    one_line_error(ssmgen("continue", song, "--model", ckpt, "--seconds", "20000", "--num",
                          "4096", "-q", "--out", tmp_path / "b.wav"), "--num 4096", "GiB")
    one_line_error(ssmgen("train", data, "--set", "model.d_model=8192", "--set",
                          "model.n_layers=64", "--max-steps", 1, "-q"), "parameters", "GiB")
    # a checkpoint whose config declares a huge model, with small weights
    d = torch.load(ckpt, weights_only=True)
    d["config"]["model"].update(d_model=8192, n_layers=64)
    huge = tmp_path / "huge.pt"
    torch.save(d, huge)
    one_line_error(ssmgen("continue", song, "--model", huge, "--seconds", 1, "-q",
                          "--out", tmp_path / "c.wav"), "huge.pt")
    assert time.time() - t < 120
    assert [p.name for p in tmp_path.glob("*.wav")] == ["song.wav"]


def test_a_long_song_is_never_read_whole_for_a_short_prompt(tmp_path):
    import tracemalloc

    from ssmgen.audio import read_song_clip
    rate = 16000
    x = (0.3 * np.sin(np.arange(300 * rate) * 0.05)).astype(np.float32)  # 5 minutes, 19 MB
    path = tmp_path / "long.wav"
    sf.write(path, x, rate, subtype="PCM_16")
    fmt = {"rate": rate, "encoding": "mulaw", "normalization": "peak"}
    tracemalloc.start()
    clip = read_song_clip(path, fmt, seconds=1.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert clip.end == 300 * rate and clip.start == 299 * rate and len(clip.audio) == rate
    assert peak < 10e6, peak  # blocks and the clip, never the 19 MB song
    assert abs(clip.gain - 1 / np.abs(x).max()) < 1e-3  # the whole song's peak all the same


# --- 11. missing keys, bad paths, bad names: one line naming the file ----------------------------

def test_damaged_checkpoints_and_manifests_name_the_file(tmp_path, ckpt, song, data):
    d = torch.load(ckpt, weights_only=True)
    cases = {"nocfg.pt": {k: v for k, v in d.items() if k != "config"},
             "nofmt.pt": {k: v for k, v in d.items() if k != "data_format"},
             "enc.pt": {**d, "data_format": {**d["data_format"], "encoding": "alaw"}},
             "backend.pt": {**d, "config": {**d["config"],
                                            "model": {**d["config"]["model"], "backend": "lstm"}}}}
    for name, payload in cases.items():
        torch.save(payload, tmp_path / name)
        one_line_error(ssmgen("continue", song, "--model", tmp_path / name, "--seconds", 0.1,
                              "-q"), name)
    one_line_error(ssmgen("continue", song, "--model", ckpt, "--seconds", 0.1,
                          "--out", tmp_path / "nowhere" / "x.wav", "-q"), "no such folder")
    one_line_error(ssmgen("export", ckpt, "--out", tmp_path), "is a folder")
    one_line_error(ssmgen("eval", ckpt, "--data", data, "--split", "validation", "-q"),
                   "--split validation")
    broken = tmp_path / "broken_ds"
    shutil.copytree(data, broken)
    m = json.loads((broken / "manifest.json").read_text())
    del m["rate"]
    (broken / "manifest.json").write_text(json.dumps(m))
    one_line_error(ssmgen("train", broken, *TRAIN_FAST, "--max-steps", 1, "--out",
                          tmp_path / "r"), "manifest.json", "rate")
    m["rate"], m["splits"]["train"]["file"] = 16000, "../../../etc/passwd"
    (broken / "manifest.json").write_text(json.dumps(m))
    one_line_error(ssmgen("train", broken, *TRAIN_FAST, "--max-steps", 1, "--out",
                          tmp_path / "r"), "manifest.json")
    assert not (tmp_path / "r").exists()


# --- 12. the right cause, no library warning, one line even for odd names -----------------------

def test_messages_name_the_real_cause(tmp_path, ckpt):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "ssmgen-checkpoint", "x": Evil()}, evil)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(Evil()))
    song = write_tone(tmp_path / "s.wav", seconds=0.5, rate=16000, channels=1)
    for bad in (evil, legacy):
        line = one_line_error(ssmgen("continue", song, "--model", bad, "--seconds", 0.1, "-q"),
                              bad.name)
        assert "Python objects" in line or "not only tensors" in line, line
    assert not (tmp_path / "pwned").exists()
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    one_line_error(ssmgen("continue", nan, "--model", ckpt, "--seconds", 0.1, "-q"),
                   "NaN or infinite samples")
    odd = tmp_path / "two\nlines.wav"
    shutil.copy(song, odd)
    r = ssmgen("continue", odd, "--model", tmp_path / "missing\nmodel.pt", "--seconds", 0.1, "-q")
    one_line_error(r, "missing\\nmodel.pt")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.pt"
        shutil.copy(ckpt, locked)
        locked.chmod(0)
        one_line_error(ssmgen("continue", song, "--model", locked, "--seconds", 0.1, "-q"),
                       "no permission")


def test_nan_audio_in_prep_is_skipped_for_what_it_is(tmp_path):
    src = tmp_path / "audio"
    src.mkdir()
    for i in range(3):
        write_tone(src / f"t{i}.wav", seconds=1.5, rate=16000, channels=1, freq=300 + 50 * i)
    x = np.sin(np.arange(24000) * 0.1).astype(np.float32)
    x[5000] = np.nan
    sf.write(src / "nan.wav", x, 16000, subtype="FLOAT")
    r = ssmgen("prep", src, "--out", tmp_path / "ds", "-q")
    assert r.returncode == 0, r.stderr
    skipped = json.loads((tmp_path / "ds" / "manifest.json").read_text())["skipped"]
    assert [(s["path"], s["reason_kind"]) for s in skipped] == [("nan.wav", "not finite")]
    assert "NaN" in skipped[0]["reason"] and "silence" not in skipped[0]["reason"]


# --- 13. leftovers: killed writers' temporaries, failed starts ----------------------------------

def test_stale_temporaries_are_cleaned_and_failed_starts_leave_no_run(tmp_path, data):
    run = tmp_path / "run"
    assert ssmgen("train", data, *TRAIN_FAST, "--max-steps", 2, "--out", run).returncode == 0
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = run / "checkpoints" / f".last.pt.{dead}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    foreign = run / "checkpoints" / "notes.tmp"
    foreign.write_text("not ours")
    r = ssmgen("train", data, "--resume", "--out", run, "--max-steps", 3, "-q")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and foreign.exists()
    # a start that fails after its checks leaves no empty run folder behind
    ws = tmp_path / "ws"
    ws.mkdir()
    r = ssmgen("train", data, "--preset", "tiny", "--set", "train.sample_len=64000",
               "--max-steps", 1, "-q", cwd=ws)
    one_line_error(r, "no training file is as long")
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir())


def test_file_names_that_are_not_utf8(tmp_path, ckpt):
    """Linux file names are bytes: one that is not UTF-8 is read, written beside and shown as
    \\xNN, never a crash (soundfile is given the name's bytes; messages escape them)."""
    name = os.fsdecode(b"\xff\xfesong.wav")
    src = tmp_path / "audio"
    src.mkdir()
    for i in range(3):
        write_tone(src / f"t{i}.wav", seconds=1.5, rate=16000, channels=1, freq=250 + 60 * i)
    os.rename(write_tone(src / "odd.wav", seconds=1.5, rate=16000, channels=1, freq=500),
              src / name)
    r = ssmgen("prep", src, "--out", tmp_path / "ds", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text(encoding="utf-8"))
    assert name in [f["path"] for f in m["files"]]
    r = ssmgen("continue", src / name, "--model", ckpt, "--seconds", 0.1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote \\xff\\xfesong-continued.wav" in r.stdout
    assert (tmp_path / os.fsdecode(b"\xff\xfesong-continued.wav")).is_file()
    r = ssmgen("continue", src / name, "--model", ckpt, "--seconds", 0.1, cwd=tmp_path)
    one_line_error(r, "\\xff\\xfesong-continued.wav", "already exists")
