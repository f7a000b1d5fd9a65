"""S4 (DPLR) backend: the fast Cauchy/Woodbury machinery against slow, obviously correct references.

The reference builds the dense continuous A = Lambda - P P^* over all 2*(N/2) complex modes (the
conjugate half explicit) straight from the parameters, discretizes it bilinearly in float64 and
takes explicit matrix powers / a plain recurrence. Parameters are perturbed away from the init.
"""

import pytest
import torch

from helpers import perturb, step_through
from ssmgen.backends.s4 import S4, hippo_legs_nplr

B = 2


def make(H=4, d_state=16, rank=1, dtype=torch.float64, seed=0, block=None, scale=0.1, l_max=None):
    torch.manual_seed(seed)
    layer = S4(H, d_state=d_state, rank=rank, l_max=l_max)
    layer = perturb(layer, scale=scale, seed=seed).to(dtype).eval()
    if block is not None:
        layer.block_size = block
    return layer


def dense(layer):
    """(dA (H, M, M), dB (H, M), C (H, M)) in complex128 over all M = 2*(N/2) modes. With l_max
    the parameter is C~ = C (I - dA^l_max): C comes from an explicit inverse and matrix power."""
    cplx = lambda p: torch.view_as_complex(p.to(torch.float64).contiguous())  # noqa: E731
    lam = torch.complex(-torch.exp(layer.log_A_real.double()), layer.A_imag.double())
    P, Bv, C = cplx(layer.P), cplx(layer.B), cplx(layer.C)
    dt = torch.exp(layer.log_dt.double())
    lam_f = torch.cat([lam, lam.conj()])
    P_f = torch.cat([P, P.conj()], -1)  # (R, M)
    A = torch.diag(lam_f) - P_f.T @ P_f.conj()
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    M1 = eye - dt[:, None, None] / 2 * A
    dA = torch.linalg.solve(M1, eye + dt[:, None, None] / 2 * A)
    dB = dt[:, None] * torch.linalg.solve(M1, torch.cat([Bv, Bv.conj()]).expand(len(dt), -1))
    C = torch.cat([C, C.conj()], -1)
    if layer.l_max is not None:
        C = (C.unsqueeze(1) @ torch.linalg.inv(eye - torch.linalg.matrix_power(dA, layer.l_max)))
        C = C.squeeze(1)
    return dA, dB, C


def dense_kernel(layer, L):
    dA, dB, C = dense(layer)
    ks, x = [], dB
    for _ in range(L):
        ks.append((C * x).sum(-1))
        x = (dA @ x.unsqueeze(-1)).squeeze(-1)
    k = torch.stack(ks, -1)
    assert k.imag.abs().max() < 1e-10
    return k.real


def naive_run(layer, x, state):
    """Plain recurrence x_t = dA x_(t-1) + dB u_t, y_t = C x_t + D u_t over the full modes."""
    dA, dB, C = dense(layer)
    s = torch.complex(*[t.double() for t in state])
    s = torch.cat([s, s.conj()], -1)
    ys = []
    for t in range(x.shape[1]):
        u = x[:, t].double()
        s = (dA @ s.unsqueeze(-1)).squeeze(-1) + dB * u.unsqueeze(-1)
        ys.append((C * s).sum(-1).real + layer.D.double() * u)
    n2 = s.shape[-1] // 2
    return torch.stack(ys, 1), (s[..., :n2].real, s[..., :n2].imag)


def rand_state(layer, batch=B, dtype=torch.float64, scale=0.3):
    return tuple(scale * torch.randn(t.shape, dtype=dtype) for t in layer.initial_state(batch))


# --- sizes and initialization --------------------------------------------------------------------

def test_parameter_count_and_groups():
    layer = S4(64)
    assert sum(p.numel() for p in layer.parameters()) == 66 * 64 + 192
    assert {id(p) for p in layer.ssm_parameters()} == {
        id(layer.log_A_real), id(layer.A_imag), id(layer.P), id(layer.B), id(layer.log_dt)}
    assert not layer.has_output_projection and layer.lr == 1e-3
    assert layer.C.shape == (64, 32, 2) and layer.P.shape == (1, 32, 2) and layer.B.shape == (32, 2)


