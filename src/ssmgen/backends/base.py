"""The interface every sequence backend implements, and the bookkeeping they share.

A backend maps (batch, length, channels) to the same shape, causally, in three modes:

- ``forward(x)``: parallel over the whole sequence from a zero state (training);
- ``initial_state(batch)`` / ``step(x_t, state)``: recurrent, O(1) work per sample (generation);
- ``forward_with_state(x, state)``: parallel over a chunk that starts from ``state``, returning the
  state after the chunk, computed in closed form or by a scan, never by stepping (prompt reading).

A state is a tuple of real float tensors (complex modes are stored as real/imag pairs), so the
step exports to ONNX and other engines can run it; ``state_names()`` names them.

**Step caches, and what they mean for ONNX export.** Stepping needs a preparation
(discretization, diagonalization, the conversion of a kernel's C-tilde back to C).
``step_cache()`` recomputes it whenever any parameter changed (new values, moved to another
device, loaded from a checkpoint), so it is never silently stale. Everything ``step`` derives from
the parameters should come through it, in one or more named slots: `ssmgen.export`'s
`frozen_step_caches` runs one eager frame of `SaShiMi.step`, records what every layer's
``step_cache`` returned, slot by slot (detached), and serves exactly those values while the
frame is traced, so the preparation enters the ONNX graph as constants and its python-level
staleness checks never see traced values. A step that computed a derived tensor outside
``step_cache`` would still export, as traced ops on the parameters.

**The fast-step contract (the compiled CPU engine, cpu-fast).** A backend whose step has one of
the forms that engine's kernels compute declares it as ``fast_kind`` (a key of `FAST_LAYOUTS`:
"s4d", "s4", "mamba") and implements ``fast_step()``: a dict of plain real tensors named, shaped
and meant exactly as `FAST_LAYOUTS[fast_kind]` says, taken from its own step cache (the very
numbers its `step` uses). The engine checks the names and shapes (`check_fast_step`), packs
those tensors as they are (float32, in the table's order) and does no math of its own; the
kernels find each field where the same table puts it. A backend that declares no
``fast_kind`` (the default) runs on the torch engine, which needs only ``step``: ``--engine
auto`` picks it with a one-line note, ``--engine cpu-fast`` refuses the model in one line. The
engines go by ``fast_kind`` only, never by class, so a plug-in is never packed as something it
does not say it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ssmgen.param_cache import DerivedCache

State = tuple[Tensor, ...]


# ------------------------------------------------------------------------------------------------
# The fast-step layouts (one table for the backends, the packer and the kernels)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FastField:
    """One tensor of a fast step: its name, its shape in the layout's dimensions (a dimension is a
    name, or a sum of multiples of names such as "R+2*N"), and what it holds. `linear`: a linear
    map (in, out) that the kernels multiply by (the engine may store its entries in another
    order, e.g. in column panels; the values are those given)."""

    name: str
    shape: tuple[str, ...]
    doc: str
    linear: bool = False


@dataclass(frozen=True)
class FastLayout:
    """A fast step form: its tensors in packing order, and the dimensions the kernel reads per
    layer (bound from the tensors' shapes; H is always the layer's width, d_model)."""

    fields: tuple[FastField, ...]
    dims: tuple[str, ...]
    doc: str

    def names(self) -> list[str]:
        return [f.name for f in self.fields]


def _f(name: str, shape: str, doc: str, linear: bool = False) -> FastField:
    return FastField(name, tuple(d.strip() for d in shape.split(",") if d.strip()), doc, linear)


#: The step forms the cpu-fast kernels compute, by `SequenceBackend.fast_kind`. Field order is
#: packing order; the kernels' field offsets are derived from this table (cpu_fast_kernels.py),
#: never written there by hand. Complex quantities are (re, im) pairs of real tensors; a linear
#: map is stored (in, out), i.e. transposed from torch's `Linear.weight`.
FAST_LAYOUTS: dict[str, FastLayout] = {
    "s4d": FastLayout(
        doc="diagonal complex SSM per channel, N2 modes: s' = dA s + dB u, "
            "y = Re(2C s') + D u",
        dims=("N2",),
        fields=(
            _f("dA_re", "H, N2", "Re of the discrete transition dA"),
            _f("dA_im", "H, N2", "Im of dA"),
            _f("dB_re", "H, N2", "Re of the discrete input map dB"),
            _f("dB_im", "H, N2", "Im of dB"),
            _f("C2_re", "H, N2", "Re of 2C (the conjugate modes folded in)"),
            _f("C2_im", "H, N2", "Im of 2C"),
            _f("D", "H", "skip"),
        )),
    "s4": FastLayout(
        doc="DPLR SSM, the O(N) Woodbury form of the bilinear step per channel: "
            "a = 2 Re(P^* x), w = E x - P a + 2B u, v = G w, x' = v - GP Sinv 2 Re(P^* v), "
            "y = Re(2C x') + D u",
        dims=("N2", "R"),
        fields=(
            _f("E_re", "H, N2", "Re of E = 2/dt + Lambda"),
            _f("E_im", "H, N2", "Im of E"),
            _f("G_re", "H, N2", "Re of G = 1 / (2/dt - Lambda)"),
            _f("G_im", "H, N2", "Im of G"),
            _f("P_re", "R, N2", "Re of the low-rank term P (shared by the channels)"),
            _f("P_im", "R, N2", "Im of P"),
            _f("GP_re", "H, R, N2", "Re of G P"),
            _f("GP_im", "H, R, N2", "Im of G P"),
            _f("B2_re", "N2", "Re of 2B (shared by the channels)"),
            _f("B2_im", "N2", "Im of 2B"),
            _f("C2_re", "H, N2", "Re of 2C (the true C, not C~)"),
            _f("C2_im", "H, N2", "Im of 2C"),
            _f("D", "H", "skip"),
            _f("Sinv", "H, R, R", "(I + 2 Re(P^* G P))^-1, the Woodbury core"),
        )),
    "mamba": FastLayout(
        doc="mamba-ssm's step: x, z = in_proj(u); conv over the last K inputs, SiLU; "
            "(dt, B, C) = x_proj(x); dt = softplus(dt_proj(dt)); h = exp(dt A) h + dt B x; "
            "y = (C.h + D x) SiLU(z); out_proj(y)",
        dims=("E", "N", "R", "K"),
        fields=(
            _f("in_proj_w", "H, 2*E", "in_proj, (in, out)", linear=True),
            _f("in_proj_b", "2*E", "its bias (zeros if none)"),
            _f("conv_w", "E, K", "depthwise conv taps, the newest input last"),
            _f("conv_b", "E", "conv bias (zeros if none)"),
            _f("x_proj_w", "E, R+2*N", "x_proj, (in, out): dt (R), B (N), C (N)", linear=True),
            _f("x_proj_b", "R+2*N", "its bias (zeros if none)"),
            _f("dt_proj_w", "R, E", "dt_proj, (in, out)", linear=True),
            _f("dt_proj_b", "E", "dt_proj's bias (added before the softplus)"),
            _f("A", "E, N", "A = -exp(A_log)"),
            _f("D", "E", "skip"),
            _f("out_proj_w", "E, H", "out_proj, (in, out)", linear=True),
            _f("out_proj_b", "H", "its bias (zeros if none)"),
        )),
}


def _dim_value(expr: str, dims: dict[str, int]) -> int | None:
    """The value of a layout dimension ("N2", "2*E", "R+2*N") from bound names; None if a name
    is unbound."""
    total = 0
    for term in expr.split("+"):
        k, _, name = term.strip().rpartition("*")
        if name not in dims:
            return None
        total += (int(k) if k else 1) * dims[name]
    return total


def check_fast_step(kind: str, tensors: dict[str, Tensor], d_model: int) -> dict[str, int]:
    """Check a `fast_step()` result against `FAST_LAYOUTS[kind]` and return the layout's
    dimensions (H = d_model, the rest bound from the tensors' shapes). Raises ValueError naming
    the first field that is missing, unexpected, not real or of the wrong shape."""
    layout = FAST_LAYOUTS[kind]
    missing = [n for n in layout.names() if n not in tensors]
    extra = [n for n in tensors if n not in layout.names()]
    if missing or extra:
        which = f"lacks '{missing[0]}'" if missing else f"has an unknown field '{extra[0]}'"
        raise ValueError(f"fast_step() for kind '{kind}' {which} (fields: "
                         f"{', '.join(layout.names())})")
    dims = {"H": d_model}
    for fld in layout.fields:  # bare names are bound by the first field that has them
        t = tensors[fld.name]
        if not isinstance(t, Tensor) or t.is_complex() or not t.is_floating_point():
            raise ValueError(f"fast_step() field '{fld.name}' must be a real float tensor")
        if t.dim() != len(fld.shape):
            raise ValueError(f"fast_step() field '{fld.name}' has shape {tuple(t.shape)}, "
                             f"the layout says ({', '.join(fld.shape)})")
        for expr, n in zip(fld.shape, t.shape):
            if expr.isidentifier():
                dims.setdefault(expr, int(n))
    for fld in layout.fields:
        t = tensors[fld.name]
        want = tuple(_dim_value(e, dims) for e in fld.shape)
        if tuple(t.shape) != want:
            raise ValueError(f"fast_step() field '{fld.name}' has shape {tuple(t.shape)}, "
                             f"the layout says ({', '.join(fld.shape)}) = {want}")
    return {d: dims[d] for d in ("H", *layout.dims)}


class SequenceBackend(nn.Module):
    """Base class of the sequence layers (S4, S4D, Mamba, and third-party plug-ins)."""

    #: True when the layer ends in an output projection of its own (Mamba's out_proj): the
    #: SaShiMi sequence block then adds no GELU + output linear after it.
    has_output_projection: bool = False
    #: True when the constructor takes `l_max`, the training length at the layer's rate (the
    #: model passes it: the sample length divided by the pooling above the layer's tier).
    takes_length: bool = False
    #: The form of this layer's step that the compiled CPU engine (cpu-fast) computes, a key of
    #: `FAST_LAYOUTS` ("s4d", "s4", "mamba"); the layer then implements `fast_step()`. None: the
    #: layer runs on the torch engine, which needs only `step`; `--engine auto` picks it with a
    #: one-line note (see the module docstring).
    fast_kind: str | None = None

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self._step_caches = DerivedCache()

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

    def read_carried(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """A chunk read as training with carried states reads it (truncated backpropagation
        through time): `forward_with_state`'s outputs with their gradients, and the state after
        the chunk without them (the trainer cuts the graph there anyway). Default:
        `forward_with_state` with the state detached; a backend whose differentiable final state
        is costly computes it without gradients (S4)."""
        y, s = self.forward_with_state(x, state)
        return y, tuple(v.detach() for v in s)

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
    def fast_step(self) -> dict[str, Tensor]:
        """This layer's step as the plain real tensors of `FAST_LAYOUTS[self.fast_kind]` (names,
        shapes and meaning as the table says), taken from its step cache, for the cpu-fast
        engine. Implement it whenever `fast_kind` is set; the engine calls it once per packing,
        without gradients, and copies the values."""
        raise NotImplementedError(f"{type(self).__name__} declares fast_kind "
                                  f"{self.fast_kind!r} but does not implement fast_step()")

    def prepare_step(self) -> Any:
        """Compute what `step` needs from the parameters (override). Called by `step_cache`."""
        return None

    def step_cache(self, prepare: Callable[[], Any] | None = None, slot: str = "step") -> Any:
        """`prepare()` (default `prepare_step`), recomputed whenever a parameter changed since the
        last call for this `slot` (a backend may keep several derived forms, each in its slot).
        Everything `step` derives from the parameters should come through here: ONNX export
        freezes what `step` asked for, slot by slot, into constants of the traced graph.

        The key is each parameter's storage and version counter (`param_cache`): in-place
        updates (optimizer steps, `load_state_dict`) bump the version, `.to(device)` changes the
        storage. Under autograd nothing is cached, so gradients flow through the preparation.
        """
        return self._step_caches.get(slot, prepare or self.prepare_step, self.parameters())

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
