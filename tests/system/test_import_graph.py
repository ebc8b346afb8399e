"""The package's import graph has no cycle (read from the source: every ``import`` of every
module, at module level, inside functions and under ``TYPE_CHECKING``; only the
``if __name__ == "__main__":`` block of a module that is also a command is not an import of
the module)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "wadi_cli"


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for file in package.rglob("*.py"):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The known modules one import statement names (``from a import b``: ``a.b`` when that
    is a module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[: len(here) - node.level + 1]
            base = ".".join([*here, base] if base else here)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    known = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, file in known.items():
        todo: list[ast.AST] = [ast.parse(file.read_text(encoding="utf-8"))]
        while todo:
            node = todo.pop()
            for child in ast.iter_child_nodes(node):
                test = ast.unparse(child.test) if isinstance(child, ast.If) else ""
                if "__name__" not in test or "__main__" not in test:
                    todo.append(child)
            graph[module].update(_imported(node, module, file.name == "__init__.py", known))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 200  # the walk sees the package
    assert cycles(graph) == []


def test_a_planted_cycle_is_found(tmp_path):
    pkg = tmp_path / "wadi_cli"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from wadi_cli.sub.a import x\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from wadi_cli.sub import b\nx = 1\n")
    relative_typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    (pkg / "sub" / "b.py").write_text(relative_typed)
    (pkg / "sub" / "c.py").write_text("if __name__ == '__main__':\n    import wadi_cli.sub.a\n")
    graph = import_graph(pkg)
    assert graph["wadi_cli.sub.a"] == {"wadi_cli.sub.b"}
    assert graph["wadi_cli.sub.c"] == set()
    assert cycles(graph) == [["wadi_cli.sub.a", "wadi_cli.sub.b"]]
