"""`continue_song()`: any audio file as the prompt, read in parallel, continued by an engine.

The prompt is prepared exactly as training data was (`ssmgen.audio`: mono, the model's rate, the
dataset's normalization policy applied with the whole song's peak, the dataset's encoding), read
in one parallel pass (`model.forward_with_state`, once, its state shared by every variation), and
continued sample by sample by an engine (`engines.py`).

Settings may be lists: every combination of temperature, top-k and top-p, times `num`, is one row
of ONE batch. Variation j of every setting gets the seed `seed + j` (so settings are compared on
the same noise), and a variation made inside a grid is, sample for sample, the one `--seed
<its seed> --num 1` with its settings makes alone. Outputs are written atomically, each with a JSON
sidecar that makes it reproducible, and (with several variations) a page to compare them
(`page.py`). `out="-"` streams one variation as a WAV to standard output while it is generated.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import soundfile as sf
import torch

from ssmgen.atomic import check_output
from ssmgen.audio import (
    atomic_write_text,
    decode,
    encode,
    pcm16_bytes,
    read_song_clip,
    resample,
    wav_header,
    write_wav,
)
from ssmgen.data import shift_inputs
from ssmgen.errors import UserError
from ssmgen.listen import levels, matching_gain, spectrogram_png, warnings_for, waveform_png
from ssmgen.model import ModelState
from ssmgen.runtime import check_memory, resolve_device
from ssmgen.tokens import SILENCE_TOKEN
from ssmgen.validate import number
from ssmgen.validate import short_number as short

#: A 16-bit WAV holds at most 4 GiB of samples (its sizes are 32-bit).
WAV_MAX_BYTES = (1 << 32) - (1 << 16)
#: Most rows one batch may hold (settings x --num).
MAX_VARIATIONS = 4096
#: Samples per piece of a stream (64 ms at 16 kHz), ending on a 16-sample frame boundary.
STREAM_CHUNK = 1024
#: Seconds at the end of the prompt whose level the continuation is matched to.
LEVEL_WINDOW_S = 3.0


class StreamClosed(Exception):
    """The reader of a streamed continuation went away (the player was closed)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the reader closed the stream after {seconds:.1f} s of audio")
        self.seconds = seconds


