"""The bundled example model: it loads, and a 60 s continuation stays finite and bounded."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ssmgen.audio import decode, encode, read_song_clip
from ssmgen.checkpoint import load_model
from ssmgen.generate.continuation import read_prompt
from ssmgen.generate.engines import create_engine
from ssmgen.generate.sampling import Sampler
from ssmgen.workspace import bundled_models

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(bundled_models().values())


@pytest.mark.skipif(not MODELS, reason="no bundled example model")
@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_sixty_seconds_stay_finite_and_bounded(path):
    model, ckpt = load_model(path)
    fmt = ckpt["data_format"]
    clip = read_song_clip(ROOT / "examples" / "prompt.flac", fmt, seconds=2, at=2)
    prompt = encode(clip.audio * clip.gain, fmt["encoding"]).astype(np.int64)
    state, first = read_prompt(model, prompt, 1)
    engine = create_engine("auto", model, 1)
    n = 60 * fmt["rate"]
    tokens, final = engine.generate(state, first, n, Sampler(temperature=1.0, seed=0, batch_size=1))
    assert tokens.shape == (1, n)
    for name, t in final.tensors.items():
        assert torch.isfinite(t).all(), name
        assert t.abs().max().item() < 1e4, name  # no runaway state
    x = decode(tokens[0], fmt["encoding"])
    last = x[-10 * fmt["rate"]:]
    rms = float(np.sqrt(np.mean(last ** 2)))
    assert rms < 0.7  # not stuck near full scale
    assert np.mean(np.abs(last) > 0.99) < 0.05  # not clipping
    assert len(np.unique(tokens[0, -fmt["rate"]:])) > 3  # not frozen on one value
