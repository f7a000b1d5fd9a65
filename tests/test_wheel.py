"""A model in the box: the wheel carries a trained model, so right after `pip install` a user can
continue a song from any folder with no run of their own."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import write_tone

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("wheel")


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                          **kw)


def test_the_installed_wheel_continues_a_song_with_its_bundled_model(tmp_path):
    dist = tmp_path / "dist"
    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
            "-w", dist, ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next(dist.glob("ssmgen-*.whl"))
    assert wheel.stat().st_size > 3e6  # the model travels inside it

    fresh = tmp_path / "fresh"
    r = run(sys.executable, "-m", "venv", "--without-pip", fresh)
    assert r.returncode == 0, r.stderr
    py = fresh / "bin" / "python"
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # ssmgen's dependencies (torch, numba, ...) from this environment, ssmgen itself only from the
    # wheel: a .pth line adds the folder but not its editable-install hooks
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
            "--no-index", wheel)
    assert r.returncode == 0, r.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run(py, "-c", "import ssmgen; print(ssmgen.__file__)", cwd=elsewhere)
    assert r.stdout.startswith(site), r.stdout  # the installed copy, not the source tree
    write_tone(elsewhere / "song.wav", seconds=1.5, rate=44100, channels=2)
    r = run(fresh / "bin" / "ssmgen", "continue", "song.wav", "--seconds", "1", "-q",
            cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert "the bundled model ablated-s4d-mix (no run in this folder yet" in r.stderr
    assert (elsewhere / "song-continued.wav").stat().st_size > 40000
    r = run(fresh / "bin" / "ssmgen", "doctor", cwd=elsewhere)
    assert "ablated-s4d-mix" in r.stdout and "ablated-s4d-pieces" in r.stdout, r.stdout
