"""The interface every sequence backend implements, and the bookkeeping they share.

A backend maps (batch, length, channels) to the same shape, causally, in three modes:

- ``forward(x)``: parallel over the whole sequence from a zero state (training);
- ``initial_state(batch)`` / ``step(x_t, state)``: recurrent, O(1) work per sample (generation);
- ``forward_with_state(x, state)``: parallel over a chunk that starts from ``state``, returning the
  state after the chunk, computed in closed form or by a scan, never by stepping (prompt reading).

A state is a tuple of real float tensors (complex modes are stored as real/imag pairs), so the
step exports to ONNX and other engines can run it; ``state_names()`` names them.

Stepping needs a preparation (discretization, diagonalization, the conversion of a kernel's
C-tilde back to C). ``step_cache()`` recomputes it whenever any parameter changed (new values,
moved to another device, loaded from a checkpoint), so it is never silently stale.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]


class SequenceBackend(nn.Module):
    """Base class of the sequence layers (S4, S4D, Mamba, and third-party plug-ins)."""

    #: True when the layer ends in an output projection of its own (Mamba's out_proj): the
    #: SaShiMi sequence block then adds no GELU + output linear after it.
    has_output_projection: bool = False
    #: True when the constructor takes `l_max`, the training length at the layer's rate (the
    #: model passes it: the sample length divided by the pooling above the layer's tier).
    takes_length: bool = False
    #: The form of this layer's step that the compiled CPU engine (cpu-fast) can pack, as a name
    #: from `ssmgen.generate.cpu_fast.KINDS`: "s4d" (diagonal; packed from `discrete()`), "s4"
    #: (DPLR; from `ssm()`), "mamba" (selective scan; from its projections). None: the layer runs
    #: on the torch engine, which needs only `step`; `--engine auto` picks it with a one-line note.
    fast_kind: str | None = None

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self._step_caches: dict[str, tuple[tuple, Any]] = {}

    # --- the three modes ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # (B, L, H) -> (B, L, H)
        y, _ = self.forward_with_state(x, self.initial_state(x.shape[0], x.device, x.dtype))
        return y

    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> State:
        raise NotImplementedError

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:  # x: (B, H)
        raise NotImplementedError

    def forward_with_state(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    def final_state(self, x: Tensor, state: State) -> State:
        """The state after x (B, L, H) from `state`, when its outputs are not wanted (the last
        layer of a prompt read). Default: `forward_with_state`'s; a convolution backend can skip
        the convolution."""
        return self.forward_with_state(x, state)[1]

    def state_names(self) -> list[str]:
        """One short name per tensor of the state, in order (used for ONNX input/output names)."""
        raise NotImplementedError

    # --- training helpers -----------------------------------------------------------------------
    def ssm_parameters(self) -> list[nn.Parameter]:
        """Parameters of the state-space part that get their own optimizer group (reference:
        lr 1e-3, no weight decay). Default: none."""
        return []

    # --- step preparation -----------------------------------------------------------------------
    def prepare_step(self) -> Any:
        """Compute what `step` needs from the parameters (override). Called by `step_cache`."""
        return None

    def step_cache(self, prepare: Callable[[], Any] | None = None, slot: str = "step") -> Any:
        """`prepare()` (default `prepare_step`), recomputed whenever a parameter changed since the
        last call for this `slot` (a backend may keep several derived forms, each in its slot).
        Everything `step` derives from the parameters should come through here: ONNX export
        freezes what `step` asked for, slot by slot, into constants of the traced graph.

        The key is each parameter's storage and version counter: in-place updates (optimizer
        steps, `load_state_dict`) bump the version, `.to(device)` changes the storage. Under
        autograd nothing is cached, so gradients flow through the preparation.
        """
        prepare = prepare or self.prepare_step
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return prepare()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        hit = self._step_caches.get(slot)
        if hit is None or hit[0] != key:
            # Entries of other slots made from older parameters can never hit again: drop them,
            # so that kernels cached for lengths no longer in use do not pile up during training.
            self._step_caches = {s: v for s, v in self._step_caches.items() if v[0] == key}
            hit = self._step_caches[slot] = (key, prepare())
        return hit[1]

    def cached_kernel(self, L: int) -> Tensor:
        """`self.kernel(L)` of a convolution backend, kept (per length) while the parameters are
        unchanged and no gradient is wanted: evaluation reads many chunks of one length."""
        return self.step_cache(lambda: self.kernel(L), slot=f"kernel:{L}")


class ComplexModeState:
    """Mixin for layers whose state is d_state/2 complex modes per channel (conjugate pairs
    implied), kept as two real tensors (re, im) of shape (batch, d_model, d_state / 2)."""

    def initial_state(self, batch_size: int, device=None, dtype=None) -> State:
        ref = next(self.parameters())
        shape = (batch_size, self.d_model, self.d_state // 2)
        kw = {"device": device or ref.device, "dtype": dtype or ref.dtype}
        return torch.zeros(shape, **kw), torch.zeros(shape, **kw)

    def state_names(self) -> list[str]:
        return ["re", "im"]
