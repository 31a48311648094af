"""A loopback package registry for prefetch tests: packages made in the test, served the ways the real
tools ask for them (npm packuments and tarballs, a PEP 503 simple index, a Cargo `dl` path, a GOPROXY,
gem files). Plain http.server on 127.0.0.1; `broken` paths answer with wrong bytes."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import threading
import time
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def tgz(files: dict[str, bytes], mtime: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def npm_tarball(name: str, version: str, extra: bytes = b"") -> bytes:
    pkg = json.dumps({"name": name, "version": version, "main": "index.js"}).encode()
    return tgz({"package/package.json": pkg,
                "package/index.js": f"module.exports = {json.dumps(name + '@' + version)};\n".encode() + extra})


def sri(data: bytes, algo: str = "sha512") -> str:
    return f"{algo}-" + base64.b64encode(hashlib.new(algo, data).digest()).decode()


def wheel(name: str, version: str, requires: tuple[str, ...] = ()) -> tuple[str, bytes]:
    dist = name.replace("-", "_")
    reqs = "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{dist}/__init__.py": f"VERSION = {version!r}\n".encode(),
             f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{reqs}".encode(),
             f"{dist}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
                     for p, d in files.items()) + f"{dist}-{version}.dist-info/RECORD,,\n"
    files[f"{dist}-{version}.dist-info/RECORD"] = record.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p, d in files.items():
            z.writestr(zipfile.ZipInfo(p, (2020, 1, 1, 0, 0, 0)), d)
    return f"{dist}-{version}-py3-none-any.whl", buf.getvalue()


def crate(name: str, version: str) -> bytes:
    toml = f'[package]\nname = "{name}"\nversion = "{version}"\nedition = "2021"\n\n[lib]\npath = "src/lib.rs"\n'
    return tgz({f"{name}-{version}/Cargo.toml": toml.encode(),
                f"{name}-{version}/src/lib.rs": f'pub fn version() -> &\'static str {{ "{version}" }}\n'.encode()})


def go_module(path: str, version: str) -> tuple[bytes, bytes]:
    """(zip, go.mod) of a module as a GOPROXY serves them."""
    gomod = f"module {path}\n\ngo 1.19\n".encode()
    pkg = path.rsplit("/", 1)[-1].replace("-", "")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{path}@{version}/go.mod", gomod)
        z.writestr(f"{path}@{version}/{pkg}.go", f'package {pkg}\n\nconst Version = "{version}"\n')
    return buf.getvalue(), gomod


class Registry:
    """`files[path] = bytes`; `packuments[name]` (npm) built from `npm_add`; start()/stop()."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.packuments: dict[str, dict] = {}
        self.broken: set[str] = set()
        self.requests: list[str] = []
        self.delay = 0.0
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head: bool = False):
                path = urllib.parse.unquote(self.path.split("?", 1)[0])
                registry.requests.append(path)
                if registry.delay:
                    time.sleep(registry.delay)
                name = path.lstrip("/")
                if path.startswith("/npm/") and name[4:] in registry.packuments:
                    body, ctype = json.dumps(registry.packuments[name[4:]]).encode(), "application/json"
                elif path in registry.files:
                    body = registry.files[path]
                    ctype = "text/html" if path.startswith("/simple/") else "application/octet-stream"
                    if path in registry.broken:
                        body = b"not the package you locked" + body[:10]
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "Registry":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def npm_add(self, name: str, version: str, data: bytes, deps: dict | None = None) -> str:
        path = f"/npm/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"
        self.files[path] = data
        doc = self.packuments.setdefault(name, {"name": name, "versions": {}, "dist-tags": {}})
        doc["versions"][version] = {"name": name, "version": version, "dependencies": deps or {},
                                    "dist": {"tarball": self.url + path, "integrity": sri(data),
                                             "shasum": hashlib.sha1(data).hexdigest()}}
        doc["dist-tags"]["latest"] = version
        return self.url + path

    def pypi_add(self, name: str, filename: str, data: bytes) -> str:
        path = f"/files/{filename}"
        self.files[path] = data
        page = f"/simple/{name}/"
        links = self.files.get(page, b"<html><body>\n").decode().replace("</body></html>", "")
        links += f'<a href="../../files/{filename}#sha256={hashlib.sha256(data).hexdigest()}">{filename}</a>\n'
        self.files[page] = (links + "</body></html>").encode()
        return self.url + path
