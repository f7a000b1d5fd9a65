"""The `ssmgen` command line. Thin: each command parses its options, calls one library function a
Python user could call too, and prints the result. This is the only module that knows about exit
codes: 0 success, 2 user error, 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ssmgen import __version__
from ssmgen.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train a raw-waveform SaShiMi model on your own audio and continue any song.")
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"ssmgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train a raw-waveform SaShiMi model on your own audio and continue any song."""


class _WarningHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "note"
        err.print(f"[yellow]{level}:[/] {record.getMessage()}", markup=True, highlight=False,
                  soft_wrap=True)


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
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as e:
            err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130)
        except Exception as e:  # a bug: say so plainly, keep the details for a report
            err.print(f"internal error: {type(e).__name__}: {e}", markup=False, soft_wrap=True)
            if os.environ.get("SSMGEN_DEBUG"):
                traceback.print_exc()
            else:
                err.print("(a bug in ssmgen: rerun with SSMGEN_DEBUG=1 for the traceback)",
                          markup=False)
            raise typer.Exit(1)

    return app.command(name=name)(wrapper)


# ------------------------------------------------------------------------------------------------
# prep
# ------------------------------------------------------------------------------------------------

def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.replace(",", "/").split("/")]
    except ValueError:
        raise UserError(f"--split '{text}': expected three numbers like 90/5/5") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"--split '{text}': expected three non-negative numbers like 90/5/5")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


@command
def prep(
    src: Path = typer.Argument(..., help="Folder of audio files (searched recursively)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write."),
    rate: int = typer.Option(16000, help="Sample rate of the dataset (Hz)."),
    encoding: str = typer.Option("mulaw", help="Token encoding: mulaw or linear."),
    bits: int = typer.Option(8, help="Bits per sample (the model predicts 8-bit tokens)."),
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
    from ssmgen.prep import prepare

    manifest = prepare(src, out_dir, rate=rate, encoding=encoding, bits=bits,
                       normalization=normalize, split=_parse_split(split), seed=seed, jobs=jobs,
                       force=force, progress=not quiet)
    _print_prep_summary(manifest, out_dir)


def _print_prep_summary(manifest: dict, out_dir: Path) -> None:
    table = Table(title=f"dataset {out_dir}", show_edge=False)
    table.add_column("split")
    table.add_column("files", justify="right")
    table.add_column("hours", justify="right")
    table.add_column("level dBFS", justify="right")
    table.add_column("silence", justify="right")
    table.add_column("clipped", justify="right")
    for name, s in manifest["splits"].items():
        table.add_row(name, str(s["files"]), f"{s['hours']:.3f}", _fmt(s.get("rms_dbfs"), "{:.1f}"),
                      _fmt(s.get("silence_share"), "{:.1%}"), _fmt(s.get("clipped_share"), "{:.3%}"))
    out.print(table)
    skipped = manifest.get("skipped", [])
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason_kind"]] = reasons.get(s["reason_kind"], 0) + 1
    kept = len(manifest["files"])
    line = f"kept {kept} file(s)"
    if reasons:
        line += "; skipped " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items()))
    out.print(line, highlight=False)
    # manifest["warnings"] were already shown: prep logs each one as it finds it


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


# ------------------------------------------------------------------------------------------------
# presets, train, eval
# ------------------------------------------------------------------------------------------------

@command
def presets() -> None:
    """List the presets with their parameter counts per backend."""
    from ssmgen import backends
    from ssmgen.config import load_config, preset_names
    from ssmgen.model import SaShiMi, count_parameters

    names = backends.available()
    table = Table(show_edge=False)
    table.add_column("preset")
    for b in names:
        table.add_column(f"params ({b})", justify="right")
    table.add_column("shape")
    table.add_column("training")
    for p in preset_names():
        counts = []
        for b in names:
            try:
                counts.append(f"{count_parameters(SaShiMi(load_config(p, backend=b).model)):,}")
            except Exception as e:  # a broken plug-in must not hide the other rows
                counts.append(f"({type(e).__name__})")
        cfg = load_config(p)
        m, t = cfg.model, cfg.train
        table.add_row(p, *counts, f"d_model {m.d_model}, {m.n_layers} layers/tier, pool {m.pool}",
                      f"{t.batch_size} x {t.sample_len}, lr {t.lr:g}")
    out.print(table)


