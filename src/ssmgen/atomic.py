"""Every file ssmgen writes goes through here: the rules that keep a user's data safe, and atomic
output (a temporary file beside the target, renamed over it when complete).

The rules (docs/architecture.md, "Never lose what we did not write"):
- an existing file is replaced only when the caller says so (`--force` for a user-named output;
  our own files inside a folder marked as ours, such as a run's checkpoints, are ours to replace);
- never anything that is not a regular file (a folder, a symbolic link, a FIFO, a device), with
  or without `--force`;
- never an input of the same command (`--force` does not make an input an output);
- a write that fails (disk full, file too large, read-only or vanished folder) is reported as our
  failure to write that output, in one line, and leaves the previous file untouched.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ssmgen.errors import UserError

#: Temporary names: `.NAME.PID.RANDOM.tmp`, so that leftovers of a killed process can be told
#: apart from a live writer's and removed (`remove_stale_temps`).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
#: Errors that mean "this output could not be written", whatever the output is.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES,
                errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a pid we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, force: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), make_parent: bool = False) -> Path:
    """Refuse, with one line, an output path that breaks the rules above; else return it.
    `force`: an existing regular file may be replaced. `inputs`: files this command reads.
    `make_parent`: create a missing parent folder (else a missing folder is an error)."""
    path = Path(path)
    if str(path).endswith(("/", os.sep)) or path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    if path.is_symlink():
        raise UserError(f"{path}: is a symbolic link; ssmgen never replaces one (choose another "
                        "name)")
    if path.exists():
        if not path.is_file():
            raise UserError(f"{path}: exists and is not a regular file; ssmgen never replaces "
                            "it (choose another name)")
        for source in inputs:
            if _same_file(path, Path(source)):
                raise UserError(f"{path}: is an input of this command ({source}); ssmgen never "
                                "writes over its input, even with --force (choose another name)")
        if not force:
            raise UserError(f"{path}: already exists (use --force to replace it)")
    parent = Path(os.path.abspath(path)).parent
    if not parent.exists() and make_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{path}: cannot create its folder ({e.strerror or e})") from None
    if not parent.is_dir():
        raise UserError(f"{path}: no such folder {parent} for the output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write in {parent} (no permission)")
    return path


def write_failure(path: str | os.PathLike, e: BaseException) -> UserError:
    """The one-line error for an output we could not write."""
    why = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
    return UserError(f"{path}: could not write this output ({why}); nothing was replaced")


@contextmanager
def atomic_output(path: str | os.PathLike, *, replace: bool = True, fsync: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, give it the usual file mode
    (0666 minus the umask; mkstemp makes 0600), optionally fsync it, and rename it to `path`.
    On any error (or Ctrl-C) the temporary file is removed and `path` is untouched; an OSError of
    writing (disk full, ...) becomes a UserError naming `path`.

    `replace=False` refuses an existing file (a user-named output without --force); a target that
    is not a regular file, or is one of `inputs`, is refused in any case, checked before writing
    and again just before the rename."""
    path = Path(path)
    inputs = list(inputs)
    check_output(path, force=replace, inputs=inputs, make_parent=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as e:
        raise write_failure(path, e) from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            if fsync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise write_failure(path, e) from None
            raise
        check_output(path, force=replace, inputs=inputs)  # the target may have changed meanwhile
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True,
                fsync: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write `data` to `path` atomically under the rules above. Serializers that hide the OS error
    of a failed write (torch.save, libsndfile, protobuf) write to memory first and come here, so a
    full disk is reported as what it is."""
    with atomic_output(path, replace=replace, fsync=fsync, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, replace: bool = True,
               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a UTF-8 text file atomically under the rules above."""
    return write_bytes(path, text.encode("utf-8"), replace=replace, inputs=inputs)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed ssmgen processes left in `folder` (our naming, a
    process id that no longer runs, a regular file); returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP.match(e.name)
        if not m or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        try:
            if stat.S_ISREG(e.stat(follow_symlinks=False).st_mode):
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            pass
    return removed
