#!/usr/bin/env python3
"""Continue a song with a model exported by `ssmgen export`, using only numpy, soundfile and
onnxruntime (soxr too, optionally, when the song's rate differs from the model's). No torch, no
ssmgen: everything needed is in the .onnx file's metadata.

    python examples/onnx_continue.py song.wav --model model.onnx --seconds 5 --out cont.wav

The audio is prepared exactly as `ssmgen continue` prepares it (mono, the model's rate, scaled by
the whole song's peak, mu-law), the last --prompt-seconds are read through the block graph as forced
tokens, and new samples are drawn with the same Gumbel noise stream as ssmgen's Sampler, so the
same seed and temperature give the same tokens as `ssmgen continue --engine torch --no-adapt`
(up to float near-ties: the prompt is read step by step here, in parallel there). The model is
used as exported: adapting it to the prompt, as `ssmgen continue` does by default, needs torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import soundfile as sf

MU = 255
SILENCE = 128
BLOCK_FRAMES = 1 << 18  # ssmgen decodes (and resamples, streaming) in blocks of this many frames


# --- the codec and normalization, as in ssmgen.audio ----------------------------------------------

def mulaw_encode(x):
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    f = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    return np.floor((f + 1.0) / 2.0 * MU + 0.5).astype(np.uint8)


def mulaw_decode(q):
    f = np.asarray(q, dtype=np.float64) / MU * 2.0 - 1.0
    x = np.sign(f) * ((1.0 + MU) ** np.abs(f) - 1.0) / MU
    x[np.asarray(q) == SILENCE] = 0.0
    return x.astype(np.float32)


def linear_encode(x):
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    return np.clip(np.floor((x + 1.0) * 128.0), 0, 255).astype(np.uint8)


def linear_decode(q):
    return (np.asarray(q, dtype=np.float32) / 128.0 - 1.0).astype(np.float32)


CODECS = {"mulaw": (mulaw_encode, mulaw_decode), "linear": (linear_encode, linear_decode)}


def gain_for(peak: float, policy: str) -> float:
    if policy == "none":
        return 1.0
    if policy == "peak":
        return 1.0 / peak if peak > 0 else 1.0
    raise SystemExit(f"error: unknown normalization '{policy}' in the model's metadata")


def load_mono(path: str, rate: int) -> np.ndarray:
    """Decode, downmix (channel mean) and resample (soxr HQ, streaming) block by block, as
    ssmgen."""
    blocks = []
    with sf.SoundFile(path) as f:
        sr = int(f.samplerate)
        stream = None
        if sr != rate:
            try:
                import soxr
            except ImportError:
                raise SystemExit(f"error: {path} is at {sr} Hz, the model at {rate} Hz: install "
                                 "soxr to resample, or give a file at the model's rate") from None
            stream = soxr.ResampleStream(sr, rate, 1, dtype="float32", quality="HQ")
        while True:
            block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            last = len(block) < BLOCK_FRAMES
            mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
            mono = np.ascontiguousarray(mono, dtype=np.float32)
            if stream is not None:
                mono = stream.resample_chunk(mono, last=last)
            if len(mono):
                blocks.append(mono)
            if last:
                break
    if not blocks:
        raise SystemExit(f"error: {path}: no audio in file")
    return np.concatenate(blocks)


# --- the noise stream, as in ssmgen.generate.sampling.Sampler -------------------------------------

class Noise:
    """Gumbel noise per batch row b from PCG64(seed + b), 256 doubles a step, consumed in order
    (so drawing in pieces gives the same stream as drawing at once). Row b is what `ssmgen
    continue --seed SEED+b --num 1` draws, and variation b of `--seed SEED --num N`."""

    def __init__(self, seed: int, batch: int = 1) -> None:
        self.gens = [np.random.Generator(np.random.PCG64(seed + b)) for b in range(batch)]

    def draw(self, n: int) -> np.ndarray:
        out = np.empty((n, len(self.gens), 256), np.float32)
        for b, gen in enumerate(self.gens):
            u = gen.random((n, 256))
            np.log(u, out=u)
            np.negative(u, out=u)
            np.log(u, out=u)
            np.negative(u, out=out[:, b])
        return out


# --- generation through the block graph -----------------------------------------------------------

def generate(sess, meta: dict, prompt: np.ndarray, n_new: int, temperature: float, seed: int):
    """New tokens (n_new,) uint8 after reading `prompt` (T,) through the graph as forced tokens."""
    F = int(meta["block_size"])
    names = json.loads(meta["state_names"])
    shapes = json.loads(meta["state_shapes"])
    states = {n: np.zeros([1 if d == "B" else d for d in shapes[n]], np.float32) for n in names}
    T, total = len(prompt), len(prompt) + n_new
    inv_t = np.array(1.0 / temperature if temperature > 0 else 0.0, dtype=np.float32)
    noise = Noise(seed)
    token = np.full(1, SILENCE, np.int64)  # the input of step 0: silence before the first sample
    out = np.empty(((total + F - 1) // F) * F, np.int64)
    for start in range(0, total, F):
        forced = np.zeros((F, 1), np.int64)
        mask = np.zeros((F, 1), bool)
        k = min(F, max(0, T - start))  # steps of this frame that read the prompt
        forced[:k, 0] = prompt[start:start + k]
        mask[:k] = True
        g = np.zeros((F, 1, 256), np.float32)
        g[k:] = noise.draw(F - k)  # only generated steps consume noise
        feeds = {"token": token, "noise": g, "inv_temperature": inv_t, "forced": forced,
                 "mask": mask}
        feeds.update({f"state.{n}": states[n] for n in names})
        res = sess.run(None, feeds)
        tokens = res[0]
        states = dict(zip(names, res[2:]))
        out[start:start + F] = tokens[:, 0]
        token = tokens[-1]
    return out[T:total].astype(np.uint8)


def write_wav(path: str, x: np.ndarray, rate: int) -> None:
    """16-bit PCM WAV, atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".onnx_continue.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        sf.write(tmp, np.clip(np.asarray(x, np.float32), -1.0, 1.0), rate, subtype="PCM_16",
                 format="WAV")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="audio file to continue (WAV, FLAC, ...)")
    ap.add_argument("--model", required=True, help="model.onnx from `ssmgen export`")
    ap.add_argument("--out", default=None, help="output WAV (default INPUT-onnx.wav)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds of new audio")
    ap.add_argument("--prompt-seconds", type=float, default=8.0,
                    help="seconds at the end of the input the model hears")
    ap.add_argument("--temp", type=float, default=0.8, help="temperature (0: argmax)")
    ap.add_argument("--seed", type=int, default=0, help="same seed, same audio")
    ap.add_argument("--only-new", action="store_true", help="write only the new audio")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    a = ap.parse_args(argv)
    if a.seconds <= 0 or a.prompt_seconds < 0 or a.temp < 0:
        ap.error("--seconds must be > 0, --prompt-seconds and --temp >= 0")

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    if meta.get("ssmgen.format") != "ssmgen-onnx-step" or meta.get("graph") != "block":
        raise SystemExit(f"error: {a.model}: not a block graph from `ssmgen export`")
    rate = int(meta["sample_rate"])
    encode, decode = CODECS[meta["encoding"]]

    audio = load_mono(a.input, rate)
    gain = gain_for(float(np.max(np.abs(audio))), meta["normalization"])
    end = len(audio)
    start = max(0, end - int(round(a.prompt_seconds * rate)))
    prompt = encode(audio[start:end] * gain).astype(np.int64)
    n_new = int(round(a.seconds * rate))

    t0 = time.perf_counter()
    new = generate(sess, meta, prompt, n_new, a.temp, a.seed)
    elapsed = time.perf_counter() - t0
    cont = decode(new)
    out = a.out or os.path.splitext(a.input)[0] + "-onnx.wav"
    write_wav(out, cont if a.only_new else np.concatenate([decode(prompt.astype(np.uint8)), cont]),
              rate)
    print(f"wrote {out}: {a.seconds:g} s new after a {len(prompt) / rate:.2f} s prompt in "
          f"{elapsed:.1f} s ({n_new / elapsed:,.0f} samples/s with the prompt read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
