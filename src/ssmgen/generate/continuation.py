"""`continue_song()`: any audio file as the prompt, read in parallel, continued by an engine.

The prompt is prepared exactly as training data was (`ssmgen.audio`: mono, the model's rate, the
dataset's normalization policy applied with the whole song's peak, the dataset's encoding), read
in one parallel pass (`model.forward_with_state`), and continued sample by sample by an engine
(`engines.py`). Outputs are written atomically with a JSON sidecar that makes them reproducible.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch

from ssmgen.atomic import check_output
from ssmgen.audio import atomic_write_text, decode, encode, read_song_clip, resample, write_wav
from ssmgen.data import shift_inputs
from ssmgen.errors import UserError
from ssmgen.runtime import check_memory, resolve_device
from ssmgen.validate import number

#: A 16-bit WAV holds at most 4 GiB of samples (its sizes are 32-bit).
WAV_MAX_BYTES = (1 << 32) - (1 << 16)


@torch.no_grad()
def read_prompt(model, prompt: np.ndarray, num: int):
    """State after reading `prompt` (T,) int64 in parallel, for `num` rows, and the token to feed
    next. The model's input at each step is the previous sample (silence before the first)."""
    device = next(model.parameters()).device
    state = model.initial_state(num, device=device)
    if len(prompt) == 0:
        return state, np.full(num, 128, dtype=np.int64)
    inputs = torch.from_numpy(shift_inputs(prompt[None])).to(device).expand(num, -1)
    _, state = model.forward_with_state(inputs.contiguous(), state, logits=False)
    return state, np.full(num, int(prompt[-1]), dtype=np.int64)


def continue_tokens(model, prompt: np.ndarray, n_new: int, *, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, num: int | None = None,
                    engine: str = "auto",
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Continue token prompts: `prompt` (1 or num, T) int64 -> (num, n_new) uint8 new tokens.
    `progress(done)` is called with the number of samples generated so far."""
    from ssmgen.generate.sampling import Sampler

    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim == 2:
        prompt = prompt[0]
    num = num or 1
    return _generate(model, prompt, n_new, Sampler(temperature=temperature, top_k=top_k,
                                                   top_p=top_p, seed=seed, batch_size=num),
                     engine, num, progress)[0]


def _generate(model, prompt: np.ndarray, n_new: int, sampler, engine: str, num: int,
              progress) -> tuple[np.ndarray, str]:
    from ssmgen.generate.engines import create_engine

    model.eval()
    state, first = read_prompt(model, prompt, num)  # parallel: uses every thread
    eng = create_engine(engine, model, num)
    with single_thread():
        tokens, _ = eng.generate(state, first, n_new, sampler, progress=progress)
    return tokens, eng.name


@contextmanager
def single_thread():
    """Per-sample work is hundreds of tiny ops: waking a thread pool for each costs more than the
    op (milliseconds each on a busy machine), so stepping runs on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def continue_song(song: str | Path, checkpoint: str | Path, *, seconds: float = 10.0,
                  temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  num: int = 1, prompt_seconds: float = 8.0, at: float | None = None,
                  out: str | Path | None = None, only_new: bool = False, join: bool = False,
                  force: bool = False, engine: str = "auto", device: str = "cpu",
                  progress: bool = True) -> dict[str, Any]:
    """Continue `song` by `seconds` of new audio with the model in `checkpoint`; write WAV(s) and
    JSON sidecar(s). Returns a summary with the output paths, speed and settings.

    Only the prompt's span of the song is kept in memory (one streaming pass also measures the
    whole song's peak); every output is checked before any work starts (never an input, never a
    non-regular file, an existing one only with `force`); requests larger than the machine are
    refused before anything is allocated."""
    from ssmgen.checkpoint import load_model, resolve
    from ssmgen.generate.sampling import Sampler
    from ssmgen.progress import progress_bar

    _check_settings(seconds, temperature, top_k, top_p, num, prompt_seconds, at, only_new, join,
                    seed)
    song = Path(song)
    inputs = [song, resolve(checkpoint)]
    outputs = _output_paths(song, out, num, force, inputs)
    model, ckpt = load_model(checkpoint, resolve_device(device))
    fmt = ckpt["data_format"]
    rate = int(fmt["rate"])
    n_new = int(round(seconds * rate))
    n_prompt = int(round(prompt_seconds * rate))
    _check_size(model, song, n_new, n_prompt, num, join, only_new, rate)
    clip = read_song_clip(song, fmt, seconds=prompt_seconds, at=at)
    start, end, gain, song_rate = clip.start, clip.end, clip.gain, clip.info.samplerate
    prompt = encode(clip.audio * gain, fmt["encoding"]).astype(np.int64)
    del clip

    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task("continuing", total=n_new, unit="samples", rate=rate)
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          batch_size=num)
        marks: list[tuple[float, int]] = []  # (time, samples done so far) at each report

        def report(done: int) -> None:  # engines report the cumulative count
            marks.append((time.perf_counter(), int(done)))
            bar.update(task, completed=int(done))

        new, engine_name = _generate(model, prompt, n_new, sampler, engine, num, report)
    elapsed = time.perf_counter() - t0
    # Steady-state speed: from the first report on (excludes prompt read and a first-run compile).
    if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
        speed = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    else:
        speed = n_new / elapsed if elapsed else 0.0
    seeds = sampler.seeds
    prompt_audio = decode(prompt.astype(np.uint8), fmt["encoding"])
    results = []
    for b, path in enumerate(outputs):
        cont = decode(new[b], fmt["encoding"])
        if join:
            original, orig_rate = sf.read(os.fsencode(song), dtype="float32", always_2d=True,
                                          frames=int(np.ceil(end / rate * song_rate)))
            head = original[: int(round(end / rate * orig_rate))]
            tail = resample(cont / gain, rate, orig_rate)
            tail = np.repeat(tail[:, None], original.shape[1], axis=1)
            write_wav(path, np.concatenate([head, tail]), orig_rate, replace=force, inputs=inputs)
        else:
            write_wav(path, cont if only_new else np.concatenate([prompt_audio, cont]), rate,
                      replace=force, inputs=inputs)
        sidecar = {"output": str(path), "checkpoint": ckpt["path"],
                   "step": int(ckpt.get("step", 0)),
                   "song": str(song.resolve()), "prompt_start_s": start / rate,
                   "prompt_end_s": end / rate, "seconds": seconds, "temperature": temperature,
                   "top_k": top_k, "top_p": top_p, "seed": seed, "variation": b,
                   "variation_seed": int(seeds[b]), "num": num, "engine": engine_name,
                   "only_new": only_new, "join": join, "rate": rate, "data_format": fmt,
                   "gain": gain}
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2, allow_nan=False),
                          replace=force, inputs=inputs)
        results.append(sidecar)
    return {"outputs": [str(p) for p in outputs], "engine": engine_name, "seconds_new": seconds,
            "elapsed_s": elapsed, "samples_per_s": speed, "real_time_factor": num * speed / rate,
            "prompt_seconds": (end - start) / rate, "variations": results}


