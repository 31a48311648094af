#!/usr/bin/env python3
"""Code-health figures for issue 17, read from the source text (nothing is imported or run).

    python scripts/code_health.py                 # every measure, one section each
    python scripts/code_health.py near-copies     # one measure: long-functions, private-imports,
                                                  # near-copies, import-cycles

- long-functions: functions (nested ones too) longer than 80 lines, counted per package.
- private-imports: `from m import _x` (or `import m._x`) where `m` is another module of the project.
- near-copies: pairs of a simnet function and a production (p2pcache) function whose bodies, with the
  docstring and comments dropped and the text dedented, have difflib similarity >= 0.85 (at least
  `MIN_LINES` lines each, so one-line accessors do not count).
- import-cycles: strongly connected groups of modules in the import graph of p2pcache and simnet, with
  imports inside functions counted as edges (they run, only later); imports under `if TYPE_CHECKING:`
  are not, since they never run. Unlike `import_arrows.py` (the layering check, whose cycle finder this
  uses), a submodule that takes names from its own package's `__init__` while that `__init__` imports it
  back is a cycle here.

Exit code 0 always: these are figures, not a gate.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from import_arrows import cycles  # noqa: E402  (the layering check's strongly-connected-components finder)
PACKAGES = ("p2pcache", "simnet")
LONG = 80
SIMILAR = 0.85
MIN_LINES = 5


@dataclass(frozen=True)
class Module:
    name: str  # dotted
    path: Path
    tree: ast.Module
    is_package: bool


def modules() -> list[Module]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            tree = ast.parse(path.read_text(), str(path))
            out.append(Module(".".join(parts), path, tree, is_package))
    return out


def package_of(mod: Module) -> str:
    parts = mod.name.split(".")
    # p2pcache.net.host -> p2pcache/net; p2pcache.cli -> p2pcache (top level); simnet.x -> simnet
    return "/".join(parts[:2]) if len(parts) > 2 or (mod.is_package and len(parts) == 2) else parts[0]


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def qualnames(tree: ast.Module) -> dict[ast.AST, str]:
    names: dict[ast.AST, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{prefix}{child.name}"
                names[child] = q
                visit(child, q + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return names


# -- long functions ---------------------------------------------------------------------------------


def long_functions(mods: list[Module]) -> None:
    per: dict[str, list[str]] = {}
    for m in mods:
        names = qualnames(m.tree)
        for f in functions(m.tree):
            n = (f.end_lineno or f.lineno) - f.lineno + 1
            if n > LONG:
                per.setdefault(package_of(m), []).append(f"{m.path.relative_to(ROOT)}:{f.lineno} {names[f]} ({n} lines)")
    total = sum(len(v) for v in per.values())
    print(f"functions over {LONG} lines: {total}")
    for pkg in sorted(per):
        print(f"  {pkg}: {len(per[pkg])}")
        for line in per[pkg]:
            print(f"    {line}")


# -- imports ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    target: str  # the dotted module imported from
    names: tuple[str, ...]  # names taken from it (empty for `import x`)
    line: int
    in_function: bool


def resolve(mod: Module, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(mod: Module) -> list[Import]:
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:  # the `else:` branch runs
                    visit_one(sub, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, ast.Import):
            for a in child.names:
                out.append(Import(a.name, (), child.lineno, in_function))
        elif isinstance(child, ast.ImportFrom):
            out.append(Import(resolve(mod, child.level, child.module), tuple(a.name for a in child.names),
                              child.lineno, in_function))
        else:
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(mod.tree, False)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def private_imports(mods: list[Module]) -> None:
    known = {m.name for m in mods}
    found = []
    for m in mods:
        for imp in imports(m):
            if imp.target not in known and not imp.target.startswith(PACKAGES):
                continue
            if imp.names:
                for n in imp.names:
                    if n.startswith("_") and not n.startswith("__"):
                        found.append(f"{m.path.relative_to(ROOT)}:{imp.line} {n} from {imp.target}")
            elif any(p.startswith("_") and not p.startswith("__") for p in imp.target.split(".")):
                found.append(f"{m.path.relative_to(ROOT)}:{imp.line} import {imp.target}")
    print(f"private names imported across modules: {len(found)}")
    for line in found:
        print(f"  {line}")


def import_graph(mods: list[Module], function_level: bool = True) -> dict[str, set[str]]:
    known = {m.name for m in mods}
    graph: dict[str, set[str]] = {m.name: set() for m in mods}
    for m in mods:
        # A module's own ancestor packages are already being imported when it runs, so reaching them
        # through `from .x import y` is no edge; naming one for what its __init__ defines
        # (`from . import LockFile`) is.
        own = {".".join(m.name.split(".")[:i]) for i in range(1, len(m.name.split(".")))}
        for imp in imports(m):
            if imp.in_function and not function_level:
                continue
            subs = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known]
            explicit = subs + ([imp.target] if imp.target in known and len(subs) < max(1, len(imp.names)) else [])
            implied = []
            for t in explicit + ([imp.target] if imp.target in known else []):
                parts = t.split(".")
                implied += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            targets = set(explicit) | {t for t in implied if t in known and t not in own}
            graph[m.name].update(t for t in targets if t != m.name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (Tarjan, as `import_arrows.py` finds them)."""
    return sorted(cycles(graph))


