"""What a sequence backend must satisfy, importable: the tests of ssmgen's built-ins and of a
third-party plug-in (backends/ssmgen-lru) run the same checks.

    from ssmgen.testing import check_backend
    check_backend(lambda dtype: MyLayer(8, d_state=16).to(dtype))

`check_backend` asserts, in float64: the three modes agree (parallel == stepping; a chunk read
from a state == the same chunk inside the whole sequence; `final_state` == `forward_with_state`'s
state), a chunk read from a state has stepping's gradients (what training with carried states
backpropagates through) and `read_carried` gives the same outputs, gradients and (detached)
state (`check_carried_read`, which a backend with its own carried read also runs at the length
where that read takes its fast path), outputs are causal, the state is real tensors named by
`state_names()`, and the step cache is never stale after an in-place parameter change.
Backend-specific references (a naive recurrence, gradchecks) stay with each backend's own tests.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ssmgen.backends.base import SequenceBackend, State


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Move every parameter away from its initialization by relative noise, so tests exercise
    trained-looking weights, not the special structure of a fresh init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            s = p.detach().abs().mean().item() or 1.0
            p.add_(scale * s * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def step_through(layer, x: torch.Tensor, state):
    """Run `layer.step` over x (B, L, ...) one sample at a time; returns (y, state)."""
    ys = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    try:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def _states_close(a: State, b: State, what: str, atol: float, rtol: float) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} state tensors against {len(b)}"
    for i, (u, v) in enumerate(zip(a, b)):
        _close(u, v, f"{what}, state tensor {i}", atol, rtol)


def check_backend(make: Callable[[torch.dtype], SequenceBackend], *, batch: int = 2,
                  length: int = 301, split: int = 123, atol: float = 1e-9,
                  rtol: float = 1e-7, seed: int = 0) -> None:
    """Assert the contract of `ssmgen.backends.SequenceBackend` for the layer `make(dtype)`
    builds (in eval mode, weights perturbed by the caller if it wants). Runs in float64, so the
    tolerances are for algebra, not rounding; a failure says which property broke."""
    torch.manual_seed(seed)
    layer = make(torch.float64).eval()
    assert isinstance(layer, SequenceBackend), f"{type(layer).__name__} is not a SequenceBackend"
    H = layer.d_model
    x = torch.randn(batch, length, H, dtype=torch.float64)
    zero = layer.initial_state(batch, dtype=torch.float64)
    names = layer.state_names()
    assert len(names) == len(zero), f"state_names() names {len(names)}, the state has {len(zero)}"
    for name, s in zip(names, zero):
        assert isinstance(s, torch.Tensor) and s.dtype == torch.float64 and not s.is_complex(), \
            f"state tensor {name}: real float64 expected, got {s.dtype}"
        assert s.shape[0] == batch, f"state tensor {name}: batch axis first, got {tuple(s.shape)}"
    with torch.no_grad():
        y = layer(x)
        assert y.shape == x.shape, f"forward: shape {tuple(y.shape)} for input {tuple(x.shape)}"
        ys, s_step = step_through(layer, x, zero)
        _close(ys, y, "step through the sequence against forward", atol, rtol)
        y1, s1 = layer.forward_with_state(x[:, :split], zero)
        y2, s2 = layer.forward_with_state(x[:, split:], s1)
        _close(torch.cat([y1, y2], 1), y, "two chunks handing their state over against forward",
               atol, rtol)
        _states_close(s2, s_step, "state after two chunks against the stepped state", atol, rtol)
        y_tail, _ = step_through(layer, x[:, split:], s1)
        _close(y_tail, ys[:, split:], "stepping on from a chunk's state", atol, rtol)
        for start, label in ((zero, "zero"), (s1, "non-zero")):
            want = layer.forward_with_state(x[:, split:], start)[1]
            _states_close(layer.final_state(x[:, split:], start), want,
                          f"final_state from a {label} state against forward_with_state's",
                          atol, rtol)
    _check_gradients(layer, x[:, split:], tuple(v.detach() for v in s1), atol, rtol)
    check_carried_read(layer, x[:, split:], tuple(v.detach() for v in s1), atol, rtol)
    with torch.no_grad():
        x2 = x.clone()
        x2[:, split:] += 1.0
        _close(layer(x2)[:, :split], y[:, :split], "causality (outputs before a change of input)",
               atol, rtol)
        # the step cache (and whatever a layer keeps per length) follows an in-place change of
        # the parameters
        layer.step(x[:, 0], zero)  # fills the caches
        layer.forward_with_state(x[:, split:], s1)
        for p in layer.parameters():
            p.mul_(1.5)
        after, _ = layer.step(x[:, 0], zero)
        read, _ = layer.forward_with_state(x[:, split:], s1)
        fresh = make(torch.float64).eval()
        fresh.load_state_dict(layer.state_dict())
        _close(after, fresh.step(x[:, 0], fresh.initial_state(batch, dtype=torch.float64))[0],
               "a step after an in-place parameter change (stale step cache?)", atol, rtol)
        _close(read, fresh.forward_with_state(x[:, split:], s1)[0],
               "a chunk read after an in-place parameter change (stale cache?)", atol, rtol)


def check_carried_read(layer: SequenceBackend, x: torch.Tensor, start: State,
                       atol: float = 1e-9, rtol: float = 1e-7) -> None:
    """`read_carried` (how training with carried states reads a chunk) gives
    `forward_with_state`'s outputs and their gradients for every parameter and the input, and
    its final state, detached."""
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    y1, s1, d1 = _run_with_grads(layer, layer.read_carried, x, start, w)
    y2, s2, d2 = _run_with_grads(layer, layer.forward_with_state, x, start, w)
    assert not any(v.requires_grad for v in s1), "read_carried: the state after it has gradients"
    _close(y1, y2, "read_carried's outputs against forward_with_state's", atol, rtol)
    _states_close(s1, tuple(v.detach() for v in s2),
                  "read_carried's state against forward_with_state's", atol, rtol)
    _grads_close(layer, d1, d2, "through read_carried against forward_with_state", atol, rtol)


def _check_gradients(layer: SequenceBackend, x: torch.Tensor, start: State, atol: float,
                     rtol: float) -> None:
    """A chunk read from a non-zero state (how training with carried states runs it) must give
    stepping's gradients, for every parameter and the input (through its outputs and state)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(x.shape, generator=g, dtype=x.dtype)
    ws = [torch.randn(s.shape, generator=g, dtype=s.dtype) for s in start]
    read = _run_with_grads(layer, layer.forward_with_state, x, start, w, ws)[2]
    stepped = _run_with_grads(layer, lambda xi, s: step_through(layer, xi, s), x, start, w, ws)[2]
    _grads_close(layer, read, stepped, "through a chunk read from a state against stepping",
                 atol, rtol)


def _run_with_grads(layer: SequenceBackend, read: Callable, x: torch.Tensor, start: State,
                    w: torch.Tensor, ws: list[torch.Tensor] | None = None):
    """(outputs, state, gradients of the input and every parameter) of read(x, start) under the
    loss sum(y w) (+ sum(state ws) when `ws` is given); an unused parameter's gradient is 0."""
    xi = x.clone().requires_grad_()
    wrt = [xi, *(p for p in layer.parameters() if p.requires_grad)]
    y, s = read(xi, start)
    loss = (y * w).sum() + (sum((a * b).sum() for a, b in zip(s, ws)) if ws else 0)
    got = torch.autograd.grad(loss, wrt, allow_unused=True)
    return y.detach(), s, [torch.zeros_like(v) if d is None else d for d, v in zip(got, wrt)]


def _grads_close(layer: SequenceBackend, a: list, b: list, what: str, atol: float,
                 rtol: float) -> None:
    names = ["the input"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, u, v in zip(names, a, b):
        _close(u, v, f"gradient of {name} {what}", atol, rtol)
