"""Properties every sequence backend must have (parametrized over the built-ins).

Backend-specific references (S4's dense powers, Mamba's Python-loop scan, gradchecks) live in
tests/test_backend_<name>.py; this file checks the shared contract of base.SequenceBackend.
"""

import pytest
import torch

from helpers import BACKENDS, DEVICES, perturb, require_backend, step_through
from ssmgen import backends

H, B = 6, 2


def make(name, dtype=torch.float32, seed=0):
    require_backend(name)
    torch.manual_seed(seed)
    layer = backends.create(name, H, d_state=16)
    return perturb(layer, seed=seed).to(dtype).eval()


@pytest.mark.parametrize("name", BACKENDS)
def test_the_importable_contract_holds_for_every_builtin(name):
    """ssmgen.testing.check_backend, the checks a plug-in's tests run too."""
    from ssmgen.testing import check_backend
    check_backend(lambda dtype: make(name, dtype))


def test_the_contract_catches_a_broken_backend():
    from ssmgen.backends.s4d import S4D
    from ssmgen.testing import check_backend

    class Leaky(S4D):  # its prompt read forgets the state it starts from
        def forward_with_state(self, x, state):
            return super().forward_with_state(x, self.initial_state(x.shape[0], x.device, x.dtype))

    with pytest.raises(AssertionError, match="two chunks"):
        check_backend(lambda dtype: perturb(Leaky(H, d_state=16)).to(dtype))


def test_registry_lists_builtins_through_entry_points():
    from importlib.metadata import entry_points
    names = {ep.name for ep in entry_points(group="ssmgen.backends")}
    assert {"s4", "s4d", "mamba"} <= names
    assert {"s4", "s4d", "mamba"} <= set(backends.available())