def import_cycles(mods: list[Module]) -> None:
    graph = import_graph(mods)
    groups = strongly_connected(graph)
    # Package __init__ -> own submodule edges are how packages curate their API; a cycle made only of a
    # package and its submodules re-exporting is still listed, since it constrains import order.
    top_only = strongly_connected(import_graph(mods, function_level=False))
    print(f"import cycles (strongly connected groups, function-level imports counted): {len(groups)} "
          f"({len(top_only)} from module-level imports alone)")
    for g in groups:
        members = set(g)
        edges = sorted(f"{a} -> {b}" for a in g for b in graph[a] if b in members)
        print(f"  {len(g)} modules: {', '.join(g)}")
        for e in edges:
            print(f"      {e}")


# -- near-copies ------------------------------------------------------------------------------------


def body_text(src_lines: list[str], f: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    body = f.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return ""
    start, end = body[0].lineno, body[-1].end_lineno or body[-1].lineno
    text = textwrap.dedent("".join(src_lines[start - 1:end]))
    return _strip_comments(text)


def _strip_comments(text: str) -> str:
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type != tokenize.COMMENT]
        text = tokenize.untokenize(toks)
    except (tokenize.TokenError, IndentationError):
        pass
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def near_copies(mods: list[Module]) -> None:
    bodies: dict[str, list[tuple[str, str]]] = {"simnet": [], "p2pcache": []}
    for m in mods:
        src = m.path.read_text().splitlines(keepends=True)
        names = qualnames(m.tree)
        for f in functions(m.tree):
            text = body_text(src, f)
            if text.count("\n") + 1 < MIN_LINES:
                continue
            where = f"{m.path.relative_to(ROOT)}:{f.lineno} {names[f]}"
            bodies[m.name.split(".")[0]].append((where, text))
    pairs = []
    for sw, st in bodies["simnet"]:
        matcher = difflib.SequenceMatcher(None, autojunk=False)
        matcher.set_seq2(st)
        for pw, pt in bodies["p2pcache"]:
            matcher.set_seq1(pt)
            if matcher.real_quick_ratio() < SIMILAR or matcher.quick_ratio() < SIMILAR:
                continue
            r = matcher.ratio()
            if r >= SIMILAR:
                pairs.append((r, sw, pw))
    pairs.sort(key=lambda p: (-p[0], p[1]))
    print(f"simnet <-> production near-copies (difflib ratio >= {SIMILAR}, bodies >= {MIN_LINES} lines): {len(pairs)}")
    for r, sw, pw in pairs:
        print(f"  {r:.2f}  {sw}  ~  {pw}")


MEASURES = {
    "long-functions": long_functions,
    "private-imports": private_imports,
    "near-copies": near_copies,
    "import-cycles": import_cycles,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("measure", nargs="*", choices=[*MEASURES, []], help="which (default: all)")
    args = ap.parse_args()
    mods = modules()
    for name in args.measure or MEASURES:
        MEASURES[name](mods)
        print()


if __name__ == "__main__":
    main()
