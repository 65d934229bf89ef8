"""The house stays layered: no import climbs back up, no cycle, docs/architecture.md names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ncaudit"

#: Layer of each unit (a top-level module or a subpackage); an import must go to a strictly lower layer.
LAYERS = {
    "errors": 0, "_lazy": 0,
    "_device": 1, "_validate": 1, "_text": 1,
    "data": 2, "models": 2, "stats": 2, "cache": 2,
    "metrics": 3, "distributed": 3,
    "extract": 4, "audit": 4,
    "report": 5, "_progress": 5,
    "_run": 6,
    "_demo": 7,
    "cli": 8,
    "__main__": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (version and lazy re-exports)


def _imports(path: Path) -> set[str]:
    """Every ncaudit module imported anywhere in the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "ncaudit":
            if node.module == "ncaudit":
                found |= {f"ncaudit.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ncaudit"}
    return found


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()} - {None}
    assert units == set(LAYERS), f"units without a layer or layers without a unit: {units ^ set(LAYERS)}"


def test_no_import_climbs_back_up():
    wrong = []
    for module, path in _modules().items():
        source = _unit(module)
        if source is None:
            continue
        for target in _imports(path):
            dest = _unit(target)
            if dest is None or dest == source:
                continue
            if LAYERS[dest] >= LAYERS[source]:
                wrong.append(f"{module} imports {target} ({source} is layer {LAYERS[source]}, {dest} is "
                             f"{LAYERS[dest]})")
    assert not wrong, "\n".join(wrong)


def _top_level_imports(path: Path) -> set[str]:
    """The ncaudit modules a file imports when it is imported (module-level statements only)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "ncaudit" and node.module != "ncaudit":
            found.add(node.module)
    return found


def test_no_import_cycle():
    """No module imports, at import time, a module that imports it back (through any chain)."""
    mods = _modules()
    graph = {m: {t for t in _top_level_imports(p) if t in mods and t != m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            assert nxt not in stack, "import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt])
            if nxt not in done:
                visit(nxt, stack + [node])
        done.add(node)

    for m in sorted(graph):
        if m not in done:
            visit(m, [])


def test_architecture_doc_names_every_module_and_only_those():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(ncaudit/[\w/]+\.py)`", doc))
    every = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    modules = {f for f in every if not f.endswith("/__init__.py") or f == "ncaudit/__init__.py"}
    assert named <= every, f"the doc names modules that are gone: {sorted(named - every)}"
    assert modules <= named, f"modules missing from the doc: {sorted(modules - named)}"


def test_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not big, f"split these by subject: {big}"


def test_public_surface_is_importable_without_torch():
    import subprocess
    import sys

    code = ("import sys, ncaudit, ncaudit.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "names = ncaudit.__all__; [getattr(ncaudit, n) for n in names]; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 10
