"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces") as a
SaShiMi sequence backend.

The block is mamba-ssm's `Mamba` (mamba_ssm/modules/mamba_simple.py) with the same parameter names,
shapes and initialization, so state_dicts interchange:

    x, z = in_proj(u).chunk(2)                  # (B, L, 2 d_inner)
    x = silu(causal depthwise conv1d(x))         # kernel d_conv
    dt, B, C = x_proj(x).split(dt_rank, N, N)    # input-dependent step, input and output maps
    dt = softplus(dt_proj(dt))                   # (B, L, d_inner), bias = inverse softplus of dt0
    y = selective_scan(x, dt, A = -exp(A_log), B, C) + D x
    out = out_proj(y * silu(z))

State: (conv (B, d_inner, d_conv - 1): the last d_conv - 1 pre-conv inputs, ssm (B, d_inner, N)).

On CPU the scan is compiled with numba (`selective_scan_cpu.py`, forward and backward, ~10-50x the
PyTorch scans); elsewhere, or without the CUDA packages, it is pure PyTorch (`selective_scan.py`):
the chunked two-level scan, or the plain sequential loop (`scan="sequential"`). On CUDA with
`mamba_ssm` and `causal_conv1d` installed, forward uses `selective_scan_fn` / `causal_conv1d_fn`
and step uses `selective_state_update`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmgen.backends.base import SequenceBackend, State
from ssmgen.backends.selective_scan import (
    decay_exp,
    selective_scan_chunked,
    selective_scan_sequential,
)
from ssmgen.backends.selective_scan_cpu import HAS_NUMBA, selective_scan_compiled

try:  # optional CUDA kernels (pip install ssmgen[cuda])
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    HAS_KERNELS = True
except Exception:  # ImportError, or a broken CUDA build
    causal_conv1d_fn = selective_scan_fn = selective_state_update = None
    HAS_KERNELS = False

SCANS = {"compiled": selective_scan_compiled, "chunked": selective_scan_chunked,
         "sequential": selective_scan_sequential}


def _pick_scan(name: str, x: Tensor) -> str:
    """'auto': the compiled (numba) scan for CPU tensors, else the chunked PyTorch scan."""
    if name != "auto":
        return name
    return "compiled" if HAS_NUMBA and x.device.type == "cpu" else "chunked"


