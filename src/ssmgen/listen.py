"""What a listener sees beside a clip: a waveform and a spectrogram picture with the seam (where the
prompt ends) marked, and the level of each part (RMS in dBFS, spectral flatness).

numpy only: the pictures are PNG files made by a small encoder (zlib + the PNG chunk format), so
the pages that show them need nothing but a browser, and ssmgen needs no plotting library.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib

import numpy as np

#: Colours (RGB) of the pictures.
PROMPT = (74, 111, 165)
NEW = (224, 123, 57)
SEAM = (214, 39, 40)
BACKGROUND = (250, 250, 250)
AXIS = (200, 200, 200)
#: A perceptually ordered map (viridis anchors), dark = quiet.
_MAP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
                np.float64)
#: dBFS reported for digital silence (JSON holds no -inf).
SILENCE_DBFS = -120.0


# --- PNG ----------------------------------------------------------------------------------------

def png_bytes(image: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """The bytes of a PNG file: `image` (H, W, 3) uint8 RGB, or (H, W) uint8 indices into
    `palette` (N <= 256, 3) uint8 (one byte a pixel: pictures of few colours stay small)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if palette is None:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3) RGB, got {image.shape}")
        h, w = image.shape[:2]
        kind, row_bytes = 2, 3 * w
    else:
        if image.ndim != 2 or not 0 < len(palette) <= 256:
            raise ValueError(f"expected (H, W) indices and at most 256 colours, got "
                             f"{image.shape} and {len(palette)}")
        h, w = image.shape
        kind, row_bytes = 3, w
    raw = np.zeros((h, 1 + row_bytes), np.uint8)  # filter byte 0 (None) on every row
    raw[:, 1:] = image.reshape(h, row_bytes)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, kind, 0, 0, 0)  # 8 bits, no interlace
    plte = b"" if palette is None else chunk(
        b"PLTE", np.ascontiguousarray(palette, dtype=np.uint8).tobytes())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + plte
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + chunk(b"IEND", b""))


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI (an <img> that needs no file beside the page)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --- pictures -----------------------------------------------------------------------------------

def _seam_column(seam: int | None, n: int, width: int) -> int | None:
    if seam is None or n == 0 or not 0 < seam < n:
        return None
    return min(width - 1, int(seam * width / n))


def _mark_seam(img: np.ndarray, col: int | None, value) -> None:
    if col is not None:
        img[:, max(0, col - 1):col + 1] = value


