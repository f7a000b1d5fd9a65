"""S4: the diagonal-plus-low-rank (DPLR) state-space layer (Gu et al. 2022, "Efficiently Modeling
Long Sequences with Structured State Spaces"), in the stable form SaShiMi uses (Goel et al. 2022).

Continuous system per channel h (N = d_state, stored as N/2 conjugate-pair modes):
    A = Lambda - P P^*,  Re(Lambda) = -exp(log_A_real) < 0,
initialized from the NPLR form of HiPPO-LegS in the eigenbasis of its normal part. A, B, P (one SSM
copy) are shared by all channels; C, D and dt are per channel. A + A^* = 2 Re(Lambda) - 2 P P^* is
negative definite, so every A is Hurwitz and its bilinear discretization is a contraction.

Bilinear discretization with M1 = 2/dt - A and M2 = 2/dt + A:
    x_t = dA x_{t-1} + dB u_t,  dA = M1^-1 M2,  dB = 2 M1^-1 B,  y_t = 2 Re(C x_t) + D u_t.

The full 2*(N/2)-dimensional complex state is [x; conj x]; a real-linear map of the stored half x
acts on its real form rho(x) = [Re x; Im x] as an N x N real matrix (used for dA^T, never for
stepping). Everything below is exact for any length L:

* Resolvent at the T-th roots of unity zeta (Cauchy + Woodbury):
      (I - zeta dA)^-1 dB = 2 W B,  (I - zeta dA)^-1 dA = W M2,
      W = (Delta + (1+zeta) P P^*)^-1,  Delta = diag((2/dt)(1-zeta) - (1+zeta) Lambda_n),
  a diagonal (Cauchy) term minus a rank-R Woodbury term; no singularity at zeta = -1.
* Kernel: K_hat(zeta) = C~ (I - zeta dA)^-1 dB with the truncated generating function correction
  C~ = C (I - dA^T), then an inverse FFT. Lengths above `block_size` are cut into blocks of T:
  block b uses C dA^(bT) in place of C, so no (H, N, L) tensor is ever built and the kernel costs
  one batched matmul over the blocks.
* What the parameter C holds. Given `l_max` (the training length at this layer's rate, up to
  `max_tilde_len`), it is C~ for that length, as in the reference implementation: the training
  kernel is then the Cauchy sums alone, with no N x N matrix powers (or their gradients), which
  were two fifths of a CPU training step. Every other use (other lengths, step, reading a prompt)
  takes the true C = C~ (I - dA^l_max)^-1 (`ssm()`). Without `l_max` the parameter is the true C
  (the limit l_max -> infinity, where dA^l_max -> 0).
* forward_with_state: the initial state's echo 2 Re(C dA^(t+1) x0) uses the row kernel
  C~ W M2 (same machinery; skipped when x0 = 0); the final state x_L = dA^L x0 +
  sum_j dA^j dB u_(L-1-j) uses f_j (the inverse FFT of 2 W B: dA^j dB aliased by (I - dA^T)^-1,
  corrected on the block sums) and dA^T between blocks (log-depth products, no stepping). Since
  f is at hand, the kernel is there the real rows C~_b against f_j (equal to the Cauchy sums).
* The N x N dense work (dA built by stepping the basis, dA^T by squaring, C dA^(bT)) runs in
  float64 whatever the parameters' dtype: cheap, and dA^T is ill-conditioned in T for slow modes.
* step: the Woodbury linear step x' = M1^-1 (M2 x + 2 B u), O(N) per channel, in real arithmetic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ssmgen.backends.base import ComplexModeState, SequenceBackend, State
from ssmgen.backends.cauchy import cauchy, cauchy_transposed
from ssmgen.backends.fftconv import causal_conv
from ssmgen.backends.matpow import hi_dtype, horner, krylov, matpow, powers

# ------------------------------------------------------------------------------------------------
# Initialization
# ------------------------------------------------------------------------------------------------

def hippo_legs_nplr(N: int, rank: int = 1, b_clip: float | None = 2.0):
    """NPLR form of HiPPO-LegS: (Lambda (N/2,), P (rank, N/2), B (N/2,), V (N, N/2)), complex128.

    A_legs = V_full (Lambda_full - p_full p_full^*) V_full^* with V_full = [V, conj V],
    p_full = [P; conj P]: the normal part A + P P^T = -1/2 + skew is diagonalized with eigh.
    Keeps the half with negative imaginary parts; B's imaginary part is clipped like the reference.
    """
    q = torch.arange(N, dtype=torch.float64)
    sq = torch.sqrt(2 * q + 1)
    A = -torch.tril(sq[:, None] * sq[None, :], -1) - torch.diag(q + 1)
    B = sq
    p = torch.sqrt(q + 0.5)
    S = A + p[:, None] * p[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)  # skew-symmetric
    w, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # S v = i w v
    idx = torch.argsort(w)[: N // 2]
    lam = -0.5 + 1j * w[idx]
    V = V[:, idx]
    Bn = V.conj().T @ B.to(V.dtype)
    if b_clip is not None:
        Bn = torch.complex(Bn.real, Bn.imag.clamp(-b_clip, b_clip))
    Pn = torch.zeros(rank, N // 2, dtype=torch.complex128)
    Pn[0] = V.conj().T @ p.to(V.dtype)
    return lam, Pn, Bn, V


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------

def _full(s: Tensor, dim: int = 1) -> Tensor:
    """Sum over all 2*(N/2) modes from the sum over the stored half: s(zeta) + conj(s(conj zeta)),
    where the frequency axis `dim` holds zeta_k = exp(-2 pi i k / T), so conj zeta_k = zeta_-k."""
    return s + torch.roll(s.flip(dim), 1, dim).conj()


def _inv(M: Tensor) -> Tensor:
    """Inverse of (..., R, R) (reciprocal for R = 1)."""
    return M.reciprocal() if M.shape[-1] == 1 else torch.linalg.inv(M)


def _roots(T: int, cdtype: torch.dtype, device) -> Tensor:
    k = torch.arange(T, dtype=torch.float64, device=device)
    return torch.polar(torch.ones_like(k), -2 * math.pi * k / T).to(cdtype)


def _lowrank(a: Tensor, P: Tensor) -> Tensor:
    """a @ P for a (..., R), P (R, n); a broadcast product when R = 1 (faster than a K=1 matmul)."""
    return a * P[0] if P.shape[0] == 1 else a @ P


def _matvec(M: Tensor, v: Tensor) -> Tensor:
    """(H, n, n) @ (..., H, n) -> (..., H, n)."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