class Mamba(SequenceBackend):
    """Mamba block. Options as mamba-ssm's `Mamba`; `lr` is the SSM parameters' learning rate
    (None: the trainer's `ssm_lr`); `scan` picks the scan used without the CUDA kernels:
    'compiled' (numba, CPU), 'chunked' or 'sequential' (PyTorch), or 'auto' (compiled on CPU,
    chunked elsewhere); `use_kernels=False` forces that path on CUDA too."""

    fast_kind = "mamba"

    has_output_projection = True

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 lr: float | None = None, scan: str = "auto", use_kernels: bool = True) -> None:
        super().__init__(d_model)
        if scan not in SCANS and scan != "auto":
            raise ValueError(f"unknown scan '{scan}': use auto, {', '.join(SCANS)}")
        if d_conv < 1:
            raise ValueError(f"d_conv must be >= 1, got {d_conv}")
        self.d_state, self.d_conv, self.expand = d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.lr, self.scan, self.use_kernels = lr, scan, use_kernels
        D = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * D, bias=bias)
        self.conv1d = nn.Conv1d(D, D, kernel_size=d_conv, groups=D, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(D, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, D, bias=True)

        # dt_proj: weight keeps the variance at init; bias = softplus^-1(dt), dt log-uniform.
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(D) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        # S4D-real: A_n = -(n + 1), stored as log; D skip = 1. Neither gets weight decay.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(D, 1).contiguous())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(D))
        self.D._no_weight_decay = True
        # created last, like mamba-ssm: the same seed gives the same initial weights
        self.out_proj = nn.Linear(D, d_model, bias=bias)

    def ssm_parameters(self) -> list[nn.Parameter]:
        return [self.A_log, self.D, self.dt_proj.weight, self.dt_proj.bias]

    # --- state ------------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device=None, dtype=None) -> State:
        device = device or self.A_log.device
        dtype = dtype or self.A_log.dtype
        return (torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype))

    def state_names(self) -> list[str]:
        return ["conv", "ssm"]

    def _kernels(self, x: Tensor) -> bool:
        return HAS_KERNELS and self.use_kernels and x.is_cuda

    # --- parallel ---------------------------------------------------------------------------------
    def _ssm_inputs(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xc (B, D, L) post-conv -> dt before bias/softplus (B, D, L), B, C (B, N, L)."""
        x_dbl = self.x_proj(xc.transpose(1, 2))  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, D, L)
        return dt, Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous()

    def _run(self, u: Tensor, state: State | None) -> tuple[Tensor, State]:
        b, L, _ = u.shape
        x, z = self.in_proj(u).transpose(1, 2).chunk(2, dim=1)  # (B, D, L) each
        w = self.conv1d.weight  # (D, 1, W)
        W = self.d_conv
        if state is None:
            conv_state, h0 = x.new_zeros(b, self.d_inner, W - 1), None
        else:
            conv_state, h0 = state
        xx = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (B, D, W - 1 + L)
        new_conv = xx[..., xx.shape[-1] - (W - 1):]
        A = -torch.exp(self.A_log)
        if self._kernels(u) and state is None:
            xc = causal_conv1d_fn(x.contiguous(), w.squeeze(1), self.conv1d.bias, activation="silu")
        else:
            xc = F.silu(F.conv1d(xx, w, self.conv1d.bias, groups=self.d_inner))
        dt, Bm, Cm = self._ssm_inputs(xc)
        if self._kernels(u):
            y, h_last = self._scan_kernel(xc, dt, A, Bm, Cm, z, h0)
        else:
            delta = F.softplus(dt + self.dt_proj.bias.unsqueeze(-1))
            y, h_last = SCANS[_pick_scan(self.scan, xc)](xc, delta, A, Bm, Cm, self.D, z, h0)
        out = self.out_proj(y.transpose(1, 2))
        return out, (new_conv.contiguous(), h_last)

    def _scan_kernel(self, xc, dt, A, Bm, Cm, z, h0):
        """mamba-ssm's CUDA scan (zero start state) plus, from a non-zero start h0, the linear
        term it lacks: C_t . (exp(A cumsum(delta)_t) h0). Gate applied here (the kernel's z would
        gate before the correction)."""
        f32 = lambda t: t.float()  # noqa: E731 (the kernel wants fp32 A, D, bias)
        y, h_last = selective_scan_fn(xc, dt, f32(A), Bm, Cm, f32(self.D), z=None,
                                      delta_bias=f32(self.dt_proj.bias), delta_softplus=True,
                                      return_last_state=True)
        if h0 is not None:
            delta = F.softplus(dt + self.dt_proj.bias.unsqueeze(-1)).float()
            decay = torch.exp(delta.cumsum(-1).unsqueeze(2) * f32(A).unsqueeze(-1))  # (B,D,N,L)
            y = y + torch.einsum("bdnl,bdn,bnl->bdl", decay, h0.float(), Cm.float()).to(y.dtype)
            h_last = h_last + decay[..., -1] * h0.float()
        return y * F.silu(z), h_last.to(xc.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)[0]

    def forward_with_state(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        return self._run(x, state)

    # --- recurrent --------------------------------------------------------------------------------
    def prepare_step(self) -> dict[str, Tensor]:
        """What the step derives from the parameters: A = -exp(A_log) (E, N)."""
        return {"A": -torch.exp(self.A_log)}

    def fast_step(self) -> dict[str, Tensor]:
        """The step in the "mamba" layout of `FAST_LAYOUTS`: the projections as (in, out) maps,
        absent biases as zeros, A from the step cache."""
        E, N, R = self.d_inner, self.d_state, self.dt_rank

        def bias(lin, n):
            return lin.bias if lin.bias is not None else self.A_log.new_zeros(n)
        return {"in_proj_w": self.in_proj.weight.t(), "in_proj_b": bias(self.in_proj, 2 * E),
                "conv_w": self.conv1d.weight.reshape(E, self.d_conv),
                "conv_b": bias(self.conv1d, E),
                "x_proj_w": self.x_proj.weight.t(), "x_proj_b": bias(self.x_proj, R + 2 * N),
                "dt_proj_w": self.dt_proj.weight.t(), "dt_proj_b": self.dt_proj.bias,
                "A": self.step_cache()["A"], "D": self.D,
                "out_proj_w": self.out_proj.weight.t(),
                "out_proj_b": bias(self.out_proj, self.d_model)}

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        conv_state, h = state
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, D)
        window = torch.cat([conv_state, xi.unsqueeze(-1)], dim=-1)  # (B, D, W)
        xc = (window * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc)
        dt, Bm, Cm = torch.split(self.x_proj(xc), [self.dt_rank, self.d_state, self.d_state], -1)
        dt = dt @ self.dt_proj.weight.t()  # (B, D), bias added below
        A = self.step_cache()["A"]
        if self._kernels(x):
            h = h.clone()  # the kernel updates the state in place; keep step functional
            y = selective_state_update(h, xc, dt, A, Bm, Cm, self.D, z=z,
                                       dt_bias=self.dt_proj.bias, dt_softplus=True)
        else:
            delta = F.softplus(dt + self.dt_proj.bias)
            # decay_exp: the scans' floor (exactly 0 below exp(-60)), so every mode and engine
            # computes the same decays
            h = (decay_exp(delta.unsqueeze(-1) * A) * h
                 + (delta * xc).unsqueeze(-1) * Bm.unsqueeze(1))
            y = (h @ Cm.unsqueeze(-1)).squeeze(-1) + self.D * xc
            y = y * F.silu(z)
        return self.out_proj(y), (window[..., 1:].contiguous(), h)