def test_hippo_legs_nplr_reconstructs_legs():
    N = 64
    lam, P, Bv, V = hippo_legs_nplr(N, b_clip=None)
    q = torch.arange(N, dtype=torch.float64)
    sq = torch.sqrt(2 * q + 1)
    A = -torch.tril(sq[:, None] * sq[None, :], -1) - torch.diag(q + 1)  # HiPPO-LegS
    V_f = torch.cat([V, V.conj()], 1)
    p_f = torch.cat([P[0], P[0].conj()])
    A_rec = V_f @ (torch.diag(torch.cat([lam, lam.conj()])) - torch.outer(p_f, p_f.conj())) \
        @ V_f.conj().T
    torch.testing.assert_close(A_rec, A.to(A_rec.dtype), atol=1e-9, rtol=0)
    torch.testing.assert_close(V_f @ torch.cat([Bv, Bv.conj()]), sq.to(V.dtype), atol=1e-9, rtol=0)
    assert (lam.real < 0).all() and (lam.imag < 0).all()


def test_stable_for_random_parameters():
    for seed in range(4):
        layer = make(H=3, d_state=16, seed=seed, scale=0.5)
        with torch.no_grad():
            layer.log_dt.copy_(torch.tensor([-9.0, -2.3, 0.5]))  # dt 1e-4 .. 1.6
            dA, _, _ = dense(layer)
        assert torch.linalg.eigvals(dA).abs().max().item() < 1
    big = make(H=2, d_state=64, seed=1, scale=0.3)
    with torch.no_grad():
        assert torch.linalg.eigvals(dense(big)[0]).abs().max().item() < 1


# --- the fast paths against the dense reference --------------------------------------------------

@pytest.mark.parametrize("rank,block,L", [(1, None, 300), (1, 64, 300), (2, 50, 257),
                                          (1, 4096, 1)])
def test_kernel_matches_dense_powers(rank, block, L):
    layer = make(H=3, d_state=16, rank=rank, block=block)
    with torch.no_grad():
        k = layer.kernel(L)
    ref = dense_kernel(layer, L)
    torch.testing.assert_close(k, ref, atol=1e-12 * ref.abs().max().item(), rtol=0)


def test_kernel_full_size_and_lengths_beyond_training():
    layer = make(H=2, d_state=64, block=512)
    with torch.no_grad():
        k = layer.kernel(2000)
        ref = dense_kernel(layer, 2000)
        torch.testing.assert_close(k, ref, atol=1e-11 * ref.abs().max().item(), rtol=0)
        # A length is a prefix of a longer one (C~ formed per length, nothing stale).
        torch.testing.assert_close(layer.kernel(777), k[:, :777], atol=1e-13, rtol=0)


