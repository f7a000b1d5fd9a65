"""The engine registry.

An engine continues a `ModelState` token by token::

    engine = create_engine("auto", model, batch_size=B, device="cpu")
    tokens, state = engine.generate(state, first_token, n, sampler, progress)

- ``torch``: eager `model.step` loop (the reference, any device);
- ``cpu-fast``: the whole recurrent model packed into flat arrays, 16-sample blocks run by one
  numba function, sampling included (CPU only);
- ``cuda-graph``: one 16-sample frame captured as a CUDA graph, sampling inside (CUDA only);
- ``auto``: the fastest engine available for the device (cpu-fast on a CPU where numba imports;
  on CUDA the torch engine until cuda-graph has been checked on a GPU, see cuda_graph.py).
"""

from __future__ import annotations

import logging

import torch

from ssmgen.errors import UserError
from ssmgen.generate.base import Engine
from ssmgen.model import SaShiMi

__all__ = ["Engine", "available_engines", "create_engine"]

log = logging.getLogger("ssmgen.generate")


def _numba_ok() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def available_engines(device: str | torch.device | None = None) -> list[str]:
    """Engines usable here (for `device`, default CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    names = ["torch"]
    if dev.type == "cpu" and _numba_ok():
        names.append("cpu-fast")
    if dev.type == "cuda" and torch.cuda.is_available():
        names.append("cuda-graph")
    return names


def _resolve(name: str, device: torch.device, model: SaShiMi) -> str:
    if name != "auto":
        return name
    if "cpu-fast" not in available_engines(device):
        return "torch"
    from ssmgen.generate.cpu_fast import supports
    if supports(model):
        return "cpu-fast"
    log.info("backend %s has no step form the cpu-fast engine packs (fast_kind): generating with "
             "the torch engine", model.cfg.backend)
    return "torch"


def create_engine(name: str, model: SaShiMi, batch_size: int, device=None) -> Engine:
    """An engine by name ('auto', 'torch', 'cpu-fast', 'cuda-graph'). Raises UserError for one
    that is unknown or unusable on `device` or with this model's backend."""
    dev = torch.device(device) if device is not None else model.head.weight.device
    resolved = _resolve(name, dev, model)
    if resolved == "torch":
        from ssmgen.generate.torch_engine import TorchEngine
        return TorchEngine(model, batch_size, dev)
    if resolved == "cpu-fast":
        if resolved not in available_engines(dev):
            raise UserError(f"engine 'cpu-fast' needs numba and a CPU device (got {dev})")
        from ssmgen.generate.cpu_fast import CpuFastEngine
        return CpuFastEngine(model, batch_size)
    if resolved == "cuda-graph":
        if resolved not in available_engines(dev):
            raise UserError(f"engine 'cuda-graph' needs a CUDA device (got {dev})")
        from ssmgen.generate.cuda_graph import CudaGraphEngine
        return CudaGraphEngine(model, batch_size, dev)
    raise UserError(f"unknown engine '{name}': use auto or one of "
                    f"{', '.join(available_engines(dev))}")
