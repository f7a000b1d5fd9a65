"""The package's layering, fixed: every import (top-level or inside a function) points down the
table below or across its own layer, and the import graph has no cycle. A shared helper used by
two commands lives below both (docs/architecture.md, the module table)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ssmgen"

#: Layer of each module, highest first: cli > commands > model services > model > backends and
#: configuration > utilities. A module may import from its own layer or any layer below.
LAYERS = {
    "cli": 6, "__main__": 6, "cli_tables": 6,
    "prep": 5, "train": 5, "run_folder": 5, "evaluate": 5, "report": 5, "export": 5, "doctor": 5,
    "generate.continuation": 5, "generate.request": 5, "generate.page": 5,
    "checkpoint": 4, "optim": 4, "sizing": 4, "run_config": 4, "adapt": 4, "generate.engines": 4,
    "generate.torch_engine": 4,
    "generate.cpu_fast": 4,
    "generate.cpu_fast_kernels": 4, "generate.cpu_fast_linear": 4,
    "generate.cpu_fast_backends": 4, "generate.cuda_graph": 4, "generate.sampling": 4,
    "generate.base": 4, "generate": 4,
    "model": 3,
    "backends": 2, "backends.base": 2, "backends.s4": 2, "backends.s4d": 2, "backends.mamba": 2,
    "backends.cauchy": 2, "backends.selective_scan": 2, "backends.selective_scan_cpu": 2,
    "backends.fftconv": 2, "backends.matpow": 2, "prior": 2, "ordinal": 2,
    "config": 2, "workspace": 2, "prep_files": 2, "prep_swap": 2, "testing": 2,
    "data": 1, "audio": 1, "atomic": 1, "validate": 1, "runtime": 1, "progress": 1,
    "vecmath": 1, "simd": 1, "param_cache": 1, "listen": 1, "classical": 1, "ema": 1,
    "errors": 0, "tokens": 0, "__init__": 0,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """ssmgen modules imported anywhere in `path` (as names relative to the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ssmgen":
                names = [a.name for a in node.names]
                found |= {n for n in names if n in LAYERS} or {"__init__"}
            elif node.module.startswith("ssmgen."):
                mod = node.module[len("ssmgen."):]
                subs = {f"{mod}.{a.name}" for a in node.names} & set(LAYERS)
                found |= subs or {mod}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ssmgen."):
                    found.add(a.name[len("ssmgen."):])
    return found


def graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert set(graph()) <= set(LAYERS), sorted(set(graph()) - set(LAYERS))


def test_imports_point_down_the_layers():
    wrong = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
             for m, deps in graph().items() for d in deps if LAYERS[d] > LAYERS[m]]
    assert not wrong, wrong


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
