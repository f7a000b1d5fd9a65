"""A running average of the weights (Polyak averaging with an exponential window), used for
validation, the best checkpoint and its listening samples while training updates the raw ones.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the first steps' random
weights leave the average quickly. Its state travels in the run's checkpoints, so a resumed run
continues the same average.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class WeightAverage:
    """The average of `model`'s floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone()
                                          for k, v in model.state_dict().items()
                                          if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's weights after an optimizer step."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - d)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in `model` inside the block, its own ones restored after."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(own, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, d: dict) -> None:
        self.updates = int(d["updates"])
        for k, v in d["shadow"].items():
            if k in self.shadow:
                self.shadow[k].copy_(v)
