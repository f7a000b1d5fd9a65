"""LRU: the Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for
Long Sequences") as an ssmgen sequence backend.

A complex diagonal recurrence over N modes shared by the layer's H channels (the paper's MIMO form):

    x_t = Lambda * x_{t-1} + gamma * (B u_t),     y_t = Re(C x_t) + D * u_t

with Lambda = exp(-exp(nu_log) + i exp(theta_log)) (stable for any parameter values: |Lambda| < 1),
B (N, H) and C (H, N) complex, D (H,) real, and the normalization gamma = exp(gamma_log),
initialized to sqrt(1 - |Lambda|^2) so that a white input keeps unit variance in every mode however
close to the unit circle it sits (a trainable parameter, as in the paper's code).

Parallel mode (training, prompt reads): every mode's states are the causal convolution of its
driven input gamma B u with the kernel Lambda^k, done by FFT in O(L log L); a start state x0 adds
its echo Lambda^(t+1) x0 in closed form. Recurrent mode: O(N H) real arithmetic per sample. The
state is (re, im), each (batch, N), so the step exports to ONNX.

`lru_reference` is the slow, obvious version (a Python loop over time in complex arithmetic) that
the tests hold the layer to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssmgen.backends import SequenceBackend, State

# Powers |Lambda|^k below exp(-80) are set to exactly 0: as float32 they would soon be subnormal,
# and subnormal operands make CPU FFTs and matmuls many times slower. exp(-80) ~ 2e-35 is far below
# float32 resolution relative to the terms that matter.
_LOG_FLOOR = -80.0


class LRU(SequenceBackend):
    """Linear Recurrent Unit over (batch, length, d_model).

    Options (`--set model.backend_options.lru.NAME=VALUE`):

    - `d_state`: N, the number of complex modes of the layer (its state is N complex numbers,
      shared by all channels through B and C).
    - `r_min`, `r_max`: the ring initialization: |Lambda|^2 uniform in [r_min^2, r_max^2].
    - `max_phase`: arg(Lambda) uniform in [0, max_phase].

    Defaults for 8-bit audio at 16 kHz. A mode with |Lambda| = r remembers for about 1 / (1 - r)
    steps. r_max 0.999 gives 1000 steps: 62 ms at the finest tier (16 kHz), 1 s at the centre tier
    (1 kHz). That fits within the paper recipe's crops at every tier (131072 samples: 8192 centre
    steps); with the CPU presets' short crops (2048 to 4096 samples: 128 to 256 centre steps) the
    slowest centre modes carry a crop's start to its end, which is what the centre tier is for.
    r_min 0.9 (10 steps, under a millisecond at 16 kHz) keeps the fast modes that waveform detail
    needs. The range is close to S4D's default here (dt in [1e-3, 0.1] with Re(A) = -1/2: |dA| in
    [0.95, 0.9995]). max_phase pi spreads the modes' frequencies uniformly from 0 to Nyquist: with
    a real output Re(C x), a phase in (pi, 2 pi) only repeats its mirror image 2 pi - phase, so
    the paper's 2 pi would spend half the modes on duplicates.
    """

    def __init__(self, d_model: int, d_state: int = 64, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = math.pi) -> None:
        super().__init__(d_model)
        if d_state < 1:
            raise ValueError(f"d_state must be >= 1, got {d_state}")
        if not (0.0 <= r_min <= r_max < 1.0 and r_max > 0.0):  # |Lambda| = 0 would be nu = inf
            raise ValueError(f"need 0 <= r_min <= r_max < 1 and r_max > 0, got r_min={r_min}, "
                             f"r_max={r_max}")
        if not 0.0 < max_phase <= 2 * math.pi:
            raise ValueError(f"max_phase must be in (0, 2 pi], got {max_phase}")
        H, N = d_model, d_state
        self.d_state, self.r_min, self.r_max, self.max_phase = N, r_min, r_max, max_phase
        # Ring initialization. 1 - rand lies in (0, 1]: never log(0).
        u1, u2 = 1 - torch.rand(N, dtype=torch.float64), 1 - torch.rand(N, dtype=torch.float64)
        radius_sq = u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2  # |Lambda|^2 uniform on the ring
        nu = -0.5 * torch.log(radius_sq)  # |Lambda| = exp(-nu)
        self.nu_log = nn.Parameter(torch.log(nu).float())
        self.theta_log = nn.Parameter(torch.log(max_phase * u2).float())
        # gamma = sqrt(1 - |Lambda|^2) = sqrt(-expm1(-2 nu)): expm1 keeps it accurate near r = 1.
        self.gamma_log = nn.Parameter((0.5 * torch.log(-torch.expm1(-2 * nu))).float())
        # Glorot-style complex normals, as the paper: B keeps the variance of the driven input at
        # that of one channel, C sums N modes back to unit scale.
        self.B_re = nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H))
        self.B_im = nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H))
        self.C_re = nn.Parameter(torch.randn(H, N) / math.sqrt(N))
        self.C_im = nn.Parameter(torch.randn(H, N) / math.sqrt(N))
        self.D = nn.Parameter(torch.randn(H))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, r_min={self.r_min}, "
                f"r_max={self.r_max}, max_phase={self.max_phase:.4g}")

    def ssm_parameters(self) -> list[nn.Parameter]:
        """nu_log, theta_log (Lambda) and gamma_log: the recurrence's own parameters, trained with
        the lower SSM learning rate and no weight decay, as in the paper. gamma_log is among them
        because weight decay would pull it to 0, i.e. gamma to 1, undoing the normalization."""
        return [self.nu_log, self.theta_log, self.gamma_log]

    # --- the recurrence's ingredients -------------------------------------------------------------
    def log_lambda(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(log |Lambda|, arg Lambda), real (N,) each: -exp(nu_log) and exp(theta_log), computed in
        `dtype` (default: the parameters')."""
        if dtype is None:
            return -torch.exp(self.nu_log), torch.exp(self.theta_log)
        return -torch.exp(self.nu_log.to(dtype)), torch.exp(self.theta_log.to(dtype))

    def maps(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The input and output maps as real (H, N) and (N, H) matrices for right-multiplication:
        (Re(gamma B)^T, Im(gamma B)^T, Re(C)^T, -Im(C)^T), so that for a real u (..., H) and a
        complex state x = xr + i xi (..., N): gamma B u = u @ W_re + i u @ W_im and
        Re(C x) = xr @ O_re + xi @ O_im."""
        gamma = torch.exp(self.gamma_log).unsqueeze(-1)  # (N, 1)
        return (gamma * self.B_re).t(), (gamma * self.B_im).t(), self.C_re.t(), -self.C_im.t()

    def powers(self, L: int, offset: int = 0, dtype: torch.dtype = torch.complex64) -> Tensor:
        """Lambda^(k + offset) for k in [0, L): complex (L, N) of `dtype`.

        Computed in float64 from the (log-magnitude, phase) form, so the phase k * theta is exact
        even where it is thousands of radians (in float32, theta's rounding alone, times k, would
        be off by ~1e-3 rad there): the kernel is exactly the parameters' to float32 rounding."""
        log_r, theta = self.log_lambda(torch.float64)
        k = torch.arange(offset, offset + L, device=log_r.device, dtype=torch.float64).unsqueeze(-1)
        log_mag = k * log_r
        mag = torch.where(log_mag > _LOG_FLOOR, torch.exp(log_mag), torch.zeros_like(log_mag))
        return torch.polar(mag, k * theta).to(dtype)

    # --- parallel ---------------------------------------------------------------------------------
    def _drive(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """gamma B u_t for every t: complex (B, L, N) of the real `dtype`'s complex type."""
        w_re, w_im, _, _ = self.maps()
        N = self.d_state
        # one matmul for both parts; its output is cast because autocast may have made it bf16
        v = (x @ torch.cat([w_re, w_im], dim=1)).to(dtype)
        return torch.complex(v[..., :N], v[..., N:])

    def _kernel_fft(self, L: int, n: int, dtype: torch.dtype) -> Tensor:
        """FFT of the zero-padded kernel Lambda^k (k < L) over n points: complex (n, N)."""
        return torch.fft.fft(self.powers(L, dtype=dtype), n=n, dim=0)

    def states(self, x: Tensor, state: State | None = None) -> Tensor:
        """Every state x_t of the chunk x (B, L, H), starting from `state` (None: zero), computed in
        parallel: complex (B, L, N), at least single precision."""
        real = torch.promote_types(x.dtype, torch.float32)
        cdtype = torch.complex128 if real == torch.float64 else torch.complex64
        L = x.shape[1]
        # A power of two >= 2L - 1: no wrap-around, and a fast size (2L can be 2 x a prime for an
        # odd prompt length, where pocketfft falls back to a several times slower algorithm).
        n = 1 << (2 * L - 1).bit_length()
        v = self._drive(x, real)
        # The kernel's FFT is kept while the parameters stand and no gradient is wanted (evaluation
        # and prompt reads use the same lengths over and over); `step_cache` drops it on any change.
        kf = self.step_cache(lambda: self._kernel_fft(L, n, cdtype), slot=f"kfft:{L}:{cdtype}")
        s = torch.fft.ifft(torch.fft.fft(v, n=n, dim=1) * kf, dim=1)[:, :L]
        if state is not None and bool(state[0].any() or state[1].any()):
            # the start state's echo, in closed form: x_t += Lambda^(t + 1) x0
            x0 = torch.complex(state[0].to(real), state[1].to(real))
            s = s + x0.unsqueeze(1) * self.powers(L, offset=1, dtype=cdtype)
        return s

    def _readout(self, s: Tensor, x: Tensor) -> Tensor:
        """y_t = Re(C x_t) + D u_t for states s (B, L, N) and inputs x (B, L, H)."""
        _, _, o_re, o_im = self.maps()
        real = s.real.dtype
        y = torch.cat([s.real, s.imag], dim=-1) @ torch.cat([o_re, o_im], dim=0).to(real)
        return (y + self.D.to(real) * x.to(real)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, H) -> (B, L, H), from a zero state
        return self._readout(self.states(x), x)

    def forward_with_state(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        s = self.states(x, state)
        last = s[:, -1]
        return self._readout(s, x), (last.real.to(state[0].dtype).contiguous(),
                                     last.imag.to(state[1].dtype).contiguous())

    def final_state(self, x: Tensor, state: State) -> State:
        """Lambda^L x0 + sum_j Lambda^(L-1-j) gamma B u_j: the input map, then one weighted sum
        over time; no convolution and no readout (the last layer of a prompt read)."""
        real = torch.promote_types(x.dtype, torch.float32)
        cdtype = torch.complex128 if real == torch.float64 else torch.complex64
        L = x.shape[1]
        v = self._drive(x, real)
        s = (v * self.powers(L, dtype=cdtype).flip(0)).sum(1)
        x0 = torch.complex(state[0].to(real), state[1].to(real))
        s = s + x0 * self.powers(1, offset=L, dtype=cdtype)[0]
        return s.real.to(state[0].dtype).contiguous(), s.imag.to(state[1].dtype).contiguous()

    # --- recurrent --------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """Zero state: (re, im), each (batch, N)."""
        ref = self.B_re
        kw = {"device": device or ref.device, "dtype": dtype or ref.dtype}
        return (torch.zeros(batch_size, self.d_state, **kw),
                torch.zeros(batch_size, self.d_state, **kw))

    def state_names(self) -> list[str]:
        return ["re", "im"]

    def prepare_step(self) -> tuple[Tensor, ...]:
        """(Lambda_re, Lambda_im) (N,) and the four real maps of `maps()`, as fresh contiguous
        tensors. `step` reads them through the plain `step_cache()`, which `ssmgen export` freezes
        into graph constants."""
        # Lambda from float64 and only then rounded: stepping compounds Lambda's error k times
        # over k samples, so it should be the parameters' Lambda to half an ulp.
        log_r, theta = self.log_lambda(torch.float64)
        r, dtype = torch.exp(log_r), self.nu_log.dtype
        # Copies, never views: a view of a parameter (C_re.t()) requires grad even when made under
        # no_grad, and the tracer refuses such a tensor as a constant. Contiguous also suits the
        # step's small matmuls.
        maps = (m.clone(memory_format=torch.contiguous_format) for m in self.maps())
        return ((r * torch.cos(theta)).to(dtype), (r * torch.sin(theta)).to(dtype), *maps)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One sample x (B, H): the complex update written in real ops (ONNX has no complex)."""
        lr, li, w_re, w_im, o_re, o_im = self.step_cache()
        sr, si = state
        nr = lr * sr - li * si + x @ w_re
        ni = lr * si + li * sr + x @ w_im
        return nr @ o_re + ni @ o_im + self.D * x, (nr, ni)


def lru_reference(layer: LRU, u: Tensor, x0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The layer's outputs (B, L, H) and final state (B, N) for inputs u (B, L, H) from the start
    state x0 (complex (B, N); None: zero), one sample at a time in complex128, straight from the
    paper's formulas and the raw parameters. Slow and obvious: the tests' reference. Differentiable.
    """
    p = {name: t.to(torch.float64) for name, t in layer.named_parameters()}
    lam = torch.exp(torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"])))
    gamma_b = torch.exp(p["gamma_log"]).unsqueeze(-1) * torch.complex(p["B_re"], p["B_im"])
    c = torch.complex(p["C_re"], p["C_im"])
    u = u.to(torch.float64)
    x = torch.zeros(u.shape[0], layer.d_state, dtype=torch.complex128) if x0 is None else x0
    ys = []
    for t in range(u.shape[1]):
        ut = u[:, t].to(torch.complex128)
        x = lam * x + ut @ gamma_b.t()
        ys.append((x @ c.t()).real + p["D"] * u[:, t])
    return torch.stack(ys, 1), x
