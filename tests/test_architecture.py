"""The package's shape, checked: each decision has one owner (see STYLE.md).

These are the rules a reviewer would otherwise have to remember: which module
may ask whether a store is local, which may import a ledger backend, that no
two modules import each other (not even for type hints), and that no module
grows past the size one person can hold in their head.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sweeprun"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every sweeprun module `name` imports, at any depth of its code
    (function bodies and `if TYPE_CHECKING:` blocks included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for candidate in [target] + [f"{target}.{alias.name}" for alias in node.names]:
                if candidate in MODULES and candidate != name:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES and a.name != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start through the import graph, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, trail = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return trail + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


def _is_parent_package(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_cycle():
    """A package's __init__ re-exporting its own submodules is not a cycle; any
    other loop is, even one hidden under TYPE_CHECKING or inside a function."""
    graph = {n: {m for m in deps if not _is_parent_package(m, n) and not _is_parent_package(n, m)}
             for n, deps in GRAPH.items()}
    cycles = {" -> ".join(c) for n in graph if (c := _cycle_from(n, graph))}
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES})"


ASKS_THE_KIND = re.compile(r"\bis_local\b|\b_strip_protocol\b|\bLocalFileSystem\b")


def test_only_the_store_package_asks_which_kind_of_store_it_is():
    """Local disk, object store or late folder is decided in sweeprun/store/ alone:
    everyone else asks the store's backend what it can do (append, rename folders...)."""
    outside = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
               for name, path in MODULES.items() if not name.startswith("sweeprun.store")
               for n, line in enumerate(path.read_text().splitlines(), 1) if ASKS_THE_KIND.search(line)]
    assert outside == []


def test_only_the_ledger_package_imports_a_backend():
    backends = {"sweeprun.ledger.sqlite", "sweeprun.ledger.postgres"}
    backends |= {n for n in MODULES if n.startswith(("sweeprun.ledger.sqlite.", "sweeprun.ledger.postgres."))}
    outside = {n: sorted(GRAPH[n] & backends) for n in MODULES
               if not n.startswith("sweeprun.ledger") and GRAPH[n] & backends}
    assert not outside, f"ledger backends imported outside sweeprun/ledger/: {outside}"
