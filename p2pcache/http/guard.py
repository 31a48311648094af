"""Who may ask the node's HTTP port what: the checks every request passes before it is routed.

Owns the request-admission policy (pure functions of the ASGI scope, no I/O):

- **Host**: only the node's own listen address, a loopback name (`localhost`, 127.0.0.0/8, `[::1]`) or a
  configured name — so a page whose DNS name rebinds to 127.0.0.1 is refused (403), on every endpoint,
  the Nix substituter's read-only ones included. A node bound to 0.0.0.0/:: also accepts any IP literal
  (a rebinding attack needs a DNS name; an IP in the URL is no name to rebind).
- **Origin / Sec-Fetch-Site**: a browser marks cross-site requests; any Origin not on the allowlist
  (default empty), and any `Sec-Fetch-Site` other than `same-origin`/`none` without an allowed Origin,
  is refused (403). CORS preflights (OPTIONS) are refused unless the Origin is allowed.
- **Token**: every `/api/v0/*` call and every request that is not GET/HEAD needs the API token, as
  `Authorization: Bearer <token>` (the CLI) or HTTP Basic with the token as password (Nix via a netrc
  file); compared in constant time. Authorization is not a CORS-safelisted header, so a browser can
  only send it cross-origin after a preflight, which the node refuses. A 401 carries no
  `WWW-Authenticate` challenge, so a browser never prompts for (and then caches and replays) Basic
  credentials; curl, and so Nix, sends netrc credentials without being challenged.

Must not: decide what an endpoint does; answer anything itself (it raises `HTTPError`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass

from .asgi import HTTPError, Scope

READ_METHODS = ("GET", "HEAD")
# What a browser may send cross-origin without a preflight (the Fetch standard's CORS-safelisted types).
SIMPLE_CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True)
class AccessPolicy:
    token: str
    listen_host: str = "127.0.0.1"  # the host part of the API's bind address
    allowed_hosts: tuple[str, ...] = ()  # extra Host names, e.g. the runner's name when exposed on a LAN
    allowed_origins: tuple[str, ...] = ()  # e.g. "http://dashboard.internal:8080"
    repo: str = "REPO"  # named in error messages: where the token and netrc files are

    def origin_allowed(self, origin: str) -> bool:
        return origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in self.allowed_origins}


def header(scope: Scope, name: bytes) -> str | None:
    """The one value of header `name`; HTTPError(400) if it is sent twice with different values."""
    values = {v for k, v in scope.get("headers", ()) if k == name}
    if len(values) > 1:
        raise HTTPError(400, f"conflicting {name.decode()} headers")
    return values.pop().decode("latin-1") if values else None


def needs_token(method: str, path: str) -> bool:
    return path.startswith("/api/") or method not in READ_METHODS


def _host_name(host: str) -> str:
    host = host.strip()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        name = host.rsplit(":", 1)[0]
    else:
        name = host
    return name.lower().rstrip(".")


def _is_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(host: str, policy: AccessPolicy) -> bool:
    name = _host_name(host)
    if name == "localhost" or name in {_host_name(h) for h in policy.allowed_hosts}:
        return True
    listen = _host_name(policy.listen_host)
    if name == listen and name:
        return True
    ip = _is_ip(name)
    if ip is None:
        return False
    if ip.is_loopback:
        return True
    listen_ip = _is_ip(listen)
    return listen_ip is not None and listen_ip.is_unspecified


def token_matches(authorization: str | None, token: str) -> bool:
    """`Bearer <token>`, or `Basic base64(<any user>:<token>)`, compared in constant time."""
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            _, sep, value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
    elif scheme != "bearer":
        return False
    return hmac.compare_digest(value.encode(), token.encode())


def check(scope: Scope, policy: AccessPolicy) -> None:
    """Raise HTTPError (400/401/403) unless the request may be routed."""
    method, path = scope["method"], scope["path"]
    host = header(scope, b"host")
    if host is not None and not host_allowed(host, policy):
        raise HTTPError(403, f"Host {host!r} is not this node's address; use http://127.0.0.1:PORT "
                             "(or add the name to http.allowed_hosts)")
    origin = header(scope, b"origin")
    origin_ok = origin is not None and policy.origin_allowed(origin)
    if origin is not None and not origin_ok:
        raise HTTPError(403, f"requests from web pages are refused (Origin {origin!r} is not in http.allowed_origins)")
    site = header(scope, b"sec-fetch-site")
    if site is not None and site.lower() not in ("same-origin", "none") and not origin_ok:
        raise HTTPError(403, f"cross-site browser requests are refused (Sec-Fetch-Site: {site})")
    if method == "OPTIONS" and not origin_ok:
        raise HTTPError(403, "cross-origin requests are refused (no CORS preflight is answered)")
    if needs_token(method, path) and method != "OPTIONS" and not token_matches(header(scope, b"authorization"), policy.token):
        raise HTTPError(401, f"{method} {path} needs the API token from {policy.repo}/api.token: "
                             "`Authorization: Bearer <token>` (the CLI sends it), or for `nix copy --to` "
                             f"`--option netrc-file {policy.repo}/api.netrc`")


def require_content_type(scope: Scope, *allowed: str) -> None:
    """State-changing endpoints take a content type a browser cannot send without a preflight."""
    ctype = (header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
    if ctype not in allowed:
        raise HTTPError(415, f"{scope['method']} {scope['path']} takes Content-Type {' or '.join(allowed)}, "
                             f"not {ctype or 'none'}")


def cors_headers(scope: Scope, policy: AccessPolicy) -> list[tuple[bytes, bytes]]:
    """Response headers that let an allowlisted origin read the answer (nothing for anyone else)."""
    origin = header(scope, b"origin")
    if origin is None or not policy.origin_allowed(origin):
        return []
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, HEAD, POST, PUT"),
            (b"access-control-allow-headers", b"authorization, content-type")]
