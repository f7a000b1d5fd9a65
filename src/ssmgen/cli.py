"""The `ssmgen` command line. Thin: each command parses its options, fills in the working
folder's defaults (`workspace.py`: which dataset, which model), calls one library function a
Python user could call too, and prints the result. This is the only module that knows about exit
codes: 0 success, 2 user error, 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from ssmgen import __version__
from ssmgen.adapt import ADAPT_LR, ADAPT_PASSES
from ssmgen.errors import UserError
from ssmgen.validate import one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train a raw-waveform SaShiMi model on your own audio and continue "
                       "any song.")
out = Console(width=None if sys.stdout.isatty() else 200)  # files and pipes get whole lines
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"ssmgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train a raw-waveform SaShiMi model on your own audio and continue any song."""


def _say(text: str, style: str = "") -> None:
    """One line on stderr, control characters escaped (a file name may hold a newline)."""
    line = one_line(text)
    err.print(f"[{style}]{line}[/]" if style else line, markup=bool(style), highlight=False,
              soft_wrap=True)


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "note"
        err.print(f"[yellow]{level}:[/] ", end="", markup=True, highlight=False)
        err.print(one_line(record.getMessage()), markup=False, highlight=False, soft_wrap=True)


def _setup_logging(quiet: bool = False) -> None:
    log = logging.getLogger("ssmgen")
    log.handlers[:] = [_WarningHandler()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def command(fn: Callable | None = None, *, name: str | None = None) -> Callable:
    """Register `fn` as a command and map what it raises to one line and an exit code."""
    if fn is None:
        return lambda f: command(f, name=name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging(kwargs.get("quiet", False))
        try:
            with warnings.catch_warnings():
                if not os.environ.get("SSMGEN_DEBUG"):  # libraries' advice is not for our users
                    warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as e:
            _say(f"error: {e}")
            raise typer.Exit(2)
        except KeyboardInterrupt:
            _say("interrupted")
            raise typer.Exit(130)
        except Exception as e:  # a bug: say so plainly, keep the details for a report
            _say(f"internal error: {type(e).__name__}: {e}")
            if os.environ.get("SSMGEN_DEBUG"):
                traceback.print_exc()
            else:
                _say("(a bug in ssmgen: rerun with SSMGEN_DEBUG=1 for the traceback)")
            raise typer.Exit(1)

    return app.command(name=name)(wrapper)


def _note(text: str) -> None:
    """A line saying what a command chose for the user (which dataset, which model)."""
    err.print("[yellow]note:[/] ", end="", markup=True, highlight=False)
    err.print(one_line(text), markup=False, highlight=False, soft_wrap=True)


def _model_choice(positional: Optional[str], option: Optional[str]) -> Path:
    """The model a command uses: named (positionally or with --model), or the working folder's
    default, said in one line."""
    from ssmgen.workspace import resolve_model

    if positional and option and positional != option:
        raise UserError(f"two models given ({positional} and --model {option}): give one")
    choice = resolve_model(positional or option)
    if not (positional or option) or choice.path != Path(positional or option):
        _note(f"model: {choice.why}")
    return choice.path


# ------------------------------------------------------------------------------------------------
# prep
# ------------------------------------------------------------------------------------------------

def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.replace(",", "/").split("/")]
    except ValueError:
        raise UserError(f"--split '{text}': expected three numbers like 90/5/5") from None
    return tuple(parts)  # type: ignore[return-value]  # checked by prepare()


@command
def prep(
    src: Path = typer.Argument(..., help="Folder of audio files (searched recursively)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset folder to write "
                                           "(default: data/NAME, NAME being SRC's folder name)."),
    rate: int = typer.Option(16000, help="Sample rate of the dataset (Hz)."),
    encoding: str = typer.Option("mulaw", help="Token encoding: mulaw or linear."),
    normalize: str = typer.Option("peak", help="Level normalization: peak (each file to full "
                                               "scale) or none."),
    split: str = typer.Option("90/5/5", help="train/val/test shares by source file."),
    seed: int = typer.Option(0, help="Seed of the split."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel decoders "
                                                                   "(default: all cores)."),
    force: bool = typer.Option(False, help="Rebuild from scratch, reusing nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes."),
) -> None:
    """Turn a folder of audio into a dataset (16 kHz mono 8-bit, split by file)."""
    from ssmgen.cli_tables import prep_summary
    from ssmgen.prep import prepare
    from ssmgen.workspace import dataset_for

    if out_dir is None:
        out_dir = dataset_for(src)
    manifest = prepare(src, out_dir, rate=rate, encoding=encoding, normalization=normalize,
                       split=_parse_split(split), seed=seed, jobs=jobs, force=force,
                       progress=not quiet)
    table, line = prep_summary(manifest, out_dir)
    out.print(table)
    out.print(line, highlight=False)
    # manifest["warnings"] were already shown: prep logs each one as it finds it


# ------------------------------------------------------------------------------------------------
# presets, train, eval
# ------------------------------------------------------------------------------------------------

@command
def presets(
    show: Optional[str] = typer.Option(None, "--show", help="Print this preset's YAML (to copy "
                                                            "into ./presets/ and edit)."),
) -> None:
    """List the presets with their parameter counts per backend, or print one."""
    from ssmgen.config import preset_text

    if show is not None:
        print(preset_text(show), end="")
        return
    from ssmgen.cli_tables import presets_table

    out.print(presets_table())


#: Options that would change a run's settings; a resumed run keeps its own.
_RESUME_FIXED = ("--preset", "--backend", "--recipe", "--set", "--batch-size", "--sample-len",
                 "--lr", "--seed", "--init")


@command
def train(
    data: Optional[Path] = typer.Argument(None, help="Dataset folder made by `ssmgen prep` "
                                          "(default: the one prep wrote last under ./data)."),
    preset: Optional[str] = typer.Option(None, help="Preset name (see `ssmgen presets`) or a "
                                         "YAML path [default: ablated]."),
    backend: Optional[str] = typer.Option(None, help="Sequence backend: s4, s4d or mamba "
                                          "[default: the preset's, s4d]."),
    recipe: str = typer.Option("auto", help="How to train: auto (cpu or gpu, by the device), "
                               "cpu, gpu or paper (the paper's exact recipe)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: key=value "
                                                     "(repeatable), e.g. train.lr=1e-3."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: a "
                                           "new runs/PRESET-BACKEND-N)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes "
                                                "(with neither: run until Ctrl-C)."),
    batch_size: Optional[int] = typer.Option(None, help="Crops per step (global batch)."),
    sample_len: Optional[int] = typer.Option(None, help="Samples per crop (multiple of 16)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (SSM parameters: train.ssm_lr)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    init: Optional[str] = typer.Option(None, help="Start from this model's weights (a run, a "
                                       "checkpoint or a bundled model's name): fine-tuning."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes."),
) -> None:
    """Train a SaShiMi model on a prepared dataset."""
    from ssmgen.checkpoint import load_checkpoint
    from ssmgen.config import Config, load_config
    from ssmgen.run_config import init_model_config
    from ssmgen.train import train as run_training
    from ssmgen.workspace import newest_dataset

    if resume:
        given = dict(zip(_RESUME_FIXED, (preset, backend, recipe != "auto" or None, set_ or None,
                                         batch_size, sample_len, lr, seed, init)))
        fixed = [name for name, value in given.items() if value is not None]
        if fixed:
            raise UserError(f"--resume continues a run with its own settings: drop {fixed[0]} "
                            "(only --max-steps, --max-minutes and --device may change)")
        if out_dir is None:
            raise UserError("--resume needs the run folder: --out RUN")
        last = load_checkpoint(Path(out_dir) / "checkpoints" / "last.pt")
        if data is None:  # the run's own dataset
            data = Path(last.get("dataset") or "")
            if not last.get("dataset") or not data.is_dir():
                raise UserError(f"{out_dir}: its dataset {data} is not here; name it: "
                                f"`ssmgen train DATASET --resume --out {out_dir}`")
        cfg = Config.from_dict(last["config"], source=last["path"])
        for key, value in (("max_steps", max_steps), ("max_minutes", max_minutes),
                           ("device", device)):
            if value is not None:
                setattr(cfg.train, key, value)
        cfg = Config.from_dict(cfg.to_dict(), source="--resume")  # the new limits checked too
        result = run_training(data, cfg, out_dir, resume=True, progress=not quiet)
    else:
        if data is None:
            choice = newest_dataset()
            _note(choice.why)
            data = choice.path
        overrides = list(set_)
        for key, value in (("batch_size", batch_size), ("sample_len", sample_len), ("lr", lr),
                           ("seed", seed), ("max_steps", max_steps), ("max_minutes", max_minutes),
                           ("device", device)):
            if value is not None:
                overrides.append(f"train.{key}={value}")
        if init is not None and preset is None and backend is None:  # the model's own shape
            ckpt, model_cfg = init_model_config(init)
            cfg = load_config("ablated", backend=model_cfg.backend, overrides=overrides,
                              recipe=recipe)
            cfg = dataclasses.replace(cfg, preset=str(ckpt["config"].get("preset", "custom")),
                                      model=dataclasses.replace(model_cfg,
                                                                dropout=cfg.model.dropout))
        else:
            cfg = load_config(preset or "ablated", backend=backend, overrides=overrides,
                              recipe=recipe)
        result = run_training(data, cfg, out_dir, init=init, progress=not quiet)
    best = (f"best val bpb {result['best_bpb']:.4f}" if result["best_bpb"] < float("inf")
            else "no validation split to score")
    out.print(f"trained {result['steps']} steps ({result['stopped']}); {best}; run folder "
              f"{one_line(result['run'])}", highlight=False)


@command(name="eval")
def eval_(
    model: Optional[str] = typer.Argument(None, help="Run folder, checkpoint file or bundled "
                                          "model name (default: the newest run here)."),
    model_opt: Optional[str] = typer.Option(None, "--model", "-m", help="The same, as an option."),
    split: str = typer.Option("test", help="test, val or train."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder (default: the one it "
                                                   "trained on)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    max_samples: Optional[int] = typer.Option(
        None, help="Evaluate only this many samples: a prefix of every file, shared out evenly."),
    audio: Optional[List[Path]] = typer.Option(
        None, "--audio", help="Score these audio files instead of a split (repeat the option; "
                              "any format, rate, channels)."),
    streamed: bool = typer.Option(True, "--streamed/--chunked-only",
                                  help="Also score with the state carried through each file, as "
                                       "`continue` uses the model (about twice the time)."),
    adapt: bool = typer.Option(False, "--adapt", help="Also score streamed with the model "
                               "adapting to each file as it reads it, each chunk scored before "
                               "it learns from it (as `continue` adapts; about 4x the time)."),
    adapt_lr: float = typer.Option(ADAPT_LR, help="Adam's step size with --adapt."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Bits per byte and top-1/3/5/10 accuracy of a model on a split or on audio files: in
    chunks of its training length from a fresh state (the paper's protocol) and streamed, the
    state carried through each file (as `continue` reads a song); with --adapt, also adapting
    to each file."""
    from ssmgen.adapt import checked_lr
    from ssmgen.cli_tables import eval_lines
    from ssmgen.evaluate import evaluate, evaluate_audio

    checked_lr(adapt_lr)
    if not adapt and adapt_lr != ADAPT_LR:
        raise UserError("--adapt-lr applies with --adapt: add --adapt or drop --adapt-lr")
    path = _model_choice(model, model_opt)
    show = not (quiet or as_json)
    lr = adapt_lr if adapt else None
    if audio:
        r = evaluate_audio(path, list(audio), device=device, progress=show, streamed=streamed,
                           adapt_lr=lr)
    else:
        r = evaluate(path, split, data=data, device=device, max_samples=max_samples,
                     progress=show, streamed=streamed, adapt_lr=lr)
    if as_json:
        print(json.dumps(r, indent=2))
        return

    for text in eval_lines(r):
        out.print(text, highlight=False)

# ------------------------------------------------------------------------------------------------
# continue
# ------------------------------------------------------------------------------------------------

def _number_list(name: str, text: str, integer: bool = False) -> list:
    """`--temp 0.7,0.8,1.0`: one number or a comma-separated list (each then checked in range by
    the library, where every number is)."""
    values = []
    for part in str(text).split(","):
        try:
            values.append(int(part) if integer else float(part))
        except ValueError:
            kind = "whole number" if integer else "number"
            raise UserError(f"{name} {text!r}: expected a {kind} or a comma-separated list like "
                            f"{'0,40' if integer else '0.7,0.8,1.0'}") from None
    return values


@command(name="continue")
def continue_(
    song: Path = typer.Argument(..., help="Any audio file: the prompt."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Run folder, checkpoint file "
                                        "or bundled model name (default: the newest run here, "
                                        "else the bundled model)."),
    seconds: float = typer.Option(10.0, help="Seconds of new audio."),
    temp: str = typer.Option("0.8", help="Sampling temperature (0: always the likeliest), or a "
                                         "list to compare: 0.7,0.8,1.0."),
    top_p: str = typer.Option("1.0", help="Nucleus sampling: keep this much probability (or a "
                                          "list)."),
    top_k: str = typer.Option("0", help="Keep the k likeliest tokens (0: all; or a list)."),
    seed: int = typer.Option(0, help="Same seed, same audio (variation j of each setting: "
                                     "seed + j)."),
    num: int = typer.Option(1, help="Variations per setting, all generated as one batch."),
    prompt_seconds: float = typer.Option(8.0, help="Seconds of the song the model hears."),
    at: Optional[float] = typer.Option(None, help="Continue from this time in seconds "
                                                  "(default: the end)."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Output WAV (default "
                                            "SONG-continued.wav here); - streams it to standard "
                                            "output while it is generated."),
    only_new: bool = typer.Option(False, help="Write only the new audio."),
    join: bool = typer.Option(False, help="Original song up to --at, then the continuation, "
                                          "at the song's rate and channels."),
    match_level: Optional[bool] = typer.Option(None, "--match-level/--no-match-level",
                                               help="Bring the new audio's level to the "
                                                    "prompt's (default: on with --join)."),
    page: Optional[bool] = typer.Option(None, "--page/--no-page", help="Write OUT.html to "
                                        "compare the variations (default: with several)."),
    force: bool = typer.Option(False, help="Replace existing outputs (never the song itself)."),
    engine: str = typer.Option("auto", help="auto, torch, cpu-fast or cuda-graph."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    adapt: bool = typer.Option(True, "--adapt/--no-adapt", help="Adapt the model to the prompt "
                               "before it continues (a few seconds; --no-adapt: the model as "
                               "trained)."),
    adapt_passes: int = typer.Option(ADAPT_PASSES, help="Passes over the prompt when adapting."),
    adapt_lr: float = typer.Option(ADAPT_LR, help="Adam's step size when adapting."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Continue any song with a trained model."""
    from ssmgen.adapt import Adaptation
    from ssmgen.cli_tables import adapt_text
    from ssmgen.generate.continuation import StreamClosed, continue_song

    if not adapt and (adapt_passes, adapt_lr) != (ADAPT_PASSES, ADAPT_LR):
        raise UserError("--no-adapt: drop --adapt-passes and --adapt-lr (or --adapt-passes 0 "
                        "alone)")
    temps = _number_list("--temp", temp)
    top_ps = _number_list("--top-p", top_p)
    top_ks = _number_list("--top-k", top_k, integer=True)
    path = _model_choice(None, model)
    streaming = out_path is not None and str(out_path) == "-"
    try:
        r = continue_song(song, path, seconds=seconds, temperature=temps, top_k=top_ks,
                          top_p=top_ps, seed=seed, num=num, prompt_seconds=prompt_seconds, at=at,
                          out=out_path, only_new=only_new, join=join, match_level=match_level,
                          page=page, force=force, engine=engine, device=device,
                          adapt=Adaptation(adapt_passes if adapt else 0, adapt_lr),
                          progress=not quiet)
    except StreamClosed as e:
        _note(f"stopped: {e}")
        return
    speed = (f"{r['seconds_new'] * max(1, len(r['outputs'])):.1f} s of new audio in "
             f"{r['elapsed_s']:.1f} s including the prompt read and any first-run compile; "
             f"generation ran at {r['real_time_factor']:.2f}x real time (engine {r['engine']})")
    speed += adapt_text(r["adapt"])
    if streaming:  # standard output is the audio: everything else goes to stderr
        v = r["variations"][0]
        _say(f"streamed {r['prompt_seconds']:.2f} s of prompt and {speed}; seed {v['seed']}, "
             f"temp {v['temperature']:g}, top-k {v['top_k']}, top-p {v['top_p']:g} (the same "
             "options with --out FILE.wav write the same samples)")
        return
    for p in r["outputs"]:
        out.print(f"wrote {one_line(p)} (+ {one_line(Path(p).with_suffix('.json').name)})",
                  highlight=False)
    if r["page"]:
        out.print(f"wrote {one_line(r['page'])} (+ {one_line(Path(r['prompt_file']).name)}): "
                  "open it in a browser to compare them", highlight=False)
    out.print(speed, highlight=False)
    for v in r["variations"]:
        if v["level"]["warnings"]:
            _say(f"warning: {Path(v['output']).name}: {'; '.join(v['level']['warnings'])}")


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------

@command
def export(
    model: Optional[str] = typer.Argument(None, help="Run folder, checkpoint file or bundled "
                                          "model name (default: the newest run here)."),
    model_opt: Optional[str] = typer.Option(None, "--model", "-m", help="The same, as an option."),
    out_path: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
    opset: int = typer.Option(20, help="ONNX opset (9..20)."),
    block: bool = typer.Option(True, "--block/--single", help="16-sample block graph with "
                               "sampling (default), or the single-sample step with logits."),
    verify_steps: int = typer.Option(2048, help="Steps to compare onnxruntime with torch."),
    force: bool = typer.Option(False, help="Replace an existing file."),
) -> None:
    """Export the model's recurrent step to ONNX, verified against torch."""
    from ssmgen.export import export_onnx

    path = _model_choice(model, model_opt)
    r = export_onnx(path, out_path, opset=opset, block=block, verify_steps=verify_steps,
                    force=force)
    out.print(f"wrote {one_line(r['path'])} ({r['graph']} graph, backend {r['backend']}, opset "
              f"{r['opset']}, {r['size_bytes'] / 1e6:.2f} MB); verified {r['steps_verified']} "
              f"steps: max logit difference {r['max_logit_diff']:.1e}, identical tokens",
              highlight=False)


# ------------------------------------------------------------------------------------------------
# doctor
# ------------------------------------------------------------------------------------------------

@command
def doctor() -> None:
    """Show versions, device, backends, engines, bundled models and optional extras."""
    from ssmgen.doctor import report

    for key, value in report().items():
        out.print(f"{key:<18} {value}", highlight=False)


def _is_usage_error(e: BaseException) -> bool:
    """Click's usage errors (bad option value, unknown option, missing argument), whether they
    come from click itself or the copy typer vendors (typer._click)."""
    return any(c.__name__ == "UsageError" for c in type(e).__mro__)


def main() -> None:
    """Console-script entry point. A mistake on the command line is one line and exit 2 (not
    Click's usage block)."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:
        if not _is_usage_error(e):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `ssmgen`: the help, not an error
            print(e.format_message())
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _say(f"error: {e.format_message()}{hint}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