@command
def train(
    data: Path = typer.Argument(..., help="Dataset folder made by `ssmgen prep`."),
    preset: str = typer.Option("ablated", help="Preset name (see `ssmgen presets`) or a YAML path."),
    backend: Optional[str] = typer.Option(None, help="Sequence backend: s4, s4d or mamba."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: key=value "
                                                     "(repeatable), e.g. train.lr=1e-3."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder "
                                           "(default runs/PRESET-BACKEND-TIME)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes."),
    batch_size: Optional[int] = typer.Option(None, help="Crops per step (global batch)."),
    sample_len: Optional[int] = typer.Option(None, help="Samples per crop (multiple of 16)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (SSM parameters: train.ssm_lr)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a SaShiMi model on a prepared dataset."""
    from ssmgen.config import load_config
    from ssmgen.train import train as run_training

    overrides = list(set_)
    for key, value in (("batch_size", batch_size), ("sample_len", sample_len), ("lr", lr),
                       ("device", device), ("seed", seed), ("max_steps", max_steps),
                       ("max_minutes", max_minutes)):
        if value is not None:
            overrides.append(f"train.{key}={value}")
    if resume and out_dir is None:
        raise UserError("--resume needs --out RUN_FOLDER")
    cfg = load_config(preset, backend=backend, overrides=overrides)
    result = run_training(data, cfg, out_dir, resume=resume, progress=not quiet)
    best = (f"best val bpb {result['best_bpb']:.4f}" if result["best_bpb"] < float("inf")
            else "no validation split to score")
    out.print(f"trained {result['steps']} steps ({result['stopped']}); {best}; run folder "
              f"{result['run']}", highlight=False)


@command(name="eval")
def eval_(
    model: Path = typer.Argument(..., help="Run folder or checkpoint file."),
    split: str = typer.Option("test", help="test, val or train."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder (default: the one it "
                                                   "trained on)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    max_samples: Optional[int] = typer.Option(None, help="Evaluate only this many samples."),
    audio: Optional[List[Path]] = typer.Option(
        None, "--audio", help="Score these audio files instead of a split (repeat the option; "
                              "any format, rate, channels)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Bits per byte and top-1/3/5/10 accuracy of a model on a split or on audio files."""
    from ssmgen.evaluate import evaluate, evaluate_audio

    show = not (quiet or as_json)
    if audio:
        r = evaluate_audio(model, list(audio), device=device, progress=show)
    else:
        r = evaluate(model, split, data=data, device=device, max_samples=max_samples,
                     progress=show)
    if as_json:
        print(json.dumps(r, indent=2))
        return

    def line(name: str, r: dict) -> None:
        out.print(f"{name}: {r['bpb']:.4f} bits per byte over {r['samples']:,} samples; "
                  f"accuracy top-1 {r['acc1']:.1%}, top-3 {r['acc3']:.1%}, "
                  f"top-5 {r['acc5']:.1%}, top-10 {r['acc10']:.1%}", highlight=False)
    files = r.get("files", [])
    if len(files) > 1:
        for f in files:
            line(f["file"], f)
    line(files[0]["file"] if len(files) == 1 else "all files" if files else r["split"], r)


# ------------------------------------------------------------------------------------------------
# continue
# ------------------------------------------------------------------------------------------------

@command(name="continue")
def continue_(
    song: Path = typer.Argument(..., help="Any audio file: the prompt."),
    model: Path = typer.Option(..., "--model", "-m", help="Run folder or checkpoint file."),
    seconds: float = typer.Option(10.0, help="Seconds of new audio."),
    temp: float = typer.Option(0.8, help="Sampling temperature (0: always the likeliest)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep this much probability."),
    top_k: int = typer.Option(0, help="Keep the k likeliest tokens (0: all)."),
    seed: int = typer.Option(0, help="Same seed, same audio."),
    num: int = typer.Option(1, help="Variations, generated together as one batch."),
    prompt_seconds: float = typer.Option(8.0, help="Seconds of the song the model hears."),
    at: Optional[float] = typer.Option(None, help="Continue from this time in seconds "
                                                  "(default: the end)."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Output WAV "
                                            "(default SONG-continued.wav)."),
    only_new: bool = typer.Option(False, help="Write only the new audio."),
    join: bool = typer.Option(False, help="Original song up to --at, then the continuation, "
                                          "at the song's rate and channels."),
    force: bool = typer.Option(False, help="Overwrite existing outputs."),
    engine: str = typer.Option("auto", help="auto, torch, cpu-fast or cuda-graph."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Continue any song with a trained model."""
    from ssmgen.generate.continuation import continue_song

    r = continue_song(song, model, seconds=seconds, temperature=temp, top_k=top_k, top_p=top_p,
                      seed=seed, num=num, prompt_seconds=prompt_seconds, at=at, out=out_path,
                      only_new=only_new, join=join, force=force, engine=engine, device=device,
                      progress=not quiet)
    for path in r["outputs"]:
        out.print(f"wrote {path} (+ {Path(path).with_suffix('.json').name})", highlight=False)
    out.print(f"{r['seconds_new'] * len(r['outputs']):.1f} s of new audio in {r['elapsed_s']:.1f} s "
              f"including the prompt read and any first-run compile; generation ran at "
              f"{r['real_time_factor']:.2f}x real time (engine {r['engine']})", highlight=False)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------

@command
def export(
    model: Path = typer.Argument(..., help="Run folder or checkpoint file."),
    out_path: Path = typer.Option(..., "--out", "-o", help="ONNX file to write."),
    opset: int = typer.Option(20, help="ONNX opset (9..20)."),
    block: bool = typer.Option(True, "--block/--single", help="16-sample block graph with "
                               "sampling (default), or the single-sample step with logits."),
    prompt_graph: bool = typer.Option(False, "--prompt-graph", help="Also a parallel prompt "
                                      "graph (not supported: prompts go through the block graph)."),
    verify_steps: int = typer.Option(2048, help="Steps to compare onnxruntime with torch."),
) -> None:
    """Export the model's recurrent step to ONNX, verified against torch."""
    from ssmgen.export import export_onnx

    r = export_onnx(model, out_path, opset=opset, block=block, prompt_graph=prompt_graph,
                    verify_steps=verify_steps)
    out.print(f"wrote {r['path']} ({r['graph']} graph, backend {r['backend']}, opset {r['opset']}, "
              f"{r['size_bytes'] / 1e6:.2f} MB); verified {r['steps_verified']} steps: max logit "
              f"difference {r['max_logit_diff']:.1e}, identical tokens", highlight=False)


# ------------------------------------------------------------------------------------------------
# doctor
# ------------------------------------------------------------------------------------------------

@command
def doctor() -> None:
    """Show versions, device, backends, engines and optional extras."""
    from ssmgen.doctor import report

    for key, value in report().items():
        out.print(f"{key:<18} {value}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
