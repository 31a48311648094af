"""The store's Nix figures (issue 10): NAR ingest by `nix copy --to http://node`, and warm `nix copy --from`
a node that holds the paths, each against a static binary cache measured in the same run.

    .venv/bin/python bench/nixwarm.py [--quick] [--runs N]

Real Nix (nix-bin 2.8, root, no daemon) and real `p2pcache daemon` processes on loopback, on two kinds of
content: bench/nix.py's closure (random blobs, text, many small files, with references) and a real tree of
thousands of small files (this interpreter's site-packages added with `nix-store --add`, bench/nixcopy.py's
builder).

1. Ingest, per run and content kind, alternating: `nix copy --to http://A?compression=none` into a daemon
   with an empty repo, and `nix copy --to file://DIR?compression=none` into an empty directory. Ratio: the
   file:// time over the node's time (a time-rate; goal >= 0.5). Beside them, the floor of any HTTP binary
   cache with Nix 2.8: the same copy to a null sink (python's http.server in its own process, answering 404
   to every GET and HEAD and 200 to every PUT, whose body it reads and drops), on a fresh port per round so
   that Nix's narinfo disk cache knows nothing of it. What Nix spends there beyond `file://` is Nix's own
   HTTP upload path; what the node spends beyond the sink is the node's.
2. Warm: one daemon holds both kinds; `nix copy --from` it into a fresh chroot store with a fresh Nix cache,
   alternating with the same copy from a static zstd binary cache (`compression=zstd`, written by Nix) served
   by python's ThreadingHTTPServer in its own process. Ratio: node time over zstd time (goal <= 0.7).
   Every copy is checked against the NarHashes. Beside them, two floors of a server of uncompressed NARs (as
   the node is): the same copy from the same static server over a `compression=none` cache (what any server
   of uncompressed NARs costs Nix), and from a local `file://` cache with `compression=none` (no HTTP).
3. Nix's own floor: the same copy from a local `file://` cache written with `compression=zstd` (no HTTP, no
   server: what Nix needs to import the zstd NARs), beside the `compression=none` one; the faster of the two is
   the least any binary cache can cost Nix, so `floor / static zstd` is the best ratio the goal can reach, and
   the bench says whether 0.7 is within it. Each variant's CPU seconds of Nix (user + system, getrusage of
   the reaped `nix copy`) and of the serving process are printed beside the wall times: less load-sensitive
   than wall time on a shared machine, and they show where a copy's time goes (on these VMs Nix's own CPU is
   nearly all kernel time creating the files: ext4 inode allocation, `perf record` of `nix copy`).

Figures are min over runs. --quick: bench/nix.py's small closure and the first 60 packages of site-packages.
Table on stderr, JSON lines on stdout ({"bench": "nixwarm", "metric", "value", "unit", "better", ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (nix.py, nixcopy.py put the checkout first)
import nix as nixbench  # noqa: E402  (bench/nix.py: Nix runner, the closure, daemons, timed copies)
from nixcopy import make_kinds  # noqa: E402

MiB = 1 << 20
log = nixbench.log

# The floor of an HTTP binary cache for `nix copy --to`: takes every upload and keeps nothing. Expect:
# 100-continue is answered by BaseHTTPRequestHandler itself (HTTP/1.1).
NULL_SINK = r"""
import http.server
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
    def do_GET(self):
        if self.path == "/nix-cache-info":
            return self.reply(200, b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n")
        self.reply(404)
    do_HEAD = do_GET
    def do_PUT(self):
        left = int(self.headers.get("Content-Length", "0"))
        while left:
            got = self.rfile.read(min(left, 1 << 20))
            if not got:
                return
            left -= len(got)
        self.reply(200)
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def null_sink_copy(nix: nixbench.Nix, top: str) -> float:
    """Seconds of `nix copy --to` a fresh null sink (a new port: Nix's narinfo disk cache has nothing of it)."""
    proc = subprocess.Popen([sys.executable, "-c", NULL_SINK], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        t = time.perf_counter()
        nix.run("nix", "copy", "--to", f"http://127.0.0.1:{port}?compression=none", top, timeout=300)
        return time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait()


WARM_LABELS = {"zstd": "static zstd", "node": "node", "none": "static none", "file-none": "file:// none",
               "file-zstd": "file:// zstd"}


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "nixwarm", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--warm-only", action="store_true", help="skip the ingest rounds (the warm figures only)")
    ap.add_argument("--ingest-only", action="store_true", help="skip the warm rounds (the ingest figures only)")
    args = ap.parse_args()
    started = nixbench.start_bench(args, "nixwarm")
    if started is None:
        return 2
    bench, token = started
    work = bench.work
    made: list[str] = []
    t_start = time.perf_counter()
    try:
        nix = bench.nix
        log(f"bench/nixwarm.py: temp dir {work} (2 cores: compare same-run ratios)")
        kinds = make_kinds(nix, work, token, args.quick, made)
        ingest: dict[str, dict[str, list[float]]] = {k: {"node": [], "node_cpu": [], "file": [], "sink": []}
                                                       for k in kinds}
        serial = 0
        for i in range(0 if args.warm_only else max(1, args.runs)):
            for kind, content in kinds.items():
                serial += 1
                d = work / f"file-{serial}"
                t = time.perf_counter()
                nix.run("nix", "copy", "--to", f"file://{d}?compression=none", content["top"])
                ingest[kind]["file"].append(time.perf_counter() - t)
                nixbench.rmtree(d)
                a = bench.daemon(f"ingest-{serial}")
                c0 = nixbench.cpu_seconds(a.proc.pid)
                t = time.perf_counter()
                nix.run("nix", "copy", "--to", f"{a.api}?compression=none", content["top"],
                        config=f"netrc-file = {a.netrc}\n")  # uploads need the daemon's API token
                ingest[kind]["node"].append(time.perf_counter() - t)
                ingest[kind]["node_cpu"].append(nixbench.cpu_seconds(a.proc.pid) - c0)
                bench.stop(a)
                nixbench.rmtree(a.repo)
                ingest[kind]["sink"].append(null_sink_copy(nix, content["top"]))
                log(f"  ingest {kind} run {i + 1} (load {os.getloadavg()[0]:.1f}): file:// {ingest[kind]['file'][-1]:.2f}s, "
                    f"node {ingest[kind]['node'][-1]:.2f}s (daemon {ingest[kind]['node_cpu'][-1]:.2f} CPU-s), "
                    f"null sink {ingest[kind]['sink'][-1]:.2f}s")

        warm: dict[str, dict[str, list[float]]] = {k: {n: [] for n in WARM_LABELS} for k in kinds}
        cpu: dict[str, dict[str, list[tuple[float, float]]]] = {k: {n: [] for n in WARM_LABELS} for k in kinds}
        floor: dict[str, list[float]] = {k: [] for k in kinds}
        if not args.ingest_only:
            a = bench.daemon("a")
            static = work / "static-zstd"
            for content in kinds.values():
                nix.run("nix", "copy", "--to", f"{a.api}?compression=none", content["top"],
                        config=f"netrc-file = {a.netrc}\n")
                nix.run("nix", "copy", "--to", f"file://{static}?compression=zstd&parallel-compression=true",
                        content["top"])
            url, proc = bench.static_server(static)
            # The floor of any server of uncompressed NARs (as the node is) in front of Nix 2.8: python's static
            # server over a `compression=none` cache, on the same loopback. What the node spends beyond it is the
            # node's; what separates it from the zstd copy is Nix's own handling of the bigger uncompressed NAR.
            static_none = work / "static-none"
            for content in kinds.values():
                nix.run("nix", "copy", "--to", f"file://{static_none}?compression=none", content["top"])
            url_none, proc_none = bench.static_server(static_none)
            # The floor of a warm copy from a server of uncompressed NARs (as the node is): the same copy from a local
            # `file://` cache of uncompressed NARs (no HTTP, no server at all), timed in the same rounds. What the node
            # spends beyond it is the node's; what separates it from the zstd copy is Nix's handling of the bigger
            # uncompressed NAR.
            local = work / "local-none"
            local_zstd = work / "local-zstd"
            for content in kinds.values():
                nix.run("nix", "copy", "--to", f"file://{local}?compression=none", content["top"])
                nix.run("nix", "copy", "--to", f"file://{local_zstd}?compression=zstd", content["top"])

            sources = {"zstd": (url, {"server": proc.pid}), "node": (a.api, {"server": a.proc.pid}),
                       "none": (url_none, {"server": proc_none.pid}), "file-none": (f"file://{local}", {}),
                       "file-zstd": (f"file://{local_zstd}", {})}
            names = list(sources)
            for i in range(max(1, args.runs)):
                # Each round starts with another variant: Nix's CPU for the same copy moved 0.8-3.4 s from copy
                # to copy (most of it is ext4 creating the files, whose inode allocator walks past recently
                # deleted inodes, and each copy deletes the store it made), so no variant keeps one position.
                order = names[i % len(names):] + names[:i % len(names)]
                for kind, content in kinds.items():
                    for name in order:
                        src, watch = sources[name]
                        got = bench.copy(src, content, watch)
                        warm[kind][name].append(got["wall"])
                        cpu[kind][name].append((got["cpu"]["nix"], got["cpu"].get("server", 0.0)))
                    floor[kind].append(min(warm[kind]["file-none"][-1], warm[kind]["file-zstd"][-1]))
                    log(f"  warm {kind} run {i + 1} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
                        f"{WARM_LABELS[n]} {warm[kind][n][-1]:.2f}s (nix {cpu[kind][n][-1][0]:.2f}"
                        + (f", server {cpu[kind][n][-1][1]:.2f}" if sources[n][1] else "") + " CPU-s)"
                        for n in order))
        bench.close()

        for kind, content in kinds.items():
            mib = content["nar_bytes"] / MiB
            what = f"{len(content['paths'])} paths" if kind == "closure" else f"{content['files']} files"
            log(f"\n== {kind}: {what}, {mib:.1f} MiB of NAR (min of {args.runs}; 2 shared cores)")
            common = {"nar_mib": round(mib, 1), "quick": args.quick, "kind": kind}
            if ingest[kind]["file"]:  # not with --warm-only
                fi, no = min(ingest[kind]["file"]), min(ingest[kind]["node"])
                log(f"  nix copy --to file://?compression=none  {fi:7.2f}s  {mib / fi:7.1f} MiB/s")
                log(f"  nix copy --to http://node               {no:7.2f}s  {mib / no:7.1f} MiB/s  "
                    f"{fi / no:.2f}x the file:// rate (goal >= 0.5)")
                emit(f"{kind}_ingest_file_seconds", fi, "s", "lower",
                     runs=[round(x, 3) for x in ingest[kind]["file"]], **common)
                emit(f"{kind}_ingest_node_seconds", no, "s", "lower",
                     runs=[round(x, 3) for x in ingest[kind]["node"]], **common)
                emit(f"{kind}_ingest_node_vs_file_rate", fi / no, "ratio", "higher", goal=">= 0.5", **common)
                nc = min(ingest[kind]["node_cpu"])
                log(f"  daemon CPU per upload (getrusage, min)   {nc:7.2f}s")
                emit(f"{kind}_ingest_daemon_cpu_seconds", nc, "s", "lower",
                     runs=[round(x, 3) for x in ingest[kind]["node_cpu"]], **common)
                sk = min(ingest[kind]["sink"])
                log(f"  floor: nix copy --to http://null-sink    {sk:7.2f}s  {mib / sk:7.1f} MiB/s  "
                    f"{fi / sk:.2f}x the file:// rate (the best any HTTP cache can do); node {no / sk:.2f}x its time")
                emit(f"{kind}_ingest_sink_seconds", sk, "s", "lower", runs=[round(x, 3) for x in ingest[kind]["sink"]],
                     **common)
                emit(f"{kind}_ingest_sink_vs_file_rate", fi / sk, "ratio", "higher", **common)
                emit(f"{kind}_ingest_node_over_sink", no / sk, "ratio", "lower", **common)
            if not floor[kind]:  # --ingest-only
                continue
            zs, wn = min(warm[kind]["zstd"]), min(warm[kind]["node"])
            log(f"  nix copy --from static zstd             {zs:7.2f}s")
            log(f"  nix copy --from node (warm)             {wn:7.2f}s  {wn / zs:.2f}x the zstd time (goal <= 0.7)")
            sn = min(warm[kind]["none"])
            log(f"  nix copy --from static none (HTTP)      {sn:7.2f}s  {sn / zs:.2f}x the zstd time; "
                f"node {wn / sn:.2f}x this floor")
            fz, fn = min(warm[kind]["file-zstd"]), min(warm[kind]["file-none"])
            log(f"  nix copy --from file://?compression=zstd {fz:7.2f}s  {fz / zs:.2f}x the zstd time (no server)")
            log(f"  nix copy --from file://?compression=none {fn:7.2f}s  {fn / zs:.2f}x the zstd time (no server)")
            fl = min(floor[kind])
            log(f"  floor: Nix alone, the faster file://      {fl:7.2f}s  {fl / zs:.2f}x the zstd time: the goal's 0.7 is "
                f"{'within' if fl / zs <= 0.7 else 'NOT within'} reach of any binary cache; node {wn / fl:.2f}x this floor")
            for n in WARM_LABELS:  # min of each: CPU moves less with the machine's load than wall time
                nc, sc = min(c[0] for c in cpu[kind][n]), min(c[1] for c in cpu[kind][n])
                log(f"    CPU-s of {WARM_LABELS[n]:18s} nix {nc:6.2f}" + (f"   server {sc:6.2f}" if n in
                                                                         ("zstd", "node", "none") else ""))
                emit(f"{kind}_warm_{n.replace('-', '_')}_nix_cpu_seconds", nc, "s", "lower", **common)
                if n in ("zstd", "node", "none"):
                    emit(f"{kind}_warm_{n}_server_cpu_seconds", sc, "s", "lower", **common)
            emit(f"{kind}_warm_zstd_seconds", zs, "s", "lower", runs=[round(x, 3) for x in warm[kind]["zstd"]],
                 **common)
            emit(f"{kind}_warm_node_seconds", wn, "s", "lower", runs=[round(x, 3) for x in warm[kind]["node"]],
                 **common)
            emit(f"{kind}_warm_node_over_zstd", wn / zs, "ratio", "lower", goal="<= 0.7", **common)
            emit(f"{kind}_static_none_seconds", sn, "s", "lower", runs=[round(x, 3) for x in warm[kind]["none"]],
                 **common)
            emit(f"{kind}_static_none_over_zstd", sn / zs, "ratio", "lower", **common)
            emit(f"{kind}_warm_node_over_static_none", wn / sn, "ratio", "lower", **common)
            emit(f"{kind}_local_none_seconds", fn, "s", "lower", runs=[round(x, 3) for x in warm[kind]["file-none"]],
                 **common)
            emit(f"{kind}_local_zstd_seconds", fz, "s", "lower", runs=[round(x, 3) for x in warm[kind]["file-zstd"]],
                 **common)
            emit(f"{kind}_local_none_over_zstd", fn / zs, "ratio", "lower", **common)
            emit(f"{kind}_nix_floor_seconds", fl, "s", "lower", runs=[round(x, 3) for x in floor[kind]], **common)
            emit(f"{kind}_nix_floor_over_zstd", fl / zs, "ratio", "lower", goal_reachable=fl / zs <= 0.7, **common)
            emit(f"{kind}_warm_node_over_nix_floor", wn / fl, "ratio", "lower", **common)
        log(f"\nbench/nixwarm.py took {time.perf_counter() - t_start:.0f}s")
        return 0
    finally:
        nixbench.clean_up(bench, made, work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
