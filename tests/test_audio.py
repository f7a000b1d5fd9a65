"""The codecs against hand-computed values, decoding/downmix/resampling, atomic WAV writing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import soxr

from conftest import synth
from ssmgen.audio import (
    decode,
    encode,
    linear_decode,
    linear_encode,
    load_mono,
    mulaw_decode,
    mulaw_encode,
    normalization_gain,
    probe,
    write_wav,
)
from ssmgen.errors import UserError


def mulaw_by_hand(x: float) -> int:
    """The SaShiMi reference quantizer, written out with the math module."""
    f = math.copysign(math.log(1 + 255 * abs(x)) / math.log(256), x)
    return math.floor((f + 1) / 2 * 255 + 0.5)


def mulaw_inverse_by_hand(k: int) -> float:
    f = k / 255 * 2 - 1
    return math.copysign((256 ** abs(f) - 1) / 255, f)


def test_mulaw_fixed_points():
    assert mulaw_encode(np.array([0.0, 1.0, -1.0])).tolist() == [128, 255, 0]
    assert mulaw_decode(np.array([128, 255, 0])).tolist() == [0.0, 1.0, -1.0]
    assert mulaw_encode(np.array([2.0, -3.0])).tolist() == [255, 0]  # clipped


@pytest.mark.parametrize("x, k", [(0.5, 239), (-0.5, 16), (0.01, 157), (-0.01, 98), (0.1, 203)])
def test_mulaw_mid_values(x, k):
    # e.g. 0.5: f = ln(128.5)/ln(256) = 0.87570; (f+1)/2*255 + 0.5 = 239.65 -> 239
    assert mulaw_by_hand(x) == k
    assert int(mulaw_encode(np.array([x]))[0]) == k


@pytest.mark.parametrize("k", [1, 50, 127, 129, 200, 254])
def test_mulaw_decode_mid_values(k):
    assert float(mulaw_decode(np.array([k]))[0]) == pytest.approx(mulaw_inverse_by_hand(k),
                                                                 rel=1e-6, abs=1e-9)


def test_linear_values():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 0.9921875, 1.0, -2.0])
    assert linear_encode(x).tolist() == [0, 64, 128, 192, 255, 255, 0]
    assert linear_decode(np.array([0, 64, 128, 192, 255])).tolist() == \
        [-1.0, -0.5, 0.0, 0.5, 0.9921875]


@pytest.mark.parametrize("codec", ["mulaw", "linear"])
def test_round_trip_every_token(codec):
    k = np.arange(256)
    assert np.array_equal(encode(decode(k, codec), codec), k)
    assert decode(np.array([128]), codec)[0] == 0.0
    assert np.all(np.diff(decode(k, codec)) > 0)  # monotone


def test_unknown_codec_and_policy():
    with pytest.raises(UserError, match="unknown encoding"):
        encode(np.zeros(3), "alaw")
    with pytest.raises(UserError, match="unknown normalization"):
        normalization_gain(0.5, "rms")
    assert normalization_gain(0.25, "peak") == 4.0
    assert normalization_gain(0.0, "peak") == 1.0
    assert normalization_gain(0.25, "none") == 1.0


def test_load_mono_downmixes_and_resamples(tmp_path):
    path = tmp_path / "stereo.wav"
    x = synth(1.0, 44100, 440, channels=2)  # right channel = left / 2
    sf.write(path, x, 44100, subtype="FLOAT")
    y, info = load_mono(path, 16000)
    assert (info.samplerate, info.channels, info.frames) == (44100, 2, 44100)
    assert y.dtype == np.float32 and len(y) == 16000
    expected = soxr.resample(x.mean(axis=1), 44100, 16000, quality="HQ")
    assert np.abs(y - expected).max() < 1e-5
    assert np.abs(y).max() == pytest.approx(0.375, rel=0.01)  # mean of 0.5 and 0.25


def test_probe_rejects_non_audio(tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_text("not audio at all")
    with pytest.raises(UserError, match="not audio"):
        probe(bad)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        probe(tmp_path / "empty.wav")


def test_write_wav_is_atomic(tmp_path):
    x = synth(0.5, 16000, 220)
    out = write_wav(tmp_path / "sub" / "o.wav", x, 16000)
    assert [p.name for p in out.parent.iterdir()] == ["o.wav"]
    y, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and np.abs(y - x).max() < 1e-4
    with pytest.raises(UserError, match="already exists"):
        write_wav(out, x, 16000, replace=False)
    assert [p.name for p in out.parent.iterdir()] == ["o.wav"]
