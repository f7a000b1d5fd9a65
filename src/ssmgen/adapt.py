"""Adapting a model to one song while it reads it: dynamic evaluation (Krause et al., "Dynamic
Evaluation of Neural Sequence Models", ICML 2018).

The song is read in crops of the model's training length, the state carried from one crop to the
next as `continue` reads a prompt. Each crop is scored by the weights as they stand, then one Adam
step on that crop's loss moves them towards the song. Because a crop is always scored before the
model learns from it, one pass is a prequential code (a decoder that adapts the same way decodes
it): `eval --adapt` reports an honest code length, comparable with the classical coder, which
adapts to each file too. `continue` makes a few passes over the prompt, then generates with the
adapted weights (docs/architecture.md says why; docs/benchmarks.md how the settings were chosen).

The settings and their defaults import nothing heavy, so that the command line shows them in its
help without loading torch; the functions import it when called.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from ssmgen.validate import number

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor, nn

#: Adam's step size while adapting (a twentieth of the cpu recipe's training rate).
ADAPT_LR = 1e-4
#: Passes `continue` makes over its prompt before generating (one: it then takes about as long as
#: the default 8 s prompt plays, so a stream does not wait for it).
ADAPT_PASSES = 1
#: Adam's moment decays while adapting: a short memory, since a song is a few hundred steps.
ADAPT_BETAS = (0.9, 0.99)


@dataclass(frozen=True)
class Adaptation:
    """How a model adapts to a song: `passes` over it, Adam at `lr`."""

    passes: int = ADAPT_PASSES
    lr: float = ADAPT_LR

    def checked(self) -> "Adaptation":
        """Itself, with every number checked (UserError naming the option otherwise)."""
        number("--adapt-passes", self.passes, low=0, high=100, integer=True)
        checked_lr(self.lr)
        return self


def checked_lr(lr: float) -> float:
    """`lr` if it is a usable adaptation rate (UserError naming --adapt-lr otherwise)."""
    return number("--adapt-lr", lr, low=0, low_open=True, high=1)


def adaptation_optimizer(model: nn.Module, lr: float = ADAPT_LR) -> torch.optim.Optimizer:
    """A fresh Adam over every trainable weight of `model`."""
    import torch

    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                            betas=ADAPT_BETAS)


def read_adapting(model: nn.Module, tokens: np.ndarray, length: int,
                  optimizer: torch.optim.Optimizer) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over one song's `tokens` in crops of `length`, the state carried from the song's
    first sample: yields each crop's (logits (1, n, 256), targets (1, n)) as the weights before
    its step scored it, after taking that step. A crop whose loss is not finite is not learnt
    from. The model is read in eval mode (no dropout) and left in it."""
    import torch
    import torch.nn.functional as F

    from ssmgen.data import token_chunks

    model.eval()
    device = next(model.parameters()).device
    state = model.initial_state(1, device=device)
    for inputs, targets in token_chunks(tokens, length, streamed=True):
        x = torch.from_numpy(inputs).to(device)
        y = torch.from_numpy(targets).to(device)
        with torch.enable_grad():
            logits, state = model(x, state)  # training's carried read: the state comes detached
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            if torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        yield logits.detach(), y


def adapt_to(model: nn.Module, tokens: np.ndarray, length: int, adaptation: Adaptation, *,
             progress: Callable[[int], None] | None = None) -> list[float]:
    """Adapt `model` in place to one song's `tokens`: `adaptation.passes` passes of
    `read_adapting`, one optimizer throughout. Returns each pass's bits per sample (the first is
    the prequential figure `eval --adapt` reports). `progress(n)` after each crop of n samples."""
    import torch.nn.functional as F

    optimizer = adaptation_optimizer(model, adaptation.lr)
    bits = []
    for _ in range(adaptation.passes):
        nll, n = 0.0, 0
        for logits, y in read_adapting(model, tokens, length, optimizer):
            nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum").item()
            n += y.numel()
            if progress is not None:
                progress(y.numel())
        bits.append(nll / max(n, 1) / math.log(2))
    return bits


@contextmanager
def weights_kept(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Inside, `model` may adapt; on leaving, its weights (and buffers) are put back as they were.
    Yields a function that puts them back early (between songs)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore() -> None:
        model.load_state_dict(saved)

    try:
        yield restore
    finally:
        restore()
