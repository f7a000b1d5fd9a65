"""The LRU backend beside its slow, obvious reference (`lru_reference`: a Python loop over time in
complex128), and the contract every ssmgen backend keeps (base.SequenceBackend)."""

from __future__ import annotations

import math
from importlib.metadata import entry_points

import pytest
import torch

from ssmgen import backends
from ssmgen.errors import UserError
from ssmgen.testing import check_backend, perturb, step_through
from ssmgen_lru import LRU, lru_reference

# Tiny ops on 2 shared cores: a thread pool per op costs more than it saves.
torch.set_num_threads(1)

H, N, B = 5, 6, 2


def make(dtype: torch.dtype = torch.float64, seed: int = 0, **options) -> LRU:
    torch.manual_seed(seed)
    options = {"d_state": N, **options}
    return perturb(LRU(H, **options), scale=0.2, seed=seed).to(dtype).eval()


def test_the_contract_every_ssmgen_backend_keeps():
    """ssmgen.testing.check_backend: the checks ssmgen's built-ins pass too."""
    check_backend(lambda dtype: make(dtype))


def as_complex(state) -> torch.Tensor:
    return torch.complex(*state)


# --- registration and options ---------------------------------------------------------------------

def test_registered_through_the_entry_point():
    eps = {ep.name: ep for ep in entry_points(group="ssmgen.backends")}
    assert eps["lru"].load() is LRU
    assert "lru" in backends.available() and backends.get("lru") is LRU
    layer = backends.create("lru", 8, d_state=4, r_min=0.5)
    assert isinstance(layer, LRU) and layer.d_state == 4 and layer.r_min == 0.5


@pytest.mark.parametrize("options,message", [
    ({"d_state": 0}, "d_state"), ({"r_min": 0.99, "r_max": 0.9}, "r_min <= r_max"),
    ({"r_max": 1.0}, "r_max < 1"), ({"r_min": 0.0, "r_max": 0.0}, "r_max > 0"),
    ({"max_phase": 0.0}, "max_phase")])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LRU(4, **options)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="backend 'lru': bad options"):
        backends.create("lru", 4, dt_min=0.1)


# --- initialization -------------------------------------------------------------------------------

def test_ring_initialization_and_normalization():
    torch.manual_seed(0)
    r_min, r_max, max_phase = 0.4, 0.99, 1.5
    m = LRU(3, d_state=20000, r_min=r_min, r_max=r_max, max_phase=max_phase)
    with torch.no_grad():
        log_r, theta = m.log_lambda()
        r = torch.exp(log_r.double())
        gamma = torch.exp(m.gamma_log.double())
    assert r.min() >= r_min - 1e-6 and r.max() <= r_max + 1e-6
    assert theta.min() > 0 and theta.max() <= max_phase * (1 + 1e-6)
    torch.testing.assert_close(gamma, torch.sqrt(1 - r ** 2), rtol=1e-5, atol=0)
    # |Lambda|^2 and the phase are uniform: their means and the quartiles of |Lambda|^2
    r2 = (r ** 2 - r_min ** 2) / (r_max ** 2 - r_min ** 2)
    assert abs(r2.mean().item() - 0.5) < 0.01 and abs(theta.mean().item() - max_phase / 2) < 0.02
    q = torch.quantile(r2, torch.tensor([0.25, 0.75], dtype=r2.dtype))
    torch.testing.assert_close(q, torch.tensor([0.25, 0.75], dtype=r2.dtype), atol=0.015, rtol=0)


def test_defaults_suit_16khz_audio():
    m = LRU(8)
    assert (m.d_state, m.r_min, m.r_max, m.max_phase) == (64, 0.9, 0.999, math.pi)
    assert [p is q for p, q in zip(m.ssm_parameters(), (m.nu_log, m.theta_log, m.gamma_log))] \
        == [True] * 3
    assert not any(p.is_complex() for p in m.parameters())  # ONNX export refuses complex ones


