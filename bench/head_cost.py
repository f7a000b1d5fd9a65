"""What an output head costs per training step on this CPU: the 256-way softmax (the model's)
against a discretized mixture of K logistics over the 256 mu-law bins (PixelCNN++), forward +
backward of the loss over one batch of 4 x 4096 positions from 64 channels, one intra-op thread.

    python bench/head_cost.py [--k 4 10] [--repeats 4]

Prints the median seconds per head; docs/benchmarks.md ("Ablations on real music") has the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

N, D, BINS = 4 * 4096, 64, 256


def _mixture_nll(p: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Discretized logistic mixture over BINS uniform bins of [-1, 1] (the end bins open), each
    bin's mass as sigmoid(b) sigmoid(-a) (1 - e^(a - b)): no cancellation in narrow bins."""
    c = torch.arange(BINS, dtype=torch.float32)
    centre = c / (BINS - 1) * 2 - 1
    lo = torch.where(c == 0, torch.tensor(-1e4), centre - 1 / (BINS - 1))
    hi = torch.where(c == BINS - 1, torch.tensor(1e4), centre + 1 / (BINS - 1))
    p = p.view(-1, 3, k)
    logit_pi, mu, log_s = p[:, 0], p[:, 1], p[:, 2].clamp(min=-7)
    inv = torch.exp(-log_s)[..., None]
    a, b = (lo - mu[..., None]) * inv, (hi - mu[..., None]) * inv
    logp = F.logsigmoid(b) + F.logsigmoid(-a) + torch.log(-torch.expm1(a - b))
    logp = torch.logsumexp(F.log_softmax(logit_pi, -1)[..., None] + logp, dim=1)
    return F.nll_loss(logp, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 10])
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(N, D), torch.randint(0, BINS, (N,))
    for name, k in [("softmax", 0)] + [(f"mixture K={k}", k) for k in args.k]:
        w = (torch.randn(BINS if k == 0 else 3 * k, D) * 0.1).requires_grad_()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = F.linear(x, w)
            loss = F.cross_entropy(out, y) if k == 0 else _mixture_nll(out, y, k)
            loss.backward()
            times.append(time.perf_counter() - t)
        print(f"{name:>14}: {statistics.median(times):.3f} s forward + backward per batch")


if __name__ == "__main__":
    main()