def assert_read_matches_naive(layer, L):
    """forward_with_state from a random state against the plain recurrence."""
    x = torch.randn(B, L, layer.d_model, dtype=torch.float64)
    s0 = rand_state(layer)
    with torch.no_grad():
        y, s = layer.forward_with_state(x, s0)
    y_ref, s_ref = naive_run(layer, x, s0)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    for a, b in zip(s, s_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("block,L", [(None, 123), (32, 123), (32, 96)])
def test_forward_with_state_matches_naive_recurrence(block, L):
    assert_read_matches_naive(make(H=3, d_state=16, rank=1, block=block), L)


def test_wide_layers_get_shorter_blocks():
    layer = make(H=4, d_state=16)
    assert layer._plan(5000) == (2048, 3)
    layer.block_elems = 4 * 64  # as wide as H = 4 * 2048 / 64 would be: blocks of 64
    assert layer._plan(300) == (64, 5) and layer._plan(50) == (50, 1)
    assert_read_matches_naive(layer, 300)


def test_step_matches_naive_recurrence_rank2():
    layer = make(H=3, d_state=16, rank=2)
    x = torch.randn(B, 40, 3, dtype=torch.float64)
    s0 = rand_state(layer)
    with torch.no_grad():
        y, s = step_through(layer, x, s0)
    y_ref, s_ref = naive_run(layer, x, s0)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(s[0], s_ref[0], atol=1e-11, rtol=1e-10)


# --- C learned as C~ for the training length (l_max) ---------------------------------------------

def test_l_max_beyond_the_one_block_limit_keeps_the_true_C():
    assert S4(2, 16, l_max=64).l_max == 64
    assert S4(2, 16, l_max=S4.max_tilde_len * 2).l_max is None and S4(2, 16).l_max is None


@pytest.mark.parametrize("L", [64, 41, 1, 150])  # the training length, prefixes, and beyond it
def test_tilde_kernel_matches_dense_reference(L):
    layer = make(H=3, d_state=16, l_max=64, block=32)
    with torch.no_grad():
        k = layer.kernel(L)
        fast = layer.tilde_kernel()  # the training path: Cauchy sums of C~ alone
    ref = dense_kernel(layer, max(L, 64))
    torch.testing.assert_close(k, ref[:, :L], atol=1e-11 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(fast, ref[:, :64], atol=1e-11 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("rank", [1, 2])
def test_carried_read_at_the_training_length_is_the_general_read(rank):
    """At l_max, training's carried read takes its own path (the echo as Cauchy sums, the final
    state without gradients): the same outputs, gradients and state as the general machinery,
    and the state against the naive recurrence."""
    from ssmgen.testing import check_carried_read

    layer = make(H=3, d_state=16, rank=rank, l_max=64)
    x = torch.randn(B, 64, 3, dtype=torch.float64)
    s0 = rand_state(layer)
    check_carried_read(layer, x, s0, atol=1e-10, rtol=1e-8)
    with torch.no_grad():
        _, s_ref = naive_run(layer, x, s0)
        _, s_read = layer.read_carried(x, s0)
    for a, b in zip(s_read, s_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    calls = []
    layer.forward_with_state = lambda *a: calls.append(1)  # the fast path never falls back
    layer.read_carried(x, s0)
    assert not calls


def test_tilde_modes_match_naive_recurrence():
    """Parallel (C~), prompt read and step (the true C) all run the recurrence of the true C."""
    layer = make(H=3, d_state=16, l_max=32)
    x = torch.randn(B, 70, 3, dtype=torch.float64)
    s0 = rand_state(layer)
    zero = layer.initial_state(B, dtype=torch.float64)
    with torch.no_grad():
        y_par = layer(x[:, :32])
        y_fws, s_fws = layer.forward_with_state(x, s0)
        y_step, s_step = step_through(layer, x, s0)
    y_ref0, _ = naive_run(layer, x[:, :32], zero)
    y_ref, s_ref = naive_run(layer, x, s0)
    torch.testing.assert_close(y_par, y_ref0, atol=1e-10, rtol=1e-9)
    for y, s in ((y_fws, s_fws), (y_step, s_step)):
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
        for a, b in zip(s, s_ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


# --- the three modes agree -----------------------------------------------------------------------

def test_parallel_equals_step_float32_over_4100_samples():
    layer = make(H=4, d_state=64, dtype=torch.float32)  # 4100 > block_size: three blocks
    x = torch.randn(B, 4100, 4)
    with torch.no_grad():
        y = layer(x)
        ys, s_step = step_through(layer, x, layer.initial_state(B))
        y2, s2 = layer.forward_with_state(x, layer.initial_state(B))
    assert (y - ys).abs().max().item() <= 1e-4
    assert (y2 - ys).abs().max().item() <= 1e-4
    for a, b in zip(s2, s_step):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype,block,tol", [(torch.float64, 64, 1e-10),
                                             (torch.float32, None, 1e-4)])
def test_prefix_handoff_and_unequal_chunks(dtype, block, tol):
    layer = make(H=4, d_state=64, dtype=dtype, block=block)
    x = torch.randn(B, 1000, 4, dtype=dtype)
    with torch.no_grad():
        ys, s_step = step_through(layer, x, layer.initial_state(B, dtype=dtype))
        # prompt read in parallel, then stepping: equals stepping from the start
        y_pre, s_pre = layer.forward_with_state(x[:, :611], layer.initial_state(B, dtype=dtype))
        y_tail, s_tail = step_through(layer, x[:, 611:], s_pre)
        # three chunks of unequal, non-power-of-two lengths with the carried state
        y1, s1 = layer.forward_with_state(x[:, :333], layer.initial_state(B, dtype=dtype))
        y2, s2 = layer.forward_with_state(x[:, 333:334], s1)
        y3, s3 = layer.forward_with_state(x[:, 334:], s2)
        y_full, s_full = layer.forward_with_state(x, layer.initial_state(B, dtype=dtype))
    close = lambda a, b: torch.testing.assert_close(a, b, atol=tol, rtol=0)  # noqa: E731
    close(y_pre, ys[:, :611])
    close(y_tail, ys[:, 611:])
    close(torch.cat([y1, y2, y3], 1), y_full)
    for a, b, c, d in zip(s3, s_full, s_step, s_tail):
        close(a, b)
        close(b, c)
        close(d, c)
    assert all(s.dtype == dtype and s.shape == (B, 4, 32) for s in s3)


def test_causal():
    layer = make(H=3, d_state=16, block=32)
    x = torch.randn(1, 96, 3, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 50] += 1.0
    with torch.no_grad():
        d = (layer(x2) - layer(x)).abs().amax(-1)[0]
        s0 = rand_state(layer, 1)
        d2 = (layer.forward_with_state(x2, s0)[0] - layer.forward_with_state(x, s0)[0]).abs()
    assert d[:50].max().item() < 1e-12 and d[50].item() > 0
    assert d2.amax(-1)[0, :50].max().item() < 1e-12


@pytest.mark.parametrize("l_max", [None, 32])  # with l_max the true C is a cached solve too
def test_step_cache_is_never_stale(l_max):
    layer = make(H=4, d_state=16, dtype=torch.float32, l_max=l_max)
    x = torch.randn(B, 4)
    s0 = rand_state(layer, dtype=torch.float32)
    with torch.no_grad():
        y0, _ = layer.step(x, s0)
        for p in (layer.P, layer.log_dt, layer.C):
            p.add_(0.05 * torch.randn_like(p))
        y1, st1 = layer.step(x, s0)
        fresh = S4(4, d_state=16, l_max=l_max)
        fresh.load_state_dict(layer.state_dict())
        y2, st2 = fresh.eval().step(x, s0)
        y3, _ = layer.forward_with_state(x[:, None], s0)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(y3[:, 0], y1, atol=1e-5, rtol=1e-5)
    assert all(not s.is_complex() and s.dtype == torch.float32 for s in st1)


# --- gradients -----------------------------------------------------------------------------------

class _WithState(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, sr, si):
        y, (r, i) = self.layer.forward_with_state(x, (sr, si))
        return y, r, i


def test_gradcheck_forward_with_state():
    layer = make(H=2, d_state=8, block=8)  # L = 20: three blocks, the last one partial
    wrapped = _WithState(layer)
    names = [n for n, _ in wrapped.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in wrapped.parameters())
    x = torch.randn(1, 20, 2, dtype=torch.float64, requires_grad=True)
    s0 = tuple(t.requires_grad_() for t in rand_state(layer, 1))

    def f(x, sr, si, *ps):
        return torch.func.functional_call(wrapped, dict(zip(names, ps)), (x, sr, si))

    assert torch.autograd.gradcheck(f, (x, *s0, *params), atol=1e-7, rtol=1e-5)


def test_gradcheck_forward():
    layer = make(H=2, d_state=8)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(1, 16, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("block,l_max,L", [(128, None, 300),  # true C, blocked
                                           (None, 256, 256)])  # C~: the training fast path
def test_kernel_gradient_matches_dense_reference(block, l_max, L):
    layer = make(H=2, d_state=64, block=block, l_max=l_max)
    w = torch.randn(2, L, dtype=torch.float64)
    params = list(layer.parameters())
    g_fast = torch.autograd.grad((layer.kernel(L) * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((dense_kernel(layer, L) * w).sum(), params, allow_unused=True)
    for p, a, b in zip(params, g_fast, g_ref):
        if b is None:  # D does not enter the kernel
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-9 * b.abs().max().item(), rtol=0)
