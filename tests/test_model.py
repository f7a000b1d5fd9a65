"""The SaShiMi model: exact sizes, and the three modes agreeing for every backend."""

import math

import numpy as np
import pytest
import torch

from helpers import BACKENDS, DEVICES, perturb, require_backend
from ssmgen.config import load_config
from ssmgen.model import SaShiMi, count_parameters, tier_schedule


@pytest.mark.parametrize("preset,expected", [("ablated", 1_289_600), ("sashimi", 4_072_448)])
def test_paper_parameter_counts_with_s4(preset, expected):
    require_backend("s4")
    paper = SaShiMi(load_config(preset, backend="s4", recipe="paper").model)
    assert count_parameters(paper) == expected
    # the cpu recipe trains the same model with the ordinal maps (18 features into 64 channels
    # at the input; 18 x (64 + 1) at the head), which fold into its table and head
    cpu = SaShiMi(load_config(preset, backend="s4", recipe="cpu").model)
    assert count_parameters(cpu) == expected + 18 * 64 + 18 * 65
    assert count_parameters(cpu, folded=True) == expected


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("preset", ["tiny", "ablated", "sashimi"])
def test_every_preset_builds_with_every_backend(preset, name):
    require_backend(name)
    model = SaShiMi(load_config(preset, backend=name).model)
    logits = model(torch.randint(0, 256, (1, 32)))
    assert logits.shape == (1, 32, 256) and torch.isfinite(logits).all()


def tiny(name, dtype=torch.float32, pool=None):
    require_backend(name)
    torch.manual_seed(0)
    extra = [f"model.pool={pool}", f"train.sample_len={96 * math.prod(pool)}"] if pool else []
    cfg = load_config("tiny", backend=name, overrides=["model.n_layers=2", *extra]).model
    return perturb(SaShiMi(cfg), scale=0.05).to(dtype).eval()


def step_all(model, tokens, state):
    out = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, 1), state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("length", [16 * 3 + 7, 16 * 4 + 2])  # > 2 periods, not multiples of 4
