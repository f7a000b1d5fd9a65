"""`continue_song()`: any audio file as the prompt, read in parallel, continued by an engine.

The prompt is prepared exactly as training data was (`ssmgen.audio`: mono, the model's rate, the
dataset's normalization policy applied with the whole song's peak, the dataset's encoding), the
model adapts to it (`ssmgen.adapt`, unless told not to), it is read in one parallel pass
(`model.forward_with_state`, once, its state shared by every variation), and it is continued
sample by sample by an engine (`engines.py`). What a request asks for is checked before any work
starts (`request.py`).

Settings may be lists: every combination of temperature, top-k and top-p, times `num`, is one row
of ONE batch. Variation j of every setting gets the seed `seed + j` (so settings are compared on
the same noise), and a variation made inside a grid is, sample for sample, the one `--seed
<its seed> --num 1` with its settings makes alone. Outputs are written atomically, each with a JSON
sidecar that makes it reproducible, and (with several variations) a page to compare them
(`page.py`). `out="-"` streams one variation as a WAV to standard output while it is generated.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import soundfile as sf
import torch

from ssmgen.adapt import Adaptation, adapt_to
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
from ssmgen.generate.request import (
    MAX_VARIATIONS,
    Variation,
    check_settings,
    check_size,
    check_stream,
    listed,
    output_base,
    output_paths,
    page_paths,
    sampling_grid,
)
from ssmgen.listen import levels, matching_gain, spectrogram_png, warnings_for, waveform_png
from ssmgen.model import ModelState
from ssmgen.runtime import resolve_device
from ssmgen.tokens import SILENCE_TOKEN
from ssmgen.validate import short_number as short

#: Samples per piece of a stream (64 ms at 16 kHz), ending on a 16-sample frame boundary.
STREAM_CHUNK = 1024
#: Seconds at the end of the prompt whose level the continuation is matched to.
LEVEL_WINDOW_S = 3.0


class StreamClosed(Exception):
    """The reader of a streamed continuation went away (the player was closed)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the reader closed the stream after {seconds:.1f} s of audio")
        self.seconds = seconds


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


def _adapt(model, prompt: np.ndarray, crop: int, adapt: Adaptation, bar, rate: int
           ) -> dict[str, Any]:
    """Adapt `model` to the prompt in place (`adapt.adapt_to`) with a progress bar; what it did,
    for the summary and sidecars: passes, rate, crop and each pass's bits per sample."""
    done = {"passes": adapt.passes, "lr": adapt.lr, "crop": crop, "bits": []}
    if adapt.passes == 0 or len(prompt) == 0:
        return done
    task = bar.add_task("adapting to the prompt", total=adapt.passes * len(prompt),
                        unit="samples", rate=rate)
    done["bits"] = adapt_to(model, prompt, crop, adapt,
                            progress=lambda n: bar.update(task, advance=n))
    return done


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
                  adapt: Adaptation = Adaptation(), progress: bool = True,
                  stream: BinaryIO | None = None) -> dict[str, Any]:
    """Continue `song` by `seconds` of new audio with the model in `checkpoint`; write WAV(s) and
    JSON sidecar(s). Returns a summary with the output paths, speed and settings.

    `temperature`, `top_k`, `top_p`: a value or a list; every combination times `num` is one
    batch. `match_level` (default: on with `join`): a gain on the new audio brings its RMS to that
    of the prompt's last 3 s (within +-12 dB). `page` (default: on with several variations):
    OUT.html beside the outputs, with OUT-prompt.wav, to compare them. `out="-"`: stream one
    variation as a WAV to `stream` (default standard output) while it is generated; no sidecar,
    no page. `adapt`: before generating, the model adapts to the prompt (`adapt.adapt_to`:
    `adapt.passes` passes over it, none with 0), so that it continues this song rather than the
    music it was trained on on average.

    Only the prompt's span of the song is kept in memory (one streaming pass also measures the
    whole song's peak); every output is checked before any work starts (never an input, never a
    non-regular file, an existing one only with `force`); requests larger than the machine are
    refused before anything is allocated."""
    from ssmgen.checkpoint import load_model, resolve
    from ssmgen.generate.sampling import Sampler
    from ssmgen.progress import progress_bar

    check_settings(seconds, temperature, top_k, top_p, num, prompt_seconds, at, only_new, join,
                   seed)
    adapt.checked()
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
        check_stream(rows, join, match_level, page)
        stream = stream if stream is not None else sys.stdout.buffer
        if getattr(stream, "isatty", lambda: False)():
            raise UserError("--out -: standard output is a terminal; pipe it into a player "
                            "(| ffplay -nodisp -) or a file")
        outputs: list[Path] = []
    else:
        outputs = output_paths(song, out, rows, force, inputs)
    page_path = prompt_path = None
    if page:
        page_path, prompt_path = page_paths(output_base(song, out), force, inputs)
    model, ckpt = load_model(checkpoint, resolve_device(device))
    fmt = ckpt["data_format"]
    rate = int(fmt["rate"])
    n_new = int(round(seconds * rate))
    n_prompt = int(round(prompt_seconds * rate))
    B = len(rows)
    crop = int(ckpt["config"]["train"]["sample_len"])
    check_size(model, song, n_new, n_prompt, B, join, only_new, rate,
               f"--num {num}" if B == num else f"{B} variations (settings x --num {num})",
               adapt_crop=crop if adapt.passes else 0)
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
        adapted = _adapt(model, prompt, crop, adapt, bar, rate)
        t_adapt = time.perf_counter() - t0
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
               "adapt": {**adapted, "elapsed_s": t_adapt}, "variations": []}
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
              "join": join, "rate": rate, "data_format": fmt, "gain": gain, "adapt": adapted,
              "grid": {"temperature": listed(temperature), "top_k": listed(top_k),
                       "top_p": listed(top_p), "num": num, "seed": seed},
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
                                           end / rate, only_new, join, match_level, adapt)}
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
               match_level: bool, adapt: Adaptation) -> str:
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
    args += (["--adapt-passes", str(adapt.passes), "--adapt-lr", short(adapt.lr)] if adapt.passes
             else ["--no-adapt"])
    return " ".join(shlex.quote(a) for a in args)


