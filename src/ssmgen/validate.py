"""Checks on what a user hands us, done once where it is parsed: numbers finite and in range,
plain data (YAML, a checkpoint's config) bounded in size, text made safe to print on one line.

Every failure is a UserError whose message names the option or field, the value and the rule.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

from ssmgen.errors import UserError

#: Nodes a config may hold once aliases are expanded (a preset has about 60); far beyond any real
#: config, far below what a "billion laughs" document would make of it.
MAX_PLAIN_NODES = 10_000
MAX_PLAIN_DEPTH = 64


def number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False) -> Any:
    """`value` if it is a finite number within [low, high] (an open end excludes the bound, an
    integer is whole); else UserError "NAME VALUE: must be ...". Returns ints as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} {value!r}: expected a number")
    if not math.isfinite(float(value)):
        raise UserError(f"{name} {value}: must be a finite number")
    if integer:
        if float(value) != int(value):
            raise UserError(f"{name} {value}: expected a whole number")
        value = int(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise UserError(f"{name} {value}: must be {_range_text(low, high, low_open, high_open)}")
    if high is not None and (value > high or (high_open and value == high)):
        raise UserError(f"{name} {value}: must be {_range_text(low, high, low_open, high_open)}")
    return value


def short_number(v: float | int) -> str:
    """A number as written on a command line or in a file name: the shortest text that reads back
    as the same float (0.7, 1, 1e-05), so that a command made from it reproduces it exactly."""
    if isinstance(v, int):
        return str(v)
    text = repr(float(v))
    return text[:-2] if text.endswith(".0") else text


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is not None and high >= 1e9:  # a bound against overflow, not a meaningful limit
        high = None
    if high is None:
        return f"{'above' if low_open else 'at least'} {low:g}"
    if low is None:
        return f"{'below' if high_open else 'at most'} {high:g}"
    return (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def bounded_size(root: Any, children: Callable[[Any], Iterable[Any] | None], what: str,
                 limit: int = MAX_PLAIN_NODES, depth_limit: int = MAX_PLAIN_DEPTH) -> int:
    """The number of nodes of a graph of shared nodes (YAML aliases, pickle memo references) once
    every reference is expanded, computed in time linear in the distinct nodes. UserError naming
    `what` if it exceeds `limit`, nests deeper than `depth_limit` or refers to itself.
    `children(node)` gives a node's children, or None for a leaf."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def walk(node: Any, depth: int) -> int:
        kids = children(node)
        if kids is None:
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UserError(f"{what}: refers to itself (a recursive alias); refusing it")
        if depth > depth_limit:
            raise UserError(f"{what}: nested more than {depth_limit} levels deep; refusing it")
        active.add(key)
        n = 1
        for kid in kids:
            n += walk(kid, depth + 1)
            if n > limit:
                raise UserError(f"{what}: expands to more than {limit:,} values (aliases "
                                "repeated inside aliases?); refusing it")
        active.discard(key)
        sizes[key] = n
        return n

    return walk(root, 0)


def plain_children(obj: Any) -> Iterable[Any] | None:
    """Children of plain Python data (dicts, lists, tuples) for `bounded_size`."""
    if isinstance(obj, dict):
        return [x for kv in obj.items() for x in kv]
    if isinstance(obj, (list, tuple)):
        return obj
    return None


_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}


def one_line(text: str) -> str:
    """`text` with control characters escaped (a file name holding a newline must not split a
    message into two lines) and the bytes of a file name that is not UTF-8 shown as \\xNN (they
    arrive as lone surrogates, which no terminal can print)."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.translate(_CONTROL)
