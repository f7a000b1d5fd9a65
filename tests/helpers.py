"""Small helpers shared by tests."""

from __future__ import annotations

import importlib

import pytest
import torch

BACKENDS = ["s4", "s4d", "mamba"]


def require_backend(name: str) -> None:
    """Skip (not fail) while a backend's module is absent from this tree."""
    pytest.importorskip(f"ssmgen.backends.{name}")


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its initialization by relative noise, so tests exercise
    trained-looking weights, not the special structure of a fresh init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            s = p.detach().abs().mean().item() or 1.0
            p.add_(scale * s * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def step_through(layer, x: torch.Tensor, state):
    """Run `layer.step` over x (B, L, ...) one sample at a time; returns (y, state)."""
    ys = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state
