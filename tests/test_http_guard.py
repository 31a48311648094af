"""The request-admission policy (http/guard.py) as pure code: Host, Origin, Sec-Fetch-Site, token forms."""

import base64

import pytest

from p2pcache.http.asgi import HTTPError
from p2pcache.http.guard import AccessPolicy, check, host_allowed, needs_token, token_matches

TOKEN = "t" * 43
POLICY = AccessPolicy(token=TOKEN, listen_host="127.0.0.1")


def scope(method="GET", path="/nix-cache-info", **headers):
    return {"type": "http", "method": method, "path": path,
            "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def status(s, policy=POLICY):
    try:
        check(s, policy)
    except HTTPError as e:
        return e.status
    return 200


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:37515", True), ("127.9.9.9", True), ("localhost:1", True), ("LOCALHOST.:1", True),
    ("[::1]:37515", True), ("[::1]", True), ("evil.example:37515", False), ("127.0.0.1.evil.example", False),
    ("10.0.0.5:37515", False), ("localhost.evil.example", False), ("", False),
])
def test_host_names(host, ok):
    assert host_allowed(host, POLICY) is ok


def test_own_address_and_configured_names_and_unspecified_binds():
    lan = AccessPolicy(token=TOKEN, listen_host="10.0.0.5", allowed_hosts=("runner-1.ci",))
    assert host_allowed("10.0.0.5:37515", lan) and host_allowed("runner-1.ci:37515", lan)
    assert not host_allowed("10.0.0.6:37515", lan)
    anywhere = AccessPolicy(token=TOKEN, listen_host="0.0.0.0")
    assert host_allowed("10.0.0.6:37515", anywhere) and not host_allowed("evil.example", anywhere)


def test_token_forms_and_wrong_tokens():
    basic = base64.b64encode(f"p2pcache:{TOKEN}".encode()).decode()
    assert token_matches(f"Bearer {TOKEN}", TOKEN) and token_matches(f"Basic {basic}", TOKEN)
    assert token_matches(f"basic {basic}", TOKEN)
    for bad in (None, "", TOKEN, f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Basic !!!", "Basic " +
                base64.b64encode(TOKEN.encode()).decode(), f"Token {TOKEN}"):
        assert not token_matches(bad, TOKEN), bad


def test_what_needs_the_token():
    assert not needs_token("GET", "/abc.narinfo") and not needs_token("HEAD", "/nar/x.nar")
    assert needs_token("GET", "/api/v0/status") and needs_token("PUT", "/abc.narinfo")
    assert needs_token("POST", "/anything") and needs_token("DELETE", "/nar/x.nar")


def test_admission():
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert status(scope()) == 200
    assert status(scope(host="127.0.0.1:1")) == 200
    assert status(scope(host="evil.example:1")) == 403
    assert status(scope(origin="http://evil.example")) == 403
    assert status(scope(origin="null")) == 403
    assert status(scope(sec_fetch_site="cross-site")) == 403
    assert status(scope(sec_fetch_site="same-site")) == 403
    assert status(scope(sec_fetch_site="none")) == 200
    assert status(scope("PUT", "/x.narinfo")) == 401
    assert status(scope("PUT", "/x.narinfo", **auth)) == 200
    assert status(scope("PUT", "/x.narinfo", origin="http://evil.example", **auth)) == 403
    assert status(scope("OPTIONS", "/api/v0/gc", origin="http://evil.example")) == 403
    assert status(scope("GET", "/api/v0/status", **auth)) == 200
    two_hosts = {"type": "http", "method": "GET", "path": "/", "headers": [(b"host", b"127.0.0.1"), (b"host", b"evil")]}
    assert status(two_hosts) == 400


def test_allowlisted_origin():
    dash = AccessPolicy(token=TOKEN, allowed_origins=("http://dash.internal:8080",))
    assert status(scope(origin="http://dash.internal:8080", sec_fetch_site="cross-site"), dash) == 200
    assert status(scope("OPTIONS", "/api/v0/status", origin="http://dash.internal:8080"), dash) == 200
    assert status(scope("GET", "/api/v0/status", origin="http://dash.internal:8080"), dash) == 401
    assert status(scope(origin="http://dash.internal:8081"), dash) == 403
