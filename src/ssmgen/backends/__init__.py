"""Sequence backends: a registry of plug-in layers behind one interface (see `base.py`).

Built-ins register through the ``ssmgen.backends`` entry-point group, the same mechanism a
third-party package uses::

    [project.entry-points."ssmgen.backends"]
    mylayer = "mypackage.layers:MyLayer"   # a SequenceBackend subclass: MyLayer(d_model, **options)
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from ssmgen.backends.base import SequenceBackend, State
from ssmgen.errors import UserError

__all__ = ["SequenceBackend", "State", "available", "create", "get", "register"]

ENTRY_POINT_GROUP = "ssmgen.backends"
# Used only when the package runs from a source tree that was never installed (no entry points).
_FALLBACK = {"s4": "ssmgen.backends.s4:S4", "s4d": "ssmgen.backends.s4d:S4D",
             "mamba": "ssmgen.backends.mamba:Mamba"}
_registered: dict[str, type[SequenceBackend]] = {}


def _targets() -> dict[str, Any]:
    found: dict[str, Any] = dict(_FALLBACK)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep
    found.update(_registered)
    return found


def available() -> list[str]:
    """Names of the backends that can be created here."""
    return sorted(_targets())


def register(name: str, cls: type[SequenceBackend]) -> None:
    """Register a backend class at run time (for code that is not an installed package)."""
    _registered[name] = cls


def get(name: str) -> type[SequenceBackend]:
    """The class registered under `name`. Raises UserError for an unknown name."""
    targets = _targets()
    if name not in targets:
        raise UserError(f"unknown backend '{name}': available are {', '.join(available())}")
    target = targets[name]
    if isinstance(target, type):
        return target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(import_module(module), attr)
    return target.load()


def create(name: str, d_model: int, **options: Any) -> SequenceBackend:
    """A new backend layer working on (batch, length, d_model)."""
    cls = get(name)
    try:
        return cls(d_model, **options)
    except TypeError as e:
        raise UserError(f"backend '{name}': bad options {options} ({e})") from None
