"""Audio in and out: decode any file libsndfile reads, downmix, resample (soxr), the 8-bit codecs,
level normalization, and atomic WAV writing.

Everything here works on numpy arrays; nothing imports torch, so the data pipeline stays light.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf
import soxr

from ssmgen.atomic import write_bytes, write_text
from ssmgen.errors import UserError
from ssmgen.tokens import SILENCE_TOKEN

MU = 255  # mu-law constant for 8-bit audio, as in the SaShiMi reference
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
        st = path.stat()
        if not path.is_file():
            raise UserError(f"{path}: not a regular file")
        if st.st_size == 0:
            raise UserError(f"{path}: empty file")
        if not os.access(path, os.R_OK):
            raise UserError(f"{path}: no permission to read it")
        info = sf.info(os.fsencode(path))  # bytes: a name that is not UTF-8 opens too
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: not audio that libsndfile can read ({_one_line(e)})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise UserError(f"{path}: invalid header (rate {info.samplerate}, "
                        f"{info.channels} channels)")
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames),
                     str(info.format), str(info.subtype))


class NotFiniteAudio(UserError):
    """A file whose samples hold NaN or infinity (float formats can): unusable as audio."""


def iter_mono_blocks(path: str | os.PathLike, rate: int | None = None,
                     block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Decode a file block by block, downmixed to mono (channel mean) and, if `rate` is given,
    resampled to it with soxr (high quality, streaming, so memory stays bounded). Yields float32.
    Raises NotFiniteAudio at the first block holding NaN or infinity."""
    path = Path(path)
    done = 0
    try:
        with sf.SoundFile(os.fsencode(path)) as f:
            sr = int(f.samplerate)
            resampler = soxr.ResampleStream(sr, rate, 1, dtype="float32", quality="HQ") \
                if rate and rate != sr else None
            while True:
                block = f.read(block_frames, dtype="float32", always_2d=True)
                last = len(block) < block_frames
                if not np.isfinite(block).all():
                    raise NotFiniteAudio(f"{path}: holds NaN or infinite samples (from "
                                         f"{done / sr:.2f} s on); not usable as audio")
                done += len(block)
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
    except PermissionError:
        raise UserError(f"{path}: no permission to read it") from None
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


@dataclass
class SongClip:
    """A span of a song read as a model's training files were: mono float32 at the model's rate
    (`audio` holds samples [start, end) of the song), with the gain its normalization policy gives
    the WHOLE song (the model's tokens are `encode(audio * gain, encoding)`)."""

    audio: np.ndarray
    start: int
    end: int
    length: int  # of the whole song, in samples at the model's rate
    gain: float
    info: AudioInfo


def read_song_clip(path: str | os.PathLike, data_format: dict, *, seconds: float,
                   at: float | None = None) -> SongClip:
    """The `seconds` of `path` that end at `at` seconds (default: the song's end), in one streaming
    pass that also measures the whole song's peak: memory is the clip's, whatever the song's
    length. UserError if `at` is past the end or the song holds no audio."""
    rate = int(data_format["rate"])
    info = probe(path)
    n_keep = max(0, int(round(seconds * rate)))
    end = None if at is None else int(round(at * rate))
    start = None if end is None else max(0, end - n_keep)
    kept: list[np.ndarray] = []
    pos, peak = 0, 0.0
    for block in iter_mono_blocks(path, rate):
        peak = max(peak, float(np.max(np.abs(block))))
        if end is None:  # the clip ends with the song: keep a ring of the last n_keep samples
            kept.append(block)
            if sum(len(k) for k in kept) > 2 * n_keep + len(block):
                tail = np.concatenate(kept)
                kept = [tail[len(tail) - n_keep:]] if n_keep else []
        else:
            lo, hi = max(start, pos), min(end, pos + len(block))
            if lo < hi:
                kept.append(block[lo - pos: hi - pos])
        pos += len(block)
    if pos == 0:
        raise UserError(f"{path}: no audio in file")
    if end is None:
        end, start = pos, max(0, pos - n_keep)
    elif end > pos:
        raise UserError(f"{path}: --at {at} s is past the end of the song ({pos / rate:.2f} s)")
    audio = np.concatenate(kept) if kept else np.zeros(0, np.float32)
    audio = audio[len(audio) - (end - start):] if end - start else audio[:0]
    gain = normalization_gain(peak, data_format["normalization"])
    return SongClip(np.ascontiguousarray(audio), start, end, pos, gain, info)


def read_song_tokens(path: str | os.PathLike, data_format: dict) -> np.ndarray:
    """A whole song as the model's uint8 tokens, exactly as a training file was made (peak of the
    whole song, then scale and encode): two streaming passes, one byte of memory per sample."""
    rate = int(data_format["rate"])
    probe(path)
    n, peak = 0, 0.0
    for block in iter_mono_blocks(path, rate):
        peak = max(peak, float(np.max(np.abs(block))))
        n += len(block)
    if n == 0:
        raise UserError(f"{path}: no audio in file")
    gain = normalization_gain(peak, data_format["normalization"])
    tokens = np.empty(n, np.uint8)
    pos = 0
    for block in iter_mono_blocks(path, rate):
        # float32 * python float stays float32: exactly what prep computes for a training file
        q = encode(block * gain, data_format["encoding"])
        tokens[pos: pos + len(q)] = q[: n - pos]
        pos += len(q)
    if pos != n:
        raise UserError(f"{path}: changed while it was read")
    return tokens


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono or (frames, channels) float audio with soxr (high quality)."""
    if from_rate == to_rate:
        return np.asarray(x, dtype=np.float32)
    return soxr.resample(np.asarray(x, dtype=np.float32), from_rate, to_rate, quality="HQ")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    """Float audio (mono or frames x channels) as a 16-bit PCM WAV file's bytes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0), rate, subtype="PCM_16",
             format="WAV")
    return buf.getvalue()


def pcm16_bytes(x: np.ndarray) -> bytes:
    """Float mono audio as the sample bytes of a 16-bit PCM WAV (the conversion `wav_bytes`
    makes, sample for sample: libsndfile's, with the same clipping)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0), 8000, subtype="PCM_16",
             format="RAW", endian="LITTLE")
    return buf.getvalue()


def wav_header(frames: int, rate: int, channels: int = 1) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV holding `frames` frames, its sizes exact: what a
    stream writes before samples it has not generated yet."""
    data = frames * channels * 2
    if data > 0xFFFFFFFF - 36:
        raise ValueError(f"{frames} frames do not fit in a WAV file")
    return (b"RIFF" + (36 + data).to_bytes(4, "little") + b"WAVEfmt "
            + (16).to_bytes(4, "little") + (1).to_bytes(2, "little")
            + channels.to_bytes(2, "little") + rate.to_bytes(4, "little")
            + (rate * channels * 2).to_bytes(4, "little") + (channels * 2).to_bytes(2, "little")
            + (16).to_bytes(2, "little") + b"data" + data.to_bytes(4, "little"))


def write_wav(path: str | os.PathLike, x: np.ndarray, rate: int, *, replace: bool = True,
              inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write float audio as 16-bit PCM WAV, atomically and under `ssmgen.atomic`'s rules
    (`replace=False`: an existing file is an error; never over an input)."""
    return write_bytes(path, wav_bytes(x, rate), replace=replace, inputs=inputs)


def atomic_write_text(path: str | os.PathLike, text: str, *, replace: bool = True,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a text file atomically under `ssmgen.atomic`'s rules."""
    return write_text(path, text, replace=replace, inputs=inputs)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
