"""Ordinal inputs and outputs: the input table and the output layer with a learned smooth part over
a code's position, so that code 130 and 131 start close and share what they learn
(`model.ordinal_input`, `model.ordinal_output`; docs/architecture.md says why).

Both fold into a plain table and a plain (weight, bias), which every engine uses as it uses the
paper's. In training the fold is part of the graph (its gradient reaches the maps); in inference
(no grad) it is computed once and kept until a parameter it reads changes (`param_cache`), so a
step pays a lookup, not two (256 x 18 x d) products.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmgen.audio import mulaw_decode
from ssmgen.param_cache import DerivedCache

#: Frequencies of the ordinal input features: sin and cos of pi k y for k = 1 .. ORDINAL_WAVES.
ORDINAL_WAVES = 8


def ordinal_features(n_tokens: int) -> Tensor:
    """(n_tokens, 2 + 2 ORDINAL_WAVES) smooth functions of a code's position: y in [-1, 1]
    (linear in the code), its mu-law expansion (the decoded amplitude of a mu-law code) and
    sin / cos(pi k y), so that neighbouring codes get neighbouring inputs."""
    q = np.arange(n_tokens, dtype=np.float64)
    y = q / (n_tokens - 1) * 2.0 - 1.0
    k = np.arange(1, ORDINAL_WAVES + 1)
    waves = np.pi * y[:, None] * k[None, :]
    amp = mulaw_decode(q * (255.0 / (n_tokens - 1)))
    feats = np.concatenate([y[:, None], amp[:, None], np.sin(waves), np.cos(waves)], axis=1)
    return torch.from_numpy(feats.astype(np.float32))


class TokenEmbedding(nn.Embedding):
    """The input table. With `ordinal`, a token's vector is its own row plus a learned linear map
    of `ordinal_features` (code 130 and 131 then start close and share what they learn); the sum
    is one (256, d) table, `table()`, which every engine looks up as it looks up a plain one."""

    def __init__(self, n_tokens: int, d: int, ordinal: bool = False) -> None:
        super().__init__(n_tokens, d)
        self.ordinal = None
        self._folds = DerivedCache()
        if ordinal:
            self.register_buffer("features", ordinal_features(n_tokens), persistent=False)
            self.ordinal = nn.Linear(self.features.shape[1], d, bias=False)

    def map_size(self) -> int:
        """Parameters of the ordinal map (0 without one): they fold into `table()`."""
        return self.ordinal.weight.numel() if self.ordinal is not None else 0

    def table(self) -> Tensor:
        """The (n_tokens, d) table the model looks tokens up in."""
        if self.ordinal is None:
            return self.weight
        return self._folds.get("fold", lambda: self.weight + self.ordinal(self.features),
                               (self.weight, self.ordinal.weight, self.features))

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.table())


class TokenHead(nn.Linear):
    """The output layer (d -> 256 logits). With `ordinal`, each token's row and bias get a learned
    smooth part, `ordinal_features` times a (features, d + 1) map that starts at zero (so the
    model starts as the plain one): neighbouring codes' logits move together. `folded()` is the
    (weight, bias) every engine uses as a plain linear layer's."""

    def __init__(self, d: int, n_tokens: int, ordinal: bool = False) -> None:
        super().__init__(d, n_tokens)
        self.ordinal = None
        self._folds = DerivedCache()
        if ordinal:
            self.register_buffer("features", ordinal_features(n_tokens), persistent=False)
            self.ordinal = nn.Parameter(torch.zeros(self.features.shape[1], d + 1))

    def map_size(self) -> int:
        """Parameters of the ordinal map (0 without one): they fold into `folded()`."""
        return self.ordinal.numel() if self.ordinal is not None else 0

    def _fold_now(self) -> tuple[Tensor, Tensor]:
        part = self.features @ self.ordinal
        return self.weight + part[:, :-1], self.bias + part[:, -1]

    def folded(self) -> tuple[Tensor, Tensor]:
        """The (weight, bias) of the plain linear layer this head computes."""
        if self.ordinal is None:
            return self.weight, self.bias
        return self._folds.get("fold", self._fold_now,
                               (self.weight, self.bias, self.ordinal, self.features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, *self.folded())
