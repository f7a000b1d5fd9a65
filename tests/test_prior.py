"""The classical prior inside the model (prior.py): it scores as the classical coder does, the
model starts exactly at it, and every engine and the ONNX export carry it."""

import numpy as np
import pytest
import torch

from helpers import (
    BACKENDS,
    check_model_modes,
    make_checkpoint,
    make_dataset,
    perturb,
    require_backend,
    ssmgen,
    tone_coder,
)
from ssmgen.checkpoint import load_checkpoint, load_model
from ssmgen.classical import score
from ssmgen.config import load_config
from ssmgen.generate import Sampler, create_engine
from ssmgen.model import SaShiMi
from ssmgen.prior import LinearPredictionPrior


def bits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    logp = torch.log_softmax(logits, -1)
    return -logp.gather(-1, targets.unsqueeze(-1)).mean().item() / np.log(2)


def model_with_prior(backend="s4d", head=True, seed=0):
    require_backend(backend)
    torch.manual_seed(seed)
    cfg = load_config("tiny", backend=backend, overrides=["model.n_layers=2", "model.prior=lpc"])
    model = SaShiMi(cfg.model)
    if head:  # a trained-looking head, so the test sees the network's part too
        perturb(model, scale=0.05, seed=seed)
    model.prior.load_coder(tone_coder()[0])
    return model.eval()


def test_the_prior_alone_scores_what_the_classical_coder_scores():
    coder, tok = tone_coder()
    prior = LinearPredictionPrior()
    prior.load_coder(coder)
    held = torch.from_numpy(tok[16000:].astype(np.int64))[None]
    logp, _ = prior.parallel(held, None)
    ours = bits(logp[:, :-1], held[:, 1:])
    theirs, _ = score(coder, [tok[16000:]])
    # the coder also scores the first sample (from zeros): the same history, one sample more
    assert abs(ours - theirs) < 0.01, (ours, theirs)
    assert ours < 6.0  # a tone is predictable: far below 8 bits


def test_a_new_model_starts_exactly_at_the_prior():
    model = model_with_prior(head=False)
    tokens = torch.from_numpy(tone_coder()[1][:3000].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(tokens)
        logp, _ = model.prior.parallel(tokens, None)
    assert torch.equal(logits, logp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_equals_step_and_chunked_reads_with_the_prior(backend):
    model = model_with_prior(backend)
    tokens = torch.from_numpy(tone_coder()[1][5000:5300].astype(np.int64)).view(1, -1)
    tokens = torch.cat([tokens, tokens.flip(1)])
    state, end = check_model_modes(model, tokens)
    for n in ("prior.hist", "prior.res", "prior.seen"):
        assert (state.tensors[n] - end.tensors[n]).abs().max().item() <= 1e-5, n
    assert end.tensors["prior.seen"].flatten().tolist() == [300.0, 300.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_fast_gives_the_torch_tokens_with_the_prior(backend):
    model = model_with_prior(backend)
    prompt = torch.from_numpy(tone_coder()[1][1000:1037].astype(np.int64)).view(1, -1)
    prompt = torch.cat([prompt, prompt.flip(1), prompt.roll(5, 1)])
    with torch.no_grad():
        _, state = model.forward_with_state(prompt, model.initial_state(3))
    first, n = prompt[:, -1].numpy(), 16 * 4 + 3
    results = []
    for engine in ("torch", "cpu-fast"):
        logits = np.zeros((n, 3, 256), np.float32)
        sampler = Sampler(seed=5, batch_size=3, temperature=[1.0, 0.8, 1.2], top_p=0.95)
        toks, final = create_engine(engine, model, 3, "cpu").generate(
            state, first, n, sampler, logits_out=logits)
        results.append((toks, final, logits))
    (ref, ref_state, ref_logits), (fast, fast_state, fast_logits) = results
    np.testing.assert_array_equal(ref, fast)
    assert np.abs(ref_logits - fast_logits).max() <= 2e-6 * np.abs(ref_logits).max()
    for name in ref_state.tensors:
        assert (ref_state.tensors[name] - fast_state.tensors[name]).abs().max() <= 1e-4, name


def test_the_onnx_export_carries_the_prior(tmp_path):
    pytest.importorskip("onnxruntime")
    from ssmgen.export import export_onnx
    ckpt = make_checkpoint(tmp_path / "m.pt", "s4d", prior=True)
    r = export_onnx(ckpt, tmp_path / "m.onnx", verify_steps=512)
    assert r["tokens_identical"] and r["max_logit_diff"] <= 1e-3
    assert [n for n in r["state_names"] if n.startswith("prior.")] == [
        "prior.hist", "prior.res", "prior.seen"]


def test_train_fits_the_prior_on_the_train_split_and_fine_tuning_refits_it(tmp_path):
    from ssmgen.classical import dataset_coder
    from ssmgen.data import Dataset
    a = make_dataset(tmp_path / "a", seed=0)
    b = make_dataset(tmp_path / "b", seed=7)
    r = ssmgen("train", a, "--preset", "tiny", "--set", "model.prior=lpc", "--max-steps", "2",
               "--out", tmp_path / "run", "-q", "--sample-len", "512", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    model, _ = load_model(tmp_path / "run" / "checkpoints" / "last.pt")
    expect = dataset_coder(Dataset(a), dists=("logistic",))
    np.testing.assert_allclose(model.prior.coef.numpy(), expect["coefficients"][::-1], rtol=1e-5,
                               atol=1e-6)
    assert model.prior.settings[3].item() == expect["window"]
    # the prior's numbers travel in the checkpoint and load back exactly
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.equal(ckpt["model"]["prior.coef"], model.prior.coef)

    r = ssmgen("train", b, "--init", tmp_path / "run", "--max-steps", "1", "--out",
               tmp_path / "ft", "-q", "--sample-len", "512", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    tuned, _ = load_model(tmp_path / "ft" / "checkpoints" / "last.pt")
    expect_b = dataset_coder(Dataset(b), dists=("logistic",))
    np.testing.assert_allclose(tuned.prior.coef.numpy(), expect_b["coefficients"][::-1],
                               rtol=1e-5, atol=1e-6)
    assert not torch.equal(tuned.prior.coef, model.prior.coef)


def test_a_checkpoint_whose_prior_would_divide_by_zero_is_refused_in_one_line(tmp_path):
    from ssmgen.checkpoint import save_checkpoint
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "m.pt", "s4d", prior=True))
    ckpt["model"]["prior.settings"] = torch.tensor([0.0, 0.0, 1e-4, 32.0])
    save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in ckpt.items() if k != "path"})
    r = ssmgen("eval", "--model", tmp_path / "bad.pt", "--audio", tmp_path / "missing.wav")
    assert r.returncode == 2 and "classical prior is not usable" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
