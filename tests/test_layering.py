"""The import arrows STYLE.md draws (cli/http → node → services → store/exchange/routing → content), checked on
the source (scripts/import_arrows.py, function-level imports included): no service or lower layer imports
http/ or node.py, and the Nix cache service imports neither."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _arrows():
    spec = importlib.util.spec_from_file_location("import_arrows", ROOT / "scripts" / "import_arrows.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_service_or_store_imports_http_or_node():
    ia = _arrows()
    known, run, typing_only = ia.arrows(ROOT)
    assert "p2pcache.nixcache.service" in known and "p2pcache.http.nix" in known
    upward = sorted((m, t) for m, ts in run.items() for t in ts | typing_only[m]
                    if m.startswith(ia.LOWER) and (t == "p2pcache.node" or t.startswith(ia.UPPER)))
    assert upward == []
    nixcache = {t for m, ts in run.items() if m.startswith("p2pcache.nixcache") for t in ts | typing_only[m]}
    assert not {t for t in nixcache if t.startswith(("p2pcache.http", "p2pcache.node", "p2pcache.cli"))}
    assert "p2pcache.store.narstore" in nixcache  # the check sees the arrows that are there


def test_config_does_not_import_http_node_or_the_nix_cache():
    """config.py is read by every layer: it must not import up into http/ or the node (it imported
    http/nix.py for NixConfig, which closed a cycle through the repo)."""
    known, run, typing_only = _arrows().arrows(ROOT)
    assert not {t for t in run["p2pcache.config"] if t.startswith(("p2pcache.http", "p2pcache.nixcache",
                                                                   "p2pcache.node"))}
