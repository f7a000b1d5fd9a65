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


def make_dataset(root, files=(("train", 3), ("val", 1), ("test", 1)), seconds: float = 2.0,
                 rate: int = 16000, seed: int = 0):
    """Write a small dataset in `ssmgen prep`'s format (manifest.json + uint8 .npy splits) from
    synthesized tones with harmonics and noise: fast, and learnable in a few steps."""
    import json
    from pathlib import Path

    import numpy as np

    from ssmgen.audio import mulaw_encode

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, splits = [], {}
    for split, n in files:
        arrays, offset = [], 0
        for i in range(n):
            t = np.arange(int(seconds * rate)) / rate
            f0 = 110 * 2 ** (rng.integers(0, 24) / 12)
            x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
            x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)) + 0.02 * rng.standard_normal(len(t))
            q = mulaw_encode(x / np.abs(x).max())
            entries.append({"path": f"{split}/{i}.wav", "split": split, "offset": offset,
                            "length": len(q)})
            arrays.append(q)
            offset += len(q)
        data = np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)
        np.save(root / f"{split}.npy", data)
        splits[split] = {"file": f"{split}.npy", "samples": int(len(data)), "files": n,
                         "hours": len(data) / rate / 3600}
    manifest = {"format": "ssmgen-dataset", "format_version": 1, "rate": rate,
                "encoding": "mulaw", "bits": 8, "normalization": "peak", "splits": splits,
                "files": entries, "skipped": [], "warnings": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
