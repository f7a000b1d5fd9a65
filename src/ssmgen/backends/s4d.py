"""S4D: the diagonal state-space layer (Gu et al. 2022, "On the Parameterization and Initialization
of Diagonal State Space Models").

Per channel h and mode n (N/2 complex modes, their conjugates implied):
    x_t = dA x_{t-1} + dB u_t,   y_t = 2 Re(C x_t) + D u_t,
with ZOH discretization dA = exp(dt A), dB = (exp(dt A) - 1) / A (B is folded into C).

The convolution kernel K_l = 2 Re(sum_n C_n dB_n dA_n^l) is a Vandermonde product. It is computed
two-level, z^(Ka+b) = z^(Ka) z^b, as one batched matmul, so no (H, N, L) tensor is ever built: this
is what makes CPU training fast (the reference builds that tensor and crawls). `vandermonde_naive`
is the slow, obvious version the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmgen.backends.base import ComplexModeState, SequenceBackend, State
from ssmgen.backends.fftconv import causal_conv

# ------------------------------------------------------------------------------------------------
# Vandermonde products (shared with other diagonal layers)
# ------------------------------------------------------------------------------------------------

def _exp(e: Tensor) -> Tensor:
    """exp(e) with powers below exp(-80) set to exactly 0. Decayed modes would otherwise be
    subnormal floats, which make CPU matmuls tens of times slower (37 s vs 7 s for an 8 s prompt);
    exp(-80) is far below float32 resolution relative to the terms that matter."""
    # exp(re) (cos im + i sin im) in real ops: torch's complex exp is a scalar loop on CPU, ~5x
    # slower than the vectorized real exp, cos and sin.
    mag = torch.where(e.real > -80, torch.exp(e.real), torch.zeros((), dtype=e.real.dtype,
                                                                    device=e.device))
    return torch.polar(mag, e.imag)


def _block(L: int) -> int:
    return max(1, min(L, 1 << max(0, round(math.log2(max(L, 1)) / 2))))


def power_tables(log_z: Tensor, L: int) -> dict[str, Tensor]:
    """The powers exp(log_z l), l = K a + b < L, that `vandermonde` and `vandermonde_transposed`
    multiply, in the layouts each wants (one pair of exponentials serves both; a layer keeps them
    per length while its parameters stand): "za" exp(log_z K a) complex (..., N, A) and "zaT" its
    transpose; "Q" [Re; -Im] exp(log_z b) real (..., 2N, K); "Zt" [Re, Im] exp(log_z b) real
    (..., K, 2N), contiguous (strided .real/.imag views made bmm copy every batch matrix: a third
    of a prompt read's time)."""
    K = _block(L)
    A = -(-L // K)
    a = torch.arange(A, device=log_z.device, dtype=log_z.real.dtype)
    b = torch.arange(K, device=log_z.device, dtype=log_z.real.dtype)
    za = _exp(log_z.unsqueeze(-1) * (a * K))  # (..., N, A)
    zb = _exp(log_z.unsqueeze(-1) * b)  # (..., N, K)
    return {"za": za, "zaT": za.transpose(-1, -2), "Q": torch.cat([zb.real, -zb.imag], dim=-2),
            "Zt": torch.cat([zb.real, zb.imag], dim=-2).transpose(-1, -2).contiguous()}


def vandermonde(coef: Tensor, log_z: Tensor, L: int, offset: int = 0,
                tables: dict[str, Tensor] | None = None) -> Tensor:
    """Re(sum_n coef[..., n] * exp(log_z[..., n] * (l + offset))) for l in [0, L): real (..., L).

    coef: (..., N) complex, broadcastable against log_z: (..., N) complex; `tables`: the
    `power_tables(log_z, L)` if already made. Two-level powers (l = K a + b) turn the sum into one
    batched (A x N) @ (N x K) product, and since only the real part is needed,
    Re(P Q) = [Re P, Im P] @ [Re Q; -Im Q] is a single real matmul (complex bmm is several times
    slower on CPU). An offset is folded into the coefficients: coef exp(log_z offset).
    """
    t = tables if tables is not None else power_tables(log_z, L)
    if offset:
        coef = coef * _exp(log_z * offset)
    P = coef.unsqueeze(-1) * t["za"]  # (..., N, A)
    P = torch.cat([P.real, P.imag], dim=-2).transpose(-1, -2)  # (..., A, 2N)
    return (P @ t["Q"]).flatten(-2)[..., :L]


def vandermonde_transposed(u: Tensor, log_z: Tensor,
                           tables: dict[str, Tensor] | None = None) -> Tensor:
    """out[..., n] = sum_l u[..., l] * exp(log_z[..., n] * l): u (..., L) real, log_z (..., N)
    broadcastable against u's leading dims; complex (..., N); `tables`: `power_tables(log_z, L)`
    if already made. Two-level like `vandermonde`, with the big contraction as two real matmuls."""
    L = u.shape[-1]
    t = tables if tables is not None else power_tables(log_z, L)
    Zt, zaT = t["Zt"], t["zaT"]
    K, A, n = Zt.shape[-2], zaT.shape[-2], zaT.shape[-1]
    u = F.pad(u, (0, A * K - L)).unflatten(-1, (A, K))  # (..., A, K)
    w = u @ Zt.to(u.dtype)  # (..., A, 2N)
    return (torch.complex(w[..., :n], w[..., n:]) * zaT).sum(-2)


def vandermonde_naive(coef: Tensor, log_z: Tensor, L: int, offset: int = 0) -> Tensor:
    """Reference for `vandermonde`: builds the full (..., N, L) power table."""
    l = torch.arange(L, device=log_z.device, dtype=log_z.real.dtype) + offset
    return (coef.unsqueeze(-1) * torch.exp(log_z.unsqueeze(-1) * l)).sum(-2).real


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------

class S4D(ComplexModeState, SequenceBackend):
    """Diagonal SSM layer with D skip. `init`: 'lin' (S4D-Lin, A_n = -1/2 + i pi n) or 'inv'
    (S4D-Inv, A_n = -1/2 + i N/pi (N/(2n+1) - 1)). dt is log-uniform in [dt_min, dt_max]."""

    fast_kind = "s4d"

    def __init__(self, d_model: int, d_state: int = 64, init: str = "lin", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, lr: float | None = 1e-3) -> None:
        super().__init__(d_model)
        if d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs), got {d_state}")
        H, N2 = d_model, d_state // 2
        self.d_state, self.lr = d_state, lr
        n = torch.arange(N2, dtype=torch.float32)
        if init == "lin":
            imag = math.pi * n
        elif init == "inv":
            imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
        else:
            raise ValueError(f"unknown S4D init '{init}': use lin or inv")
        self.log_A_real = nn.Parameter(torch.full((H, N2), math.log(0.5)))
        self.A_imag = nn.Parameter(imag.repeat(H, 1))
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        # C ~ CN(0, 1) per mode (the reference's S4D init), stored as real/imag pairs.
        self.C = nn.Parameter(torch.randn(H, N2, 2) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(H))

    def ssm_parameters(self) -> list[nn.Parameter]:
        return [self.log_A_real, self.A_imag, self.log_dt]

    # --- discretization ---------------------------------------------------------------------------
    def discrete(self) -> tuple[Tensor, Tensor, Tensor]:
        """(dtA, dB, C) as complex tensors (H, N/2): log of the transition, input map, output
        map."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        dtA = A * torch.exp(self.log_dt).unsqueeze(-1)
        dB = torch.expm1(dtA) / A
        return dtA, dB, torch.view_as_complex(self.C.contiguous())

    def kernel(self, L: int) -> Tensor:
        """K (H, L): K_l = 2 Re(sum_n C_n dB_n dA_n^l)."""
        dtA, dB, C = self.discrete()
        return 2 * vandermonde(C * dB, dtA, L)

    def prepare_step(self) -> dict[str, Tensor]:
        """The step in real arithmetic (exportable: ONNX has no complex), in the "s4d" layout of
        `FAST_LAYOUTS`: dA = exp(dt A), dB and 2C as re/im parts (H, N/2), and D (H,)."""
        dtA, dB, C = self.discrete()
        dA = torch.exp(dtA)
        # 2C: doubling is exact, so y = Re(2C s) equals 2 Re(C s) bit for bit
        return {"dA_re": dA.real.contiguous(), "dA_im": dA.imag.contiguous(),
                "dB_re": dB.real.contiguous(), "dB_im": dB.imag.contiguous(),
                "C2_re": 2 * C.real, "C2_im": 2 * C.imag, "D": self.D}

    def fast_step(self) -> dict[str, Tensor]:
        """The step cache as it is: `step` computes with exactly these tensors."""
        return self.step_cache()

    # --- modes ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        u = x.transpose(1, 2)  # (B, H, L)
        y = causal_conv(u, self.cached_kernel(u.shape[-1]).to(u.dtype)) + self.D.unsqueeze(-1) * u
        return y.transpose(1, 2)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        # Complex arithmetic written out in real ops: s' = dA s + dB x, y = Re(2C s') + D x.
        k = self.step_cache()
        ar, ai, br, bi = k["dA_re"], k["dA_im"], k["dB_re"], k["dB_im"]
        sr, si = state
        u = x.unsqueeze(-1)
        nr = ar * sr - ai * si + br * u
        ni = ar * si + ai * sr + bi * u
        y = (k["C2_re"] * nr - k["C2_im"] * ni).sum(-1) + k["D"] * x
        return y, (nr, ni)

    def forward_with_state(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        u = x.transpose(1, 2)  # (B, H, L)
        L = u.shape[-1]
        p = self._powers(L)
        s0 = torch.complex(*state)  # (B, H, N/2)
        y = causal_conv(u, p["K"].to(u.dtype)) + self.D.unsqueeze(-1) * u
        if bool(s0.real.any() or s0.imag.any()):  # a prompt read from silence has nothing to echo
            # The initial state's echo: y_t += 2 Re(sum_n C_n dA_n^(t+1) s0_n).
            y = y + 2 * vandermonde(p["C"] * p["dA"] * s0, p["dtA"], L, tables=p)
        return y.transpose(1, 2), self._final_state(u, state, p)

    def final_state(self, x: Tensor, state: State) -> State:
        u = x.transpose(1, 2)
        return self._final_state(u, state, self._powers(u.shape[-1]))

    @staticmethod
    def _final_state(u: Tensor, state: State, p: dict[str, Tensor]) -> State:
        # dA^L s0 + sum_j dA^(L-1-j) dB u_j (a transposed Vandermonde product): no convolution.
        s = (p["dA_L"] * torch.complex(*state)
             + p["dB"] * vandermonde_transposed(u.flip(-1), p["dtA"], p))
        return s.real.contiguous(), s.imag.contiguous()

    def _powers(self, L: int) -> dict[str, Tensor]:
        """What reading a chunk of L from a state derives from the parameters (the kernel, the
        power tables its echo and its final state share), made once per read under autograd and
        kept per length otherwise (a streamed evaluation reads a file in chunks of one length)."""
        def prepare() -> dict[str, Tensor]:
            dtA, dB, C = self.discrete()
            p = power_tables(dtA, L)
            p.update(dtA=dtA, dB=dB, C=C, dA=torch.exp(dtA), dA_L=torch.exp(dtA * L),
                     K=2 * vandermonde(C * dB, dtA, L, tables=p))
            return p
        return self.step_cache(prepare, slot=f"powers:{L}")