def test_parallel_equals_step(name, length, device):
    model = tiny(name).to(device)
    tokens = torch.randint(0, 256, (2, length)).to(device)
    with torch.no_grad():
        parallel = model(tokens)
        stepped, _ = step_all(model, tokens, model.initial_state(2))
    assert (parallel - stepped).abs().max().item() <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_prompt_read_in_parallel_then_step_equals_stepping(name, device):
    model = tiny(name).to(device)  # initial_state follows the model's device
    tokens = torch.randint(0, 256, (2, 16 * 4 + 5)).to(device)
    with torch.no_grad():
        ref, ref_state = step_all(model, tokens, model.initial_state(2))
        for cut in (37, 48, 3):  # odd, frame-aligned, shorter than a frame
            head, state = model.forward_with_state(tokens[:, :cut], model.initial_state(2))
            tail, state = step_all(model, tokens[:, cut:], state)
            assert (torch.cat([head, tail], 1) - ref).abs().max().item() <= 1e-4
            assert state.t == ref_state.t and state.names() == ref_state.names()
            for k in ref_state.tensors:
                assert (state.tensors[k] - ref_state.tensors[k]).abs().max().item() <= 1e-4, k
        # two parallel chunks with the carried state, the second starting off a frame boundary
        a, s = model.forward_with_state(tokens[:, :21], model.initial_state(2))
        b, s = model.forward_with_state(tokens[:, 21:], s)
        assert (torch.cat([a, b], 1) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", BACKENDS)
def test_prompt_read_without_logits_gives_the_same_state(name):
    """logits=False skips the finest tier's last block outputs and FF: the state must not move."""
    model = tiny(name)
    tokens = torch.randint(0, 256, (2, 16 * 4 + 5))
    with torch.no_grad():
        _, ref = model.forward_with_state(tokens, model.initial_state(2))
        none, fast = model.forward_with_state(tokens, model.initial_state(2), logits=False)
        _, s1 = model.forward_with_state(tokens[:, :21], model.initial_state(2))  # off a frame
        _, ref2 = model.forward_with_state(tokens[:, 21:], s1)
        _, fast2 = model.forward_with_state(tokens[:, 21:], s1, logits=False)
    assert none is None
    for a, b in ((ref, fast), (ref2, fast2)):
        assert a.t == b.t and a.names() == b.names()
        for k in a.tensors:
            assert (a.tensors[k] - b.tensors[k]).abs().max().item() <= 1e-5, k


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("t", [3, 4, 15, 16, 31])
def test_causal_at_frame_boundaries(name, t):
    model = tiny(name, torch.float64)
    tokens = torch.randint(0, 256, (1, 48))
    changed = tokens.clone()
    changed[0, t] = (changed[0, t] + 77) % 256
    with torch.no_grad():
        d = (model(changed) - model(tokens)).abs().amax(-1)[0]
    assert d[:t].max().item() < 1e-10 if t else True
    assert d[t].item() > 0


def test_state_names_are_stable_and_complete():
    model = tiny("s4d")
    state = model.initial_state(3)
    assert state.names() == model.state_names()
    assert {"down0", "down1", "up0", "up1", "center.0.re", "tier0.1.im"} <= set(state.names())
    assert all(v.shape[0] == 3 and not v.is_complex() for v in state.tensors.values())


# --- the tier schedule ----------------------------------------------------------------------------

@pytest.mark.parametrize("pool", [[4, 4], [2, 3, 4], [1, 4], [4], [3, 1, 2]])
def test_tier_schedule_is_the_definition(pool):
    """Against a simulation from the definition: tier i runs at step t iff (t + 1) is a multiple of
    P_0 ... P_(i-1); each pool counts the inputs it holds and empties when it pools."""
    frame = math.prod(pool)
    held = [0] * len(pool)
    steps = np.arange(3 * frame + 5)
    table_top, table_pos = tier_schedule(pool, steps)  # numpy form: the cpu-fast table
    for t in steps.tolist():
        runs = [(t + 1) % math.prod(pool[:i]) == 0 for i in range(len(pool) + 1)]
        top, pos = tier_schedule(pool, t)
        assert isinstance(top, int) and all(isinstance(k, int) for k in pos)
        assert top == max(i for i, r in enumerate(runs) if r) and all(runs[:top + 1])
        for i in range(top + 1 if top < len(pool) else len(pool)):  # the pools written now
            assert pos[i] == held[i]  # the slot written is the count already held
            held[i] += 1
            assert (held[i] == pool[i]) == (i < top)  # full exactly when the next tier runs
            held[i] %= pool[i]
        assert table_top[t] == top and [p[t] for p in table_pos] == pos
        t_top, t_pos = tier_schedule(pool, torch.tensor(t))  # tensor form: the single-step graph
        assert int(t_top) == top and [int(k) for k in t_pos] == pos


def test_schedule_table_rows_are_the_schedule():
    model = tiny("s4d")
    table = model.schedule_table(13, 40)
    assert table.dtype == np.int64 and table.shape == (40, 1 + len(model.cfg.pool))
    for s, row in enumerate(table):
        top, pos = model.schedule(13 + s)
        assert row.tolist() == [top, *pos]


@pytest.mark.parametrize("pool", [[2, 3], [4, 2, 2]])
def test_other_pools_parallel_step_and_prompt_read_agree(pool):
    model = tiny("s4d", pool=pool)
    F = model.frame
    tokens = torch.randint(0, 256, (2, 4 * F + 3))
    with torch.no_grad():
        parallel = model(tokens)
        stepped, ref_state = step_all(model, tokens, model.initial_state(2))
        assert (parallel - stepped).abs().max().item() <= 1e-4
        for cut in (F + 1, 2 * F):
            head, state = model.forward_with_state(tokens[:, :cut], model.initial_state(2))
            tail, state = step_all(model, tokens[:, cut:], state)
            assert (torch.cat([head, tail], 1) - stepped).abs().max().item() <= 1e-4
            for k in ref_state.tensors:
                assert (state.tensors[k] - ref_state.tensors[k]).abs().max().item() <= 1e-4, k


def test_restart_rows_resets_only_those_rows_and_cuts_the_graph():
    model = tiny("s4d").train()
    tokens = torch.randint(0, 256, (3, 48))
    _, state = model.forward_with_state(tokens, model.initial_state(3))
    assert any(v.requires_grad for v in state.tensors.values())
    rows = torch.tensor([False, True, False])
    got = model.restart_rows(state, rows)
    first = model.initial_state(3)
    assert got.t == state.t and got.names() == state.names()
    for n, v in got.tensors.items():
        assert not v.requires_grad
        assert torch.equal(v[1], first.tensors[n][1]), n
        assert torch.equal(v[[0, 2]], state.tensors[n][[0, 2]].detach()), n
    assert any(state.tensors[n][1].abs().sum() > 0 for n in state.names())


@pytest.mark.parametrize("name", BACKENDS)
def test_training_read_from_a_state_is_the_prompt_read_with_its_state_detached(name):
    """model(tokens, state), how training with carried states reads a crop (each layer's
    `read_carried`, S4's own path at the training length): forward_with_state's logits and
    gradients, and its state without the graph."""
    model = tiny(name, dtype=torch.float64).train()
    L = model.cfg.seq_len
    tokens = torch.randint(0, 256, (2, 2 * L))
    with torch.no_grad():
        _, start = model.forward_with_state(tokens[:, :L], model.initial_state(2))
    w = torch.randn(2, L, 256, dtype=torch.float64)
    got = []
    for read in (model, model.forward_with_state):
        logits, state = read(tokens[:, L:], start)
        grads = torch.autograd.grad((logits * w).sum(), list(model.parameters()))
        got.append((logits.detach(), state, grads))
    (a, sa, ga), (b, sb, gb) = got
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert sa.t == sb.t and sa.names() == sb.names()
    for n in sa.names():
        assert not sa.tensors[n].requires_grad, n
        torch.testing.assert_close(sa.tensors[n], sb.tensors[n].detach(), atol=1e-9, rtol=1e-7)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-7)
