"""`ssmgen prep` through the real command: one line on stderr and exit 2 for each user mistake,
the summary table on success."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ssmgen", "prep", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def src(tmp_path, write_audio):
    folder = tmp_path / "music"
    for i, freq in enumerate((220, 330, 440)):
        write_audio(folder / f"piece {i}.flac", 1.2, 22050, freq, channels=2, fmt="FLAC")
    (folder / "readme.wav").write_text("not audio")
    return folder


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_src(tmp_path):
    assert_user_error(run(tmp_path / "nowhere", "--out", tmp_path / "d"), "nowhere",
                      "no such folder")


def test_src_is_a_file(src, tmp_path):
    assert_user_error(run(src / "piece 0.flac", "--out", tmp_path / "d"), "piece 0.flac",
                      "not a folder")


def test_out_inside_src(src):
    assert_user_error(run(src, "--out", src / "data"), "data", "inside the source folder")


def test_no_usable_audio(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.wav").write_text("nope")
    assert_user_error(run(folder, "--out", tmp_path / "d", "-q"), "junk", "no usable audio")
    assert not (tmp_path / "d").exists()


def test_success_prints_summary(src, tmp_path):
    r = run(src, "--out", tmp_path / "d", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    for word in ("split", "train", "val", "test", "hours", "level dBFS", "kept 3 file(s)",
                 "skipped 1 not audio"):
        assert word in r.stdout, r.stdout
    assert "readme.wav: skipped: not audio" in r.stderr
    assert "need at least 5 min" in r.stderr and "Traceback" not in r.stderr
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["totals"]["files_kept"] == 3
