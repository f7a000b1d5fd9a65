"""Small helpers shared by tests."""

from __future__ import annotations

import pytest
import torch

from ssmgen.testing import perturb, step_through

BACKENDS = ["s4", "s4d", "mamba"]
# Parametrize a test over these to run it on the CPU and, marked `cuda` (conftest.py skips it
# without a GPU), on CUDA with the same assertions.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# The suite runs as 2 pytest-xdist workers on 2 cores: one intra-op thread each. (More threads
# than cores make every tiny op in a step wait milliseconds for a busy thread pool.)
torch.set_num_threads(1)


def check_model_modes(model, tokens: torch.Tensor, cut: int = 137):
    """Assert the whole model's parallel logits == its step-by-step ones == two chunked reads
    split at `cut`, to float32 tolerance; returns (the state after stepping, after the reads)."""
    batch = tokens.shape[0]
    with torch.no_grad():
        full = model(tokens)
        stepped, state = step_through(model, tokens, model.initial_state(batch))
        a, mid = model.forward_with_state(tokens[:, :cut], model.initial_state(batch))
        b, end = model.forward_with_state(tokens[:, cut:], mid)
    scale = full.abs().max().item()
    assert (stepped - full).abs().max().item() <= 2e-6 * scale
    assert (torch.cat([a, b], 1) - full).abs().max().item() <= 2e-6 * scale
    return state, end


def require_backend(name: str) -> None:
    """Skip (not fail) while a backend's module is absent from this tree."""
    pytest.importorskip(f"ssmgen.backends.{name}")


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


def tone_coder():
    """A classical coder (logistic, as the model's prior takes it) fitted on a noisy tone."""
    import numpy as np

    from ssmgen.audio import mulaw_encode
    from ssmgen.classical import fit

    t = np.arange(24000) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    tok = mulaw_encode(x)
    return fit([tok[:16000]], [tok[16000:]], "mulaw", dists=("logistic",)), tok


def make_checkpoint(path, backend: str = "s4d", preset: str = "tiny", seed: int = 0,
                    rate: int = 16000, scale: float = 0.05, prior: bool = False,
                    overrides: tuple[str, ...] = ()):
    """A checkpoint file as `ssmgen train` writes it, with perturbed (untrained) weights (and,
    with `prior`, the classical prior fitted on a tone; `overrides` as `--set` takes them)."""
    from ssmgen.checkpoint import save_checkpoint
    from ssmgen.config import load_config
    from ssmgen.model import SaShiMi

    require_backend(backend)
    cfg = load_config(preset, backend=backend,
                      overrides=(["model.prior=lpc"] if prior else []) + list(overrides))
    torch.manual_seed(seed)
    model = perturb(SaShiMi(cfg.model), scale=scale, seed=seed)
    if prior:
        model.prior.load_coder(tone_coder()[0])
    fmt = {"rate": rate, "encoding": "mulaw", "bits": 8, "normalization": "peak"}
    return save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(),
                                  "data_format": fmt, "step": 0, "dataset": ""})


def write_tone(path, seconds: float = 1.0, rate: int = 44100, channels: int = 2,
               subtype: str = "PCM_16", freq: float = 330.0, level: float = 0.3):
    """A short harmonic tone with a little noise, as a sound file."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    x = level * (np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(2 * np.pi * 2 * freq * t))
    x = x + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    data = np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def ssmgen(*args, **kw):
    """Run the real command line (`python -m ssmgen ARGS`) and capture its output."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ssmgen", *map(str, args)], capture_output=True,
                          text=True, **kw)
