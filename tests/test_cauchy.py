"""The compiled Cauchy sums (S4's kernel on CPU) against the plain PyTorch reference."""

import pytest
import torch

from ssmgen.backends import cauchy as cauchy_module
from ssmgen.backends.cauchy import (
    cauchy,
    cauchy_compiled,
    cauchy_ref,
    cauchy_transposed,
    cauchy_transposed_ref,
)


def inputs(H, T, N, J, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a away from b, as S4's nodes are (the real parts of a and -b have opposite signs)
    a = torch.complex(3 + torch.rand(H, T, generator=g, dtype=torch.float64),
                      torch.randn(H, T, generator=g, dtype=torch.float64)).to(dtype)
    b = torch.complex(-torch.rand(T, N, generator=g, dtype=torch.float64),
                      4 * torch.randn(T, N, generator=g, dtype=torch.float64)).to(dtype)
    c = torch.randn(H, J, N, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (a, b, c)]


@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-13), (torch.complex64, 2e-6)])
@pytest.mark.parametrize("H,T,N,J", [(5, 17, 6, 4), (3, 64, 32, 9), (10, 3, 1, 1)])
def test_compiled_matches_reference_with_gradients(dtype, tol, H, T, N, J):
    a, b, c = inputs(H, T, N, J, dtype)
    w = torch.randn(H, T, J, dtype=dtype)
    fast, ref = cauchy_compiled(a, b, c), cauchy_ref(a, b, c)
    scale = ref.abs().max().item()
    torch.testing.assert_close(fast, ref, atol=tol * scale, rtol=0)
    g_fast = torch.autograd.grad((fast * w).real.sum(), (a, b, c))
    g_ref = torch.autograd.grad((ref * w).real.sum(), (a, b, c))
    for x, y in zip(g_fast, g_ref):
        torch.testing.assert_close(x, y, atol=tol * y.abs().max().item(), rtol=0)


def test_gradcheck():
    a, b, c = inputs(3, 7, 5, 4, torch.complex128)
    assert torch.autograd.gradcheck(cauchy_compiled, (a, b, c))


def test_cpu_dispatch_uses_the_compiled_sums():
    a, b, c = inputs(2, 8, 4, 4, torch.complex64)
    assert "CompiledCauchy" in type(cauchy(a, b, c).grad_fn).__name__


@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-13), (torch.complex64, 2e-6)])
@pytest.mark.parametrize("H,T,N,J", [(5, 17, 6, 4), (3, 64, 32, 9), (2, 4096, 32, 3)])
def test_transposed_compiled_matches_reference(dtype, tol, H, T, N, J, monkeypatch):
    """Sums over the nodes (S4's final state after a chunk): the compiled kernel, taken without
    gradients, against the PyTorch reference; long T too (float64 accumulation)."""
    a, b, _ = inputs(H, T, N, J, dtype)
    w = torch.randn(H, T, J, dtype=dtype)
    calls = []
    compiled = cauchy_module._transposed
    monkeypatch.setattr(cauchy_module, "_transposed", lambda *x: calls.append(1) or compiled(*x))
    with torch.no_grad():
        fast, ref = cauchy_transposed(a, b, w), cauchy_transposed_ref(a, b, w)
    assert calls, "without gradients the compiled kernel runs"
    assert fast.shape == (H, J, N)
    torch.testing.assert_close(fast, ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_transposed_with_gradients_is_the_differentiable_reference():
    a, b, _ = inputs(3, 9, 5, 2, torch.complex128)
    w = torch.randn(3, 9, 2, dtype=torch.complex128, requires_grad=True)
    out = cauchy_transposed(a, b, w)
    ga = torch.autograd.grad(out.real.sum(), (a, b, w))
    gr = torch.autograd.grad(cauchy_transposed_ref(a, b, w).real.sum(), (a, b, w))
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y)
