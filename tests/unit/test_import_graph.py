"""The import graph of the package: no circles, no upward imports, the CLI only on top.

Built from the source (no imports run): every `import` / `from ... import` of every module, including those
inside functions, except the ones under `if TYPE_CHECKING:` (they never run). An edge points from the
importing module to the module it loads; `from pkg import name` counts as an import of `pkg.name` when that
is a module, else of `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distrib"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, list[str]]]:
    """(module loaded, names taken from it) for one import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names]
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    base = ".".join(p for p in (package if node.level else "", node.module or "") if p)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append((sub, []) if sub in MODULES else (base, [alias.name]))
    return out


def _graph() -> dict[str, dict[str, list[str]]]:
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in MODULES.items():
        edges: dict[str, list[str]] = {}
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target, names in _targets(name, node):
                if target.split(".")[0] == "distrib" and target != name:
                    edges.setdefault(target, []).extend(names)
        graph[name] = edges
    return graph


GRAPH = _graph()


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in GRAPH.get(node, {}):
            if nxt == "distrib" or nxt not in MODULES:
                continue  # the package root re-exports lazily; importing a submodule never needs it
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_was_read():
    assert len(MODULES) > 40
    assert "distrib._precision" in GRAPH["distrib._prepare"]


def test_no_module_imports_itself_in_a_circle():
    assert _cycle() is None, " -> ".join(_cycle() or [])


# the bundled sanity script is a user script: it imports distrib as a user does
SCRIPTS = {"distrib._launch.sanity"}


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"distrib"} - SCRIPTS))
def test_no_module_imports_from_the_package_root(name):
    root_names = GRAPH[name].get("distrib")
    assert root_names is None, f"{name} imports {root_names} from the package root; import their own module"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("distrib._cli")))
def test_only_the_cli_imports_the_cli(name):
    allowed = {"distrib.__main__"}
    clicked = [t for t in GRAPH[name] if t.startswith("distrib._cli")]
    assert name in allowed or not clicked, f"{name} imports {clicked}; put shared logic in distrib._launch"


def test_the_launch_pipeline_does_not_need_click():
    for name, path in MODULES.items():
        if name.startswith("distrib._launch"):
            imported = [t for node in _imports(ast.parse(path.read_text())) for t, _ in _targets(name, node)]
            assert not any(t.split(".")[0] == "click" for t in imported), name
