"""Training end to end through the real command: checkpoints, exact resume after SIGKILL, Ctrl-C,
divergence, preflight errors, DDP with 2 gloo processes, the listening page in a real browser."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_dataset, ssmgen
from ssmgen.checkpoint import load_checkpoint
from ssmgen.config import load_config
from ssmgen.train import TrainingDiverged, train

FAST = ["--preset", "tiny", "--backend", "s4d", "--batch-size", "2", "--sample-len", "1024",
        "--set", "train.val_max_samples=4096", "--set", "train.sample_seconds=0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def weights(run):
    return load_checkpoint(Path(run) / "checkpoints" / "last.pt")


def test_train_writes_checkpoints_metrics_and_eval_reads_them(data, tmp_path):
    run = tmp_path / "run"
    r = ssmgen("train", data, *FAST, "--max-steps", 20, "--set", "train.val_every=10", "--out", run)
    assert r.returncode == 0, r.stderr
    ckpt = weights(run)
    assert ckpt["step"] == 20 and ckpt["data_format"]["encoding"] == "mulaw"
    assert (ckpt["config"]["model"]["backend"] == "s4d" and
            (run / "checkpoints" / "best.pt").exists())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [10, 20]
    assert float(rows[-1]["val_bpb"]) < 8.0  # learned something beyond uniform
    r = ssmgen("eval", run, "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    import json
    result = json.loads(r.stdout)
    assert 0 < result["bpb"] < 8 and result["samples"] == 32000
    assert 0 <= result["acc1"] <= result["acc3"] <= result["acc5"] <= result["acc10"] <= 1


def test_resume_after_sigkill_is_bitwise_exact(data, tmp_path):
    args = [*FAST, "--max-steps", 60, "--set", "train.val_every=4", "--seed", 3]
    ref = tmp_path / "ref"
    assert ssmgen("train", data, *args, "--out", ref).returncode == 0
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "ssmgen", "train", str(data), *map(str, args),
                          "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    time.sleep(0.37)  # somewhere in the middle of later steps (and maybe of a checkpoint write)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = weights(run)["step"]
    assert 0 < killed_at < 60
    r = ssmgen("train", data, "--resume", "--out", run, "--max-steps", 60, "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = weights(ref), weights(run)
    assert b["step"] == 60
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert steps == list(range(4, 61, 4))  # rows after the checkpoint were redone, not doubled


def test_weight_average_validates_and_resumes_with_the_run(data, tmp_path):
    args = [*FAST, "--set", "train.val_every=3", "--set", "train.ema=0.9", "--seed", 1]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert ssmgen("train", data, *args, "--max-steps", 6, "--out", whole).returncode == 0
    assert ssmgen("train", data, *args, "--max-steps", 3, "--out", split).returncode == 0
    r = ssmgen("train", data, "--resume", "--out", split, "--max-steps", 6, "--quiet")
    assert r.returncode == 0, r.stderr
    last, resumed = weights(whole), weights(split)
    best = load_checkpoint(whole / "checkpoints" / "best.pt")
    assert last["ema"]["updates"] == 6 and resumed["ema"]["updates"] == 6
    for k, v in last["model"].items():  # resumed: the same weights and the same average
        assert torch.equal(v, resumed["model"][k]), k
        assert torch.equal(last["ema"]["shadow"][k], resumed["ema"]["shadow"][k]), k
    # last.pt holds the raw weights (for --resume); best.pt the average its validation scored
    assert best["step"] in (3, 6)
    shadow = last["ema"]["shadow"]
    assert any(not torch.equal(v, shadow[k]) for k, v in last["model"].items())
    if best["step"] == 6:
        for k, v in best["model"].items():
            assert torch.equal(v, shadow[k]), k


def test_carried_states_resume_exactly(data, tmp_path):
    """train.carry_crops: last.pt holds the crop cursors and every row's state, so a resumed run
    goes on reading the same files from the same states."""
    args = [*FAST, "--set", "train.val_every=3", "--set", "train.carry_crops=4", "--seed", 2]
    whole, split, plain = tmp_path / "whole", tmp_path / "split", tmp_path / "plain"
    assert ssmgen("train", data, *args, "--max-steps", 7, "--out", whole).returncode == 0
    assert ssmgen("train", data, *args, "--max-steps", 4, "--out", split).returncode == 0
    r = ssmgen("train", data, "--resume", "--out", split, "--max-steps", 7, "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = weights(whole), weights(split)
    assert a["carry"]["cursors"] == b["carry"]["cursors"] and b["step"] == 7
    assert a["carry"]["state"].keys() == b["carry"]["state"].keys()
    for k, v in a["carry"]["state"].items():
        assert v.shape[0] == 2 and torch.equal(v, b["carry"]["state"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the carried states change what is learned (the same seed without them differs)
    r = ssmgen("train", data, *FAST, "--set", "train.val_every=3", "--seed", 2, "--max-steps", 7,
               "--set", "train.carry_crops=1", "--out", plain)
    assert r.returncode == 0 and "carry" not in weights(plain)
    assert any(not torch.equal(v, weights(plain)["model"][k]) for k, v in a["model"].items())


def test_ctrl_c_saves_and_exits_130(data, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "ssmgen", "train", str(data), *FAST,
                          "--max-steps", "100000", "--set", "train.val_every=5", "--out", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert weights(run)["step"] % 5 != 0 or weights(run)["step"] > 5  # saved at the stop


def test_divergence_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    cfg = load_config("tiny", backend="s4d", overrides=[
        "train.grad_clip=0", "train.val_every=1",
        "train.max_steps=50", "train.batch_size=2", "train.sample_len=512",
        "train.sample_seconds=0", "train.val_max_samples=1024", "train.warmup_steps=0"])
    cfg.train.lr = cfg.train.ssm_lr = 1e30  # past what a config accepts: set on the object
    with pytest.raises(TrainingDiverged, match="loss became"):
        train(data, cfg, tmp_path / "run", progress=False)
    ckpt = weights(tmp_path / "run")
    assert ckpt["step"] >= 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/ds", "--max-steps", "1"], "no such dataset folder"),
    (["DATA", "--sample-len", "64000", "--max-steps", "1"],
     "no training file is as long as one training chunk"),
    (["DATA", "--device", "cuda", "--max-steps", "1"], "no CUDA device"),
    (["DATA", "--set", "model.d_modle=3", "--max-steps", "1"], "unknown key 'd_modle'"),
    (["DATA", "--set", "train.optimizer=sgd", "--max-steps", "1"], "use one of adamw, muon"),
    (["DATA", "--sample-len", "16384", "--batch-size", "4096", "--max-steps", "1"],
     "GiB of memory"),
])
def test_preflight_errors_are_one_line(data, tmp_path, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a CUDA device is present")
    args = [str(data) if a == "DATA" else a for a in args]
    r = ssmgen("train", *args, "--preset", "tiny", "--quiet", "--out", tmp_path / "r")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("carry", [1, 2])
def test_two_gloo_processes_match_one_process(data, tmp_path, carry):
    """Also with carried states (each rank carries its own rows; last.pt gathers them all)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*FAST, "--batch-size", "4", "--max-steps", "3", "--set", "train.val_every=2",
            "--set", f"train.carry_crops={carry}"]
    one = ssmgen("train", data, *args, "--out", tmp_path / "one", env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "ssmgen", "train", str(data), *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=1e-4)
    if carry > 1:
        assert a["carry"]["cursors"] == b["carry"]["cursors"]
        for k, v in a["carry"]["state"].items():
            assert v.shape[0] == 4
            torch.testing.assert_close(v, b["carry"]["state"][k], atol=2e-5, rtol=1e-4)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_listening_page_in_a_real_headless_browser(data, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs it)")
    run = tmp_path / "run"
    r = ssmgen("train", data, "--preset", "tiny", "--backend", "s4d", "--batch-size", "2",
               "--sample-len", "1024", "--max-steps", "4", "--set", "train.val_every=2",
               "--set", "train.sample_seconds=0.05", "--set", "train.prompt_seconds=0.05",
               "--set", "train.val_max_samples=2048", "--quiet", "--out", run)
    assert r.returncode == 0, r.stderr
    profile = tmp_path / "profile"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-background-networking", "--disable-component-update",
                          "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
                          "--dump-dom", (run / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<svg" in dom.stdout and 'id="samples"' in dom.stdout
    sources = re.findall(r'<audio[^>]*src="([^"]+)"', dom.stdout)
    assert len(sources) == 2
    for src in sources:
        wav = run / src
        assert wav.is_file() and wav.stat().st_size > 1000
    # the training page (issue 21): settings, axes with units, the classical line, pictures
    assert 'id="settings"' in dom.stdout and "s4d" in dom.stdout and "samples/s" in dom.stdout
    assert "training step" in dom.stdout and "bits per sample" in dom.stdout
    assert 'id="classical"' in dom.stdout and "classical LPC coder" in dom.stdout
    pictures = re.findall(r'<img class="(?:wave|spec)"[^>]*src="([^"]+)"', dom.stdout)
    assert len(pictures) == 4
    for src in pictures:
        assert (run / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "the prompt ends at 0.05 s" in dom.stdout
    cached = json.loads((run / "classical.json").read_text())["entries"]
    assert [e["split"] for e in cached.values()] == ["val"]
    line = next(iter(cached.values()))
    assert line["samples"] == 2048  # the positions validation scores (val_max_samples)
    # eval prints it beside the model's figure, on its own split, and caches that one too
    r = ssmgen("eval", run, "--split", "val", "--max-samples", "2048", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["classical"]["bpb"] == pytest.approx(line["bpb"])
    r = ssmgen("eval", run)
    assert r.returncode == 0 and "a classical LPC coder:" in r.stdout, r.stderr
    cached = json.loads((run / "classical.json").read_text())["entries"]
    assert sorted(e["split"] for e in cached.values()) == ["test", "val"]  # val: read back


def test_init_fine_tunes_a_model_by_name_with_a_fresh_optimizer(data, tmp_path):
    """`--init` starts from a model's weights (the bundled one by name), the model's own shape
    when no preset is named; a different model or data format is one line."""
    from ssmgen.workspace import bundled_models

    bundled = load_checkpoint(bundled_models()["ablated-s4d-pieces"])
    run = tmp_path / "ft"
    r = ssmgen("train", data, "--init", "ablated-s4d-pieces", "--max-steps", 1, "--sample-len",
               1024, "--batch-size", 1, "--set", "train.val_max_samples=2048", "--set",
               "train.sample_seconds=0", "--out", run)
    assert r.returncode == 0, r.stderr
    assert "starting from" in r.stderr and "ablated-s4d-pieces" in r.stderr
    tuned = weights(run)
    assert tuned["step"] == 1 and tuned["init"].endswith("ablated-s4d-pieces.pt")
    adamw = tuned["optimizer"].get("adamw", tuned["optimizer"])  # alone, or beside Muon
    assert adamw["state"][0]["step"] == 1  # a fresh optimizer: one step of its own
    close = [torch.allclose(tuned["model"][k], v, atol=1e-2) for k, v in bundled["model"].items()]
    assert all(close)  # one small step away from the bundled weights
    assert any(not torch.equal(tuned["model"][k], v) for k, v in bundled["model"].items())
    # the preset's recipe parameterizes with ordinal maps; the plain model's weights decide
    r = ssmgen("train", data, "--init", "ablated-s4d-pieces", "--preset", "ablated", "--max-steps",
               1, "--sample-len", 1024, "--batch-size", 1, "--set", "train.sample_seconds=0",
               "--set", "train.val_max_samples=2048", "--out", tmp_path / "p", "-q")
    assert r.returncode == 0, r.stderr
    assert set(weights(tmp_path / "p")["model"]) == set(bundled["model"])
    r = ssmgen("train", data, "--init", "ablated-s4d-pieces", "--preset", "tiny", "--max-steps",
               1, "--out", tmp_path / "x", "-q")
    assert r.returncode == 2 and "its model has d_model = 64" in r.stderr, r.stderr
    other = make_dataset(tmp_path / "8k", rate=8000)
    r = ssmgen("train", other, "--init", "ablated-s4d-pieces", "--max-steps", 1, "--out",
               tmp_path / "y", "-q")
    assert r.returncode == 2 and "differs from the --init model's" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cooldown_planned_by_steps_and_started_by_the_clock():
    """train.cooldown: the learning rate falls linearly to 0 over the run's last share; with
    --max-steps from a fixed step, with --max-minutes from when that share of minutes is left,
    for that share of the steps so far (never past a planned end), kept in the state."""
    from ssmgen.optim import Schedule
    cfg = load_config("tiny", overrides=["train.schedule=constant", "train.warmup_steps=0",
                                         "train.cooldown=0.2", "train.max_steps=100"])
    s = Schedule(cfg)
    assert (s.cool_start, s.cool_end) == (80, 100)
    assert [s.multiplier(t) for t in (0, 79, 80, 90, 99)] == [1.0, 1.0, 1.0, 0.5, 0.05]
    assert s.state_dict()["cool"] is None  # planned: follows the config on resume
    assert not s.wants_cooldown(10, elapsed_s=10.0, limit_s=float("inf"))
    assert not s.wants_cooldown(10, elapsed_s=79.0, limit_s=100.0)
    assert s.wants_cooldown(10, elapsed_s=80.0, limit_s=100.0)  # the clock is earlier
    assert s.start_cooldown(60) == 75 and s.multiplier(70) == pytest.approx(1 / 3)
    assert not s.wants_cooldown(61, elapsed_s=90.0, limit_s=100.0)  # cooling already
    late = Schedule(cfg)
    assert late.start_cooldown(85) == 100  # 21 steps after 85, but never past the planned end
    timed = Schedule(load_config("tiny", overrides=["train.cooldown=0.25"]))
    assert timed.cool_start is None and timed.multiplier(1000) == 1.0
    assert timed.start_cooldown(30) == 40
    again = Schedule(load_config("tiny", overrides=["train.cooldown=0.25"]))
    again.load_state_dict(timed.state_dict())
    assert (again.cool_start, again.cool_end, again.multiplier(35)) == (30, 40, 0.5)
    done = Schedule(load_config("tiny", overrides=["train.cooldown=0.25"]))
    done.load_state_dict(timed.state_dict(), step=40)  # that run finished: a new limit plans anew
    assert done.cool_start is None and done.multiplier(40) == 1.0
    off = Schedule(load_config("tiny", overrides=["train.max_steps=100", "train.cooldown=0"]))
    assert off.cool_start is None and not off.wants_cooldown(99, 1e9, 1.0)


def test_a_timed_run_cools_down_and_ends_at_its_cooldown(data, tmp_path, monkeypatch):
    """--max-minutes with a cooldown: the loop's clock starts it (here a fake clock, 1 s per
    reading) and the run ends where it ends, its last learning rate near 0."""
    import types

    from ssmgen import train as train_module
    clock = iter(range(10**6))
    monkeypatch.setattr(train_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    cfg = load_config("tiny", backend="s4d", overrides=[
        "train.batch_size=2", "train.sample_len=1024", "train.val_max_samples=4096",
        "train.sample_seconds=0", "train.val_every=1000", "train.max_minutes=1",
        "train.cooldown=0.25"])
    result = train(data, cfg, tmp_path / "run", progress=False)
    last = weights(tmp_path / "run")
    start, end = last["schedule"]["cool"]
    assert result["stopped"] == "time limit" and last["step"] == end == result["steps"]
    assert 15 <= start <= 30 and end - start == round(start / 3)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert float(rows[-1]["lr"]) == pytest.approx(cfg.train.lr / (end - start), rel=1e-3)
    # resumed with a longer limit, the finished run trains on (and cools down again at its end)
    cfg.train.max_minutes = 2
    again = train(data, cfg, tmp_path / "run", resume=True, progress=False)
    start2, end2 = weights(tmp_path / "run")["schedule"]["cool"]
    assert again["steps"] == end2 > end and start2 > end
