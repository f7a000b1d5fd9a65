"""Mamba backend: scans against the Python-loop reference, step/parallel/hand-off agreement,
numerical safety, and state_dict compatibility with mamba-ssm."""

import itertools

import pytest
import torch

from helpers import perturb, step_through
from ssmgen import backends
from ssmgen.backends.mamba import HAS_KERNELS, Mamba
from ssmgen.backends.selective_scan import (
    selective_scan_chunked,
    selective_scan_ref,
    selective_scan_sequential,
)
from ssmgen.backends.selective_scan_cpu import selective_scan_compiled

FAST = [selective_scan_chunked, selective_scan_sequential, selective_scan_compiled]
CHUNKED = (selective_scan_chunked, selective_scan_compiled)  # the scans with a `chunk` option
F64 = torch.float64


def make(d_model=8, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return perturb(Mamba(d_model, **kw), seed=seed).to(dtype).eval()


def scan_inputs(b=2, d=3, n=4, L=37, dt_scale=1.0, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    args = [r(b, d, L), torch.rand(b, d, L, generator=g, dtype=F64) * dt_scale + 1e-3,
            -torch.rand(d, n, generator=g, dtype=F64) * 4 - 0.1, r(b, n, L), r(b, n, L), r(d),
            r(b, d, L), r(b, d, n)]
    return [a.requires_grad_(grad) for a in args]


# --- scans ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", FAST)
@pytest.mark.parametrize("L,chunk", [(1, None), (5, 8), (37, 8), (64, 16), (200, None)])
def test_fast_scan_equals_reference(scan, L, chunk):
    u, dt, A, B, C, D, z, h0 = scan_inputs(L=L)
    kw = {"chunk": chunk} if scan in CHUNKED and chunk else {}
    for h in (None, h0):
        y0, s0 = selective_scan_ref(u, dt, A, B, C, D, z, h)
        y1, s1 = scan(u, dt, A, B, C, D, z, h, **kw)
        torch.testing.assert_close(y1, y0, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(s1, s0, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("scan", FAST)
def test_fast_scan_gradients_equal_reference(scan):
    inputs = scan_inputs(L=45, grad=True)
    kw = {"chunk": 8} if scan in CHUNKED else {}  # 6 chunks, the last one short
    g = torch.Generator().manual_seed(1)
    wy, ws = torch.randn(2, 3, 45, generator=g, dtype=F64), torch.randn(2, 3, 4, generator=g,
                                                                         dtype=F64)
    grads = []
    for f, k in ((selective_scan_ref, {}), (scan, kw)):
        y, s = f(*inputs, **k)
        grads.append(torch.autograd.grad((y * wy).sum() + (s * ws).sum(), inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("scan", CHUNKED)
def test_chunked_scan_gradcheck(scan):
    inputs = scan_inputs(b=1, d=2, n=3, L=11, grad=True)
    f = lambda *a: scan(*a, chunk=4)  # noqa: E731 (3 chunks, one padded)
    assert torch.autograd.gradcheck(f, inputs)


def test_compiled_scan_gradients_over_default_chunks_float32():
    # the training configuration: float32, several default-size chunks, no start state
    u, dt, A, B, C, D, z, _ = scan_inputs(b=2, d=5, n=16, L=300, grad=False)
    a32 = [t.float().requires_grad_() for t in (u, dt, A, B, C, D, z)]
    a64 = [t.detach().clone().requires_grad_() for t in (u, dt, A, B, C, D, z)]
    grads = []
    for f, args in ((selective_scan_ref, a64), (selective_scan_compiled, a32)):
        y, s = f(*args)
        grads.append(torch.autograd.grad(y.sin().sum() + s.sum(), args))
    for a, b in zip(*grads):
        torch.testing.assert_close(b.double(), a, atol=2e-4, rtol=1e-4)


def test_scan_is_safe_for_huge_steps_and_long_sequences():
    # dt * A sums reach ~ -1e6: any exp(-cumsum) trick overflows; the decays must just vanish.
    u, dt, A, B, C, D, z, h0 = scan_inputs(L=3000, dt_scale=300.0)
    y0, s0 = selective_scan_ref(u, dt, A, B, C, D, z, h0)
    for dtype, scan in itertools.product((F64, torch.float32), CHUNKED):
        a = [t.to(dtype) for t in (u, dt, A, B, C, D, z, h0)]
        y1, s1 = scan(*a, chunk=64)
        assert torch.isfinite(y1).all() and torch.isfinite(s1).all()
        tol = 1e-12 if dtype == F64 else 1e-3
        torch.testing.assert_close(y1.double(), y0, atol=tol, rtol=tol)
        torch.testing.assert_close(s1.double(), s0, atol=tol, rtol=tol)


# --- the layer ----------------------------------------------------------------------------------
def test_registered_and_shapes():
    layer = backends.create("mamba", 8, d_state=16)
    assert isinstance(layer, Mamba) and layer.has_output_projection
    x = torch.randn(2, 10, 8)
    assert layer(x).shape == (2, 10, 8)
    conv, ssm = layer.initial_state(2)
    assert conv.shape == (2, 16, 3) and ssm.shape == (2, 16, 16)
    assert layer.state_names() == ["conv", "ssm"]
    ids = {id(p) for p in layer.ssm_parameters()}
    assert ids == {id(layer.A_log), id(layer.D), id(layer.dt_proj.weight), id(layer.dt_proj.bias)}


def test_state_dict_matches_mamba_ssm():
    # mamba_simple.Mamba(d_model=16) defaults: d_inner 32, dt_rank 1, d_state 16, d_conv 4, no bias.
    expected = {
        "A_log": (32, 16), "D": (32,),
        "in_proj.weight": (64, 16),
        "conv1d.weight": (32, 1, 4), "conv1d.bias": (32,),
        "x_proj.weight": (33, 32),
        "dt_proj.weight": (32, 1), "dt_proj.bias": (32,),
        "out_proj.weight": (16, 32),
    }
    sd = Mamba(16).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_initialization_as_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, dt_min=0.001, dt_max=0.1)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_rank == 4 and m.dt_proj.weight.abs().max() <= 4 ** -0.5


def test_parallel_equals_step_over_4096_samples():
    layer = make(8)
    x = torch.randn(2, 4100, 8)
    with torch.no_grad():
        y = layer(x)
        ys, (conv, ssm) = step_through(layer, x, layer.initial_state(2))
        y2, (conv2, ssm2) = layer.forward_with_state(x, layer.initial_state(2))
    assert (y - ys).abs().max().item() <= 1e-4
    assert (y2 - ys).abs().max().item() <= 1e-4
    assert (ssm2 - ssm).abs().max().item() <= 1e-4
    torch.testing.assert_close(conv2, conv)


def test_sequential_scan_option_gives_same_layer_output():
    layer = make(8, F64)
    x = torch.randn(2, 300, 8, dtype=F64)
    with torch.no_grad():
        y = layer(x)
        layer.scan = "sequential"
        torch.testing.assert_close(layer(x), y, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("cuts", [(123,), (2,), (1, 3, 100), (77, 78, 250)])
def test_prefix_handoff_and_chunks(cuts):
    layer = make(8, F64)
    B = 2
    x = torch.randn(B, 301, 8, dtype=F64)
    with torch.no_grad():
        y_full = layer(x)
        ys, s_step = step_through(layer, x, layer.initial_state(B))
        state, parts, edges = layer.initial_state(B), [], (0, *cuts, 301)
        for a, b in zip(edges[:-1], edges[1:]):
            y, state = layer.forward_with_state(x[:, a:b], state)
            parts.append(y)
            # the state after a chunk equals the state after stepping through the same samples
            _, s_ref = step_through(layer, x[:, :b], layer.initial_state(B))
            for s, r in zip(state, s_ref):
                torch.testing.assert_close(s, r, atol=1e-10, rtol=1e-8)
        # prompt in parallel, then step: equals stepping from the start
        _, s1 = layer.forward_with_state(x[:, :cuts[0]], layer.initial_state(B))
        y_tail, _ = step_through(layer, x[:, cuts[0]:], s1)
    torch.testing.assert_close(torch.cat(parts, 1), y_full, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(y_tail, ys[:, cuts[0]:], atol=1e-10, rtol=1e-8)
    for a, b in zip(state, s_step):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
        assert a.dtype == F64


def test_step_does_not_mutate_its_state():
    layer = make(8)
    state = tuple(s + torch.randn_like(s) for s in layer.initial_state(2))
    copies = tuple(s.clone() for s in state)
    with torch.no_grad():
        layer.step(torch.randn(2, 8), state)
    for s, c in zip(state, copies):
        assert torch.equal(s, c)


@pytest.mark.parametrize("fast", ["chunked", "compiled", "auto"])
def test_layer_gradients_equal_reference_loop(fast, monkeypatch):
    import ssmgen.backends.mamba as mm
    monkeypatch.setitem(mm.SCANS, "ref", selective_scan_ref)
    layer = make(4, F64, d_state=4)
    x = torch.randn(2, 150, 4, dtype=F64, requires_grad=True)
    grads = []
    for scan in (fast, "ref"):
        layer.zero_grad()
        layer.scan = scan
        y = layer(x)
        (y * torch.linspace(-1, 1, 150, dtype=F64)[:, None]).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
        x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_huge_dt_layer_is_finite_and_matches_reference():
    layer = make(8, F64)
    with torch.no_grad():
        layer.dt_proj.bias.add_(10.0)  # dt ~ 10+: every exp(dt A) ~ 0
    x = torch.randn(1, 2000, 8, dtype=F64)
    with torch.no_grad():
        y = layer(x)
        ys, _ = step_through(layer, x[:, :300], layer.initial_state(1))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, :300], ys, atol=1e-10, rtol=1e-8)
    with torch.no_grad():
        y32 = make(8, seed=0).to(torch.float32)
        y32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
        assert torch.isfinite(y32(x.float())).all()


def test_transition_is_stable_for_random_parameters():
    for seed in range(3):
        layer = make(16, F64, seed=seed)
        x = torch.randn(2, 64, 16, dtype=F64)
        with torch.no_grad():
            xc = torch.nn.functional.silu(layer.conv1d(layer.in_proj(x).transpose(1, 2)
                                                       .chunk(2, 1)[0])[..., :64])
            dt, _, _ = layer._ssm_inputs(xc)
            delta = torch.nn.functional.softplus(dt + layer.dt_proj.bias.unsqueeze(-1))
            dA = torch.exp(delta.unsqueeze(-1) * -torch.exp(layer.A_log).unsqueeze(1))
        assert (delta > 0).all() and (dA.abs() < 1).all()


def test_causal():
    layer = make(8, F64)
    x = torch.randn(1, 96, 8, dtype=F64)
    x2 = x.clone()
    x2[:, 50] += 1.0
    with torch.no_grad():
        d = (layer(x2) - layer(x)).abs().amax(-1)[0]
    assert d[:50].max().item() == 0.0
    assert d[50:].max().item() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_KERNELS, reason="mamba_ssm / causal_conv1d not installed: the pure "
                                            "path is the only one")
def test_cuda_kernels_match_pure_path():
    layer = make(16).cuda()
    x = torch.randn(2, 1000, 16, device="cuda")
    with torch.no_grad():
        y_k = layer(x)
        y_k1, s_k1 = layer.forward_with_state(x[:, :300], layer.initial_state(2, "cuda"))
        y_k2, s_k2 = layer.forward_with_state(x[:, 300:], s_k1)
        y_ks, _ = step_through(layer, x[:, 300:340], s_k1)
        layer.use_kernels = False
        y_p = layer(x)
        y_p2, s_p2 = layer.forward_with_state(x[:, 300:], s_k1)
        y_ps, _ = step_through(layer, x[:, 300:340], s_k1)
    tol = dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(y_k, y_p, **tol)
    torch.testing.assert_close(torch.cat([y_k1, y_k2], 1), y_p, **tol)
    torch.testing.assert_close(y_k2, y_p2, **tol)
    torch.testing.assert_close(y_ks, y_ps, **tol)
    for a, b in zip(s_k2, s_p2):
        torch.testing.assert_close(a, b, **tol)
