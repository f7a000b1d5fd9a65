"""What every generation engine shares: the `Engine` protocol and the chunk size.

An engine continues a `ModelState` token by token, `CHUNK` samples at a time: the Gumbel noise is
drawn, the tokens handed back and progress reported once per chunk (the cpu-fast kernel is also
called once per chunk; the cuda-graph engine uploads that chunk's noise at once).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from ssmgen.generate.sampling import Sampler
from ssmgen.model import ModelState

CHUNK = 1024


class Engine(Protocol):
    """`generate(state, first_token, n, sampler, progress) -> (tokens (B, n) uint8, final
    ModelState)`: feed `first_token`, sample, feed the sample, n times, from any state."""

    name: str

    def generate(self, state: ModelState, first_token: np.ndarray, n: int, sampler: Sampler,
                 progress: Callable[[int], None] | None = None
                 ) -> tuple[np.ndarray, ModelState]: ...