def waveform_png(audio: np.ndarray, seam: int | None = None, width: int = 720,
                 height: int = 90) -> bytes:
    """The waveform (min and max of each pixel column, full scale = the picture's height), the
    prompt in blue, what follows the seam (sample index `seam`) in orange, the seam in red (no
    seam: all of it is prompt)."""
    x = np.asarray(audio, np.float32).reshape(-1)
    palette = np.array([BACKGROUND, AXIS, PROMPT, NEW, SEAM], np.uint8)
    img = np.zeros((height, width), np.uint8)
    img[height // 2] = 1
    n = len(x)
    if n:
        starts = np.minimum((np.arange(width) * n) // width, n - 1)
        # (a column narrower than a sample shows the sample it falls on)
        lo = np.clip(np.minimum.reduceat(x, starts), -1, 1)
        hi = np.clip(np.maximum.reduceat(x, starts), -1, 1)
        half = (height - 1) / 2
        top = np.floor(half - hi * half).astype(int)
        bottom = np.ceil(half - lo * half).astype(int)
        rows = np.arange(height)[:, None]
        on = (rows >= top[None]) & (rows <= bottom[None])
        col = _seam_column(seam, n, width)
        colour = np.full(width, 2, np.uint8)
        if col is not None:
            colour[col:] = 3
        elif seam is not None and seam <= 0:
            colour[:] = 3
        img[on] = np.broadcast_to(colour[None], (height, width))[on]
        _mark_seam(img, col, 4)
    return png_bytes(img, palette)


def spectrogram(audio: np.ndarray, width: int = 720, n_fft: int = 512) -> np.ndarray:
    """Power in dB (n_fft // 2 + 1, width): one Hann-windowed frame centred on each pixel column."""
    x = np.asarray(audio, np.float64).reshape(-1)
    n = len(x)
    centres = ((np.arange(width) + 0.5) * n / width).astype(np.int64)
    idx = centres[:, None] + np.arange(n_fft)[None] - n_fft // 2
    padded = np.concatenate([np.zeros(n_fft), x, np.zeros(n_fft)])
    frames = padded[idx + n_fft] * np.hanning(n_fft)[None]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return 10 * np.log10(power.T + 1e-12)


def spectrogram_png(audio: np.ndarray, seam: int | None = None, rate: int = 16000,
                    width: int = 720, height: int = 128, n_fft: int = 512,
                    floor_db: float = 80.0) -> bytes:
    """The spectrogram (0 Hz at the bottom, rate / 2 at the top on the mel scale, so the low
    octaves where music lives get room; the loudest point bright, `floor_db` below it dark) with
    the seam in red."""
    db = spectrogram(audio, width, n_fft)
    top = float(db.max()) if db.size else 0.0
    level = np.clip((db - (top - floor_db)) / floor_db, 0, 1)  # (bins, width)
    bins = level.shape[0]
    mel_top = 2595 * np.log10(1 + rate / 2 / 700)
    mel = (np.arange(height)[::-1] + 0.5) / height * mel_top
    hz = 700 * (10 ** (mel / 2595) - 1)
    rows = np.minimum(np.round(hz / (rate / 2) * (bins - 1)), bins - 1).astype(int)
    # 32 shades along the map, one byte a pixel; the last palette entry is the seam
    steps = 32
    t = np.linspace(0, len(_MAP) - 1, steps)
    i = np.minimum(t.astype(int), len(_MAP) - 2)
    f = (t - i)[:, None]
    palette = np.concatenate([(_MAP[i] * (1 - f) + _MAP[i + 1] * f).round(), [SEAM]])
    img = np.round(level[rows] * (steps - 1)).astype(np.uint8)  # (height, width)
    _mark_seam(img, _seam_column(seam, len(np.asarray(audio).reshape(-1)), width), steps)
    return png_bytes(img, palette.astype(np.uint8))


# --- levels -------------------------------------------------------------------------------------

def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level in dB relative to full scale (a full-scale sine is -3 dBFS); silence -120."""
    x = np.asarray(audio, np.float64).reshape(-1)
    if not len(x):
        return SILENCE_DBFS
    rms = math.sqrt(float(np.mean(x * x)))
    return max(SILENCE_DBFS, 20 * math.log10(rms)) if rms > 0 else SILENCE_DBFS


def spectral_flatness(audio: np.ndarray, n_fft: int = 1024, quiet_dbfs: float = -60.0
                      ) -> float | None:
    """Mean over frames (Hann, hop n_fft / 2) of the geometric over the arithmetic mean of the
    power spectrum: near 0 for tones, near 1 for white noise. Frames quieter than `quiet_dbfs`
    are left out (silence has no spectrum to speak of); None when every frame is."""
    x = np.asarray(audio, np.float64).reshape(-1)
    hop = n_fft // 2
    if len(x) < n_fft:
        x = np.concatenate([x, np.zeros(n_fft - len(x))])
    starts = np.arange(0, len(x) - n_fft + 1, hop)
    frames = x[starts[:, None] + np.arange(n_fft)[None]]
    loud = np.sqrt(np.mean(frames * frames, axis=1)) > 10 ** (quiet_dbfs / 20)
    if not loud.any():
        return None
    power = np.abs(np.fft.rfft(frames[loud] * np.hanning(n_fft)[None], axis=1)) ** 2 + 1e-20
    flat = np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1)
    return float(np.mean(flat))


def levels(audio: np.ndarray) -> dict:
    """{'rms_dbfs', 'flatness'} of a clip."""
    return {"rms_dbfs": round(rms_dbfs(audio), 2),
            "flatness": None if (f := spectral_flatness(audio)) is None else round(f, 4)}


#: Limits of the level match (a gain on the generated part): at most 12 dB either way.
MAX_GAIN_DB = 12.0


def matching_gain(prompt_tail: np.ndarray, continuation: np.ndarray,
                  max_gain_db: float = MAX_GAIN_DB) -> float:
    """The gain that brings the continuation's RMS to the prompt tail's, within +-max_gain_db and
    never so high that the continuation's peak passes full scale; 1 when either part is
    silent."""
    p = np.asarray(prompt_tail, np.float64)
    c = np.asarray(continuation, np.float64)
    if not len(p) or not len(c):
        return 1.0
    rp, rc = math.sqrt(float(np.mean(p * p))), math.sqrt(float(np.mean(c * c)))
    if rp <= 0 or rc <= 0:
        return 1.0
    cap = 10 ** (max_gain_db / 20)
    gain = min(max(rp / rc, 1 / cap), cap)
    if gain > 1:  # a boost stops at full scale
        gain = min(gain, max(1.0, 1.0 / float(np.max(np.abs(c)))))
    return float(gain)


def warnings_for(prompt: dict, continuation: dict) -> list[str]:
    """Plain words for a continuation that ran away from its prompt: fell silent, much louder or
    quieter, or turned to noise (thresholds: -50 dBFS, 6 dB, flatness above 0.35 and twice the
    prompt's)."""
    out = []
    pr, cr = prompt["rms_dbfs"], continuation["rms_dbfs"]
    if cr < -50 and pr > -40:
        out.append("fell silent")
    elif cr - pr > 6:
        out.append(f"{cr - pr:.0f} dB louder than the prompt")
    elif pr - cr > 6:
        out.append(f"{pr - cr:.0f} dB quieter than the prompt")
    pf, cf = prompt.get("flatness"), continuation.get("flatness")
    if cf is not None and cf > 0.35 and cf > 2 * (pf or 0):
        out.append(f"noise-like (flatness {cf:.2f}" +
                   (f", prompt {pf:.2f})" if pf is not None else ")"))
    return out
