"""S4D beside its slow, obvious references: naive Vandermonde tables and the explicit recurrence."""

import pytest
import torch

from helpers import perturb
from ssmgen.backends.fftconv import causal_conv
from ssmgen.backends.s4d import S4D, vandermonde, vandermonde_naive, vandermonde_transposed


@pytest.fixture(autouse=True)
def float64():
    """References are compared in float64; restore the default for the other test files."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def layer(H=3, N=8, init="lin", seed=0):
    torch.manual_seed(seed)
    return perturb(S4D(H, d_state=N, init=init), scale=0.2, seed=seed).double()


def recurrence(m: S4D, u: torch.Tensor, s0=None):
    """x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C x_t) + D u_t, one step at a time, complex128."""
    dtA, dB, C = m.discrete()
    dA = torch.exp(dtA)
    s = torch.zeros(u.shape[0], *dA.shape, dtype=torch.complex128) if s0 is None else s0
    ys = []
    for t in range(u.shape[1]):
        s = dA * s + dB * u[:, t].unsqueeze(-1)
        ys.append(2 * (C * s).real.sum(-1) + m.D * u[:, t])
    return torch.stack(ys, 1), s


@pytest.mark.parametrize("L,offset", [(1, 0), (37, 0), (300, 1), (1000, 3)])
def test_vandermonde_matches_the_naive_table(L, offset):
    g = torch.Generator().manual_seed(1)
    log_z = torch.complex(-torch.rand(4, 6, generator=g), 3 * torch.randn(4, 6, generator=g))
    coef = torch.randn(2, 4, 6, dtype=torch.complex128, generator=g)
    torch.testing.assert_close(vandermonde(coef, log_z, L, offset),
                               vandermonde_naive(coef, log_z, L, offset), rtol=1e-10, atol=1e-10)
    u = torch.randn(2, 4, L, generator=g)
    l = torch.arange(L, dtype=torch.float64)
    naive = (u.unsqueeze(-1) * torch.exp(log_z.unsqueeze(-2) * l.unsqueeze(-1))).sum(-2)
    torch.testing.assert_close(vandermonde_transposed(u, log_z), naive, rtol=1e-10, atol=1e-10)


def test_causal_conv_is_the_direct_sum():
    u, k = torch.randn(2, 50), torch.randn(2, 50)
    direct = torch.stack([(k[:, : t + 1].flip(-1) * u[:, : t + 1]).sum(-1) for t in range(50)], -1)
    torch.testing.assert_close(causal_conv(u, k), direct)


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_parallel_and_state_handoff_match_the_recurrence(init):
    m = layer(init=init)
    u = torch.randn(2, 257, 3)
    ref, s_ref = recurrence(m, u)
    torch.testing.assert_close(m(u), ref, rtol=1e-9, atol=1e-9)
    # from a nonzero state: outputs (with the state's echo) and the final state
    s0 = torch.randn(2, 3, 4, dtype=torch.complex128)
    ref2, s_ref2 = recurrence(m, u, s0)
    y, (sr, si) = m.forward_with_state(u, (s0.real, s0.imag))
    torch.testing.assert_close(y, ref2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.complex(sr, si), s_ref2, rtol=1e-9, atol=1e-9)


def test_gradients_match_the_recurrence_and_gradcheck():
    m = layer(H=2, N=4)
    u = torch.randn(1, 24, 2, requires_grad=True)
    (m(u) ** 2).sum().backward()
    fast = [p.grad.clone() for p in m.parameters()] + [u.grad.clone()]
    m.zero_grad()
    u.grad = None
    (recurrence(m, u)[0] ** 2).sum().backward()
    slow = [p.grad.clone() for p in m.parameters()] + [u.grad.clone()]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    s0 = (torch.randn(1, 2, 2, requires_grad=True), torch.randn(1, 2, 2, requires_grad=True))
    def run(x, a, b):
        y, (sr, si) = m.forward_with_state(x, (a, b))
        return y, sr, si

    assert torch.autograd.gradcheck(run,
                                    (torch.randn(1, 20, 2, requires_grad=True), *s0))


def test_stable_for_random_parameters():
    for seed in range(5):
        m = layer(H=8, N=16, seed=seed)
        dtA, _, _ = m.discrete()
        assert torch.exp(dtA).abs().max().item() < 1


def test_prompt_sized_kernel_is_float32_accurate():
    torch.set_default_dtype(torch.float32)
    m = S4D(4, d_state=64)
    k32 = m.kernel(20000)
    k64 = m.double().kernel(20000)
    assert (k32.double() - k64).abs().max().item() < 1e-4
