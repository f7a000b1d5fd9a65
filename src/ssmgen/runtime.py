"""Where work runs: the device a command asked for, and whether a job fits its memory.

Shared by training, evaluation, generation and export, so it sits below all of them. Sizes are
estimated before anything is allocated: a request larger than the machine is refused in one line
naming the option to lower, never met with a swap storm or an out-of-memory kill.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssmgen.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu` or `cuda`; UserError for anything else or
    for `cuda` on a machine without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise UserError(f"--device {name}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on `device` (MemAvailable for the CPU), or None when the
    system does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(need: float, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """UserError "WHAT needs about N GiB, M GiB free here: FIX" if `need` bytes exceed what is
    available on `device`."""
    have = available_memory(device)
    if have is not None and need > have:
        raise UserError(f"{what} needs about {gib(need)} of memory, {gib(have)} free on "
                        f"{torch.device(device).type}: {fix}")
