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
        assert len(layer._step_caches) == 3  # one kernel per length while the weights stand
        layer.log_dt.add_(0.1)
        layer(torch.randn(1, 8, H))
    assert list(layer._step_caches) == ["kernel:8"]  # the three old kernels are gone
