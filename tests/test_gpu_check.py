"""The GPU check's dry run (`bash bench/gpu_check.sh --cpu`): the same script as on the GPU
machine, at tiny sizes on the CPU, so that it cannot rot between the rare GPU slots."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step_and_prints_the_table_last(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--python",
                        sys.executable, "--out", str(out), "--work", str(work)],
                       capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tail = r.stdout.strip().splitlines()[-11:]  # the step table, then the count, come last
    assert tail[0] == "| step | status | s | figures |" and tail[-1] == "7 of 7 steps ok", tail
    res = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in res["steps"]] == ["env", "cuda tests", "speed: generate",
                                                 "speed: train", "quality: prep",
                                                 "quality: train", "quality: eval"]
    assert all(s["status"] == "ok" for s in res["steps"]), res["steps"]
    # without a GPU every CUDA test is collected and skipped, none fails
    assert res["tests"]["skipped"] > 0 and res["tests"]["failed"] == res["tests"]["errors"] == 0
    assert "pure path used" in res["env"]["mamba_ssm"]
    engines = {(g["backend"], g["engine"], g["batch"]) for g in res["generate"]
               if g["kind"] == "generate" and "error" not in g}
    assert {("s4d", "torch", 1), ("s4", "torch", 2), ("mamba", "torch", 1)} <= engines
    assert res["train"] and res["train"][0]["samples_per_s"] > 0
    assert math.isfinite(res["quality"]["held_out_bpb"]) and res["quality"]["steps"] > 0
    # few files come back from the device machine: logs and results only, no data or runs
    assert sorted(p.name for p in out.iterdir()) == ["env.log", "quality.log", "results.json",
                                                      "results.md", "speed.log", "tests.log"]


def test_gpu_check_rejects_an_unknown_option(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--nope"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "unknown option --nope" in r.stderr
