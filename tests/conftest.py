"""Shared fixtures: synthesized audio (fast, nothing to ship)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

# The suite runs as 2 pytest-xdist workers on 2 cores, and many tests start the command line in a
# subprocess: one thread each for torch and numba there too (tests/helpers.py does the same for
# torch in the workers). Two workers each starting a 2-thread pool oversubscribe the cores, and
# every tiny op of a tiny model then waits on a busy pool (docs/benchmarks.md, "test suite").
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def synth(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, amp: float = 0.5,
          noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A sine of `freq` Hz (plus optional white noise), shape (frames,) or (frames, channels);
    channel c is scaled by 1 / (c + 1) so that a downmix is not any single channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    if noise:
        x = x + noise * np.random.default_rng(seed).standard_normal(len(t))
    if channels == 1:
        return x.astype(np.float32)
    return np.stack([x / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture
def write_audio():
    """write_audio(path, seconds, rate, freq=440, channels=1, fmt=None, subtype=None, **synth)"""
    def write(path, seconds, rate, freq=440.0, channels=1, fmt=None, subtype=None, **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        x = synth(seconds, rate, freq, channels, **kw)
        sf.write(str(path), x, rate, format=fmt, subtype=subtype)
        return path
    return write


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are skipped, all with the same reason
    (`bench/gpu_check.sh` runs them as `pytest -m cuda` where a GPU is lent)."""
    import torch

    if torch.cuda.is_available():
        return
    # a skipif placed first: pytest evaluates skipif marks before skip marks, so this reason wins
    # over a test's own (e.g. "mamba_ssm not installed")
    skip = pytest.mark.skipif(True, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip, append=False)