def test_a_white_input_keeps_unit_variance_in_every_mode():
    # what gamma is for: Var(x) = gamma^2 |B u|^2 / (1 - r^2) = |B u|^2, even for r near 1
    torch.manual_seed(0)
    m = LRU(1, d_state=4, r_min=0.99, r_max=0.999).double()
    with torch.no_grad():
        m.B_re.fill_(1.0)
        m.B_im.zero_()
        s = m.states(torch.randn(64, 20000, 1, dtype=torch.float64))[:, 10000:]
    var = (s.abs() ** 2).mean((0, 1))
    torch.testing.assert_close(var, torch.ones_like(var), rtol=0.1, atol=0)


# --- the three modes beside the reference ---------------------------------------------------------

@pytest.mark.parametrize("L", [1, 2, 37, 300, 1000])
def test_parallel_matches_the_reference(L):
    m = make()
    u = torch.randn(B, L, H, dtype=torch.float64)
    ref, s_ref = lru_reference(m, u)
    with torch.no_grad():
        torch.testing.assert_close(m(u), ref, rtol=1e-9, atol=1e-9)
        _, state = m.forward_with_state(u, m.initial_state(B))
    torch.testing.assert_close(as_complex(state), s_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("L", [1, 257])
def test_forward_with_state_from_a_nonzero_state_matches_the_reference(L):
    m = make()
    u = torch.randn(B, L, H, dtype=torch.float64)
    x0 = torch.randn(B, N, dtype=torch.complex128)
    ref, s_ref = lru_reference(m, u, x0)
    with torch.no_grad():
        y, state = m.forward_with_state(u, (x0.real, x0.imag))
        final = m.final_state(u, (x0.real, x0.imag))
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(as_complex(state), s_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(as_complex(final), s_ref, rtol=1e-9, atol=1e-9)


def test_step_matches_the_reference():
    m = make()
    u = torch.randn(B, 60, H, dtype=torch.float64)
    x0 = torch.randn(B, N, dtype=torch.complex128)
    ref, s_ref = lru_reference(m, u, x0)
    with torch.no_grad():
        y, state = step_through(m, u, (x0.real, x0.imag))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(as_complex(state), s_ref, rtol=1e-10, atol=1e-10)


def test_step_equals_parallel_in_float32_over_4096_samples():
    m = make(torch.float32, d_state=16)
    x = torch.randn(B, 4100, H)
    with torch.no_grad():
        y = m(x)
        ys, s_step = step_through(m, x, m.initial_state(B))
        _, s_par = m.forward_with_state(x, m.initial_state(B))
    assert (y - ys).abs().max().item() <= 1e-4
    for a, b in zip(s_par, s_step):
        assert (a - b).abs().max().item() <= 1e-4


def test_kernel_powers_are_exact_to_float32_rounding():
    # Lambda^k for k in the thousands is thousands of radians of phase: computed as k * theta in
    # float32 it would be off by ~1e-4 (rounding of the product); the layer computes it in float64
    m = make(torch.float32, d_state=16, r_min=0.9995, r_max=0.9999)
    with torch.no_grad():
        got = m.powers(4096, offset=5)
        lam = torch.exp(torch.complex(-torch.exp(m.nu_log.double()),
                                      torch.exp(m.theta_log.double())))
        want = lam ** torch.arange(5, 4101, dtype=torch.float64).unsqueeze(-1)
    assert got.dtype == torch.complex64
    assert (got.to(torch.complex128) - want).abs().max().item() <= 1e-6


def test_gradients_match_the_reference():
    m = make()
    u = torch.randn(B, 40, H, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(B, N, dtype=torch.complex128)

    def grads(run):
        m.zero_grad()
        u.grad = None
        y = run()
        (y ** 2).sum().backward()
        return [p.grad.clone() for p in m.parameters()] + [u.grad.clone()]

    for start in (None, x0):
        if start is None:
            fast = grads(lambda: m(u))
        else:
            fast = grads(lambda: m.forward_with_state(u, (x0.real, x0.imag))[0])
        slow = grads(lambda: lru_reference(m, u, start)[0])
        for (name, _), a, b in zip([*m.named_parameters(), ("u", None)], fast, slow):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


def test_gradcheck_of_the_state_handoff():
    m = make(d_state=3)
    u = torch.randn(1, 9, H, dtype=torch.float64, requires_grad=True)
    sr = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    si = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    def run(u, a, b):
        y, (nr, ni) = m.forward_with_state(u, (a, b))
        return y, nr, ni

    assert torch.autograd.gradcheck(run, (u, sr, si))


# --- the backend contract -------------------------------------------------------------------------

def test_chunks_handoff_and_state_after_a_chunk_equals_the_stepped_state():
    m = make()
    x = torch.randn(B, 301, H, dtype=torch.float64)
    with torch.no_grad():
        y_full = m(x)
        y1, s1 = m.forward_with_state(x[:, :123], m.initial_state(B))
        y2, s2 = m.forward_with_state(x[:, 123:], s1)
        ys, s_step = step_through(m, x, m.initial_state(B))
        y_tail, _ = step_through(m, x[:, 123:], s1)  # prompt in parallel, then step
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(y_tail, ys[:, 123:], atol=1e-9, rtol=1e-7)
    for a, b in zip(s2, s_step):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert [s.dtype for s in s2] == [torch.float64] * 2 and len(m.state_names()) == len(s2)


def test_causal():
    m = make()
    x = torch.randn(1, 96, H, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 50] += 1.0
    with torch.no_grad():
        d = (m(x2) - m(x)).abs().amax(-1)[0]
    assert d[:50].max().item() < 1e-12 and d[50].item() > 0


def test_caches_are_never_stale():
    m = make(torch.float32)
    x = torch.randn(B, 40, H)
    with torch.no_grad():
        y0, p0 = m(x), m.step(x[:, 0], m.initial_state(B))[0]
        torch.testing.assert_close(m(x), y0)  # the kernel's FFT is cached: same result
        for p in m.ssm_parameters():
            p.mul_(1.3)
        y1, p1 = m(x), m.step(x[:, 0], m.initial_state(B))[0]
        fresh = LRU(H, d_state=N)
        fresh.load_state_dict(m.state_dict())
        p2 = fresh.eval().step(x[:, 0], fresh.initial_state(B))[0]
    assert not torch.allclose(y0, y1) and not torch.allclose(p0, p1)
    torch.testing.assert_close(y1, m(x).detach())  # with autograd: computed afresh
    torch.testing.assert_close(p1, p2)


def test_state_is_real_float_tensors():
    m = make(torch.float32)
    state = m.initial_state(3)
    assert m.state_names() == ["re", "im"]
    assert all(s.dtype == torch.float32 and s.shape == (3, N) for s in state)


# --- inside the SaShiMi model, through ssmgen's public API ----------------------------------------

def test_sashimi_reads_a_prompt_in_parallel_as_stepping_through_it():
    from ssmgen.config import load_config
    from ssmgen.model import SaShiMi

    torch.manual_seed(0)
    model = perturb(SaShiMi(load_config("tiny", backend="lru").model), scale=0.05).eval()
    tokens = torch.randint(0, 256, (2, 16 * 9 + 5))
    with torch.no_grad():
        logits, state = model.forward_with_state(tokens, model.initial_state(2))
        ref_state, ref_logits = model.initial_state(2), []
        for t in range(tokens.shape[1]):
            out, ref_state = model.step(tokens[:, t], ref_state)
            ref_logits.append(out)
    assert (logits - torch.stack(ref_logits, 1)).abs().max().item() <= 1e-4
    assert state.names() == ref_state.names()
    for name in state.names():
        assert (state.tensors[name] - ref_state.tensors[name]).abs().max().item() <= 1e-4, name


def test_step_preparation_can_become_graph_constants():
    # `ssmgen export` computes step_cache() under no_grad and traces step() with the result as
    # constants: no entry may require grad (a view of a parameter would, even under no_grad)
    m = make(torch.float32)
    with torch.no_grad():
        prepared = m.step_cache()
    assert all(not t.requires_grad and t.is_contiguous() for t in prepared)