class _Woodbury(NamedTuple):
    """What one Cauchy pass (`S4._cauchy`) leaves for the state maps and the echo: the
    reciprocals q (only when kept), 1 + zeta, the Woodbury core and coefficients, the raw
    (stored-half) sums P^* Q P and ct Q P, and the sums of the extra columns."""

    q: Tensor | None
    z1: Tensor
    Kinv: Tensor
    coef: Tensor
    Mraw: Tensor
    sCP: Tensor
    extra: Tensor


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------

class S4(ComplexModeState, SequenceBackend):
    """S4 (DPLR, HiPPO-LegS init, bilinear) with D skip; no output projection of its own."""

    fast_kind = "s4"

    has_output_projection = False
    takes_length = True
    #: Largest FFT block of the kernel machinery (a power of two). Longer sequences are blocked.
    block_size: int = 2048
    #: Budget of H x T for the blocked machinery (2048 at H = 64, 512 at H = 256).
    block_elems: int = 64 * 2048
    #: Longest `l_max` whose kernel is one Cauchy block from C~ (H * l_max * N/2 complex values per
    #: intermediate); a longer training length keeps the true C and the blocked machinery.
    max_tilde_len: int = 8192

    def __init__(self, d_model: int, d_state: int = 64, rank: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, lr: float | None = 1e-3, l_max: int | None = None) -> None:
        super().__init__(d_model)
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs), got {d_state}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        H, N2 = d_model, d_state // 2
        self.d_state, self.rank, self.lr = d_state, rank, lr
        #: The length C~ is parameterized for, or None (the parameter is the true C).
        self.l_max = l_max if l_max is not None and 0 < l_max <= self.max_tilde_len else None
        lam, P, B, _ = hippo_legs_nplr(d_state, rank)
        # Shared by all channels (one SSM copy): Lambda, P, B.
        self.log_A_real = nn.Parameter(torch.log(-lam.real).float())
        self.A_imag = nn.Parameter(lam.imag.float())
        self.P = nn.Parameter(torch.view_as_real(P).float().contiguous())  # (R, N/2, 2)
        self.B = nn.Parameter(torch.view_as_real(B).float().contiguous())  # (N/2, 2)
        # Per channel: C ~ CN(0, 1) (C~ or the true C, see above; real pairs), D,
        # log dt ~ U[log dt_min, log dt_max].
        self.C = nn.Parameter(torch.randn(H, N2, 2) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(H))
        self.log_dt = nn.Parameter(
            torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))

    def ssm_parameters(self) -> list[nn.Parameter]:
        return [self.log_A_real, self.A_imag, self.P, self.B, self.log_dt]

    # --- parameters ------------------------------------------------------------------------------
    def _params(self, dtype: torch.dtype | None = None) -> tuple[Tensor, ...]:
        """(dt, Lambda, P, B, C as stored: C~ for l_max, or the true C without l_max)."""
        def get(p: Tensor) -> Tensor:
            return p if dtype is None else p.to(dtype)
        lam = torch.complex(-torch.exp(get(self.log_A_real)), get(self.A_imag))
        P, B, C = (torch.view_as_complex(get(p).contiguous()) for p in (self.P, self.B, self.C))
        return torch.exp(get(self.log_dt)), lam, P, B, C

    def ssm(self, dtype: torch.dtype | None = None) -> tuple[Tensor, ...]:
        """(dt (H,), Lambda (N/2,), P (R, N/2), B (N/2,), C (H, N/2)), the last four complex, C the
        true C; computed in `dtype` (default: the parameters' own). With `l_max` the true C costs
        log2 l_max dense N x N products and a solve per channel (0.25 s for the 256-channel centre
        layer): it is solved once in float64 and kept while the parameters are unchanged."""
        dt, lam, P, B, C = self._params(dtype)
        if self.l_max is None:
            return dt, lam, P, B, C
        return dt, lam, P, B, self.step_cache(self._true_c, slot="true_c").to(C.dtype)

    def _true_c(self) -> Tensor:
        """C (H, N/2) complex128 from C~: C (I - dA^l) = C~ on the real form, rows
        g (I - A^l) = g~, solved in float64."""
        hi = hi_dtype(self.log_dt.device)
        C = self._params(hi)[4]
        Ahat = self.transition_matrix(self._dynamics(hi))
        Al = matpow(powers(Ahat, self.l_max), self.l_max)
        eye = torch.eye(Al.shape[-1], dtype=hi, device=Al.device)
        N2 = self.d_state // 2
        gt = torch.cat([2 * C.real, -2 * C.imag], -1)
        g = torch.linalg.solve((eye - Al).transpose(1, 2), gt.unsqueeze(-1)).squeeze(-1)
        return torch.complex(g[..., :N2], -g[..., N2:]) / 2

    def _dynamics(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The `prepare_step` tensors that do not involve C and D (all `advance` needs)."""
        dt, lam, P, B, _ = self._params(dtype)
        E = 2 / dt[:, None] + lam
        G = 1 / (2 / dt[:, None] - lam)
        S = 2 * torch.einsum("rn,hn,sn->hrs", P.conj(), G, P).real
        S = S + torch.eye(P.shape[0], dtype=S.dtype, device=S.device)
        planar = lambda z: torch.cat([z.real, z.imag], -1)  # noqa: E731
        Pp = planar(P)
        return {"E1": torch.cat([E.real, E.real], -1), "E2": torch.cat([-E.imag, E.imag], -1),
                "G1": torch.cat([G.real, G.real], -1), "G2": torch.cat([-G.imag, G.imag], -1),
                "P": Pp, "P2": 2 * Pp, "GP": planar(G[:, None, :] * P), "Sinv": torch.linalg.inv(S),
                "B2": planar(2 * B)}

    def prepare_step(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Real tensors for the O(N) Woodbury step (`advance`), exportable as they are.

        The step works on the planar real state rho(x) = [Re x; Im x] (..., H, N). With
        E = 2/dt + Lambda and G = (2/dt - Lambda)^-1 (H, N/2), a complex diagonal product E x is
        E1 * rho + E2 * swap(rho), swap exchanging the halves;
        E1 = [Re E, Re E], E2 = [-Im E, Im E].
        P = [Re P, Im P] (R, N), P2 = 2 P; GP = rho(G P) (H, R, N);
        Sinv = (I + 2 Re(P^* G P))^-1 (H, R, R); B2 = rho(2 B) (N,); C = [2 Re C, -2 Im C] (H, N)
        so that y = C . rho(x) + D u; D (H,).
        """
        C = self.ssm(dtype)[4]
        return {**self._dynamics(dtype), "C": torch.cat([2 * C.real, -2 * C.imag], -1),
                "D": self.D if dtype is None else self.D.to(dtype)}

    def fast_step(self) -> dict[str, Tensor]:
        """The step cache (`prepare_step`) in the "s4" layout of `FAST_LAYOUTS`: the same tensors
        split into their real and imaginary halves (views; only 2 Im C changes sign, exactly)."""
        k = self.step_cache()
        n2 = self.d_state // 2
        re = lambda z: z[..., :n2]  # noqa: E731 (planar [Re; Im] halves)
        im = lambda z: z[..., n2:]  # noqa: E731
        # E1 = [Re E, Re E], E2 = [-Im E, Im E] (likewise G); C = [2 Re C, -2 Im C]
        return {"E_re": re(k["E1"]), "E_im": im(k["E2"]), "G_re": re(k["G1"]),
                "G_im": im(k["G2"]), "P_re": re(k["P"]), "P_im": im(k["P"]),
                "GP_re": re(k["GP"]), "GP_im": im(k["GP"]), "B2_re": re(k["B2"]),
                "B2_im": im(k["B2"]), "C2_re": re(k["C"]), "C2_im": -im(k["C"]), "D": k["D"],
                "Sinv": k["Sinv"]}

    @staticmethod
    def advance(k: dict[str, Tensor], x: Tensor, u: Tensor | None = None) -> Tensor:
        """rho(x') = rho(dA x + dB u) for the planar state x (..., H, N), O(N) per channel:
        w = (2/dt + A) x + 2 B u with A x = Lambda x - P 2 Re(P^* x), then the Woodbury solve
        x' = G w - G P Sinv 2 Re(P^* G w)."""
        n2 = x.shape[-1] // 2
        swap = lambda z: z.unflatten(-1, (2, n2)).flip(-2).flatten(-2)  # noqa: E731
        w = k["E1"] * x + k["E2"] * swap(x) - _lowrank(x @ k["P2"].T, k["P"])
        if u is not None:
            w = w + k["B2"] * u.unsqueeze(-1)
        v = k["G1"] * w + k["G2"] * swap(w)
        c = v @ k["P2"].T  # (..., H, R)
        GP, Sinv = k["GP"], k["Sinv"]
        if GP.shape[1] == 1:
            return v - (c * Sinv[:, 0]) * GP[:, 0]
        return v - (_matvec(Sinv, c).unsqueeze(-1) * GP).sum(-2)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        k = self.step_cache()
        s = self.advance(k, torch.cat(state, -1), x)
        y = (k["C"] * s).sum(-1) + k["D"] * x
        n2 = s.shape[-1] // 2
        return y, (s[..., :n2], s[..., n2:])

    # --- the parallel machinery ------------------------------------------------------------------
    def transition_matrix(self, k: dict[str, Tensor] | None = None) -> Tensor:
        """dA as a real (H, N, N) matrix acting on rho(x) = [Re x; Im x]."""
        k = self._dynamics() if k is None else k
        eye = torch.eye(self.d_state, dtype=k["E1"].dtype, device=k["E1"].device).unsqueeze(1)
        return self.advance(k, eye).permute(1, 2, 0)  # column j = rho(dA e_j)

    def _plan(self, L: int) -> tuple[int, int]:
        """Block length T and block count: T <= block_size, halved (down to 64) while the
        (H, T, N/2) tensors would exceed H T = block_elems (wide tiers get shorter blocks: the
        dense N x N work depends on log L only, the Cauchy and FFT work on H T)."""
        cap = self.block_size
        while cap > 64 and self.d_model * cap > self.block_elems:
            cap //= 2
        T = L if L <= cap else cap
        return T, -(-L // T)

    def _nodes(self, T: int) -> tuple[Tensor, Tensor, Tensor]:
        """The Cauchy nodes at zeta_k = exp(-2 pi i k/T): a (H, T), b (T, N/2) with the
        reciprocals q = 1 / (a[h, k] - b[k, n]) = 1/Delta_n, and 1 + zeta (T, 1)."""
        dt, lam = self._params()[:2]
        zeta = _roots(T, lam.dtype, lam.device)
        z1 = (1 + zeta)[:, None]
        return (2 / dt)[:, None] * (1 - zeta), z1 * lam, z1

    def _cauchy(self, T: int, ct: Tensor, keep_q: bool = False, extra: Tensor | None = None):
        """Cauchy sums at zeta_k = exp(-2 pi i k/T), k < T, over the stored half of the modes.

        With q_n = 1/Delta_n (H, T, N/2) one batched matmul gives every sum the Woodbury form
        needs: P^* Q P (full), P^* Q B (full), and per row b of ct (H, nb, N/2): ct Q B, ct Q P;
        and the sums of any `extra` columns (H, J, N/2) in the same pass.
        Returns (S, parts): S (H, nb, T) = ct_b (I - zeta dA)^-1 dB summed over the half modes
        (the kernel is 2 Re ifft S), parts a `_Woodbury` (for `_state_maps` and `_tilde_sums`):
        q only with `keep_q`; otherwise the sums come from `cauchy` (compiled on CPU) and q is
        never built.
        """
        dt, lam, P, B, _ = self._params()
        R, nb = P.shape[0], ct.shape[1]
        a, b, z1 = self._nodes(T)
        Pc = P.conj()
        H = a.shape[0]
        cols = torch.cat([(Pc[:, None, :] * P[None]).reshape(R * R, -1), Pc * B], 0)  # (R*R+R, n)
        cols = [cols.expand(H, -1, -1), ct * B, (ct[:, :, None, :] * P).flatten(1, 2)]
        cols = torch.cat(cols if extra is None else [*cols, extra], 1)
        if keep_q:  # the state maps need the (H, T, N/2) reciprocals themselves
            q = 1 / (a.unsqueeze(-1) - b)
            sums = q @ cols.transpose(1, 2)  # (H, T, R*R + R + nb + nb*R [+ J])
        else:
            q, sums = None, cauchy(a, b, cols)
        o = R * R + R + nb + nb * R  # where the extra columns' sums start
        Mraw = sums[..., : R * R].unflatten(-1, (R, R))  # [s, r]: sum q Pc_s P_r, stored half
        sPB = _full(sums[..., R * R: R * R + R])
        sCB = sums[..., R * R + R: R * R + R + nb].transpose(1, 2)  # (H, nb, T)
        sCP = sums[..., R * R + R + nb: o].unflatten(-1, (nb, R)).transpose(1, 2)  # (H, nb, T, R)
        eye = torch.eye(R, dtype=sums.dtype, device=sums.device)
        Kinv = _inv(eye + z1[..., None] * _full(Mraw))  # Woodbury core (H, T, R, R)
        coef = z1 * torch.einsum("htrs,hts->htr", Kinv, sPB)  # (H, T, R)
        S = 2 * (sCB - (sCP * coef.unsqueeze(1)).sum(-1))
        return S, _Woodbury(q, z1, Kinv, coef, Mraw, sCP, sums[..., o:])

    def _state_maps(self, ct0: Tensor, parts, echo: bool) -> tuple[Tensor, Tensor | None]:
        """The resolvent vectors X = (I - zeta dA)^-1 dB and (if `echo`), for the row ct0 (H, N/2),
        the echo rows ct0~ (I - zeta dA)^-1 dA = ct0~ W M2, both (H, T, N/2) (half modes)."""
        dt, lam, P, B, _ = self._params()
        q, z1, Kinv, coef = parts.q, parts.z1, parts.Kinv, parts.coef
        Pc = P.conj()
        X = 2 * q * (B - _lowrank(coef, P))
        if not echo:
            return X, None
        sCP = _full(q @ (ct0[:, :, None] * P.T))  # (H, T, R)
        rho = z1 * torch.einsum("htr,htrs->hts", sCP, Kinv)
        row = q * (ct0[:, None, :] - _lowrank(rho, Pc))  # ct0~ W
        sRP = _full(row @ P.T)
        return X, row * ((2 / dt)[:, None, None] + lam) - _lowrank(sRP, Pc)

    def _rows(self, C: Tensor, AT: Tensor, nb: int) -> tuple[Tensor, Tensor]:
        """C~_b = C dA^(bT) (I - dA^T) for b < nb: as real rows gt (H, nb, N) acting on rho(x)
        (y = gt . rho(x)) and as complex half-mode rows ct (H, nb, N/2) (y = 2 Re(ct x))."""
        g = torch.cat([2 * C.real, -2 * C.imag], -1).unsqueeze(-1)  # (H, N, 1)
        gam = krylov(AT.transpose(1, 2), g, nb)[..., 0].transpose(1, 2)  # (H, nb, N)
        gt = gam - gam @ AT
        N2 = self.d_state // 2
        return gt, torch.complex(gt[..., :N2], -gt[..., N2:]) / 2

    def _kernel_parts(self, L: int, with_state: bool, echo: bool = True):
        """The dense N x N work (dA, its powers, C~) runs in float64 whatever the parameters'
        dtype: it is tiny, and dA^T's sensitivity grows with T (float32 lost 1e-4 at T = 4096)."""
        T, nb = self._plan(L)
        hi = hi_dtype(self.log_dt.device)
        Ahat = self.transition_matrix(self._dynamics(hi))
        sq = powers(Ahat, T)
        AT = matpow(sq, T)
        gt, ct = self._rows(self.ssm(hi)[4], AT, nb)
        ct = ct.to(self._params()[1].dtype)
        if not with_state:  # S4's kernel: Cauchy sums of C~_b against the Woodbury resolvent
            S, parts = self._cauchy(T, ct)
            K = 2 * torch.fft.ifft(S, dim=-1).real
            return K.reshape(self.d_model, nb * T)[:, :L], None
        # With a state the resolvent vectors X are needed anyway: their inverse FFT f_j (aliased
        # dA^j dB) against the real rows gives the same kernel by one real matmul.
        _, parts = self._cauchy(T, ct[:, :1], keep_q=True)
        X, Grow = self._state_maps(ct[:, 0], parts, echo)
        f = torch.view_as_real(torch.fft.ifft(X, dim=1)).flatten(2)  # (H, T, N) pairs interleaved
        N2 = self.d_state // 2
        gi = torch.stack([gt[..., :N2], gt[..., N2:]], -1).flatten(2).to(f.dtype)  # interleaved
        K = (gi @ f.transpose(1, 2)).reshape(self.d_model, nb * T)[:, :L]
        return K, (T, nb, sq, AT, f, Grow)

    def kernel(self, L: int) -> Tensor:
        """K (H, L): K_l = 2 Re(C dA^l dB)."""
        if self.l_max is not None and L <= self.l_max:
            return self.tilde_kernel()[:, :L]
        return self._kernel_parts(L, False)[0]

    def tilde_kernel(self) -> Tensor:
        """K (H, l_max) straight from the parameter C~: the Cauchy sums at the l_max-th roots of
        unity and one inverse FFT (the fast path of training; `_kernel_parts` is its reference)."""
        return 2 * torch.fft.ifft(self._tilde_sums(None)[0], dim=-1).real

    def _tilde_sums(self, z: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """At the l_max-th roots of unity, from the parameter C~ = C (I - dA^l_max): S (H, l_max),
        whose inverse FFT is the training kernel (as `tilde_kernel`), and, for an initial state z
        (B, H, N/2) (half modes), the spectrum E (B, H, l_max) of its echo 2 Re(C dA^(t+1) z),
        t < l_max. E = C~ (I - zeta dA)^-1 dA z (the truncated generating function): the echo
        rows of `_state_maps` contracted with z before they are formed, so z's sums are 1 + R
        more columns per batch row of the kernel's own Cauchy pass, and no matrix power is
        differentiated."""
        dt, lam, P, _, ct = self._params()
        if z is None:
            return self._cauchy(self.l_max, ct[:, None, :])[0][:, 0], None
        z = z.to(lam.dtype)
        Pc = P.conj()
        w = (((2 / dt)[:, None] + lam) * z).transpose(0, 1)  # (2/dt + Lambda) z (H, B, N/2)
        nz = w.shape[1]
        extra = [ct[:, None, :] * w, (Pc[None, :, None, :] * w[:, None]).flatten(1, 2)]
        S, wb = self._cauchy(self.l_max, ct[:, None, :], extra=torch.cat(extra, 1))
        sCP = wb.sCP[:, 0]  # sum q C~ P_r (H, T, R), stored half
        sCW = wb.extra[..., :nz]  # sum q C~ w_b (H, T, B)
        sPW = wb.extra[..., nz:].unflatten(-1, (-1, nz))  # sum q Pc_s w_b (H, T, R, B)
        rho = wb.z1 * torch.einsum("htr,htrs->hts", _full(sCP), wb.Kinv)
        sRP = _full(sCP - torch.einsum("hts,htsr->htr", rho, wb.Mraw))  # the echo rows against P
        pz = torch.einsum("rn,bhn->hrb", Pc, z)
        E = sCW - torch.einsum("hts,htsb->htb", rho, sPW) - torch.einsum("htr,hrb->htb", sRP, pz)
        return S[:, 0], E.permute(2, 0, 1)

    def _final_state_of(self, u: Tensor, state: State) -> State:
        """The state after u (B, H, L) from `state`, one block of T = L (no gradients wanted):
        x_L = r + dA^L (x0 - r), r = sum_j f_j u_(L-1-j) from the aliased f_j = (I - dA^L)^-1
        dA^j dB, the inverse FFT of the resolvent vectors X_k = 2 q_k (B - coef_k P) (half
        modes). By Parseval r = sum_k X_k V_k with V the inverse FFT of the reversed input, so
        r = 2 B (sum_k q_k V_k) - 2 P (sum_k q_k coef_k V_k): transposed Cauchy sums, compiled on
        CPU, and neither X nor the reciprocals are formed. dA^L by log2 L squarings in float64.
        Neither the true C nor the kernel is needed."""
        Bt, H, L = u.shape
        hi = hi_dtype(self.log_dt.device)
        AL = matpow(powers(self.transition_matrix(self._dynamics(hi)), L), L)
        _, lam, P, B, ct = self._params()
        coef = self._cauchy(L, ct[:, None, :])[1].coef  # (H, L, R)
        V = torch.fft.ifft(u.flip(-1).to(lam.dtype), dim=-1).permute(1, 2, 0)  # (H, L, B)
        w = torch.cat([V, (coef.unsqueeze(-1) * V.unsqueeze(-2)).flatten(2)], -1)
        a, b, _ = self._nodes(L)
        U = cauchy_transposed(a, b, w)  # (H, B + R B, N/2)
        UP = U[:, Bt:].unflatten(1, (P.shape[0], Bt))  # (H, R, B, N/2)
        r = 2 * (B * U[:, :Bt] - torch.einsum("rn,hrbn->hbn", P, UP))  # (H, B, N/2)
        r = torch.cat([r.real, r.imag], -1).transpose(1, 2).to(hi)  # rho form (H, N, B)
        x0 = torch.cat(state, -1).permute(1, 2, 0).to(hi)
        xL = (r + AL @ (x0 - r)).permute(2, 0, 1).to(u.dtype)
        N2 = self.d_state // 2
        return xL[..., :N2].contiguous(), xL[..., N2:].contiguous()

    # --- modes -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        u = x.transpose(1, 2)  # (B, H, L)
        K = self.cached_kernel(u.shape[-1]).to(u.dtype)
        y = causal_conv(u, K) + self.D.unsqueeze(-1) * u
        return y.transpose(1, 2)

    def read_carried(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Training's carried read (`SequenceBackend.read_carried`). At the training length, where
        the parameter C is C~ for it, the outputs are the training kernel's convolution plus the
        state's echo, both from Cauchy sums (`_tilde_sums`), and the state after the chunk is
        made without gradients (`_final_state_of`): no differentiated matrix powers, which made
        a carried read of the general machinery ~9x a fresh one. Other lengths: the default."""
        L = x.shape[1]
        if self.l_max is None or L != self.l_max:
            return super().read_carried(x, state)
        u = x.transpose(1, 2)  # (B, H, L)
        z = torch.complex(state[0], state[1])
        S, E = self._tilde_sums(z if bool((z != 0).any()) else None)
        K = 2 * torch.fft.ifft(S, dim=-1).real
        y = causal_conv(u, K.to(u.dtype)) + self.D.unsqueeze(-1) * u
        if E is not None:
            y = y + 2 * torch.fft.ifft(E, dim=-1).real.to(y.dtype)
        with torch.no_grad():
            xL = self._final_state_of(u, state)
        return y.transpose(1, 2), xL

    def forward_with_state(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        u = x.transpose(1, 2)  # (B, H, L)
        Bt, H, L = u.shape
        N2 = self.d_state // 2
        x0 = torch.cat(state, -1).permute(1, 2, 0)  # rho(x0) (H, N, B)
        echo = bool((x0 != 0).any())  # reading from a fresh state skips the echo
        # kept per (length, echo) while the parameters stand: a streamed read repeats both
        K, (T, nb, sq, AT, f, Grow) = self.step_cache(lambda: self._kernel_parts(L, True, echo),
                                                      slot=f"parts:{L}:{int(echo)}")
        y = causal_conv(u, K.to(u.dtype)) + self.D.unsqueeze(-1) * u
        # Echo of the initial state: y_(bT+t) += 2 Re(g_t . dA^(bT) x0), g_t = C dA^(t+1).
        Z = krylov(AT, x0.to(AT.dtype), nb)  # dA^(bT) x0 (H, N, nb, B)
        if echo:
            g = torch.fft.ifft(Grow, dim=1)  # (H, T, N/2)
            # 2 Re(g z) = [g_re, g_im] . [2 z_re, -2 z_im], pairs interleaved: a view of g.
            Zi = torch.stack([2 * Z[:, :N2], -2 * Z[:, N2:]], 2).flatten(1, 2).to(g.real.dtype)
            echo = torch.einsum("htj,hjkb->bhkt", torch.view_as_real(g).flatten(2), Zi)
            y = y + echo.reshape(Bt, H, nb * T)[..., :L].to(y.dtype)
        # Final state: dA^L x0 + sum_j dA^j dB u_(L-1-j), blockwise (front-padded with zeros).
        # The inverse FFT of X is aliased, (I - dA^T)^-1 dA^j dB: the block sums get (I - dA^T).
        up = torch.nn.functional.pad(u, (nb * T - L, 0)).to(f.dtype)
        up = up.reshape(Bt, H, nb, T).flip(-1)  # input T-1-j of each block meets dA^j dB
        s = torch.einsum("htj,bhkt->hjkb", f, up)  # interleaved pairs
        s = s.unflatten(1, (N2, 2)).transpose(1, 2).flatten(1, 2).to(AT.dtype)  # (H, N, nb, B)
        s = s - (AT @ s.flatten(2)).view_as(s)
        xL = matpow(sq, L - (nb - 1) * T) @ Z[:, :, -1] + horner(AT, s)  # (H, N, B)
        xL = xL.permute(2, 0, 1).to(u.dtype)
        return y.transpose(1, 2), (xL[..., :N2].contiguous(), xL[..., N2:].contiguous())
