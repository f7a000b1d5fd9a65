"""`ssmgen prep`: turn a folder of audio into a dataset.

Walks the folder (symlinks followed, never looping), detects audio by content, decodes each file in
blocks (soxr streaming resample, bounded memory) in parallel worker processes, normalizes and
encodes it to 8-bit tokens, drops duplicates, splits by source file (or by time when there are only
one or two files) and writes `train.npy`, `val.npy`, `test.npy` and `manifest.json`.

The build happens in a temporary folder beside OUT that is renamed into place at the end, so an
interrupted prep never leaves a half dataset and never damages the previous one. A re-run reuses
the tokens of every unchanged file (same content hash, same settings) from the previous dataset.
See docs/architecture.md, "Data and prep", for the format and the policies.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from ssmgen import __version__
from ssmgen.atomic import WRITE_ERRNOS
from ssmgen.audio import ENCODINGS, NORMALIZATIONS, decode
from ssmgen.data import FORMAT, FORMAT_VERSION, is_dataset
from ssmgen.errors import UserError
from ssmgen.prep_files import (
    MIN_TRAIN_MINUTES,
    SILENCE_DBFS,
    SILENCE_FRAME_S,
    SILENT_PEAK,
    SPLITS,
    BuildWriteError,
    OwnFile,
    assign_splits,
    by_time_segments,
    dbfs,
    decode_file,
    find_candidates,
    hash_file,
    read_tokens,
)
from ssmgen.prep_files import skip_entry as _skip
from ssmgen.prep_swap import (
    carry_user_files,
    make_build_dir,
    recover_interrupted_swap,
    swap_into_place,
)
from ssmgen.progress import progress_bar
from ssmgen.validate import number

log = logging.getLogger("ssmgen.prep")

BY_TIME_MAX_FILES = 2  # with this few usable files, each file is split by time instead
REUSABLE_SKIPS = ("not audio", "too short", "silent", "truncated",
                  "not finite")  # same bytes, same verdict

__all__ = ["prepare", "FORMAT", "FORMAT_VERSION", "SILENT_PEAK"]


def prepare(src, out, *, rate: int = 16000, encoding: str = "mulaw",
            normalization: str = "peak", split=(0.9, 0.05, 0.05), seed: int = 0,
            jobs: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Prepare the audio under `src` as a dataset in `out`; returns the manifest (also written as
    `out/manifest.json`). Raises UserError (one line, naming the path) for user mistakes."""
    t0 = time.monotonic()
    settings = _check_options(rate, encoding, normalization, split, jobs, seed)
    src, out = _check_paths(Path(src), Path(out))
    old = None if force else _open_old(out, settings)
    build = make_build_dir(out)
    try:
        try:
            manifest = _build(src, build, settings, old, seed, progress, t0)
            del old  # drop handles on the old arrays before they are moved
            shutil.rmtree(build / "work", ignore_errors=True)
            carry_user_files(out, build)
        except BuildWriteError as e:
            raise _not_written(out, e.why) from None
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            raise _not_written(out, e.strerror or str(e)) from None
        swap_into_place(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return manifest


def _not_written(out: Path, why: str) -> UserError:
    kept = "the previous dataset is untouched" if is_dataset(out) else "nothing was written"
    return UserError(f"{out}: could not write the dataset ({why}); {kept}")


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def _check_options(rate, encoding, normalization, split, jobs, seed) -> dict:
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding '{encoding}': unknown; use one of {', '.join(ENCODINGS)}")
    if normalization not in NORMALIZATIONS:
        raise UserError(f"--normalize '{normalization}': unknown; use one of "
                        f"{', '.join(NORMALIZATIONS)}")
    rate = number("--rate", rate, low=4000, high=192000, integer=True)
    number("--seed", seed, low=0, high=2**63 - 1, integer=True)
    try:
        shares = [float(s) for s in split]
    except (TypeError, ValueError):
        raise UserError(f"--split {split!r}: expected three numbers like 90/5/5") from None
    if len(shares) != 3 or any(not (math.isfinite(s) and s >= 0) for s in shares) \
            or shares[0] <= 0:
        raise UserError(f"--split {split!r}: expected three non-negative shares, train above 0")
    total = sum(shares)
    if jobs is not None:
        number("--jobs", jobs, low=1, high=1024, integer=True)
    return {"rate": int(rate), "encoding": encoding, "bits": 8, "normalization": normalization,
            "shares": [s / total for s in shares], "jobs": jobs or os.cpu_count() or 1}


def _check_paths(src: Path, out: Path) -> tuple[Path, Path]:
    if not src.exists():
        raise UserError(f"{src}: no such folder")
    if not src.is_dir():
        raise UserError(f"{src}: not a folder (give the folder that holds your audio)")
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real or src_real in out_real.parents:
        raise UserError(f"{out}: is inside the source folder {src}; write the dataset elsewhere")
    if out_real in src_real.parents:
        raise UserError(f"{out}: holds the source folder {src}; write the dataset elsewhere")
    recover_interrupted_swap(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        if not is_dataset(out) and any(out.iterdir()):
            raise UserError(f"{out}: exists, is not empty and is not an ssmgen dataset; "
                            "refusing to overwrite it (choose another --out)")
    parent = Path(os.path.abspath(out)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out}: not writable (no permission to write in {parent})")
    return src, out


# ------------------------------------------------------------------------------------------------
# The previous dataset, for reuse
# ------------------------------------------------------------------------------------------------

class _OldDataset:
    """The dataset already in OUT, when it was made with the same settings."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root, self.manifest = root, manifest
        self.files = {f["content_hash"]: f for f in manifest.get("files", [])
                      if f.get("content_hash")}
        self.skips = {s["content_hash"]: s for s in manifest.get("skipped", [])
                      if s.get("content_hash") and s.get("reason_kind") in REUSABLE_SKIPS}

    def reusable(self) -> frozenset:
        return frozenset(self.files) | frozenset(self.skips)

    def runs(self, entry: dict) -> list[tuple[Path, int, int]]:
        """Where a file's tokens lie in the old arrays, in file order: (npy, offset, length)."""
        segs = sorted(entry.get("segments") or [entry], key=lambda s: s.get("start", 0))
        return [(self.root / self.manifest["splits"][s["split"]]["file"], int(s["offset"]),
                 int(s["length"])) for s in segs]


def _open_old(out: Path, settings: dict) -> _OldDataset | None:
    if not is_dataset(out):
        return None
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    same = (m.get("format_version") == FORMAT_VERSION
            and all(m.get(k) == settings[k] for k in ("rate", "encoding", "bits", "normalization")))
    if not same:
        log.info("%s: made with other settings; decoding every file again", out)
        return None
    return _OldDataset(out, m)


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------

_REUSABLE: frozenset = frozenset()


def _init_worker(reusable: frozenset) -> None:
    global _REUSABLE
    _REUSABLE = reusable


def process_file(job: tuple) -> dict:
    """Hash one file; unless the old dataset has it, decode it to a token file. Runs in a worker
    process: only small dicts go back, tokens go through the build folder."""
    relpath, path, work_file, settings = job
    try:
        if os.stat(path).st_size == 0:
            return {"status": "skip", **_skip(relpath, "empty", "empty file (0 bytes)")}
        content_hash = hash_file(path)
    except OSError as e:
        return {"status": "skip", **_skip(relpath, "unreadable", e.strerror or str(e))}
    if content_hash in _REUSABLE:
        return {"status": "reuse", "path": relpath, "content_hash": content_hash}
    try:
        r = decode_file(path, work_file, settings)
    except BuildWriteError:  # our own write failed: stop the whole prep, blame nobody's file
        raise
    except Exception as e:  # a file libsndfile chokes on must not stop the whole prep
        Path(work_file).unlink(missing_ok=True)
        r = {"status": "skip", "reason_kind": "unreadable",
             "reason": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    return {**r, "path": relpath, "content_hash": content_hash}


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------

def _run_jobs(jobs: list[tuple], reusable: frozenset, n_workers: int):
    """Yield each job's result as it finishes (in-process when one worker is asked for)."""
    n_workers = max(1, min(n_workers, len(jobs)))
    if n_workers == 1:
        _init_worker(reusable)
        try:
            for job in jobs:
                yield process_file(job)
        finally:
            _init_worker(frozenset())
        return
    with ProcessPoolExecutor(max_workers=n_workers, initializer=_init_worker,
                             initargs=(reusable,)) as pool:
        # all submitted (workers started) before the progress bar's thread exists
        futures = [pool.submit(process_file, job) for job in jobs]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _build(src: Path, build: Path, settings: dict, old: _OldDataset | None, seed: int,
           progress: bool, t0: float) -> dict:
    rate = settings["rate"]
    candidates, skipped = find_candidates(src)
    n_found = len(candidates) + len(skipped)
    reusable = old.reusable() if old else frozenset()
    jobs = [(rel, str(path), str(build / "work" / f"{i:06d}.u8"), settings)
            for i, (rel, path) in enumerate(candidates)]
    results: dict[str, dict] = {}
    seconds_done = 0.0
    extra = "{task.fields[hours]:.2f} h audio  {task.fields[xrt]:.0f}x real time"
    with progress_bar(progress, extra=extra) as bar:
        task = bar.add_task("prep", total=len(jobs), unit="files", hours=0.0, xrt=0.0)
        for r in _run_jobs(jobs, reusable, settings["jobs"]):
            if r["status"] == "reuse":
                r = _reused(old, r)
            results[r["path"]] = r
            seconds_done += r.get("length", 0) / rate
            bar.update(task, advance=1, hours=seconds_done / 3600,
                       xrt=seconds_done / max(time.monotonic() - t0, 1e-6))

    kept: list[dict] = []
    by_audio: dict[str, str] = {}
    for rel, _ in candidates:  # sorted by path: the first of identical files is kept
        r = results[rel]
        if r["status"] == "skip":
            skipped.append(_skip(rel, r["reason_kind"], r["reason"], r.get("content_hash")))
        elif r["audio_hash"] in by_audio:
            skipped.append(_skip(rel, "duplicate", f"duplicate of {by_audio[r['audio_hash']]}",
                                 r["content_hash"]))
        else:
            by_audio[r["audio_hash"]] = rel
            kept.append(r)
            if r.get("warning"):
                log.warning("%s: %s", rel, r["warning"])
    skipped.sort(key=lambda s: s["path"])
    if not kept:  # one line says it all: the counts and the first file's reason
        raise UserError(f"{src}: no usable audio ({_describe_skips(skipped, len(candidates))})")
    for s in skipped:
        log.warning("%s: skipped: %s", s["path"], s["reason"])

    shares = settings["shares"]
    by_time = len(kept) <= BY_TIME_MAX_FILES and (shares[1] > 0 or shares[2] > 0)
    plan = _plan(kept, shares, seed, by_time)
    if by_time:
        log.info("only %d usable file(s): splitting each by time (the last %.0f%% is test, the "
                 "%.0f%% before it val)", len(kept), 100 * shares[2], 100 * shares[1])
    split_info = _write_splits(build, plan, old, settings)
    warnings = [f"{r['path']}: {r['warning']}" for r in kept if r.get("warning")]
    for name, si in split_info.items():
        if si["silence_share"] is not None and si["silence_share"] > 0.5:
            w = f"the {name} split is {si['silence_share']:.0%} silence"
            warnings.append(w)
            log.warning("%s", w)
    train_min = split_info["train"]["hours"] * 60
    if train_min < MIN_TRAIN_MINUTES:
        w = (f"only {train_min:.1f} min of training audio: too little to train on; need at least "
             f"{MIN_TRAIN_MINUTES} min; 1 h+ recommended")
        warnings.append(w)
        log.warning("%s", w)

    first = ("path", "content_hash", "audio_hash", "split", "offset", "length", "segments",
             "samples")
    files = [{**{k: r[k] for k in first if k in r},
              **{k: v for k, v in r.items()
                 if k not in first and k not in ("status", "tokens_file")}}
             for r in kept]
    total_samples = sum(s["samples"] for s in split_info.values())
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "rate": rate,
        "encoding": settings["encoding"], "bits": settings["bits"],
        "normalization": settings["normalization"], "seed": seed,
        "split_shares": shares, "split_mode": "by_time" if by_time else "by_file",
        "splits": split_info, "files": files, "skipped": skipped, "warnings": warnings,
        "totals": {"files_found": n_found,
                   "files_kept": len(kept), "files_skipped": len(skipped),
                   "files_reused": sum(1 for r in results.values() if r.get("reused")),
                   "samples": total_samples, "hours": total_samples / rate / 3600,
                   "elapsed_s": round(time.monotonic() - t0, 3)},
        "source": str(src.resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ssmgen_version": __version__,
    }
    for f in files:
        f.pop("reused", None)
    with OwnFile(build / "manifest.json") as fh:  # the whole build folder is renamed into place
        # a file name that is not UTF-8 holds lone surrogates: written as JSON's \uXXXX escapes
        fh.write(json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8",
                                                                            "backslashreplace"))
    return manifest


def _reused(old: _OldDataset, r: dict) -> dict:
    """A file the old dataset already holds: its entry (the tokens are copied at assembly)."""
    h = r["content_hash"]
    if h in old.files:
        e = old.files[h]
        keep = {k: v for k, v in e.items() if k not in ("path", "split", "offset", "length",
                                                        "segments")}
        length = sum(n for _, _, n in old.runs(e))
        return {**keep, "status": "ok", "path": r["path"], "length": length,
                "reused": True, "old_runs": old.runs(e)}
    s = old.skips[h]
    return {"status": "skip", "path": r["path"], "reason_kind": s["reason_kind"],
            "reason": s["reason"], "content_hash": h, "reused": True}


def _describe_skips(skipped: list[dict], n_files: int) -> str:
    if not n_files and not skipped:
        return "the folder holds no files"
    kinds: dict[str, int] = {}
    for s in skipped:
        kinds[s["reason_kind"]] = kinds.get(s["reason_kind"], 0) + 1
    first = skipped[0]
    return ("skipped " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            + f"; e.g. {first['path']}: {first['reason']}")


def _plan(kept: list[dict], shares: list[float], seed: int, by_time: bool) -> dict[str, list]:
    """Per split, the runs to write: (file entry, start within the file, length)."""
    plan: dict[str, list] = {s: [] for s in SPLITS}
    if by_time:
        for r in kept:
            for name, start, n in by_time_segments(r["length"], shares):
                plan[name].append((r, start, n))
    else:
        for r, name in zip(kept, assign_splits([r["content_hash"] for r in kept], shares, seed)):
            plan[name].append((r, 0, r["length"]))
    return plan


def _write_splits(build: Path, plan: dict[str, list], old: _OldDataset | None,
                  settings: dict) -> dict:
    """Write each split's .npy (streamed, bounded memory), fill in each file's offset/segments and
    return the per-split summary."""
    power = decode(np.arange(256), settings["encoding"]).astype(np.float64) ** 2
    rate, info = settings["rate"], {}
    frame = max(1, round(SILENCE_FRAME_S * rate))
    quiet = 10 ** (SILENCE_DBFS / 10)
    for name in SPLITS:
        runs = plan[name]
        n_total = sum(n for _, _, n in runs)
        hist = np.zeros(256, np.int64)
        clipped = 0.0
        silent_frames = frames = 0
        with OwnFile(build / f"{name}.npy") as fh:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (n_total,)})
            fh.write(header.getvalue())
            offset = 0
            for r, start, n in runs:
                rest = np.zeros(0, np.uint8)  # tokens of a 50 ms frame split across chunks
                for chunk in read_tokens(r, start, n):
                    fh.write(chunk.tobytes())
                    hist += np.bincount(chunk, minlength=256)
                    q = np.concatenate([rest, chunk])
                    full = len(q) // frame * frame
                    energy = power[q[:full]].reshape(-1, frame).mean(axis=1)
                    silent_frames += int(np.count_nonzero(energy < quiet))
                    frames += len(energy)
                    rest = q[full:]
                if len(rest):
                    silent_frames += int(power[rest].mean() < quiet)
                    frames += 1
                seg = {"split": name, "offset": offset, "length": n, "start": start}
                r.setdefault("_segments", []).append(seg)
                clipped += n * (r.get("clipped_share") or 0.0)
                offset += n
            fh.close(fsync=True)
        info[name] = {"file": f"{name}.npy", "samples": n_total,
                      "files": len({r["path"] for r, _, _ in runs}),
                      "hours": n_total / rate / 3600,
                      "rms_dbfs": dbfs(math.sqrt(float(hist @ power) / n_total))
                      if n_total else None,
                      "silence_share": silent_frames / frames if frames else None,
                      "clipped_share": clipped / n_total if n_total else None}
    for runs in plan.values():
        for r, _, _ in runs:
            segs = r.pop("_segments", None)
            if segs is None:
                continue
            r["samples"] = r["length"]
            first = next((s for s in segs if s["split"] == "train"), segs[0])
            r.update(split=first["split"], offset=first["offset"], length=first["length"])
            if len(segs) > 1 or segs[0]["length"] != r["samples"]:
                r["segments"] = sorted(segs, key=lambda s: s["start"])
            r.pop("old_runs", None)
            r.pop("tokens_file", None)
    return info
