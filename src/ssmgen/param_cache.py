"""Values derived from parameters, kept while those parameters stand: a backend's step
preparation and kernels (`SequenceBackend.step_cache`), the folded ordinal table and head
(`ordinal`). One rule for all, so none of them is ever silently stale.

A value is keyed on each tensor it was made from: storage, version counter, dtype and device.
In-place updates (optimizer steps, `load_state_dict`, the weight average's swap) bump the
version; `.to()` changes the storage or the dtype. Nothing is cached while a graph is recorded:
under autograd (gradients must flow through the derivation) or a trace (which must see the
products, not a constant)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor


def tensors_key(tensors: Iterable[Tensor]) -> tuple:
    """What identifies the current values of `tensors` without reading them."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class DerivedCache:
    """Derived values by slot (a layer may keep several forms: a step preparation, a kernel per
    length), each kept with the key of the tensors it was made from."""

    def __init__(self) -> None:
        self.slots: dict[str, tuple[tuple, Any]] = {}

    def get(self, slot: str, prepare: Callable[[], Any], tensors: Iterable[Tensor]) -> Any:
        """The value in `slot`, recomputed by `prepare()` when `tensors` changed since (and on
        every call while a graph is recorded)."""
        tensors = list(tensors)
        if torch.jit.is_tracing() or (torch.is_grad_enabled() and
                                      any(t.requires_grad for t in tensors)):
            return prepare()
        key = tensors_key(tensors)
        hit = self.slots.get(slot)
        if hit is None or hit[0] != key:
            # Slots made from older values can never hit again: drop them, so that kernels
            # cached for lengths no longer in use do not pile up during training.
            self.slots = {s: v for s, v in self.slots.items() if v[0] == key}
            hit = self.slots[slot] = (key, prepare())
        return hit[1]
