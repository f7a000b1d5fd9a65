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


def command(fn: Callable) -> Callable:
    """Register `fn` as a command and map what it raises to one line and an exit code."""

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

    return app.command()(wrapper)


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
    """Turn a folder of audio into a dataset: 16 kHz mono 8-bit tokens, split by source file."""
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
    for w in manifest.get("warnings", []):
        err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)


# ------------------------------------------------------------------------------------------------
# doctor
# ------------------------------------------------------------------------------------------------

@command
def doctor() -> None:
    """Print versions and what is available here: device, backends, engines, optional extras."""
    from ssmgen.doctor import report

    for key, value in report().items():
        out.print(f"{key:<18} {value}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
