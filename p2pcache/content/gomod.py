"""Go module hashes and paths: the `h1:` dirhash of go.sum, and module path escaping for GOPROXY URLs.
Pure, no I/O beyond reading a zip file object handed in.

Dirhash "h1" (the Go module reference, golang.org/x/mod/sumdb/dirhash `Hash1`): for the files of a module
sorted by name, the lines `<lowercase hex sha256 of the file>  <name>\n` (two spaces); h1 is the sha256
of those lines, base64 encoded. Inside a module zip, names are `<module>@<version>/<path>`; a go.mod line
of go.sum hashes the one file named `go.mod`.
"""

from __future__ import annotations

import hashlib
import zipfile
from typing import BinaryIO, Iterable

from ..errors import InvalidInput


def dirhash(files: Iterable[tuple[str, bytes]]) -> bytes:
    """The h1 digest (sha256 of the summary) of (name, content) pairs; names must not contain newlines."""
    summary = hashlib.sha256()
    for name, content in sorted(files, key=lambda f: f[0]):
        if "\n" in name:
            raise InvalidInput(f"file name {name!r} contains a newline; dirhash cannot hash it")
        summary.update(f"{hashlib.sha256(content).hexdigest()}  {name}\n".encode())
    return summary.digest()


def gomod_hash(content: bytes) -> bytes:
    """h1 of a go.mod file as go.sum records it under `<version>/go.mod`."""
    return dirhash([("go.mod", content)])


def zip_hash(f: BinaryIO) -> bytes:
    """h1 of a module zip: every file in it, by its name in the zip (directories are not hashed)."""
    try:
        with zipfile.ZipFile(f) as z:
            summary = hashlib.sha256()
            names = sorted(i.filename for i in z.infolist() if not i.is_dir())
            if len(set(names)) != len(names):
                raise InvalidInput("module zip has duplicate file names")
            for name in names:
                if "\n" in name:
                    raise InvalidInput(f"module zip has a file name with a newline: {name!r}")
                h = hashlib.sha256()
                with z.open(name) as member:
                    while piece := member.read(1 << 20):
                        h.update(piece)
                summary.update(f"{h.hexdigest()}  {name}\n".encode())
            return summary.digest()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise InvalidInput(f"not a readable module zip: {e}") from None


def escape_path(path: str) -> str:
    """Module path as GOPROXY URLs spell it: each upper-case letter becomes `!` + its lower case."""
    return "".join(f"!{c.lower()}" if "A" <= c <= "Z" else c for c in path)


escape_version = escape_path
