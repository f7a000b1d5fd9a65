"""The per-file work of `ssmgen prep`: walking the source folder, hashing, decoding, resampling,
measuring, normalizing and encoding one file; and the split rules.
Pure functions of their inputs (decoding runs in worker processes); `prep.py` orchestrates.

Decoding is two streaming passes over bounded blocks: pass 1 decodes, downmixes and resamples
(soxr streaming, exactly as `audio.load_mono` does, so a prompt gets the same samples and the same
peak) into a float32 scratch file while measuring the peak; pass 2 scales by the file's gain,
encodes to tokens and writes them to the token file. Memory stays a few MB for any file length.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ssmgen.audio import NotFiniteAudio, encode, iter_mono_blocks, normalization_gain, probe
from ssmgen.errors import UserError

SPLITS = ("train", "val", "test")
MIN_SECONDS = 1.0  # shorter files are skipped as "too short"
SILENT_PEAK = 1e-4  # files whose largest sample is below this (-80 dBFS) are skipped as "silent"
CLIP_LEVEL = 0.999  # a source sample this close to full scale counts as clipped
SILENCE_DBFS = -60.0  # a 50 ms frame quieter than this (after normalization) counts as silence
SILENCE_FRAME_S = 0.05
MIN_TRAIN_MINUTES = 5  # less training audio than this gets a warning
_HASH_CHUNK = 1 << 20
COPY_CHUNK = 1 << 22  # tokens copied at a time while writing the split arrays
# Decode blocks: small enough that a truncated FLAC keeps all but its last 2 s (a failed read
# loses the whole block), large enough to be fast. Resampled output does not depend on it.
DECODE_FRAMES = 1 << 15
_HEADER_LIES = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


class BuildWriteError(Exception):
    """Writing one of prep's own files failed (disk full, file too large, ...). A failure of ours,
    never a property of the user's audio: prep stops and keeps the previous dataset."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(path, why)
        self.path, self.why = path, why

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


class OwnFile:
    """A file prep writes in its build folder; any OSError becomes a BuildWriteError (so it can
    never be mistaken for a broken source file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            self._f = open(path, "wb")
        except OSError as e:
            raise BuildWriteError(self.path, e.strerror or str(e)) from None

    def write(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise BuildWriteError(self.path, e.strerror or str(e)) from None

    def close(self, fsync: bool = False) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
            if fsync:
                os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            raise BuildWriteError(self.path, e.strerror or str(e)) from None

    def __enter__(self) -> "OwnFile":
        return self

    def __exit__(self, kind, *rest) -> None:
        if kind is None:
            self.close()
        else:
            try:
                self._f.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# Walking the source folder
# ----------------------------------------------------------------------------------------------

def find_candidates(src: Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """Every regular file under `src` (symlinks followed, each real folder entered once, hidden
    names skipped quietly), sorted by relative path; and the entries that could not be read."""
    found: list[tuple[str, Path]] = []
    skipped: list[dict] = []
    visited: set[tuple[int, int]] = set()
    stack: list[tuple[Path, str]] = [(src, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in visited:
                continue  # a symlink back to a folder already walked: no loops, no repeats
            visited.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped.append(skip_entry(rel or ".", "unreadable",
                                      f"cannot list folder ({e.strerror})"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):  # hidden files and folders, ._* and .DS_Store
                continue
            relpath = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir(follow_symlinks=True):
                    subdirs.append((Path(e.path), relpath))
                elif e.is_file(follow_symlinks=True):
                    found.append((relpath, Path(e.path)))
                elif e.is_symlink():
                    skipped.append(skip_entry(relpath, "unreadable", "broken symbolic link"))
                else:
                    skipped.append(skip_entry(relpath, "unreadable", "not a regular file"))
            except OSError as err:
                skipped.append(skip_entry(relpath, "unreadable", err.strerror or str(err)))
        stack.extend(reversed(subdirs))
    found.sort(key=lambda t: t[0])
    return found, skipped


def skip_entry(relpath: str, kind: str, reason: str, content_hash: str | None = None) -> dict:
    d = {"path": relpath, "reason_kind": kind, "reason": reason}
    if content_hash:
        d["content_hash"] = content_hash
    return d


def hash_file(path: str | os.PathLike) -> str:
    """Hex digest of a file's bytes (BLAKE2b, 160 bits), read in 1 MB chunks."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dbfs(rms: float) -> float:
    """A level in dB relative to full scale (floored at -200 so JSON never sees -inf)."""
    return round(20.0 * math.log10(max(rms, 1e-10)), 3)


