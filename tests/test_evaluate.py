"""`ssmgen eval --audio`: any audio file scored exactly as the same file would be as a prepared
split, per file and overall; bad files give one line and exit 2."""

import json

import pytest
import torch

from helpers import make_checkpoint, ssmgen, write_tone
from ssmgen.checkpoint import save_checkpoint
from ssmgen.prep import prepare


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    songs = root / "songs"
    songs.mkdir()
    # different rates, channel counts and levels: the file path must resample, mix and normalize
    write_tone(songs / "a.wav", seconds=1.5, rate=44100, channels=2, freq=220.0, level=0.2)
    write_tone(songs / "b.flac", seconds=1.0, rate=22050, channels=1, freq=330.0, level=0.5)
    write_tone(songs / "c.wav", seconds=1.2, rate=16000, channels=2, freq=440.0, level=0.7)
    manifest = prepare(songs, root / "ds", split=(0.34, 0.33, 0.33), progress=False)
    ckpt = make_checkpoint(root / "model.pt", backend="s4d", preset="tiny")
    return root, manifest, ckpt


def test_audio_file_scores_as_the_same_file_prepared_as_a_split(setup):
    root, manifest, ckpt = setup
    test_files = [f["path"] for f in manifest["files"] if f.get("split") == "test"]
    assert len(test_files) == 1
    r = ssmgen("eval", ckpt, "--data", root / "ds", "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    split = json.loads(r.stdout)
    r = ssmgen("eval", ckpt, "--audio", root / "songs" / test_files[0], "--json")
    assert r.returncode == 0, r.stderr
    song = json.loads(r.stdout)
    assert song["samples"] == split["samples"] > 0
    assert song["bpb"] == pytest.approx(split["bpb"], abs=1e-9)
    for k in ("acc1", "acc3", "acc5", "acc10"):
        assert song[k] == pytest.approx(split[k], abs=1e-12)


def test_several_files_per_file_and_sample_weighted_overall(setup):
    root, _, ckpt = setup
    a, b = root / "songs" / "a.wav", root / "songs" / "b.flac"
    r = ssmgen("eval", ckpt, "--audio", a, "--audio", b, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    files = res["files"]
    assert [f["file"] for f in files] == [str(a), str(b)]
    assert [f["samples"] for f in files] == [24000, 16000]  # 1.5 s and 1.0 s at 16 kHz
    mean = (files[0]["bpb"] * 24000 + files[1]["bpb"] * 16000) / 40000
    assert res["bpb"] == pytest.approx(mean, rel=1e-12) and res["samples"] == 40000
    r = ssmgen("eval", ckpt, "--audio", a, "--audio", b)  # the human-readable form
    assert r.returncode == 0 and "a.wav" in r.stdout and "all files" in r.stdout


def test_unreadable_audio_is_one_line_naming_it(setup):
    root, _, ckpt = setup
    bad = root / "notes.wav"
    bad.write_text("not audio")
    r = ssmgen("eval", ckpt, "--audio", bad)
    assert r.returncode == 2
    assert "notes.wav" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_split_without_a_recorded_dataset_asks_for_data(setup, tmp_path):
    root, _, ckpt = setup  # its checkpoint records no dataset, like a slimmed one
    r = ssmgen("eval", ckpt, "--split", "test")
    assert r.returncode == 2 and "pass --data" in r.stderr and str(ckpt) in r.stderr, r.stderr
    data = torch.load(ckpt, weights_only=True)
    data["dataset"] = str(tmp_path / "moved")
    moved = save_checkpoint(tmp_path / "m.pt", data)
    r = ssmgen("eval", moved, "--split", "test")
    assert r.returncode == 2 and "is not here; pass --data" in r.stderr, r.stderr


def test_eval_prints_the_classical_coder_on_the_same_split(setup):
    root, _, ckpt = setup
    r = ssmgen("eval", ckpt, "--data", root / "ds", "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    c = res["classical"]
    assert c["samples"] == res["samples"] and c["split"] == "test" and 0 < c["bpb"] < 8
    assert c["order"] == 32 and c["tuned_on"] == "val"
    r = ssmgen("eval", ckpt, "--data", root / "ds", "--split", "test")
    assert r.returncode == 0, r.stderr
    assert f"{res['streamed']['bpb']:.2f} streamed bits per sample; a classical LPC coder: " \
           f"{c['bpb']:.2f} on the same split" in r.stdout


def test_streamed_scores_a_file_as_stepping_through_it_does(setup, tmp_path):
    """Streamed: the state carried through the file, as `continue` uses the model: the same
    figure as stepping the model sample by sample from the file's start, whatever the read
    size; chunked (the paper's protocol) restarts every chunk, so it differs."""
    import math

    import torch.nn.functional as F

    from ssmgen.audio import read_song_tokens
    from ssmgen.checkpoint import load_model
    from ssmgen.evaluate import evaluate_audio

    _, _, ckpt = setup
    song = write_tone(tmp_path / "short.wav", seconds=0.05, rate=16000, channels=1)
    model, meta = load_model(ckpt, "cpu")
    tokens = torch.from_numpy(read_song_tokens(song, meta["data_format"]).astype("int64"))
    with torch.no_grad():
        state, prev, nll = model.initial_state(1), torch.tensor([128]), 0.0
        for tok in tokens:
            logits, state = model.step(prev, state)
            nll += F.cross_entropy(logits, tok.view(1), reduction="sum").item()
            prev = tok.view(1)
    stepped = nll / len(tokens) / math.log(2)
    small = evaluate_audio(ckpt, [song], chunk_len=96, progress=False, classical=False)
    whole = evaluate_audio(ckpt, [song], chunk_len=4096, progress=False, classical=False)
    assert small["samples"] == whole["samples"] == len(tokens) == 800
    assert small["streamed"]["bpb"] == pytest.approx(stepped, rel=1e-5)
    assert whole["streamed"]["bpb"] == pytest.approx(stepped, rel=1e-5)
    assert whole["bpb"] == pytest.approx(stepped, rel=1e-5)  # one chunk: nothing to carry
    assert abs(small["bpb"] - stepped) > 1e-3  # 9 fresh starts: not what a read of the file sees
    assert small["files"][0]["streamed"]["bpb"] == small["streamed"]["bpb"]


def test_chunked_only_skips_the_streamed_pass(setup):
    root, _, ckpt = setup
    r = ssmgen("eval", ckpt, "--audio", root / "songs" / "b.flac", "--chunked-only", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "streamed" not in res and "streamed" not in res["files"][0]
    r = ssmgen("eval", ckpt, "--audio", root / "songs" / "b.flac")
    assert r.returncode == 0, r.stderr
    assert "in chunks of" in r.stdout and "b.flac, streamed:" in r.stdout


def test_a_capped_read_hears_a_fair_prefix_of_every_file(tmp_path):
    """Validation caps its read (train.val_max_samples): the budget is shared out over the files,
    a prefix of each, so a long first file cannot crowd out the rest."""
    import numpy as np

    from helpers import make_dataset
    from ssmgen.data import Dataset, fair_shares

    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = [int(x) for x in rng.integers(0, 50, size=rng.integers(1, 6))]
        budget = int(rng.integers(0, 200))
        shares = fair_shares(lengths, budget)
        assert sum(shares) == min(budget, sum(lengths))
        assert all(0 <= s <= n for s, n in zip(shares, lengths))
        # max-min fair: a file cut short gets at least as much as any other file
        for s, n in zip(shares, lengths):
            if s < n:
                assert s >= max(shares) - 1
    ds = Dataset(make_dataset(tmp_path / "ds", files=(("train", 3), ("val", 1), ("test", 1)),
                              seconds=0.5))
    whole = list(ds.file_tokens("train"))
    assert [len(t) for t in whole] == [8000] * 3
    capped = list(ds.file_tokens("train", 3000))
    assert [len(t) for t in capped] == [1000] * 3
    for c, w in zip(capped, whole):
        assert np.array_equal(c, w[:1000])
