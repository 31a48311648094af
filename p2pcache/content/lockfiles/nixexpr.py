"""A lock file's dependencies as a Nix expression: one fixed-output `fetchurl { url; hash; }` per
dependency — the per-dependency derivations a dynamic derivation would compute, so each is realised
(and shared) on its own, through `hashed-mirrors` from the swarm. Pure: text in, text out.

The expression is a function of `fetchurl` (default: Nix's builtin `<nix/fetchurl.nix>`, which honours
`hashed-mirrors`; nixpkgs users pass `pkgs.fetchurl`) returning an attribute set, one attribute per
dependency named after `name@version` in the characters `nix-build` accepts (see `attr_name`).
Hashes Nix cannot check (sha384, Go's `h1:` dirhash) and dependencies without a URL are left out with a
comment saying why, unless `known` maps their alias to a sha256 this node verified (a go module zip
prefetched once is known by its sha256 afterwards).
"""

from __future__ import annotations

import re

from .hashes import NIX_ALGOS, DepHash
from .model import Dependency

_BAD_NAME = re.compile(r"[^A-Za-z0-9+\-._?=]")
_BAD_ATTR = re.compile(r"[^A-Za-z0-9_+-]")


def attr_name(label: str) -> str:
    """`nix-build` builds only attributes named like `[A-Za-z_][A-Za-z0-9_+-]*`: `@acme/util@2.1.0` →
    `_acme_util-2_1_0`."""
    name = _BAD_ATTR.sub("_", label.replace("@", "-").lstrip("-")).replace(".", "_")
    return name if name[:1].isalpha() or name[:1] == "_" else "_" + name


def _str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def store_name(dep: Dependency) -> str:
    base = (dep.filename or f"{dep.name}-{dep.version}").rsplit("/", 1)[-1]
    if dep.kind in ("go-zip", "go-mod"):
        base = f"{dep.name.rsplit('/', 1)[-1]}-{dep.version}.{dep.kind[3:]}"
    name = _BAD_NAME.sub("-", base).lstrip(".") or "source"
    return name[:200]


def to_nix(deps: list[Dependency], source: str, known: dict[str, DepHash] | None = None) -> str:
    known = known or {}
    lines = [f"# Written by `p2pcache lock2nix {source}`: one fixed-output fetch per dependency.",
             "{ fetchurl ? import <nix/fetchurl.nix> }:", "{"]
    seen: set[str] = set()
    for dep in deps:
        key = dep.label
        h = dep.hash
        if h is not None and h.algo not in NIX_ALGOS:
            h = known.get(h.alias)
        why = (dep.error if dep.error else "no URL in the lock file" if not dep.url
               else f"{dep.hash.algo} is not a hash Nix can check (prefetch it once to learn its sha256)"
               if h is None and dep.hash else None)
        if why or h is None:
            lines.append(f"  # {key}: left out: {(why or 'no hash').replace(chr(10), ' ')}")
            continue
        attr = attr_name(key)
        if attr in seen:
            attr = attr_name(f"{key}-{store_name(dep)}")
        if attr in seen:
            continue
        seen.add(attr)
        assert dep.url is not None
        lines.append(f"  # {key}")
        lines.append(f"  {attr} = fetchurl {{ name = {_str(store_name(dep))}; url = {_str(dep.url)}; "
                     f"hash = {_str(h.sri)}; }};")
    lines.append("}")
    return "\n".join(lines) + "\n"
