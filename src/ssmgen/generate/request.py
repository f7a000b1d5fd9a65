"""What a `continue` request asks for, checked before any work starts: its settings, its grid of
variations, its size against the machine and the WAV format, and its output paths (never an
input, never a non-regular file, an existing one only with --force)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from ssmgen.atomic import check_output
from ssmgen.errors import UserError
from ssmgen.runtime import check_memory
from ssmgen.validate import number
from ssmgen.validate import short_number as short

#: A 16-bit WAV holds at most 4 GiB of samples (its sizes are 32-bit).
WAV_MAX_BYTES = (1 << 32) - (1 << 16)
#: Most rows one batch may hold (settings x --num).
MAX_VARIATIONS = 4096


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
            for t, k, p in itertools.product(listed(temperature), listed(top_k), listed(top_p))
            for j in range(num)]


def listed(v) -> list:
    """A setting given as one value or a list, as a list."""
    return list(v) if isinstance(v, (list, tuple)) else [v]


def check_stream(rows: list[Variation], join: bool, match_level: bool, page: bool) -> None:
    """Refuse what `--out -` (one variation streamed as it is made) cannot do."""
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


def check_size(model, song: Path, n_new: int, n_prompt: int, num: int, join: bool,
               only_new: bool, rate: int, what: str = "", adapt_crop: int = 0) -> None:
    """Refuse, before allocating, outputs and batches larger than the machine or the WAV format.
    `adapt_crop`: the crop length the model adapts to the prompt in (0: it does not)."""
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
            + (activation_bytes(model.cfg, 1, adapt_crop)  # one crop's step while adapting
               + 12 * sum(p.numel() for p in model.parameters()) if adapt_crop else 0)
            + out_s * out_rate * channels * 16)  # one output at a time: float copies and bytes
    check_memory(need, f"--seconds {n_new / rate:g} x {what}", "ask for fewer seconds, fewer "
                 "variations or a shorter --prompt-seconds")


def check_settings(seconds, temperature, top_k, top_p, num, prompt_seconds, at, only_new,
                   join, seed=0) -> None:
    """Every number of a request in range, every list without repeats, no options that
    exclude each other."""
    number("--seconds", seconds, low=0, low_open=True, high=1e7)
    for name, values, rule in (("--temp", temperature, dict(low=0, high=100)),
                               ("--top-p", top_p, dict(low=0, low_open=True, high=1)),
                               ("--top-k", top_k, dict(low=0, high=256, integer=True))):
        values = listed(values)
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


def output_base(song: Path, out: str | Path | None) -> Path:
    """OUT, or SONG-continued.wav here; a .wav either way."""
    base = Path(out) if out else Path(f"{song.stem}-continued.wav")
    if base.suffix.lower() != ".wav":
        raise UserError(f"{base}: the output must be a .wav file")
    return base


def output_paths(song: Path, out: str | Path | None, rows: list[Variation], force: bool,
                 inputs: list[Path]) -> list[Path]:
    """The WAV paths (and, beside each, its .json sidecar), all checked against the output rules
    before any work starts. One variation: OUT.wav; several: OUT-<what differs>.wav, e.g.
    song-continued-t0.7-2.wav (temperature 0.7, second of --num), song-continued-3.wav."""
    base = output_base(song, out)
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


def page_paths(base: Path, force: bool, inputs: list[Path]) -> tuple[Path, Path]:
    """The comparison page OUT.html and the prompt it plays, OUT-prompt.wav, checked like every
    output."""
    page = base.with_suffix(".html")
    prompt = base.with_name(f"{base.stem}-prompt{base.suffix}")
    for p in (page, prompt):
        check_output(p, force=force, inputs=inputs)
    return page, prompt