@dataclass(frozen=True)
class Variation:
    """One row of the batch: its settings and its seed."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    copy: int  # j: the j-th of --num with these settings


def sampling_grid(temperature, top_k, top_p, num: int, seed: int) -> list[Variation]:
    """Every combination of the listed settings (temperatures outermost, then top-k, then top-p),
    `num` variations each; variation j of every combination has the seed `seed + j`."""
    return [Variation(float(t), int(k), float(p), int(seed) + j, j)
            for t, k, p in itertools.product(_listed(temperature), _listed(top_k), _listed(top_p))
            for j in range(num)]


def _listed(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@torch.no_grad()
def read_prompt(model, prompt: np.ndarray, num: int):
    """State after reading `prompt` (T,) int64 in parallel, for `num` rows, and the token to feed
    next. The model's input at each step is the previous sample (silence before the first). The
    prompt is read once and its state copied to every row, so a row starts from the same state
    whatever the batch size."""
    device = next(model.parameters()).device
    if len(prompt) == 0:
        return model.initial_state(num, device=device), np.full(num, SILENCE_TOKEN,
                                                                dtype=np.int64)
    inputs = torch.from_numpy(shift_inputs(prompt[None])).to(device)
    _, state = model.forward_with_state(inputs, model.initial_state(1, device=device),
                                        logits=False)
    state = ModelState(state.t, {k: v.expand(num, *v.shape[1:]).contiguous()
                                 for k, v in state.tensors.items()})
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
              progress, on_chunk: Callable[[np.ndarray], None] | None = None
              ) -> tuple[np.ndarray, str]:
    """(num, n_new) new tokens and the engine's name. With `on_chunk`, the engine runs piece by
    piece (pieces end on frame boundaries, where a state carries no partial sums, so the tokens
    are those of one call) and `on_chunk(tokens (num, m))` gets each piece as it is made."""
    from ssmgen.generate.engines import create_engine

    model.eval()
    state, first = read_prompt(model, prompt, num)  # parallel: uses every thread
    eng = create_engine(engine, model, num)
    with single_thread():
        if on_chunk is None:
            tokens, _ = eng.generate(state, first, n_new, sampler, progress=progress)
            return tokens, eng.name
        tokens = np.empty((num, n_new), np.uint8)
        done, frame = 0, int(getattr(model, "frame", 16))
        while done < n_new:
            end = done + STREAM_CHUNK
            end -= (state.t + end - done) % frame  # absolute position on a frame boundary
            m = min(max(end, done + 1), n_new) - done
            piece, state = eng.generate(state, first, m, sampler)
            tokens[:, done:done + m] = piece
            first = piece[:, -1].astype(np.int64)
            done += m
            on_chunk(piece)
            if progress is not None:
                progress(done)
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
                  temperature: float | Sequence[float] = 0.8,
                  top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
                  seed: int = 0, num: int = 1, prompt_seconds: float = 8.0,
                  at: float | None = None, out: str | Path | None = None, only_new: bool = False,
                  join: bool = False, match_level: bool | None = None, page: bool | None = None,
                  force: bool = False, engine: str = "auto", device: str = "cpu",
                  progress: bool = True, stream: BinaryIO | None = None) -> dict[str, Any]:
    """Continue `song` by `seconds` of new audio with the model in `checkpoint`; write WAV(s) and
    JSON sidecar(s). Returns a summary with the output paths, speed and settings.

    `temperature`, `top_k`, `top_p`: a value or a list; every combination times `num` is one
    batch. `match_level` (default: on with `join`): a gain on the new audio brings its RMS to that
    of the prompt's last 3 s (within +-12 dB). `page` (default: on with several variations):
    OUT.html beside the outputs, with OUT-prompt.wav, to compare them. `out="-"`: stream one
    variation as a WAV to `stream` (default standard output) while it is generated; no sidecar,
    no page.

    Only the prompt's span of the song is kept in memory (one streaming pass also measures the
    whole song's peak); every output is checked before any work starts (never an input, never a
    non-regular file, an existing one only with `force`); requests larger than the machine are
    refused before anything is allocated."""
    from ssmgen.checkpoint import load_model, resolve
    from ssmgen.generate.sampling import Sampler
    from ssmgen.progress import progress_bar

    _check_settings(seconds, temperature, top_k, top_p, num, prompt_seconds, at, only_new, join,
                    seed)
    rows = sampling_grid(temperature, top_k, top_p, num, seed)
    if len(rows) > MAX_VARIATIONS:
        raise UserError(f"{len(rows)} variations (settings x --num): at most {MAX_VARIATIONS} "
                        "in one batch")
    streaming = str(out) == "-" if out is not None else False
    if match_level is None:
        match_level = join
    if page is None:
        page = len(rows) > 1 and not streaming
    song = Path(song)
    inputs = [song, resolve(checkpoint)]
    if streaming:
        _check_stream(rows, join, match_level, page)
        stream = stream if stream is not None else sys.stdout.buffer
        if getattr(stream, "isatty", lambda: False)():
            raise UserError("--out -: standard output is a terminal; pipe it into a player "
                            "(| ffplay -nodisp -) or a file")
        outputs: list[Path] = []
    else:
        outputs = _output_paths(song, out, rows, force, inputs)
    page_path = prompt_path = None
    if page:
        page_path, prompt_path = _page_paths(_base(song, out), force, inputs)
    model, ckpt = load_model(checkpoint, resolve_device(device))
    fmt = ckpt["data_format"]
    rate = int(fmt["rate"])
    n_new = int(round(seconds * rate))
    n_prompt = int(round(prompt_seconds * rate))
    B = len(rows)
    _check_size(model, song, n_new, n_prompt, B, join, only_new, rate,
                f"--num {num}" if B == num else f"{B} variations (settings x --num {num})")
    clip = read_song_clip(song, fmt, seconds=prompt_seconds, at=at)
    start, end, gain, song_rate = clip.start, clip.end, clip.gain, clip.info.samplerate
    prompt = encode(clip.audio * gain, fmt["encoding"]).astype(np.int64)
    del clip
    prompt_audio = decode(prompt.astype(np.uint8), fmt["encoding"])

    on_chunk = None
    if streaming:
        frames = n_new + (0 if only_new else len(prompt))
        sent = [0]

        def send(data: bytes, samples: int) -> None:
            try:
                stream.write(data)
                stream.flush()
            except BrokenPipeError:
                _silence_stdout(stream)
                raise StreamClosed(sent[0] / rate) from None
            sent[0] += samples

        send(wav_header(frames, rate), 0)
        if not only_new:  # the prompt plays while the model starts
            send(pcm16_bytes(prompt_audio), len(prompt_audio))

        def on_chunk(piece: np.ndarray) -> None:
            send(pcm16_bytes(decode(piece[0], fmt["encoding"])), piece.shape[1])

    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task("continuing", total=n_new, unit="samples", rate=rate)
        sampler = Sampler(temperature=[r.temperature for r in rows],
                          top_k=[r.top_k for r in rows], top_p=[r.top_p for r in rows],
                          row_seeds=[r.seed for r in rows])
        marks: list[tuple[float, int]] = []  # (time, samples done so far) at each report

        def report(done: int) -> None:  # engines report the cumulative count
            marks.append((time.perf_counter(), int(done)))
            bar.update(task, completed=int(done))

        new, engine_name = _generate(model, prompt, n_new, sampler, engine, B, report, on_chunk)
    elapsed = time.perf_counter() - t0
    # Steady-state speed: from the first report on (excludes prompt read and a first-run compile).
    if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
        speed = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    else:
        speed = n_new / elapsed if elapsed else 0.0
    summary = {"outputs": [str(p) for p in outputs], "engine": engine_name,
               "seconds_new": seconds, "elapsed_s": elapsed, "samples_per_s": speed,
               "real_time_factor": B * speed / rate, "prompt_seconds": (end - start) / rate,
               "page": str(page_path) if page_path else None,
               "prompt_file": str(prompt_path) if prompt_path else None, "streamed": streaming,
               "variations": []}
    if streaming:
        summary["variations"] = [{"seed": rows[0].seed, "temperature": rows[0].temperature,
                                  "top_k": rows[0].top_k, "top_p": rows[0].top_p}]
        return summary

    # Levels are measured on the model's view (mono, its rate), scaled as the outputs are: the
    # song's own level with --join, the normalized level otherwise.
    out_scale = 1.0 / gain if join else 1.0
    tail = prompt_audio[max(0, len(prompt_audio) - int(LEVEL_WINDOW_S * rate)):]
    prompt_levels = levels(tail * out_scale)
    view_prompt = prompt_audio * np.float32(out_scale)
    common = {"checkpoint": ckpt["path"], "step": int(ckpt.get("step", 0)),
              "song": str(song.resolve()), "prompt_start_s": start / rate,
              "prompt_end_s": end / rate, "seconds": seconds, "prompt_seconds": prompt_seconds,
              "num": num, "variations": B, "engine": engine_name, "only_new": only_new,
              "join": join, "rate": rate, "data_format": fmt, "gain": gain,
              "grid": {"temperature": _listed(temperature), "top_k": _listed(top_k),
                       "top_p": _listed(top_p), "num": num, "seed": seed},
              "page": str(page_path) if page_path else None}
    results, pictures = [], []
    head = None
    for b, (path, row) in enumerate(zip(outputs, rows)):
        cont = decode(new[b], fmt["encoding"])
        level_gain = matching_gain(tail, cont) if match_level else 1.0
        cont = (cont * np.float32(level_gain)).astype(np.float32) if level_gain != 1.0 else cont
        if join:
            if head is None:
                original, orig_rate = sf.read(os.fsencode(song), dtype="float32", always_2d=True,
                                              frames=int(np.ceil(end / rate * song_rate)))
                head = original[: int(round(end / rate * orig_rate))]
                del original
            tail_out = resample(cont / gain, rate, orig_rate)
            tail_out = np.repeat(tail_out[:, None], head.shape[1], axis=1)
            write_wav(path, np.concatenate([head, tail_out]), orig_rate, replace=force,
                      inputs=inputs)
        else:
            write_wav(path, cont if only_new else np.concatenate([prompt_audio, cont]), rate,
                      replace=force, inputs=inputs)
        cont_levels = levels(cont * out_scale)
        sidecar = {"output": str(path), **common, "variation": b,
                   "temperature": row.temperature, "top_k": row.top_k, "top_p": row.top_p,
                   "seed": row.seed,
                   "level": {"match": bool(match_level),
                             "gain_db": round(20 * float(np.log10(level_gain)), 2),
                             "window_s": round(len(tail) / rate, 3),
                             "prompt": prompt_levels, "continuation": cont_levels,
                             "warnings": warnings_for(prompt_levels, cont_levels)},
                   "reproduce": _reproduce(song, ckpt["path"], row, seconds, prompt_seconds,
                                           end / rate, only_new, join, match_level)}
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2, allow_nan=False),
                          replace=force, inputs=inputs)
        results.append(sidecar)
        if page:  # the pictures now, while this variation's audio is at hand
            view = np.concatenate([view_prompt, cont * np.float32(out_scale)])
            pictures.append((waveform_png(view, len(view_prompt)),
                             spectrogram_png(view, len(view_prompt), rate)))
    if page:
        from ssmgen.generate.page import write_page
        write_wav(prompt_path, view_prompt, rate, replace=force, inputs=inputs)
        write_page(page_path, song=song, prompt_file=prompt_path,
                   prompt_pictures=(waveform_png(view_prompt), spectrogram_png(view_prompt,
                                                                               None, rate)),
                   variations=results, pictures=pictures, prompt_levels=prompt_levels,
                   force=force, inputs=inputs)
    summary["variations"] = results
    return summary


def _silence_stdout(stream) -> None:
    """After the reader of standard output went away, point it at /dev/null so that Python's
    final flush does not complain about the broken pipe."""
    try:
        if stream is sys.stdout.buffer:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def _reproduce(song: Path, checkpoint: str, row: Variation, seconds: float,
               prompt_seconds: float, at: float, only_new: bool, join: bool,
               match_level: bool) -> str:
    """The command that makes this variation alone, sample for sample (a model that ships with
    ssmgen is named, not located)."""
    from ssmgen.workspace import bundled_models

    model = next((name for name, p in bundled_models().items()
                  if os.path.abspath(p) == os.path.abspath(checkpoint)), str(checkpoint))
    args = ["ssmgen", "continue", str(song), "--model", model, "--seconds",
            short(seconds), "--prompt-seconds", short(prompt_seconds), "--at", short(at),
            "--temp", short(row.temperature), "--top-k", str(row.top_k), "--top-p",
            short(row.top_p), "--seed", str(row.seed)]
    args += ["--only-new"] if only_new else ["--join"] if join else []
    if match_level != join:
        args.append("--match-level" if match_level else "--no-match-level")
    return " ".join(shlex.quote(a) for a in args)


def _check_stream(rows: list[Variation], join: bool, match_level: bool, page: bool) -> None:
    if len(rows) > 1:
        raise UserError(f"--out - streams one variation; this asks for {len(rows)} (a list of "
                        "settings or --num > 1 writes files and a page: give --out FILE.wav)")
    if join:
        raise UserError("--out - streams the model's audio (its rate, mono); --join needs a file: "
                        "give --out FILE.wav")
    if match_level:
        raise UserError("--out -: the level match needs the whole continuation before the first "
                        "sample is sent; drop --match-level or give --out FILE.wav")
    if page:
        raise UserError("--out - writes no page; drop --page or give --out FILE.wav")


def _check_size(model, song: Path, n_new: int, n_prompt: int, num: int, join: bool,
                only_new: bool, rate: int, what: str = "") -> None:
    """Refuse, before allocating, outputs and batches larger than the machine or the WAV format."""
    from ssmgen.audio import probe
    from ssmgen.sizing import activation_bytes

    info = probe(song)
    channels, out_rate = (info.channels, info.samplerate) if join else (1, rate)
    song_s = info.frames / info.samplerate
    out_s = n_new / rate + (0 if only_new else song_s if join else min(n_prompt / rate, song_s))
    wav_bytes = out_s * out_rate * channels * 2
    if wav_bytes > WAV_MAX_BYTES:
        raise UserError(f"--seconds {n_new / rate:g}: each output would be "
                        f"{wav_bytes / 2**30:.1f} GiB, more than a WAV file holds (4 GiB); ask "
                        "for less")
    what = what or f"--num {num}"
    state = sum(v.numel() for v in model.initial_state(1).tensors.values()) * 4
    need = (num * n_new  # the tokens of every variation
            + num * state * 4  # the state and the engine's buffers per variation
            + activation_bytes(model.cfg, 1, min(n_prompt, int(song_s * rate) + 1),
                               training=False)  # the parallel prompt read (once)
            + out_s * out_rate * channels * 16)  # one output at a time: float copies and bytes
    check_memory(need, f"--seconds {n_new / rate:g} x {what}", "ask for fewer seconds, fewer "
                 "variations or a shorter --prompt-seconds")


def _check_settings(seconds, temperature, top_k, top_p, num, prompt_seconds, at, only_new,
                    join, seed=0) -> None:
    number("--seconds", seconds, low=0, low_open=True, high=1e7)
    for name, values, rule in (("--temp", temperature, dict(low=0, high=100)),
                               ("--top-p", top_p, dict(low=0, low_open=True, high=1)),
                               ("--top-k", top_k, dict(low=0, high=256, integer=True))):
        values = _listed(values)
        if not values:
            raise UserError(f"{name}: give at least one value")
        for v in values:
            number(name, v, **rule)
        seen = [float(v) for v in values]
        if len(set(seen)) != len(seen):
            twice = next(v for v in values if seen.count(float(v)) > 1)
            raise UserError(f"{name} {','.join(f'{v:g}' for v in values)}: lists {twice:g} "
                            "twice")
    number("--num", num, low=1, high=MAX_VARIATIONS, integer=True)
    number("--prompt-seconds", prompt_seconds, low=0, high=1e6)
    number("--seed", seed, low=0, high=2**63 - 1, integer=True)
    if seed + num - 1 > 2**63 - 1:
        raise UserError(f"--seed {seed}: variation {num} would have seed {seed + num - 1}, past "
                        f"2^63 - 1; use a smaller seed")
    if at is not None:
        number("--at", at, low=0, high=1e8)
    if only_new and join:
        raise UserError("--only-new and --join exclude each other")


def _base(song: Path, out: str | Path | None) -> Path:
    base = Path(out) if out else Path(f"{song.stem}-continued.wav")
    if base.suffix.lower() != ".wav":
        raise UserError(f"{base}: the output must be a .wav file")
    return base


def _output_paths(song: Path, out: str | Path | None, rows: list[Variation], force: bool,
                  inputs: list[Path]) -> list[Path]:
    """The WAV paths (and, beside each, its .json sidecar), all checked against the output rules
    before any work starts. One variation: OUT.wav; several: OUT-<what differs>.wav, e.g.
    song-continued-t0.7-2.wav (temperature 0.7, second of --num), song-continued-3.wav."""
    base = _base(song, out)
    if len(rows) == 1:
        paths = [base]
    else:
        varied = [len({getattr(r, f) for r in rows}) > 1 for f in ("temperature", "top_k",
                                                                  "top_p", "copy")]
        paths = []
        for r in rows:
            values = (r.temperature, r.top_k, r.top_p, r.copy + 1)
            parts = [f"{tag}{short(v)}" for on, tag, v in zip(varied, ("t", "k", "p", ""), values)
                     if on]
            paths.append(base.with_name(f"{base.stem}-{'-'.join(parts)}{base.suffix}"))
    for p in paths:
        check_output(p, force=force, inputs=inputs)
        check_output(p.with_suffix(".json"), force=force, inputs=inputs)
    return paths


def _page_paths(base: Path, force: bool, inputs: list[Path]) -> tuple[Path, Path]:
    """The comparison page OUT.html and the prompt it plays, OUT-prompt.wav, checked like every
    output."""
    page = base.with_suffix(".html")
    prompt = base.with_name(f"{base.stem}-prompt{base.suffix}")
    for p in (page, prompt):
        check_output(p, force=force, inputs=inputs)
    return page, prompt
