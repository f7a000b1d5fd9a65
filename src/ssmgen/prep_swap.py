"""Where `ssmgen prep` builds and how it puts the result in place without losing anything: the
dataset is built in a marked folder beside OUT (`OUT.tmp-<pid>`), the files in an old dataset that
prep did not write are hard-linked into the build, and the build is swapped in by two renames
(the old dataset renamed away first, deleted only once the new one is in place). A prep that died
between the renames is repaired by the next one; only folders provably ours are ever removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ssmgen.atomic import pid_alive, remove_stale_temps
from ssmgen.data import is_dataset
from ssmgen.errors import UserError
from ssmgen.prep_files import SPLITS

MARKER = ".ssmgen-build"  # marks a build folder as ours, so a stale one may be removed


def _siblings(out: Path, tag: str) -> list[tuple[Path, int]]:
    """Folders `OUT.<tag>-<pid>` beside OUT, with their pid."""
    found = []
    for p in sorted(out.parent.glob(f"{out.name}.{tag}-*")):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit():
            found.append((p, int(pid)))
    return found


def recover_interrupted_swap(out: Path) -> None:
    """If a prep died between its two renames, put the old dataset back where it was; remove what
    dead preps left (only folders that are provably ours)."""
    for p, pid in _siblings(out, "old"):
        if pid_alive(pid) or not is_dataset(p):
            continue
        if not out.exists():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p, pid in _siblings(out, "tmp"):
        if not pid_alive(pid) and (p / MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def make_build_dir(out: Path) -> Path:
    build = out.parent / f"{out.name}.tmp-{os.getpid()}"
    try:
        if (build / MARKER).exists():
            shutil.rmtree(build)
        build.mkdir()
        (build / MARKER).write_text("ssmgen prep build folder; safe to delete\n")
        (build / "work").mkdir()
    except OSError as e:
        shutil.rmtree(build, ignore_errors=True)
        raise UserError(f"{out}: not writable ({e.strerror or e})") from None
    return build


def _ours(out: Path) -> set[str]:
    """Names in the dataset folder that prep wrote: its manifest and its split arrays."""
    names = {"manifest.json"} | {f"{s}.npy" for s in SPLITS}
    try:
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        names |= {str(v.get("file")) for v in m.get("splits", {}).values() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError):
        pass
    return names


def carry_user_files(out: Path, build: Path) -> None:
    """Hard-link everything in the old dataset that prep did not write (the user's notes, a
    folder of theirs) into the new build, so the swap keeps it. Links, not moves: until the swap
    the old dataset keeps every file, so an interruption loses nothing. Where a link is
    impossible, stop with one line before anything is replaced."""
    if not is_dataset(out):
        return
    remove_stale_temps(out)
    ours = _ours(out)

    def carry(src: Path, dst: Path, rel: str, top: bool) -> None:
        for e in sorted(os.scandir(src), key=lambda e: e.name):
            if top and e.name in ours:
                continue
            name, target = f"{rel}{e.name}", dst / e.name
            try:
                if e.is_symlink():
                    os.symlink(os.readlink(e.path), target)
                elif e.is_dir():
                    target.mkdir()
                    carry(Path(e.path), target, f"{name}/", False)
                    shutil.copystat(e.path, target)
                elif e.is_file():
                    os.link(e.path, target)
                else:
                    raise OSError(0, "not a regular file, folder or link")
            except OSError as err:
                raise UserError(f"{out}: holds {name}, which prep did not write and cannot carry "
                                f"into the new dataset ({err.strerror or err}); move it out of "
                                f"{out} and run prep again (nothing was changed)") from None

    carry(out, build, "", True)


def swap_into_place(build: Path, out: Path) -> None:
    """Rename the finished build to OUT; an existing dataset is renamed away first and deleted
    only once the new one is in place."""
    (build / MARKER).unlink(missing_ok=True)
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            out.rename(old)
    build.rename(out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
