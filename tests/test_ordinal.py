"""Ordinal inputs and outputs (`model.ordinal_input`, `model.ordinal_output`:
ordinal.TokenEmbedding, ordinal.TokenHead): neighbouring codes get neighbouring inputs and logits
that share a smooth part, and the model keeps every invariant with them (parallel == step, cpu-fast
== torch token for token, the ONNX export verified, the fold kept for inference)."""

import numpy as np
import pytest
import torch

from helpers import BACKENDS, check_model_modes, make_checkpoint, perturb, require_backend, ssmgen
from ssmgen.checkpoint import load_model
from ssmgen.config import load_config
from ssmgen.generate import Sampler, create_engine
from ssmgen.model import SaShiMi
from ssmgen.ordinal import ordinal_features

BOTH = ("model.ordinal_input=true", "model.ordinal_output=true")


def ordinal_model(backend="s4d", seed=0, overrides=BOTH):
    require_backend(backend)
    torch.manual_seed(seed)
    cfg = load_config("tiny", backend=backend, overrides=list(overrides))
    return perturb(SaShiMi(cfg.model), scale=0.05, seed=seed).eval()


def test_the_features_are_smooth_in_the_code_and_decode_mu_law():
    f = ordinal_features(256).double()
    step = (f[1:] - f[:-1]).abs().max().item()
    assert step < 0.2  # the fastest wave moves by at most pi 8 (2 / 255) per code
    assert f[0, 0] == -1 and f[255, 0] == 1  # position
    assert f[0, 1] == -1 and f[255, 1] == 1 and abs(f[128, 1].item()) < 1e-3  # amplitude
    assert np.linalg.matrix_rank(f.numpy()) == f.shape[1]  # no feature repeats another


def test_the_embedding_adds_only_the_feature_map_and_starts_ordinal():
    plain = SaShiMi(load_config("ablated", recipe="paper").model)
    torch.manual_seed(0)
    model = SaShiMi(load_config("ablated", recipe="paper",
                                overrides=["model.ordinal_input=true"]).model)
    n = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert n == ordinal_features(256).shape[1] * 64
    table = model.embedding.table().detach()
    assert torch.equal(model.embedding(torch.arange(256)).detach(), table)
    # the learned map moves every code by a smooth function: its part of neighbours' rows is close
    part = table - model.embedding.weight.detach()
    near = (part[1:] - part[:-1]).norm(dim=1).mean()
    far = (part[:128] - part[128:]).norm(dim=1).mean()
    assert near < far / 5, (near, far)


def test_the_head_starts_plain_and_learns_a_part_shared_by_neighbours():
    torch.manual_seed(0)
    plain = SaShiMi(load_config("ablated", recipe="paper").model)
    torch.manual_seed(0)
    model = SaShiMi(load_config("ablated", recipe="paper",
                                overrides=["model.ordinal_output=true"]).model)
    x = torch.randn(5, 64)
    assert torch.equal(model.head(x), plain.head(x))  # the map starts at zero
    n = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert n == ordinal_features(256).shape[1] * 65
    # one gradient step on one code's logit moves its neighbours' logits, not the far codes'
    opt = torch.optim.SGD([model.head.ordinal], lr=1.0)
    model.head(x)[:, 140].sum().backward()
    opt.step()
    with torch.no_grad():
        moved = (model.head(x) - plain.head(x)).abs().mean(0)
    assert moved[139] > moved[140] / 2 and moved[141] > moved[140] / 2
    assert moved[20] < moved[140] / 4 and moved[250] < moved[140] / 4, moved

def test_inference_folds_once_and_follows_every_change_of_the_weights():
    model = ordinal_model()
    emb, head = model.embedding, model.head

    def check_fresh():
        table, (w, b) = emb.table(), head.folded()
        assert torch.equal(table, emb.weight + emb.ordinal(emb.features))
        want_w, want_b = head._fold_now()
        assert torch.equal(w, want_w) and torch.equal(b, want_b)

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        table, (w, _) = emb.table(), head.folded()
        assert emb.table() is table and head.folded()[0] is w  # kept, not recomputed per step
        emb.ordinal.weight.add_(0.1)  # what an optimizer step does
        head.ordinal.add_(0.1)
        assert not torch.equal(emb.table(), table) and not torch.equal(head.folded()[0], w)
        check_fresh()
        model.load_state_dict(saved)  # what the weight average's swap does
        assert torch.equal(emb.table(), table) and torch.equal(head.folded()[0], w)
    model.double()
    with torch.no_grad():
        assert emb.table().dtype == torch.float64 and head.folded()[1].dtype == torch.float64
        check_fresh()
    # with grad the fold is part of the graph: the gradient reaches both maps
    model.float()
    model.head(model.embedding(torch.arange(4))).sum().backward()
    assert emb.ordinal.weight.grad.abs().sum() > 0 and head.ordinal.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_equals_step_with_ordinal_inputs_and_outputs(backend):
    model = ordinal_model(backend)
    tokens = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(1))
    check_model_modes(model, tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides", [BOTH[:1], BOTH[1:], BOTH], ids=["in", "out", "both"])
def test_cpu_fast_gives_the_torch_tokens_with_ordinal_inputs_and_outputs(backend, overrides):
    model = ordinal_model(backend, overrides=overrides)
    prompt = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, state = model.forward_with_state(prompt, model.initial_state(3))
    first, n = prompt[:, -1].numpy(), 16 * 4 + 3
    results = []
    for engine in ("torch", "cpu-fast"):
        sampler = Sampler(seed=5, batch_size=3, temperature=[1.0, 0.8, 1.2], top_p=0.95)
        toks, _ = create_engine(engine, model, 3, "cpu").generate(state, first, n, sampler)
        results.append(toks)
    np.testing.assert_array_equal(results[0], results[1])


def test_the_onnx_export_carries_ordinal_inputs_and_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    from ssmgen.export import export_onnx
    ckpt = make_checkpoint(tmp_path / "m.pt", "s4d", overrides=BOTH)
    model, _ = load_model(ckpt)
    # the checkpoint's config rebuilds both maps, and the perturbed head map is not zero
    assert model.embedding.ordinal is not None and model.head.ordinal.abs().sum() > 0
    r = export_onnx(ckpt, tmp_path / "m.onnx", verify_steps=512)
    assert r["tokens_identical"] and r["max_logit_diff"] <= 1e-3


def test_a_bad_value_is_refused_in_one_line(tmp_path):
    r = ssmgen("train", tmp_path, "--set", "model.ordinal_input=maybe", "--max-steps", "1")
    assert r.returncode == 2
    assert "model.ordinal_input" in r.stderr and "Traceback" not in r.stderr
