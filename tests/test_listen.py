"""What a listener sees: the PNG encoder, the pictures, the levels and the level match; and the
classical coder drawn on the training page, against a slow reference written from its definition."""

import math
import struct
import zlib

import numpy as np
import pytest

from ssmgen import classical as C
from ssmgen.audio import mulaw_encode
from ssmgen.listen import (
    levels,
    matching_gain,
    png_bytes,
    rms_dbfs,
    spectral_flatness,
    spectrogram_png,
    warnings_for,
    waveform_png,
)
from ssmgen.report import chart, nice_ticks


def read_png(data: bytes):
    """A minimal PNG reader for what png_bytes writes: (width, height, colour type, pixel rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks[tag] = body
        pos += 12 + n
    w, h, depth, kind = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and b"IEND" in chunks
    per = 3 if kind == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + per * w)
    assert (raw[:, 0] == 0).all()
    return w, h, kind, raw[:, 1:], chunks.get(b"PLTE")


def test_png_round_trips_rgb_and_palette():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    w, h, kind, rows, _ = read_png(png_bytes(rgb))
    assert (w, h, kind) == (5, 7, 2) and np.array_equal(rows.reshape(7, 5, 3), rgb)
    idx = np.arange(12, dtype=np.uint8).reshape(3, 4)
    w, h, kind, rows, plte = read_png(png_bytes(idx, np.zeros((12, 3), np.uint8)))
    assert (w, h, kind) == (4, 3, 3) and np.array_equal(rows, idx) and len(plte) == 36


def test_pictures_mark_the_seam():
    t = np.arange(32000) / 16000
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    w, h, kind, rows, plte = read_png(waveform_png(x, seam=16000, width=400, height=60))
    palette = np.frombuffer(plte, np.uint8).reshape(-1, 3)
    seam_colour = [tuple(p) for p in palette].index((214, 39, 40))
    cols = np.flatnonzero((rows == seam_colour).all(axis=0))
    assert (w, h) == (400, 60) and 198 <= cols.min() <= cols.max() <= 200
    w, h, _, rows, _ = read_png(spectrogram_png(x, seam=16000, width=300, height=50))
    assert (w, h) == (300, 50) and (rows[:, 149] == rows.max()).all()  # the seam's own colour
    # a short clip (fewer samples than columns) and silence still draw
    read_png(waveform_png(np.zeros(10), seam=5))
    read_png(spectrogram_png(np.zeros(100)))


def test_levels_and_flatness_have_their_known_values():
    t = np.arange(48000) / 16000
    sine = np.sin(2 * np.pi * 1000 * t)
    assert rms_dbfs(sine) == pytest.approx(-3.01, abs=0.01)  # a full-scale sine
    assert rms_dbfs(np.zeros(100)) == -120.0
    noise = np.random.default_rng(1).standard_normal(160000) * 0.1
    assert spectral_flatness(noise) == pytest.approx(math.exp(-np.euler_gamma), abs=0.02)
    assert spectral_flatness(sine) < 0.01
    assert spectral_flatness(np.zeros(5000)) is None and levels(np.zeros(5))["flatness"] is None
    assert warnings_for(levels(sine), levels(noise)) == ["17 dB quieter than the prompt",
                                                         "noise-like (flatness 0.56, prompt 0.00)"]
    assert warnings_for(levels(sine), levels(sine * 1e-4)) == ["fell silent"]
    assert warnings_for(levels(sine), levels(sine * 0.9)) == []


def test_level_match_is_capped_and_never_clips():
    t = np.arange(16000) / 16000
    loud, quiet = 0.5 * np.sin(2 * np.pi * 300 * t), 0.05 * np.sin(2 * np.pi * 300 * t)
    assert matching_gain(loud, quiet) == pytest.approx(10 ** (12 / 20))  # capped at +12 dB
    assert matching_gain(5 * quiet, loud) == pytest.approx(0.5)  # -6 dB: within the cap, exact
    assert matching_gain(quiet, loud) == pytest.approx(10 ** (-12 / 20))  # -20 dB: capped
    assert matching_gain(loud * 0.01, loud) == pytest.approx(10 ** (-12 / 20))
    peaky = quiet.copy()
    peaky[100] = 0.9  # a boost may not push this past full scale
    assert matching_gain(loud, peaky) == pytest.approx(1 / 0.9)
    assert matching_gain(np.zeros(10), loud) == 1.0 == matching_gain(loud, np.zeros(10))


def test_chart_has_axes_ticks_units_and_the_classical_line():
    assert nice_ticks(3.155, 8.18, 6) == [3, 4, 5, 6, 7, 8, 9]
    assert nice_ticks(0, 12345)[-1] >= 12345 and nice_ticks(5, 5)[0] == 5
    rows = [{"step": str(s), "train_bpb": str(8 - s / 100), "val_bpb": str(8.1 - s / 100)}
            for s in (100, 200, 300)]
    svg = chart(rows, {"bpb": 5.26})
    assert "training step" in svg and "bits per sample" in svg and 'id="classical"' in svg
    assert ">300<" in svg and "classical LPC coder: 5.260" in svg


# --- the classical coder ------------------------------------------------------------------------

def slow_bits(q, a, dist, w, c, floor, eps, encoding="mulaw"):
    """The coder written from its definition, one sample at a time with math functions."""
    table = C._table(encoding)
    lo, hi = C.bin_edges(encoding)
    x = table[q]
    p_, e, total = len(a), [], 0.0
    for t in range(len(q)):
        pred = sum(a[k] * x[t - 1 - k] for k in range(p_) if t - 1 - k >= 0)
        e.append(abs(x[t] - pred))
        past = e[max(0, t - w):t]
        s = max(c * (sum(past) / len(past) if past else 0.0), floor)

        def cdf(v):
            if v == math.inf:
                return 1.0
            if v == -math.inf:
                return 0.0
            z = (v - pred) / s
            if dist == "logistic":
                return 1 / (1 + math.exp(-z))
            return 0.5 * math.exp(z) if z < 0 else 1 - 0.5 * math.exp(-z)
        p = min(max(cdf(hi[q[t]]) - cdf(lo[q[t]]), 0.0), 1.0)
        total -= math.log2((1 - eps) * p + eps / 256)
    return total / len(q)


def ar_tokens(n, seed, phi=(1.6, -0.8)):
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    for t in range(2, n):
        x[t] = phi[0] * x[t - 1] + phi[1] * x[t - 2] + rng.standard_normal() * 0.02
    return mulaw_encode(x / np.abs(x).max())


@pytest.mark.parametrize("dist", ["logistic", "laplace"])
def test_classical_coder_equals_a_slow_reference(dist, monkeypatch):
    q = ar_tokens(1500, 0)
    a = np.array([1.5, -0.6, 0.05])
    ref = slow_bits(q, a, dist, 8, 0.85, 1e-4, 1e-4)
    for block in (1 << 20, 256):  # blocked with its history carried in, or whole
        monkeypatch.setattr(C, "BLOCK", block)
        res = C.Residuals([q], a, C._table("mulaw"), 8)
        bits, n = res.bits(C.bin_edges("mulaw"), dist, 0.85, 1e-4, 1e-4)
        assert n == 1500 and bits / n == pytest.approx(ref, abs=1e-9)


def test_classical_coder_fits_an_ar_process_and_beats_order_zero(monkeypatch):
    train, val = [ar_tokens(30000, 1), ar_tokens(20000, 2)], [ar_tokens(20000, 3)]
    monkeypatch.setattr(C, "BLOCK", 4096)  # blocked autocorrelation too
    coder = C.fit(train, val, "mulaw", order=8)
    monkeypatch.setattr(C, "BLOCK", 1 << 20)
    assert C.fit(train, val, "mulaw", order=8)["coefficients"] == pytest.approx(
        coder["coefficients"], abs=1e-9)
    bpb, n = C.score(coder, val)
    counts = np.bincount(val[0], minlength=256) + 1
    order0 = -np.mean(np.log2(counts[val[0]] / counts.sum()))
    assert n == 20000 and bpb < order0 - 1.0
    assert coder["dist"] in C.DISTS and coder["window"] in C.WINDOWS
