"""A classical coder inside the model, as LPCNet put one inside WaveRNN: a linear predictor over the
last samples gives each next sample a centre and a scale, and the network's logits are ADDED to the
log-probabilities of a discretized logistic there. Training therefore starts at the classical
coder's level (the head starts at zero) and the network learns only what the predictor misses.

The predictor is the one `classical.fit` makes from a dataset (the class is its shape, the numbers
are buffers, so a checkpoint carries them and nothing here is learned by gradient):

    x^_(t+1) = sum_k a_k x_(t+1-k)                      (LPC of order ORDER on decoded tokens)
    m_t      = mean |x_j - x^_j| over the last W samples (a mask over a ring of RING residuals;
               over the n < W seen so far at the start, as the coder does at a file's start)
    log p(k) = log((1 - eps) P(lo_k <= X < hi_k) + eps / 256),  X ~ logistic(x^, max(c m, floor))

Its recurrent state is three small tensors: the last ORDER samples, the last RING absolute
residuals (the pending prediction is recomputed from the first) and how many samples it has seen
(counted up to RING, as a float so that every engine keeps it like the rest); zeros at the start,
in parallel and in the step alike, so parallel == step holds here as everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmgen.tokens import N_TOKENS

ORDER = 32
RING = 512  # the longest residual window the coder's tuning may choose (classical.WINDOWS)
EDGE = 1e4  # the end bins' outer edges (+-inf in the coder): far enough, finite for every engine
#: The prior's recurrent state, in this order (SaShiMi.state_names appends "prior.<name>").
STATE = (("hist", ORDER), ("res", RING), ("seen", 1))


class LinearPredictionPrior(nn.Module):
    """Log-probabilities (..., 256) of the next token under the fitted coder; see the module."""

    def __init__(self) -> None:
        super().__init__()
        # coef[k] multiplies hist[:, k] (oldest first): coef = a_ORDER ... a_1
        self.register_buffer("coef", torch.zeros(ORDER))
        self.register_buffer("mask", torch.ones(RING))  # 1 on the last W residuals, else 0
        self.register_buffer("table", torch.zeros(N_TOKENS))  # token -> decoded sample
        self.register_buffer("lo", torch.zeros(N_TOKENS))
        self.register_buffer("hi", torch.zeros(N_TOKENS))
        self.register_buffer("width", torch.ones(N_TOKENS))  # hi - lo, from the float64 edges
        self.register_buffer("settings", torch.tensor([1.0, 1e-4, 1e-4, RING]))  # c floor eps W

    @torch.no_grad()
    def load_coder(self, coder: dict) -> None:
        """Take a `classical.fit` result (logistic, order ORDER, window <= RING)."""
        from ssmgen.audio import decode
        from ssmgen.classical import bin_edges
        if coder["dist"] != "logistic" or coder["order"] != ORDER or coder["window"] > RING:
            raise ValueError(f"the prior takes a logistic coder of order {ORDER} with a window "
                             f"<= {RING}, not {coder['dist']} {coder['order']} {coder['window']}")
        a = np.asarray(coder["coefficients"], np.float64)
        self.coef.copy_(torch.from_numpy(a[::-1].copy()))
        mask = np.zeros(RING)
        mask[RING - coder["window"]:] = 1.0
        self.mask.copy_(torch.from_numpy(mask))
        lo, hi = bin_edges(coder["encoding"])
        self.lo.copy_(torch.from_numpy(np.clip(lo, -EDGE, EDGE)))
        self.hi.copy_(torch.from_numpy(np.clip(hi, -EDGE, EDGE)))
        self.width.copy_(torch.from_numpy(np.clip(hi, -EDGE, EDGE) - np.clip(lo, -EDGE, EDGE)))
        table = decode(np.arange(N_TOKENS, dtype=np.uint8), coder["encoding"])
        self.table.copy_(torch.from_numpy(np.asarray(table, np.float64)))
        self.settings.copy_(torch.tensor([coder["scale"], coder["floor"], coder["eps"],
                                          coder["window"]]))

    def problem(self) -> str | None:
        """What makes these numbers unusable (a checkpoint is data: a scale of 0 would divide by
        zero, a mask of other values would not be a window), or None."""
        c, floor, eps, window = self.settings.tolist()
        if not (c > 0 and floor > 0 and 0 < eps < 1 and 1 <= window <= RING and window % 1 == 0):
            return f"settings scale {c}, floor {floor}, eps {eps}, window {window} out of range"
        if not torch.equal(self.mask, (torch.arange(RING) >= RING - window).to(self.mask.dtype)):
            return "its window mask is not the last `window` residuals"
        if not (bool((self.width > 0).all()) and bool((self.hi > self.lo).all())
                and bool((self.table.abs() <= 1).all())):
            return "its bins or decoding table are out of range"
        return None

    def log_prob(self, pred: Tensor, total: Tensor, seen: Tensor) -> Tensor:
        """log p of every token, (..., 256), for centres `pred`, the sums of the last W absolute
        residuals `total` and the samples `seen` so far (...)."""
        c, floor, eps, window = (self.settings[i] for i in range(4))
        m = total / torch.clamp(torch.minimum(seen, window), min=1.0)
        s = torch.maximum(c * m, floor).unsqueeze(-1)
        p = pred.unsqueeze(-1)
        a, b = (self.lo - p) / s, (self.hi - p) / s
        # sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a - b)): no difference of two
        # close numbers, so a bin much narrower than the scale (mu-law's near zero) keeps its
        # digits; 1 - e^-d as 2 tanh(d/2) / (1 + tanh(d/2)) (exact for small d, as expm1, which
        # has no ONNX op)
        h = torch.tanh(0.5 * torch.clamp(self.width / s, max=80.0))
        prob = _sigmoid(b) * _sigmoid(-a) * (2 * h / (1 + h))
        return torch.log((1 - eps) * prob + eps / N_TOKENS)

    def initial_state(self, batch_size: int, device, dtype) -> dict[str, Tensor]:
        return {f"prior.{n}": torch.zeros(batch_size, w, device=device, dtype=dtype)
                for n, w in STATE}

    def parallel(self, tokens: Tensor, state: dict[str, Tensor] | None, want: bool = True
                 ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """tokens (B, L) -> (log p of each next token (B, L, 256) or None, the state after them)."""
        # float32 always: in bf16 a prediction is off by more than a bin near zero
        with torch.autocast(tokens.device.type, enabled=False):
            return self._parallel(tokens, state, want)

    def _parallel(self, tokens: Tensor, state: dict[str, Tensor] | None, want: bool):
        B = tokens.shape[0]
        if state is None:
            state = self.initial_state(B, tokens.device, self.table.dtype)
        x = self.table[tokens]
        hist = torch.cat([state["prior.hist"], x], dim=1)  # (B, ORDER + L)
        # pnext[:, j] = prediction from hist[:, j:j + ORDER]: j = 0 is the pending one
        pnext = _dot(hist, self.coef)
        e = (x - pnext[:, :-1]).abs()
        res = torch.cat([state["prior.res"], e], dim=1)  # (B, RING + L)
        total = _dot(res[:, 1:], self.mask)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
        seen = torch.clamp(state["prior.seen"] + steps, max=RING)  # (B, L)
        new = {"prior.hist": hist[:, -ORDER:], "prior.res": res[:, -RING:],
               "prior.seen": seen[:, -1:]}
        return (self.log_prob(pnext[:, 1:], total, seen) if want else None), new

    def step(self, token: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """token (B,) -> (log p of the next token (B, 256), the next state)."""
        with torch.autocast(token.device.type, enabled=False):
            return self._step(token, state)

    def _step(self, token: Tensor, state: dict[str, Tensor]):
        x = self.table[token].unsqueeze(1)
        e = (x - _dot1(state["prior.hist"], self.coef)).abs()
        hist = torch.cat([state["prior.hist"][:, 1:], x], dim=1)
        res = torch.cat([state["prior.res"][:, 1:], e], dim=1)
        seen = torch.clamp(state["prior.seen"] + 1, max=RING)
        new = {"prior.hist": hist, "prior.res": res, "prior.seen": seen}
        return self.log_prob(_dot1(hist, self.coef).squeeze(1), _dot1(res, self.mask).squeeze(1),
                             seen.squeeze(1)), new


#: |z| beyond which a sigmoid is taken as at ZMAX: sigmoid(-30) = 9e-14, a millionth of the least
#: eps / 256 mixed in, so no log-probability moves; and exp never overflows (its slow path here).
ZMAX = 30.0


def _sigmoid(z: Tensor) -> Tensor:
    """1 / (1 + e^-z) with z clamped to +-ZMAX, written out: onnxruntime's Sigmoid clamps its
    input near +-18, which turns a far tail's 1e-11 into 1e-8."""
    return 1 / (1 + torch.exp(-torch.clamp(z, -ZMAX, ZMAX)))


def _dot(x: Tensor, w: Tensor) -> Tensor:
    """Each window of len(w) consecutive values of x (B, n) times w: (B, n - len(w) + 1). Summed
    in float64, then rounded: the read (a convolution) and the step (one window) add in different
    orders, and a centre a few ulps apart moves a narrow logistic's log-probabilities by 1e-4."""
    out = F.conv1d(x.double().unsqueeze(1), w.double().view(1, 1, -1)).squeeze(1)
    return out.to(x.dtype)


def _dot1(x: Tensor, w: Tensor) -> Tensor:
    """`_dot` of the one window (B, len(w)) -> (B, 1), as a product (onnxruntime has no float64
    convolution)."""
    return (x.double() @ w.double().unsqueeze(1)).to(x.dtype)