def _reason(e: Exception, path) -> str:
    """A UserError's message without its leading 'PATH: ' (the manifest names the path)."""
    text = re.sub(r"Error opening '.*?': ", "", str(e))
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _promised_frames(path: str, info) -> int:
    """Frames the header promises. libsndfile quietly shortens WAV/AIFF files whose data chunk
    claims more bytes than the file holds; its log line 'data : N (should be M)' tells."""
    try:
        with sf.SoundFile(os.fsencode(path)) as f:
            log_text = f.extra_info
    except (sf.LibsndfileError, RuntimeError, OSError):
        return info.frames
    m = _HEADER_LIES.search(log_text or "")
    if m:
        claimed, real = int(m.group(1)), int(m.group(2))
        if 0 < real < claimed < 0xFFFFF000:  # 0 and ~4 GiB: "unknown length" markers
            return int(info.frames * claimed / real)
    return info.frames


def _skip(kind: str, reason: str) -> dict:
    return {"status": "skip", "reason_kind": kind, "reason": reason}


def decode_file(path: str, work_file: str, settings: dict) -> dict:
    """Decode one file into `work_file` (raw uint8 tokens) and measure it; or say why it is
    skipped. Returns a small dict (no audio)."""
    rate, encoding = settings["rate"], settings["encoding"]
    try:
        info = probe(path)
    except UserError as e:
        return _skip("not audio", _reason(e, path))
    if info.frames <= 0:
        return _skip("empty", "no audio frames in the file")
    promised = _promised_frames(path, info)
    if promised == info.frames and info.duration < MIN_SECONDS:
        return _skip("too short", f"{info.duration:.2f} s; need at least {MIN_SECONDS:.0f} s")

    scratch = work_file + ".f32"
    try:
        try:
            n_src, n_out, clipped, peak, error = _pass1(path, scratch, info.samplerate, rate)
        except NotFiniteAudio as e:
            return _skip("not finite", _reason(e, path))
        truncated = error is not None or n_src < promised - max(0.01 * promised,
                                                                0.05 * info.samplerate)
        secs, promised_s = n_out / rate, promised / info.samplerate
        why = (f"truncated: header promises {promised_s:.2f} s, " if truncated else "")
        if error is not None and n_src == 0:
            return _skip("unreadable", error)
        if n_out < MIN_SECONDS * rate:
            if truncated:
                return _skip("truncated", f"{why}only {secs:.2f} s decode")
            return _skip("too short", f"{secs:.2f} s; need at least {MIN_SECONDS:.0f} s")
        if peak < SILENT_PEAK:
            return _skip("silent", "digital silence" if peak == 0 else
                         f"silent (peak {dbfs(peak):.0f} dBFS)")
        gain = float(normalization_gain(peak, settings["normalization"]))
        audio_hash, sumsq, silent_frames, n_frames = _pass2(scratch, work_file, gain, encoding,
                                                            rate)
    finally:
        Path(scratch).unlink(missing_ok=True)
    r = {"status": "ok", "tokens_file": work_file, "audio_hash": audio_hash, "length": n_out,
         "orig_rate": info.samplerate, "orig_channels": info.channels,
         "orig_format": f"{info.format}/{info.subtype}",
         "duration": round(n_src / info.samplerate, 6),
         "gain": float(gain), "peak": float(peak),
         "rms_dbfs": dbfs(math.sqrt(sumsq / n_out)),
         "silence_share": silent_frames / n_frames if n_frames else 0.0,
         "clipped_share": clipped / n_src if n_src else 0.0}
    if truncated:
        r["truncated"] = True
        r["warning"] = f"{why}kept the {secs:.2f} s that decode" + (f" ({error})" if error else "")
    return r