def _check_size(model, song: Path, n_new: int, n_prompt: int, num: int, join: bool,
                only_new: bool, rate: int) -> None:
    """Refuse, before allocating, outputs and batches larger than the machine or the WAV format."""
    from ssmgen.audio import probe
    from ssmgen.model import activation_bytes

    info = probe(song)
    channels, out_rate = (info.channels, info.samplerate) if join else (1, rate)
    song_s = info.frames / info.samplerate
    out_s = n_new / rate + (0 if only_new else song_s if join else min(n_prompt / rate, song_s))
    wav_bytes = out_s * out_rate * channels * 2
    if wav_bytes > WAV_MAX_BYTES:
        raise UserError(f"--seconds {n_new / rate:g}: each output would be "
                        f"{wav_bytes / 2**30:.1f} GiB, more than a WAV file holds (4 GiB); ask "
                        "for less")
    state = sum(v.numel() for v in model.initial_state(1).tensors.values()) * 4
    need = (num * n_new  # the tokens of every variation
            + num * state * 4  # the state and the engine's buffers per variation
            + activation_bytes(model.cfg, num, min(n_prompt, int(song_s * rate) + 1),
                               training=False)  # the parallel prompt read
            + out_s * out_rate * channels * 16)  # one output at a time: float copies and bytes
    check_memory(need, f"--seconds {n_new / rate:g} x --num {num}", "ask for fewer seconds, "
                 "fewer variations or a shorter --prompt-seconds")


def _check_settings(seconds, temperature, top_k, top_p, num, prompt_seconds, at, only_new,
                    join, seed=0) -> None:
    number("--seconds", seconds, low=0, low_open=True, high=1e7)
    number("--temp", temperature, low=0, high=100)
    number("--top-p", top_p, low=0, low_open=True, high=1)
    number("--top-k", top_k, low=0, high=256, integer=True)
    number("--num", num, low=1, high=4096, integer=True)
    number("--prompt-seconds", prompt_seconds, low=0, high=1e6)
    number("--seed", seed, low=0, high=2**63 - 1, integer=True)
    if at is not None:
        number("--at", at, low=0, high=1e8)
    if only_new and join:
        raise UserError("--only-new and --join exclude each other")


def _output_paths(song: Path, out: str | Path | None, num: int, force: bool,
                  inputs: list[Path]) -> list[Path]:
    """The WAV paths (and, beside each, its .json sidecar), all checked against the output rules
    before any work starts."""
    base = Path(out) if out else Path(f"{song.stem}-continued.wav")
    if base.suffix.lower() != ".wav":
        raise UserError(f"{base}: the output must be a .wav file")
    paths = [base] if num == 1 else [base.with_name(f"{base.stem}-{i + 1}{base.suffix}")
                                     for i in range(num)]
    for p in paths:
        check_output(p, force=force, inputs=inputs)
        check_output(p.with_suffix(".json"), force=force, inputs=inputs)
    return paths
