"""The package's import graph: import circles, private names imported across modules, imports
made inside functions, and imports of an entry point (the architecture measures of
docs/ARCHITECTURE.md).

    python benchmarks/import_graph.py [--package hm3jax] [--list]

An import circle is a strongly connected set of modules when every import counts, the ones inside
functions included (a function-local import hides a circle from Python, not from the reader). A
private cross-import is `from a import _name` (or `a._name`) where `a` is another module of the
package. The entry points (ENTRY_POINTS: the command lines and the public names of the layer
below them) never import each other, and no other module imports them: every import of one by another
module of the package is counted. Reads the source only; imports nothing.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

# The top-level modules of docs/ARCHITECTURE.md's layer 6 (`python -m hm3jax.<name>`, and the public
# names hm3jax.online and hm3jax.export of hm3jax.run.online and hm3jax.run.export).
ENTRY_POINTS = ("train", "recommend", "online", "export", "merge", "memplan", "demo")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(package: Path):
    """{module: [(target module, names, local: bool, lineno)]} and the set of modules."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    edges = defaultdict(list)
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node

        def local(node, parents=parents):
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    return True
            return False

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges[mod].append((alias.name, [], local(node), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = resolve(mod, is_pkg, node)
                names = [a.name for a in node.names]
                # `from pkg import submodule` is an import of the submodule.
                subs = [n for n in names if f"{target}.{n}" in files]
                for n in subs:
                    edges[mod].append((f"{target}.{n}", [], local(node), node.lineno))
                rest = [n for n in names if n not in subs]
                if rest or not subs:
                    edges[mod].append((target, rest, local(node), node.lineno))
    return files, edges


def cycles(nodes, graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=str(Path(__file__).resolve().parent.parent / "hm3jax"))
    ap.add_argument("--list", action="store_true", help="list each finding, not only the counts")
    args = ap.parse_args(argv)
    package = Path(args.package)
    files, edges = scan(package)
    pkg = package.name

    def owner(target):
        """The package module a target names (the longest known prefix), or None."""
        parts = target.split(".")
        for n in range(len(parts), 0, -1):
            cand = ".".join(parts[:n])
            if cand in files:
                return cand
        return None

    graph = defaultdict(set)
    private, local_imports, entry_imports = [], [], []
    entries = {f"{pkg}.{name}" for name in ENTRY_POINTS}
    for mod, es in edges.items():
        for target, names, is_local, line in es:
            dst = owner(target) if target.startswith(pkg) else None
            if is_local:
                local_imports.append((mod, target, line))
            if dst is None or dst == mod:
                continue
            if dst in entries:
                entry_imports.append((mod, dst, line))
            # A package's __init__ re-exporting its submodules is not an arrow back up.
            if not (mod == dst.rsplit(".", 1)[0] and files[mod].name == "__init__.py"):
                graph[mod].add(dst)
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    private.append((mod, dst, n, line))
    circles = cycles(files, graph)
    print(f"modules: {len(files)}")
    print(f"import circles: {len(circles)}" + (f" (largest {max(map(len, circles))} modules)" if circles else ""))
    print(f"private names imported across modules: {len(private)}")
    print(f"function-local imports: {len(local_imports)} "
          f"({sum(1 for _, t, _ in local_imports if t.startswith(pkg))} of the package's own modules)")
    print(f"imports of an entry point: {len(entry_imports)} "
          f"({sum(1 for m, _, _ in entry_imports if m in entries)} by another entry point)")
    if args.list:
        for c in circles:
            print("  circle:", " <-> ".join(c))
        for mod, dst, n, line in private:
            print(f"  private: {mod}:{line} imports {dst}.{n}")
        for mod, target, line in local_imports:
            print(f"  local: {mod}:{line} imports {target}")
        for mod, dst, line in entry_imports:
            print(f"  entry point: {mod}:{line} imports {dst}")


if __name__ == "__main__":
    main()
