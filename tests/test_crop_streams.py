"""Training crops: fresh uniform draws (the paper's way) and streams of consecutive crops whose
state carries over (`data.CropStreams`, train.carry_crops)."""

import numpy as np
import pytest

from helpers import make_dataset
from ssmgen.data import CropStreams, Dataset
from ssmgen.tokens import SILENCE_TOKEN


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    # three training files of 8000 samples: a crop of 1000 fits 8 times in each
    return Dataset(make_dataset(tmp_path_factory.mktemp("d") / "ds", seconds=0.5))


def run(ds, batch, crops, steps, length=1000, seed=0):
    streams = CropStreams(batch, crops)
    return streams, [streams.next(ds, length, np.random.default_rng([seed, k]))
                     for k in range(steps)]


def test_rows_read_consecutive_crops_of_one_file_then_start_afresh(ds):
    tokens = ds.tokens("train")
    segs = ds.segments("train")
    length, crops, batch = 1000, 3, 4
    _, steps = run(ds, batch, crops, 16, length)
    for b in range(batch):
        limit = max(1, (b + 1) * crops // batch)  # the staggered first episode: 1, 1, 2, 3
        episode, end, seg = None, None, None
        for k, (inputs, targets, fresh) in enumerate(steps):
            # a row continues unless its episode is done or its file has no whole crop left
            if k:
                assert fresh[b] == (episode == limit or end + length > seg.offset + seg.length)
            # where this crop lies (the files are distinct tones: one offset holds these tokens)
            first = np.flatnonzero(tokens[:len(tokens) - length + 1] == targets[b, 0])
            hits = [o for o in first if np.array_equal(tokens[o:o + length], targets[b])]
            assert len(hits) == 1, (b, k)
            off = hits[0]
            if fresh[b]:
                limit = crops if k else limit
                seg = next(s for s in segs if s.offset <= off < s.offset + s.length)
                episode = 1
                assert inputs[b, 0] == SILENCE_TOKEN
            else:
                episode += 1
                assert off == end and inputs[b, 0] == tokens[off - 1]
            assert off + length <= seg.offset + seg.length  # never spans two files
            np.testing.assert_array_equal(inputs[b, 1:], targets[b, :-1])
            end = off + length
    fresh = np.array([f for _, _, f in steps])
    assert fresh[0].all() and not fresh[1:].all()


def test_one_crop_per_episode_is_a_fresh_uniform_draw_each_step(ds):
    _, steps = run(ds, 3, 1, 4)
    for inputs, _, fresh in steps:
        assert fresh.all() and (inputs[:, 0] == SILENCE_TOKEN).all()
    # a different step seed, different crops
    assert not np.array_equal(steps[0][1], steps[1][1])


def test_cursors_resume_the_same_crops(ds):
    whole, ref = run(ds, 4, 5, 9)
    half, _ = run(ds, 4, 5, 4)
    resumed = CropStreams(4, 5)
    resumed.load_state_dict(half.state_dict())
    for k in range(4, 9):
        got = resumed.next(ds, 1000, np.random.default_rng([0, k]))
        for a, b in zip(got, ref[k]):
            np.testing.assert_array_equal(a, b)
    assert resumed.state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="rows"):
        CropStreams(2, 5).load_state_dict(whole.state_dict())