def test_registry_accepts_a_plugin_and_rejects_unknown_names():
    from ssmgen.backends.s4d import S4D
    from ssmgen.errors import UserError

    class Plugin(S4D):
        pass

    backends.register("plugin-test", Plugin)
    assert isinstance(backends.create("plugin-test", 4, d_state=8), Plugin)
    with pytest.raises(UserError, match="unknown backend 'nope'"):
        backends.create("nope", 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_parallel_equals_step_over_4096_samples(name, device):
    layer = make(name).to(device)
    x = torch.randn(B, 4100, H).to(device)
    with torch.no_grad():
        y = layer(x)
        ys, _ = step_through(layer, x, layer.initial_state(B))
    assert (y - ys).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", BACKENDS)
def test_final_state_equals_the_state_of_forward_with_state(name):
    layer = make(name, torch.float64)
    x = torch.randn(B, 301, H, dtype=torch.float64)
    s0 = tuple(0.3 * torch.randn_like(t) for t in layer.initial_state(B, dtype=torch.float64))
    with torch.no_grad():
        for start in (layer.initial_state(B, dtype=torch.float64), s0):
            _, want = layer.forward_with_state(x, start)
            got = layer.final_state(x, start)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_prefix_handoff_and_chunks(name, device):
    layer = make(name, torch.float64).to(device)  # initial_state follows the layer's device
    x = torch.randn(B, 301, H, dtype=torch.float64).to(device)
    with torch.no_grad():
        y_full = layer(x)
        y1, s1 = layer.forward_with_state(x[:, :123], layer.initial_state(B, dtype=torch.float64))
        y2, s2 = layer.forward_with_state(x[:, 123:], s1)
        ys, s_step = step_through(layer, x, layer.initial_state(B, dtype=torch.float64))
        # prompt in parallel, then step: equals stepping from the start
        y_tail, _ = step_through(layer, x[:, 123:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(y_tail, ys[:, 123:], atol=1e-9, rtol=1e-7)
    for a, b in zip(s2, s_step):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert [s.dtype for s in s2] == [torch.float64] * len(s2)
    assert len(layer.state_names()) == len(s2)


@pytest.mark.parametrize("name", BACKENDS)
def test_causal(name):
    layer = make(name, torch.float64)  # float64: FFT rounding (1e-16) is far below any real leak
    x = torch.randn(1, 96, H, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 50] += 1.0
    with torch.no_grad():
        d = (layer(x2) - layer(x)).abs().amax(-1)[0]
    assert d[:50].max().item() < 1e-12
    assert d[50].item() > 0


@pytest.mark.parametrize("name", BACKENDS)
def test_step_cache_is_never_stale(name):
    layer = make(name)
    x = torch.randn(B, H)
    with torch.no_grad():
        y0, _ = layer.step(x, layer.initial_state(B))
        for p in layer.ssm_parameters() or list(layer.parameters()):
            p.mul_(1.5)
        y1, _ = layer.step(x, layer.initial_state(B))
        fresh = backends.create(name, H, d_state=16)
        fresh.load_state_dict(layer.state_dict())
        y2, _ = fresh.eval().step(x, fresh.initial_state(B))
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, y2)


@pytest.mark.parametrize("name", BACKENDS)
def test_parallel_mode_without_grad_is_never_stale(name):
    # convolution backends keep their kernel between no-grad calls: it must follow the weights
    layer = make(name)
    x = torch.randn(B, 40, H)
    with torch.no_grad():
        y0 = layer(x)
        torch.testing.assert_close(layer(x), y0)  # cached: same result
        for p in layer.ssm_parameters() or list(layer.parameters()):
            p.mul_(1.3)
        y1 = layer(x)
    y2 = layer(x)  # with autograd: computed afresh
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, y2.detach())


@pytest.mark.parametrize("name", BACKENDS)
def test_state_is_real_float_tensors(name):
    layer = make(name)
    for s in layer.initial_state(3):
        assert s.dtype == torch.float32 and not s.is_complex() and s.shape[0] == 3


def test_kernel_cache_drops_entries_of_old_parameters():
    layer = make("s4d")
    with torch.no_grad():
        for L in (16, 24, 40):
            layer(torch.randn(1, L, H))
        assert len(layer._step_caches.slots) == 3  # one kernel per length while the weights stand
        layer.log_dt.add_(0.1)
        layer(torch.randn(1, 8, H))
    assert list(layer._step_caches.slots) == ["kernel:8"]  # the three old kernels are gone


# --- the fast-step contract (what the cpu-fast engine packs) --------------------------------------

def layout_step(kind: str, k: dict, x: torch.Tensor, state):
    """One step from a `fast_step()` dict by the formula its layout states (FAST_LAYOUTS[kind].doc),
    written out in plain torch: what the cpu-fast kernel of `kind` computes, as a reference."""
    if kind == "s4d":  # s' = dA s + dB u, y = Re(2C s') + D u
        dA = torch.complex(k["dA_re"], k["dA_im"])
        s = dA * torch.complex(*state) + torch.complex(k["dB_re"], k["dB_im"]) * x.unsqueeze(-1)
        y = (torch.complex(k["C2_re"], k["C2_im"]) * s).real.sum(-1) + k["D"] * x
        return y, (s.real, s.imag)
    if kind == "s4":  # the Woodbury step of the layout's doc
        c = lambda n: torch.complex(k[n + "_re"], k[n + "_im"])  # noqa: E731
        P, G, GP = c("P"), c("G"), c("GP")  # (R, N2), (H, N2), (H, R, N2)
        s = torch.complex(*state)  # (B, H, N2)
        a = 2 * torch.einsum("rn,bhn->bhr", P.conj(), s).real
        w = c("E") * s - torch.einsum("bhr,rn->bhn", a.to(s.dtype), P) + c("B2") * x.unsqueeze(-1)
        v = G * w
        cv = 2 * torch.einsum("rn,bhn->bhr", P.conj(), v).real
        coef = torch.einsum("hrq,bhq->bhr", k["Sinv"], cv)
        s = v - torch.einsum("bhr,hrn->bhn", coef.to(v.dtype), GP)
        return (c("C2") * s).real.sum(-1) + k["D"] * x, (s.real, s.imag)
    if kind == "mamba":
        conv, h = state
        E, K = k["conv_w"].shape
        N = k["A"].shape[1]
        xz = x @ k["in_proj_w"] + k["in_proj_b"]
        xi, z = xz[:, :E], xz[:, E:]
        window = torch.cat([conv, xi.unsqueeze(-1)], -1)  # the newest input last
        xc = torch.nn.functional.silu((window * k["conv_w"]).sum(-1) + k["conv_b"])
        dbc = xc @ k["x_proj_w"] + k["x_proj_b"]
        R = dbc.shape[1] - 2 * N
        dt = torch.nn.functional.softplus(dbc[:, :R] @ k["dt_proj_w"] + k["dt_proj_b"])
        Bv, Cv = dbc[:, R:R + N], dbc[:, R + N:]
        h = torch.exp(dt.unsqueeze(-1) * k["A"]) * h + (dt * xc).unsqueeze(-1) * Bv.unsqueeze(1)
        y = ((h * Cv.unsqueeze(1)).sum(-1) + k["D"] * xc) * torch.nn.functional.silu(z)
        return y @ k["out_proj_w"] + k["out_proj_b"], (window[..., 1:], h)
    raise AssertionError(kind)


@pytest.mark.parametrize("name", BACKENDS)
def test_fast_step_follows_its_layout_and_is_the_step(name):
    from ssmgen.backends.base import FAST_LAYOUTS, check_fast_step

    layer = make(name, torch.float64)
    kind = layer.fast_kind
    assert kind in FAST_LAYOUTS
    with torch.no_grad():
        k = layer.fast_step()
        dims = check_fast_step(kind, k, H)
        assert dims["H"] == H and set(dims) == {"H", *FAST_LAYOUTS[kind].dims}
        assert list(k) == FAST_LAYOUTS[kind].names()  # packing order
        x = torch.randn(B, 5, H, dtype=torch.float64)
        s = s_ref = tuple(0.3 * torch.randn_like(t)
                          for t in layer.initial_state(B, dtype=torch.float64))
        for t in range(x.shape[1]):
            y, s = layer.step(x[:, t], s)
            y_ref, s_ref = layout_step(kind, k, x[:, t], s_ref)
            torch.testing.assert_close(y_ref, y, atol=1e-10, rtol=1e-9)
        for a, b in zip(s_ref, s):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
        for p in layer.ssm_parameters() or list(layer.parameters()):  # never stale
            p.mul_(1.2)
        k2 = layer.fast_step()
    assert any(not torch.equal(k[n], k2[n]) for n in k)


def test_check_fast_step_names_the_wrong_field():
    from ssmgen.backends.base import check_fast_step

    layer = make("s4d")
    with torch.no_grad():
        k = dict(layer.fast_step())
    with pytest.raises(ValueError, match="lacks 'D'"):
        check_fast_step("s4d", {n: v for n, v in k.items() if n != "D"}, H)
    with pytest.raises(ValueError, match="unknown field 'E'"):
        check_fast_step("s4d", {**k, "E": k["D"]}, H)
    with pytest.raises(ValueError, match=r"'dB_im' has shape \(6, 7\)"):
        check_fast_step("s4d", {**k, "dB_im": torch.zeros(H, 7)}, H)
    with pytest.raises(ValueError, match=r"'dA_re' has shape \(6, 8\).*\(7, 8\)"):
        check_fast_step("s4d", k, H + 1)  # H is the layer's width
    with pytest.raises(ValueError, match="real float"):
        check_fast_step("s4d", {**k, "C2_re": torch.zeros(H, 8, dtype=torch.complex64)}, H)
