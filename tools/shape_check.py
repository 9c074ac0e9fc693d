"""Measure the code's shape: long modules, long functions, long classes and import circles.

Usage::

    python tools/shape_check.py [--root DIR] [PACKAGE ...]   # default packages: portable_infer exporters

For every ``.py`` file under the given packages (paths relative to ``--root``, the repository by
default) it prints one line per broken limit and exits 1 when there is any, 0 otherwise:

    module    <path>  <n> lines (limit 400)
    function  <path>:<line>  <qualified name>  <n> lines (limit 80)
    class     <path>:<line>  <name>  <n> lines (limit 250)
    cycle     <a> -> <b> -> ... -> <a>

then a last line ``shape_check: <n> problem(s)`` or ``shape_check: ok``.

A module's length is its number of lines; a function's or a class's is ``end_lineno - lineno + 1``
of its ``ast`` node (the ``def``/``class`` line to the last line of the body, decorators not
counted). Methods and nested functions are measured too, named ``Class.method`` / ``outer.inner``.

Import circles count every import statement, at module level or inside a function (a lazy
import closes a circle as soon as that function runs), except those under ``if TYPE_CHECKING:``.
``import a.b`` and ``from a import b`` point at the submodule ``a.b`` when that is a module of the
scanned packages, else at ``a`` (its ``__init__``). Parent packages that Python initialises on the
way are not edges (``from a.b import c`` is an edge to ``a.b``, not to ``a``). Each strongly
connected group of modules is reported once, as one concrete circle through it, ``->`` marking a
module-level import and ``~>`` one made inside a function::

    cycle     pkg.a -> pkg.b ~> pkg.a
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

LIMITS = {"module": 400, "function": 80, "class": 250}
DEFAULT_PACKAGES = ("portable_infer", "exporters")


@dataclass(frozen=True)
class Problem:
    kind: str  # "module", "function", "class" or "cycle"
    where: str  # path, path:line, or the circle
    name: str = ""
    lines: int = 0

    def line(self) -> str:
        if self.kind == "cycle":
            return f"cycle     {self.where}"
        limit = LIMITS[self.kind]
        name = f"  {self.name}" if self.name else ""
        return f"{self.kind:<9} {self.where}{name}  {self.lines} lines (limit {limit})"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(root: Path, packages) -> list[Path]:
    files = []
    for pkg in packages:
        base = root / pkg
        files += [p for p in sorted(base.rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def _sizes(tree: ast.Module, rel: str) -> list[Problem]:
    """Functions and classes over their limits, walking with qualified names."""
    found = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                qual = f"{prefix}{child.name}"
                n = child.end_lineno - child.lineno + 1
                if n > LIMITS[kind]:
                    found.append(Problem(kind, f"{rel}:{child.lineno}", qual, n))
                walk(child, qual + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module) -> list[tuple[ast.stmt, bool]]:
    """Every Import/ImportFrom node that can run, with whether it sits inside a function (lazy);
    ``if TYPE_CHECKING:`` blocks never run and are left out."""
    out = []

    def walk(stmts, lazy: bool):
        for node in stmts:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append((node, lazy))
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                walk(node.orelse, lazy)
            else:
                inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                for field in ("body", "orelse", "finalbody", "handlers"):
                    walk(getattr(node, field, []) or [], inner)
                for case in getattr(node, "cases", []) or []:  # match statements
                    walk(case.body, inner)

    walk(tree.body, False)
    return out


def _resolve(node, this: str, is_package: bool, modules: set[str]) -> set[str]:
    """The scanned modules that an import statement makes Python execute (see the module doc)."""
    targets = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in modules:
                targets.add(alias.name)
        return targets
    if node.level:
        base = this.split(".") if is_package else this.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        pkg = ".".join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module or ""
    for alias in node.names:
        sub = f"{pkg}.{alias.name}"
        if sub in modules:
            targets.add(sub)
        elif pkg in modules:
            targets.add(pkg)
    return targets


def import_graph(files: list[Path], root: Path, trees: dict[Path, ast.Module]) -> tuple[dict, set]:
    """``(graph, lazy)``: module -> the modules it imports, and the edges made only inside functions."""
    names = {p: module_name(p, root) for p in files}
    modules = set(names.values())
    graph, eager = {}, set()
    for path, name in names.items():
        edges = set()
        for node, lazy in imports(trees[path]):
            targets = _resolve(node, name, path.name == "__init__.py", modules)
            edges |= targets
            if not lazy:
                eager |= {(name, t) for t in targets}
        graph[name] = edges
    lazy_edges = {(a, b) for a, bs in graph.items() for b in bs} - eager
    return graph, lazy_edges


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the groups with a circle (size > 1 or a self-edge)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in graph.get(node, ()):
                    groups.append(sorted(group))
    return groups


def _circle_in(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete circle through the group's first module (breadth-first: a shortest one)."""
    members, start = set(group), group[0]
    parents, frontier = {}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start, start]


def check(root: Path, packages=DEFAULT_PACKAGES) -> list[Problem]:
    """Every broken limit and import circle under ``root/<package>`` for each package."""
    root = root.resolve()
    files = python_files(root, packages)
    problems, trees = [], {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        n = len(text.splitlines())
        if n > LIMITS["module"]:
            problems.append(Problem("module", rel, "", n))
        trees[path] = ast.parse(text, filename=str(path))
        problems += _sizes(trees[path], rel)
    graph, lazy = import_graph(files, root, trees)
    for group in _strongly_connected(graph):
        circle = _circle_in(group, graph)
        text = circle[0] + "".join(f" {'~>' if (a, b) in lazy else '->'} {b}" for a, b in zip(circle, circle[1:]))
        problems.append(Problem("cycle", text))
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("packages", nargs="*", default=list(DEFAULT_PACKAGES))
    args = parser.parse_args(argv)
    problems = check(args.root, args.packages)
    for p in problems:
        print(p.line())
    print(f"shape_check: {len(problems)} problem(s)" if problems else "shape_check: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