def _pass1(path: str, scratch: str, src_rate: int, rate: int):
    """Decode, downmix and resample into a float32 scratch file. Returns (source frames, output
    samples, clipped source samples, peak of the output, decode error or None)."""
    resampler = soxr.ResampleStream(src_rate, rate, 1, dtype="float32", quality="HQ") \
        if src_rate != rate else None
    n_src = n_out = clipped = 0
    peak, error = 0.0, None
    with OwnFile(scratch) as fh:
        def put(y: np.ndarray) -> None:
            nonlocal n_out, peak
            if len(y):
                peak = max(peak, float(np.max(np.abs(y))))
                fh.write(np.ascontiguousarray(y, dtype=np.float32).tobytes())
                n_out += len(y)

        try:
            for block in iter_mono_blocks(path, None, DECODE_FRAMES):
                n_src += len(block)
                clipped += int(np.count_nonzero(np.abs(block) >= CLIP_LEVEL))
                put(resampler.resample_chunk(block, last=False) if resampler else block)
        except NotFiniteAudio:
            raise
        except UserError as e:  # decoding failed part way: keep what came out before
            error = _reason(e, path)
        if resampler is not None:
            put(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    return n_src, n_out, clipped, peak, error


def _pass2(scratch: str, work_file: str, gain: float, encoding: str, rate: int):
    """Scale, encode and write tokens; returns (audio hash, sum of squares after gain, silent
    50 ms frames, frames)."""
    frame = max(1, round(SILENCE_FRAME_S * rate))
    chunk = frame * max(1, (1 << 18) // frame)  # whole frames per chunk
    threshold = (10 ** (SILENCE_DBFS / 20)) ** 2 * frame
    h = hashlib.blake2b(digest_size=20)
    sumsq, silent, frames = 0.0, 0, 0
    with open(scratch, "rb") as fin, OwnFile(work_file) as fout:
        while buf := fin.read(chunk * 4):
            # float32 * python float stays float32: exactly what a prompt gets in continue_song
            x = np.frombuffer(buf, np.float32) * gain
            q = encode(x, encoding)
            fout.write(q.tobytes())
            h.update(q.tobytes())
            sumsq += float(np.dot(x, x))
            full = len(x) // frame * frame
            energy = np.einsum("ij,ij->i", x[:full].reshape(-1, frame), x[:full].reshape(-1, frame))
            silent += int(np.count_nonzero(energy < threshold))
            frames += len(energy)
            if full < len(x):  # the file's last, partial frame
                rest = x[full:]
                silent += int(float(np.dot(rest, rest)) < threshold * len(rest) / frame)
                frames += 1
    return h.hexdigest(), sumsq, silent, frames


def assign_splits(keys: list[str], shares, seed: int) -> list[str]:
    """Each file's split, from its key (content hash) and the seed alone: the order is a keyed
    hash, so it does not depend on paths, listing order or the number of workers. Val and test get
    at least one file each when there are 3 or more files and their share is above zero."""
    n = len(keys)
    order = sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{keys[i]}".encode(),
                                                           digest_size=16).hexdigest())
    n_test, n_val = round(n * shares[2]), round(n * shares[1])
    if n >= 3:
        n_test = max(n_test, 1) if shares[2] > 0 else 0
        n_val = max(n_val, 1) if shares[1] > 0 else 0
    while n - n_val - n_test < 1 and (n_val or n_test):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    names = ["train"] * n
    for rank, i in enumerate(order):
        names[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return names


def by_time_segments(length: int, shares) -> list[tuple[str, int, int]]:
    """Split one file of `length` tokens by time: (split, start, length) for train, then val, then
    test, contiguous; zero-length parts left out."""
    n_test = round(length * shares[2])
    n_val = round(length * shares[1])
    n_train = length - n_val - n_test
    parts = [("train", 0, n_train), ("val", n_train, n_val), ("test", n_train + n_val, n_test)]
    return [p for p in parts if p[2] > 0]


def read_tokens(r: dict, start: int, n: int):
    """Yield tokens [start, start + n) of one file, from its token file or the old dataset."""
    runs = r.get("old_runs") or [(Path(r["tokens_file"]), None, r["length"])]
    pos = 0  # position within the file's tokens of the current run's first token
    for path, offset, length in runs:
        lo, hi = max(start, pos), min(start + n, pos + length)
        if lo < hi:
            with open(path, "rb") as fh:
                base = 0
                if offset is not None:  # an old .npy: skip its header
                    version = np.lib.format.read_magic(fh)
                    (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)(fh)
                    base = fh.tell() + offset
                fh.seek(base + lo - pos)
                left = hi - lo
                while left > 0:
                    buf = fh.read(min(left, COPY_CHUNK))
                    if not buf:
                        raise OSError(f"{path}: shorter than its manifest says")
                    left -= len(buf)
                    yield np.frombuffer(buf, np.uint8)
        pos += length
