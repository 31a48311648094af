"""How the daemon's REST API answers failures that are not our own errors (bugs), on a real daemon process
with bugs planted (tests/helpers/buggy_node.py): a traceback in the daemon's log, one clean JSON error line
to the caller (a 500 before the answer started, an `error` event after an NDJSON answer started), and a
group of our own errors answered as the error inside it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from .helpers.daemons import start_daemon

BUGGY = str(Path(__file__).parent / "helpers" / "buggy_node.py")
KEY = "sha256:" + "ab" * 32


def test_bugs_in_api_routes_answer_one_line_and_log_a_traceback(tmp_path, daemons):
    d = start_daemon(tmp_path / "r", entry=[BUGGY])
    daemons.append(d)

    # a plain JSON route: 500 with a JSON error line, the connection intact
    r = httpx.post(d.api + "/api/v0/gc", json={}, headers=d.auth, timeout=10)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "POST /api/v0/gc failed with an internal error (RuntimeError: planted bug in "
                                 "gc); the daemon's log has the traceback"}
    proc = d.cli("gc", check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode != 0 and "RuntimeError: planted bug in gc" in err and len(err.splitlines()) == 1, err

    # an NDJSON route that fails after its 200 and a progress line went out: a last `error` line
    with httpx.stream("POST", d.api + "/api/v0/fetch", json={"key": KEY}, headers=d.auth, timeout=10) as r:
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0]["event"] == "progress"
    assert lines[-1] == {"event": "error", "code": 1, "message": "POST /api/v0/fetch failed with an internal error "
                         "(KeyError: 'planted bug in fetch'); the daemon's log has the traceback"}
    proc = d.cli("cat", KEY, check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1 and "KeyError" in err and "lost the daemon" not in err, err

    # our own error inside an exception group: answered as that error (404, its message)
    r = httpx.post(d.api + "/api/v0/pin", json={"key": KEY}, headers=d.auth, timeout=10)
    assert r.status_code == 404 and r.json() == {"error": f"{KEY}: no such archive here (planted)"}

    assert d.status()["repo"] == str(d.repo)  # still serving
    assert d.stop() == 0
    log = (tmp_path / "r.log").read_text()
    assert "Error in ASGI Framework" not in log
    gc_line = next(line for line in log.splitlines() if "POST /api/v0/gc failed with an internal error" in line)
    assert "Traceback (most recent call last)" in gc_line and "buggy_node.py" in gc_line and "_gc" in gc_line
    fetch_line = next(line for line in log.splitlines() if "POST /api/v0/fetch failed with an internal error" in line)
    assert "Traceback (most recent call last)" in fetch_line and "_fetch" in fetch_line
