"""go.sum: lines of `<module> <version>[/go.mod] h1:<base64>`.

The format is three space-separated fields per line (the Go module reference), so it is split, not
parsed with a grammar. A `<version>` line names the module zip (`kind="go-zip"`); its `h1:` is Go's
dirhash over the files inside the zip (see content/gomod.py), verified by recomputing it. A
`<version>/go.mod` line names only the module's go.mod (`kind="go-mod"`), hashed the same way as a
one-file tree. URLs are under the configured GOPROXY (`--registry go=URL`)."""

from __future__ import annotations

from ..gomod import escape_path, escape_version
from .hashes import parse_prefixed
from .model import LockFile, LockParseError, Registries, hashed


def parse(path: str, text: str, registries: Registries, lock: LockFile) -> None:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise LockParseError(path, f"expected `module version hash`, got {len(fields)} fields", lineno, 1)
        module, version, h = fields
        kind = "go-mod" if version.endswith("/go.mod") else "go-zip"
        version = version.removesuffix("/go.mod")
        ext = "mod" if kind == "go-mod" else "zip"
        rel = f"{escape_path(module)}/@v/{escape_version(version)}.{ext}"
        url = f"{registries.go.rstrip('/')}/{rel}" if registries.go else None
        hashed(lock, module, version, url, kind, parse_prefixed, h, rel)
