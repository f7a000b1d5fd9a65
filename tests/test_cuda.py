"""What only a GPU can check: mixed-precision training, NCCL DistributedDataParallel, and a whole
continuation on CUDA. Every test here is marked `cuda` (conftest.py skips them without a GPU).

The other CUDA checks live beside their CPU versions, parametrized over the device or marked:
cuda-graph against the torch engine (test_engines.py), parallel mode against stepping for each
backend and the whole model (test_backends_common.py, test_model.py), mamba-ssm's kernels against
the pure path (test_backend_mamba.py). `bench/gpu_check.sh` runs them all as `pytest -m cuda`.
"""

import copy
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import BACKENDS, make_checkpoint, perturb, require_backend, write_tone
from ssmgen.config import load_config
from ssmgen.model import SaShiMi
from ssmgen.optim import make_optimizer

pytestmark = pytest.mark.cuda

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op), and a mean cross-entropy over
# thousands of positions averages that out. A CPU stand-in of this test (autocast on "cpu", Mamba
# on the chunked scan CUDA uses) gave loss differences of 1e-4 nats and gradient cosines of
# 0.99998 for all three backends; these bounds leave room for CUDA's wider bf16 coverage, while a
# scan or FFT that breaks in bf16 moves the loss by tenths of a nat or more.
BF16_LOSS_TOL = 0.01  # nats, absolute (0.2% of ln 256)
BF16_GRAD_COSINE = 0.99  # the bf16 gradient points where the fp32 one does


def ablated(name: str, length: int = 4096, seed: int = 0) -> tuple[SaShiMi, object]:
    """The ablated model (what the quality run trains), moved off its init, on the GPU."""
    require_backend(name)
    torch.manual_seed(seed)
    cfg = load_config("ablated", backend=name, overrides=[f"train.sample_len={length}"])
    return perturb(SaShiMi(cfg.model), scale=0.3, seed=seed).cuda().train(), cfg


def tone_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Mu-law tokens of harmonic tones with noise: audio-like input, not uniform noise."""
    from ssmgen.audio import mulaw_encode

    rng = np.random.default_rng(seed)
    t = np.arange(length) / 16000
    rows = []
    for _ in range(batch):
        f0 = 110 * 2 ** (rng.integers(0, 24) / 12)
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
        x = x + 0.05 * rng.standard_normal(length)
        rows.append(mulaw_encode(x / np.abs(x).max()).astype(np.int64))
    return torch.from_numpy(np.stack(rows)).cuda()


def loss_and_grads(model: SaShiMi, x: torch.Tensor, bf16: bool):
    """ssmgen.train's step up to the gradients: autocast forward, fp32 cross-entropy."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return loss.item(), grads, logits


@pytest.mark.parametrize("name", BACKENDS)
def test_bf16_autocast_training_step_is_finite_and_close_to_fp32(name):
    model, cfg = ablated(name)
    x = tone_tokens(2, 4097)
    loss32, g32, logits32 = loss_and_grads(model, x, bf16=False)
    assert logits32.float().std().item() > 0.3  # trained-looking logits, not a near-uniform guess
    loss16, g16, logits16 = loss_and_grads(model, x, bf16=True)
    assert np.isfinite(loss16) and torch.isfinite(g16).all()
    assert logits16.dtype == torch.bfloat16  # autocast really ran the model in bf16
    assert abs(loss16 - loss32) <= BF16_LOSS_TOL, (loss16, loss32)
    cosine = F.cosine_similarity(g16.double(), g32.double(), dim=0).item()
    assert cosine >= BF16_GRAD_COSINE, cosine
    opt = make_optimizer(model, cfg)  # and the update it makes stays finite
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_ddp_step_world_size_one():
    """`torchrun` training's path (ssmgen.train): NCCL process group, DistributedDataParallel,
    a bf16 step. With one process DDP averages over one rank: the gradients are the plain ones."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    assert dist.is_nccl_available()
    model, cfg = ablated("s4d", length=2048)
    ref = copy.deepcopy(model)
    x = tone_tokens(2, 2049)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        net = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        opt = make_optimizer(model, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.cuda.synchronize()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        opt.step()
    finally:
        dist.destroy_process_group()
    assert torch.isfinite(loss).item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ref_loss, _, _ = loss_and_grads(ref, x, bf16=True)
    assert abs(loss.item() - ref_loss) <= 1e-4
    for g, p in zip(grads, ref.parameters()):
        assert (g is None) == (p.grad is None)
        if g is not None:
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-3)


def test_continue_song_on_cuda_cuda_graph_equals_torch_engine(tmp_path):
    """The whole `ssmgen continue --device cuda` path: prompt read on the GPU, then the same
    audio from the cuda-graph engine as from the torch engine (same seed). Without adapting to the
    prompt: the engines are compared, not the GPU's backward passes, which need not repeat to the
    last bit."""
    import soundfile as sf

    from ssmgen.adapt import Adaptation
    from ssmgen.generate.continuation import continue_song

    ckpt = make_checkpoint(tmp_path / "m.pt", backend="s4d", preset="tiny")
    song = write_tone(tmp_path / "song.wav", seconds=1.5, rate=22050)
    out = {}
    for engine in ("torch", "cuda-graph"):
        r = continue_song(song, ckpt, seconds=0.1, temperature=0.9, seed=3, num=2, engine=engine,
                          device="cuda", out=tmp_path / f"{engine}.wav", progress=False,
                          adapt=Adaptation(passes=0))
        assert r["engine"] == engine
        out[engine] = [sf.read(p, dtype="int16")[0] for p in r["outputs"]]
    for a, b in zip(out["torch"], out["cuda-graph"]):
        np.testing.assert_array_equal(a, b)
