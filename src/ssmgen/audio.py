"""Audio in and out: decode any file libsndfile reads, downmix, resample (soxr), the 8-bit codecs,
level normalization, and atomic WAV writing.

Everything here works on numpy arrays; nothing imports torch, so the data pipeline stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from ssmgen.atomic import atomic_output
from ssmgen.errors import UserError

MU = 255  # mu-law constant for 8-bit audio, as in the SaShiMi reference
SILENCE_TOKEN = 128  # both codecs map 0.0 to this token and back
ENCODINGS = ("mulaw", "linear")
NORMALIZATIONS = ("peak", "none")
BLOCK_FRAMES = 1 << 18  # decode this many frames at a time: bounded memory for any file length


# --------------------------------------------------------------------------------------------
# Codecs. Tokens are uint8 in [0, 255]; token 128 is silence and decodes to exactly 0.0.
# --------------------------------------------------------------------------------------------

def mulaw_encode(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to 8-bit mu-law tokens, bins exactly as the SaShiMi reference
    (mu = 255, quantized as floor((f + 1) / 2 * mu + 0.5)). Values outside [-1, 1] are clipped."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    f = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    return np.floor((f + 1.0) / 2.0 * MU + 0.5).astype(np.uint8)


def mulaw_decode(q: np.ndarray) -> np.ndarray:
    """8-bit mu-law tokens to float32 audio. The reference's inverse, except that token 128 (whose
    bin starts at 0.0) decodes to exactly 0.0, so silence stays silence; encode(decode(k)) == k."""
    f = np.asarray(q, dtype=np.float64) / MU * 2.0 - 1.0
    x = np.sign(f) * ((1.0 + MU) ** np.abs(f) - 1.0) / MU
    x[np.asarray(q) == SILENCE_TOKEN] = 0.0
    return x.astype(np.float32)


def linear_encode(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to 8-bit linear tokens: 256 equal bins, token k covers
    [k/128 - 1, (k+1)/128 - 1)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    return np.clip(np.floor((x + 1.0) * 128.0), 0, 255).astype(np.uint8)


def linear_decode(q: np.ndarray) -> np.ndarray:
    """8-bit linear tokens to float32 audio: k -> k/128 - 1 (token 128 -> 0.0)."""
    return (np.asarray(q, dtype=np.float32) / 128.0 - 1.0).astype(np.float32)


def encode(x: np.ndarray, encoding: str) -> np.ndarray:
    """Encode float audio with `encoding` ('mulaw' or 'linear')."""
    if encoding == "mulaw":
        return mulaw_encode(x)
    if encoding == "linear":
        return linear_encode(x)
    raise UserError(f"unknown encoding '{encoding}': use one of {', '.join(ENCODINGS)}")


def decode(q: np.ndarray, encoding: str) -> np.ndarray:
    """Decode tokens made by `encode` back to float32 audio."""
    if encoding == "mulaw":
        return mulaw_decode(q)
    if encoding == "linear":
        return linear_decode(q)
    raise UserError(f"unknown encoding '{encoding}': use one of {', '.join(ENCODINGS)}")


# --------------------------------------------------------------------------------------------
# Level normalization. Policy 'peak': each source file is scaled as a whole so that its largest
# absolute sample is 1.0 (the full range of the codec). Prompts are scaled the same way, by the
# peak of the whole song, so a prompt looks to the model exactly like a training file did.
# --------------------------------------------------------------------------------------------

def normalization_gain(peak: float, policy: str) -> float:
    """The factor that `policy` applies to a file whose largest absolute sample is `peak`."""
    if policy == "none":
        return 1.0
    if policy == "peak":
        return 1.0 / peak if peak > 0 else 1.0
    raise UserError(f"unknown normalization '{policy}': use one of {', '.join(NORMALIZATIONS)}")


# --------------------------------------------------------------------------------------------
# Decoding files
# --------------------------------------------------------------------------------------------

@dataclass
class AudioInfo:
    """What libsndfile says about a file before decoding it."""

    path: Path
    samplerate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate if self.samplerate else 0.0


def probe(path: str | os.PathLike) -> AudioInfo:
    """Read a file's header by content (not by extension). Raises UserError if it is not audio
    that libsndfile can read."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file")
        info = sf.info(str(path))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: not audio that libsndfile can read ({_one_line(e)})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise UserError(f"{path}: invalid header (rate {info.samplerate}, {info.channels} channels)")
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames),
                     str(info.format), str(info.subtype))


def iter_mono_blocks(path: str | os.PathLike, rate: int | None = None,
                     block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Decode a file block by block, downmixed to mono (channel mean) and, if `rate` is given,
    resampled to it with soxr (high quality, streaming, so memory stays bounded). Yields float32."""
    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = int(f.samplerate)
            resampler = soxr.ResampleStream(sr, rate, 1, dtype="float32", quality="HQ") \
                if rate and rate != sr else None
            while True:
                block = f.read(block_frames, dtype="float32", always_2d=True)
                last = len(block) < block_frames
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
                mono = np.ascontiguousarray(mono, dtype=np.float32)
                if resampler is not None:
                    mono = resampler.resample_chunk(mono, last=last)
                if len(mono):
                    yield mono
                if last:
                    break
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (sf.LibsndfileError, RuntimeError) as e:
        raise UserError(f"{path}: cannot decode ({_one_line(e)})") from None


def load_mono(path: str | os.PathLike, rate: int) -> tuple[np.ndarray, AudioInfo]:
    """Decode a whole file to mono float32 at `rate`. Raises UserError naming the file if it cannot
    be read or holds no audio."""
    info = probe(path)
    blocks = list(iter_mono_blocks(path, rate))
    x = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if len(x) == 0:
        raise UserError(f"{path}: no audio in file")
    return x, info


def load_song(path: str | os.PathLike, data_format: dict) -> tuple[np.ndarray, float, AudioInfo]:
    """A whole song read as a model's training files were: (mono float32 audio at the model's
    rate, the gain its normalization policy gives this song, what libsndfile said). The model's
    tokens are `encode(audio * gain, data_format["encoding"])`."""
    audio, info = load_mono(path, int(data_format["rate"]))
    gain = normalization_gain(float(np.max(np.abs(audio))), data_format["normalization"])
    return audio, gain, info


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono or (frames, channels) float audio with soxr (high quality)."""
    if from_rate == to_rate:
        return np.asarray(x, dtype=np.float32)
    return soxr.resample(np.asarray(x, dtype=np.float32), from_rate, to_rate, quality="HQ")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_wav(path: str | os.PathLike, x: np.ndarray, rate: int, *, overwrite: bool = True) -> Path:
    """Write float audio (mono or frames x channels) as 16-bit PCM WAV, atomically: to a temporary
    file in the same folder, then renamed, so a reader never sees a half-written file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists (use --force to overwrite)")
    with atomic_output(path) as tmp:
        sf.write(str(tmp), np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0), rate,
                 subtype="PCM_16", format="WAV")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
