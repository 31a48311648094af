#!/usr/bin/env python3
"""Import arrows among p2pcache modules, function-level imports included (ast, no execution).

    scripts/import_arrows.py [ROOT]     prints the cycles (strongly connected components of more than one
                                        module) and the arrows that go against the layering in STYLE.md:
                                        a service or store/exchange/routing/net/content module importing
                                        http/ or node.py. Exit code 1 if any such arrow exists.

`TYPE_CHECKING`-only imports are listed apart: they are arrows for a reader, not at run time.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LOWER = ("p2pcache.content", "p2pcache.store", "p2pcache.exchange", "p2pcache.routing", "p2pcache.net",
         "p2pcache.transfer", "p2pcache.nixcache")
UPPER = ("p2pcache.http", "p2pcache.node", "p2pcache.cli")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def arrows(root: Path) -> tuple[set[str], dict[str, set[str]], dict[str, set[str]]]:
    mods: dict[str, Path] = {module_name(root, p): p for p in (root / "p2pcache").rglob("*.py")}
    known = set(mods)
    run: dict[str, set[str]] = {m: set() for m in mods}
    typing_only: dict[str, set[str]] = {m: set() for m in mods}

    def closest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for sub in node.body:
                    for n in ast.walk(sub):
                        guarded.add(id(n))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, is_pkg, node.level, node.module)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                if not t.startswith("p2pcache"):
                    continue
                c = closest(t)
                if c is None or c == mod:
                    continue
                # `from pkg import name`: an arrow to pkg.name if that is a module, and to pkg itself
                (typing_only if id(node) in guarded else run)[mod].add(c)
    return known, run, typing_only


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    known, run, typing_only = arrows(root)
    # an __init__ importing its own submodules (and they importing their package) is not a design cycle
    graph = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in run.items()}
    comps = cycles(graph)
    both = {m: graph[m] | {t for t in typing_only[m] if not (t.startswith(m + ".") or m.startswith(t + "."))}
            for m in graph}
    comps_typed = cycles(both)
    print(f"modules: {len(known)}, run-time arrows: {sum(len(v) for v in graph.values())}")
    print(f"import cycles (run time, function-level imports included): {len(comps)}")
    for c in comps:
        print("  " + " <-> ".join(c))
    print(f"import cycles counting TYPE_CHECKING imports too: {len(comps_typed)}")
    for c in comps_typed:
        if c not in comps:
            print("  " + " <-> ".join(c))
    bad = sorted((m, t) for m, ts in both.items() for t in ts
                 if m.startswith(LOWER) and (t == "p2pcache.node" or t.startswith(UPPER)))
    print(f"arrows from services/store/exchange/routing/net/content up to http/node/cli: {len(bad)}")
    for m, t in bad:
        print(f"  {m} -> {t}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
