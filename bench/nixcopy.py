"""`nix copy --from` a p2pcache node whose peer holds every NAR, against static binary caches (zstd and xz)
served over loopback, on two kinds of content: bench/nix.py's closure (big random blobs, text, many small
files) and a real store path of thousands of small files (this checkout's .venv site-packages, added with
`nix-store --add`).

    .venv/bin/python bench/nixcopy.py [--quick] [--runs N]

Real Nix (nix-bin 2.8, root, no daemon) and real `p2pcache daemon` processes (A holds the paths, pushed
with `nix copy --to http://A?compression=none`; each B starts with an empty repo and is bootstrapped to A),
the static caches written by `nix copy --to file://DIR?compression=zstd|xz` and served by python's
ThreadingHTTPServer in its own process. Per content kind and run: static zstd, static xz, B with the
daemon's defaults (the DAG protocol), B with the NAR fetch begun when the narinfo is answered
(`nix.prefetch_nars = 4`), B with `transfer.protocol = "bitswap"` (the old path), each run starting one
step further on in that list; each copy into a fresh chroot store with a fresh Nix cache dir, checked
against the NarHashes. Figures: min over runs; ratios p2pcache/static (goal <= 1.0), and dag with the
prefetch / dag without it. Beside them, per variant, how long Nix waited on its source: the copy's wall
time minus Nix's own CPU seconds (median over runs). Nix 2.8 unpacks a NAR on one thread, so from a
source that keeps up the two are equal; Nix's CPU for the same copy swings by 2x with ext4's state, the
wait far less.

--quick: the small closure and the first 60 packages of site-packages (in sorted order).
--timeline: after the timed runs, one more copy of each kind from static zstd and from a cold B (defaults) with
`nix copy --debug`, its lines timestamped as they come: where each copy's time goes, per path (the narinfo
phase until Nix begins the first NAR; per NAR the download, then Nix adding it until it asks for the next).
--debug slows Nix a little, so these copies are not the timed ones.
Table on stderr, JSON lines on stdout ({"bench": "nixcopy", "metric", "value", "unit", "better", ...}).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import nix as nixbench  # noqa: E402  (bench/nix.py: Nix runner, the closure, daemons, timed copies)

MiB = 1 << 20
# The cold B nodes measured, each run: the daemon's defaults (the DAG protocol, no NAR prefetch), the same with
# the NAR fetch begun at narinfo time (`nix.prefetch_nars = 4`), and bitswap only (`transfer.protocol = "bitswap"`).
VARIANTS = ("dag", "dag prefetch", "bitswap")


def emit(metric: str, value: float, unit: str, better: str, **extra) -> None:
    print(json.dumps({"bench": "nixcopy", "metric": metric, "value": round(value, 4), "unit": unit,
                      "better": better, **extra}), flush=True)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_kinds(nix: nixbench.Nix, work: Path, token: str, quick: bool, made: list[str]) -> dict[str, dict]:
    """The two contents the Nix copy benches measure, the bench closure and the site-packages path, by name;
    their store paths are added to `made` (for the clean-up) as soon as each exists."""
    closure = nixbench.make_closure(nix, work, token, quick)
    made += closure["paths"]
    sp = site_packages_path(nix, work, token, quick)
    made += sp["paths"]
    return {"closure": closure, "site-packages": sp}


def site_packages_path(nix: nixbench.Nix, work: Path, token: str, quick: bool) -> dict:
    """This interpreter's site-packages (a real tree of thousands of small files) as one store path."""
    src = Path(sysconfig.get_paths()["purelib"])
    dst = work / f"p2pcache-bench-site-packages-{token}"
    if quick:
        dst.mkdir()
        for entry in sorted(src.iterdir())[:60]:
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, dst / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, dst / entry.name, follow_symlinks=False)
    else:
        shutil.copytree(src, dst, symlinks=True)
    files = sum(1 for p in dst.rglob("*") if p.is_file())
    path = nix.out("nix-store", "--add", str(dst))
    nixbench.rmtree(dst)
    info = json.loads(nix.out("nix", "path-info", "--json", path))[0]
    return {"top": path, "paths": {path: info}, "nar_bytes": info["narSize"], "files": files,
            "nar_hash": {path: info["narHash"]}}


_COPYING = re.compile(r"copying path '([^']+)'")
_NAR_DONE = re.compile(r"finished download of '[^']*/nar/[^']*'")


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z DEBUG p2pcache\.timeline: (.*)$")


def node_events(logs: dict[str, Path], since: float, until: float) -> list[tuple[float, str, str]]:
    """The `p2pcache.timeline` debug lines of the daemons' logs ({who: log file}) between two wall-clock times:
    (time, who, text)."""
    import calendar

    out = []
    for who, path in logs.items():
        for line in path.read_text(errors="replace").splitlines():
            if (m := _STAMP.match(line)) is None:
                continue
            day, frac = m.group(1).split(".")
            t = calendar.timegm(time.strptime(day, "%Y-%m-%dT%H:%M:%S")) + int(frac) / 1000
            if since - 0.01 <= t <= until + 0.01:
                out.append((t, who, m.group(2)))
    return out


def split_nar(events: list[tuple[float, str, str]], path: str, began: float, done: float) -> dict[str, float]:
    """One NAR's download split by the node's events (ms after Nix's "copying path"): the first of each kind
    (the NAR's own lines by its store hash, the DAG lines after its stream began)."""
    h = path.rsplit("/", 1)[-1].split("-", 1)[0]
    marks = {"B: stream begins": f"nar {h}: stream begins", "B: DAG stream opening": "dag .*: opening a stream",
             "B: DAG request sent": "dag .*: request of", "A: request read": "dag serve .*: request of",
             "A: first write": "dag serve: first write", "B: first bytes read": "dag .*: first .* bytes read",
             "B: manifest at hand": f"nar {h}: manifest at hand", "B: first bytes to Nix": f"nar {h}: first bytes",
             "B: last byte to Nix": f"nar {h}: last byte", "A: end written": "dag serve: end written"}
    out: dict[str, float] = {}
    start = next((t for t, w, text in events if w == "B" and text.startswith(f"nar {h}: stream begins")), began)
    end = max([done] + [t for t, w, text in events if w == "B" and text.startswith(f"nar {h}: last byte")])
    for label, pattern in marks.items():
        who = label.split(":")[0]
        hit = next((t for t, w, text in events if w == who and start <= t <= end and re.match(pattern, text)), None)
        if hit is not None:
            out[label] = (hit - began) * 1000
    return out


def spy_summary(raw: Path, top: int = 25) -> list[str]:
    """py-spy's collapsed stacks (`-f raw`, every thread, on-CPU samples only) summed by leaf function."""
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        leaf = stack.split(";")[-1]
        leaves[leaf] = leaves.get(leaf, 0) + int(n)
    out = [f"{total} samples"]
    for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / max(1, total):5.1f} %  {leaf[:150]}")
    return out


def traced_copy(bench: nixbench.Bench, src: str, content: dict, label: str,
                logs: dict[str, Path] | None = None, spy: dict[str, int] | None = None) -> dict:
    """One `nix copy --debug --from SRC` into a fresh store, its stderr lines timestamped on arrival: the
    narinfo phase (until the first "copying path"), then per path the NAR download ("copying path" ->
    "finished download of …/nar/…") and what Nix did after it until the next path began (unpacking, hashing,
    registering). Checked like the timed copies."""
    bench.serial += 1
    store = bench.work / f"store-t{bench.serial}"
    nix = nixbench.Nix(bench.work / f"home-t{bench.serial}")
    spies = {who: (bench.work / f"spy-{who}-{bench.serial}.txt", subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "250", "-f", "raw", "--threads",
         "-o", str(bench.work / f"spy-{who}-{bench.serial}.txt"), "--pid", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) for who, pid in (spy or {}).items()}
    if spies:
        time.sleep(1.0)  # py-spy attaches
    t0 = time.perf_counter()
    wall0 = time.time()
    proc = subprocess.Popen(["nix", "copy", "--debug", "--from", src, "--to", str(store), content["top"]],
                            env=nix.env("require-sigs = false\n"), stderr=subprocess.PIPE, text=True, errors="replace")
    assert proc.stderr is not None
    steps: list[list] = []  # [path, began, nar downloaded]
    nix_lines: list[tuple[float, str, str]] = []
    for line in proc.stderr:
        now = time.perf_counter() - t0
        nix_lines.append((wall0 + now, "Nix", line.rstrip()[:160]))
        if (m := _COPYING.search(line)) is not None:
            steps.append([m.group(1), now, None])
        elif _NAR_DONE.search(line) and steps and steps[-1][2] is None:
            steps[-1][2] = now
    rc = proc.wait()
    wall = time.perf_counter() - t0
    for who, (out, sp) in spies.items():
        sp.send_signal(2)
        sp.wait(timeout=60)
        if out.exists():
            log(f"  py-spy of {who} during the {label} copy (on-CPU samples, every thread), by leaf:")
            for line in spy_summary(out):
                log(f"    {line}")
    if rc != 0:
        raise RuntimeError(f"traced copy from {label} failed ({rc})")
    got = json.loads(nix.out("nix", "path-info", "--json", "--recursive", "--store", str(store), content["top"]))
    if {p["path"]: p["narHash"] for p in got} != content["nar_hash"]:
        raise RuntimeError(f"traced copy from {label}: the store does not hold the closure")
    nixbench.rmtree(store)
    nixbench.rmtree(nix.home)
    paths = []
    for i, (path, began, done) in enumerate(steps):
        end = steps[i + 1][1] if i + 1 < len(steps) else wall
        done = end if done is None else done
        size = content["paths"][path].get("narSize", 0) if isinstance(content["paths"], dict) else 0
        paths.append({"path": path, "nar_bytes": size, "download": done - began, "nix_after": end - done,
                      "began": wall0 + began, "done": wall0 + done})
    trace = {"label": label, "wall": wall, "narinfo_phase": steps[0][1] if steps else wall, "paths": paths}
    if logs:
        events = sorted(nix_lines + node_events(logs, wall0, wall0 + wall))
        out = bench.work.parent / f"p2pcache-nixcopy-timeline-{content['top'].split('-', 1)[0][-8:]}-{bench.serial}.txt"
        out.write_text("".join(f"{(t - wall0) * 1000:9.1f} ms {who:3} {text}\n" for t, who, text in events))
        trace["events_file"] = str(out)
        trace["nar_splits"] = {p["path"]: {"Nix: copying path": 0.0, **split_nar(events, p["path"], p["began"], p["done"]),
                                           "Nix: finished download": (p["done"] - p["began"]) * 1000} for p in paths}
    return trace


def print_timelines(kind: str, traces: list[dict]) -> None:
    log(f"\n== timeline, {kind} (nix copy --debug, one copy each; seconds)")
    log("  " + "".join(f"{t['label']:>24}" for t in traces))
    log("  narinfo phase       " + "".join(f"{t['narinfo_phase']:24.3f}" for t in traces))
    by_path = [{p["path"]: p for p in t["paths"]} for t in traces]
    for path in [p["path"] for p in traces[0]["paths"]]:
        name = path.split("-", 1)[-1][:28]
        mib = by_path[0][path]["nar_bytes"] / MiB
        cells = "".join(f"{b[path]['download']:11.3f} + {b[path]['nix_after']:.3f} nix" if path in b else f"{'-':>24}"
                        for b in by_path)
        log(f"  {name:28} {mib:5.1f} MiB {cells}")
    log("  total               " + "".join(f"{t['wall']:24.3f}" for t in traces))
    for t in traces:
        if "nar_splits" not in t:
            continue
        log(f"  {t['label']}: every event merged in {t['events_file']}")
        biggest = max(t["paths"], key=lambda p: p["nar_bytes"])
        split = t["nar_splits"][biggest["path"]]
        log(f"  {t['label']}: the biggest NAR ({biggest['nar_bytes'] / MiB:.1f} MiB), ms after Nix's 'copying path':")
        for what, ms in sorted(split.items(), key=lambda kv: kv[1]):
            log(f"    {ms:8.1f}  {what}")
            emit(f"{kind}_timeline_biggest_nar_{what.replace(':', '').replace(' ', '_')}_ms", ms, "ms", "lower")
    for t in traces:
        emit(f"{kind}_timeline_{t['label'].replace(' ', '_')}_narinfo_phase_seconds", t["narinfo_phase"], "s", "lower")
        emit(f"{kind}_timeline_{t['label'].replace(' ', '_')}_nar_download_seconds",
             sum(p["download"] for p in t["paths"]), "s", "lower")
        emit(f"{kind}_timeline_{t['label'].replace(' ', '_')}_nix_after_seconds",
             sum(p["nix_after"] for p in t["paths"]), "s", "lower")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--xz-level", type=int, default=0, help="xz level of the static cache (Nix's default is 6)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--timeline", action="store_true", help="also one traced copy per kind: where the time goes")
    ap.add_argument("--timeline-only", action="store_true", help="only the traced copies (no timed runs)")
    ap.add_argument("--spy", action="store_true", help="py-spy A and B during the traced swarm copies")
    ap.add_argument("--kinds", default="closure,site-packages", help="contents to copy (closure, site-packages)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"cold B nodes to time (of {', '.join(VARIANTS)})")
    ap.add_argument("--timeline-variants", default="dag", help="cold B nodes the traced copies run (of the same)")
    args = ap.parse_args()
    args.timeline = args.timeline or args.timeline_only
    started = nixbench.start_bench(args, "nixcopy")
    if started is None:
        return 2
    bench, token = started
    work = bench.work
    made: list[str] = []
    try:
        nix = bench.nix
        log(f"bench/nixcopy.py: temp dir {work} (2 cores shared with other work: compare same-run ratios)")
        kinds = make_kinds(nix, work, token, args.quick, made)
        kinds = {k: v for k, v in kinds.items() if k in args.kinds.split(",")}
        a = bench.daemon("a", extra=["--log-level", "debug"] if args.timeline else [])  # its timeline lines
        c = bench.daemon("c", bootstrap=[a.addr])  # a second runner: it takes A's provider records
        nixbench.wait_peers(a, 1)
        for content in kinds.values():
            nix.run("nix", "copy", "--to", f"{a.api}?compression=none", content["top"],
                    config=f"netrc-file = {a.netrc}\n")  # uploads need the daemon's API token
        a.wait_announced(2 * sum(len(c["paths"]) for c in kinds.values()), timeout=120)
        statics = {}
        for comp, extra in (("zstd", ""), ("xz", f"&compression-level={args.xz_level}")):
            d = work / f"static-{comp}"
            for content in kinds.values():
                nix.run("nix", "copy", "--to", f"file://{d}?compression={comp}{extra}&parallel-compression=true",
                        content["top"])
            statics[comp] = bench.static_server(d)
        serial = [0]

        def cold_b(variant: str, traced: bool = False) -> nixbench.Daemon:
            serial[0] += 1
            repo = work / f"b{serial[0]}"
            repo.mkdir()
            protocol = "bitswap" if variant == "bitswap" else "dag"
            prefetch = "[nix]\nprefetch_nars = 4\n" if variant == "dag prefetch" else ""
            (repo / "config.toml").write_text(f'[transfer]\nprotocol = "{protocol}"\n{prefetch}')
            # the daemon's default lookup timeout (bench/nix.py's 2 s misses now and then on a loaded machine)
            # at info, so a failed copy's cause is in B's log (printed below when one fails)
            level = "debug" if traced else "info"  # debug: the timeline's lines (`traced_copy`)
            b = bench.daemon(repo.name, bootstrap=[a.addr, c.addr], extra=["--lookup-timeout", "5", "--log-level", level])
            nixbench.wait_peers(b, 2)
            return b

        results: dict[str, dict[str, list[float]]] = {}
        cpu: dict[str, list[dict[str, float]]] = {}  # CPU seconds of A and B (and Nix) per swarm copy
        failures: dict[str, int] = {}
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if set(variants) - set(VARIANTS):
            raise SystemExit(f"--variants: not one of {', '.join(VARIANTS)}: {', '.join(set(variants) - set(VARIANTS))}")
        nix_cpu: dict[str, dict[str, list[float]]] = {}  # Nix's own CPU seconds per copy, by kind and variant
        for kind, content in kinds.items() if not args.timeline_only else ():
            res = results[kind] = {"static zstd": [], "static xz": [], **{f"p2pcache {v}": [] for v in variants}}
            spent = nix_cpu[kind] = {k: [] for k in res}
            steps = [f"static {comp}" for comp in statics] + [f"p2pcache {v}" for v in variants]
            for i in range(max(1, args.runs)):
                # Each run starts one step further on: Nix's CPU for the same copy swings with what the copy
                # before it deleted (ext4 creating files past freshly freed inodes), so no variant keeps one place.
                for step in steps[i % len(steps):] + steps[:i % len(steps)]:
                    if step.startswith("static "):
                        url, proc = statics[step.split()[1]]
                        r = bench.copy(url, content, {"server": proc.pid})
                        res[step].append(r["wall"])
                        spent[step].append(r["cpu"]["nix"])
                        continue
                    protocol = step.split(" ", 1)[1]
                    b = cold_b(protocol)
                    try:
                        r = bench.copy(b.api, content, {"A": a.proc.pid, "B": b.proc.pid})
                        res[step].append(r["wall"])
                        spent[step].append(r["cpu"]["nix"])
                        cpu.setdefault(f"{kind} {protocol}", []).append(r["cpu"])
                    except RuntimeError as e:  # reported, not hidden: a copy that failed is counted
                        failures[f"{kind} {protocol}"] = failures.get(f"{kind} {protocol}", 0) + 1
                        log(f"  {kind} run {i + 1}, p2pcache {protocol}: FAILED: {str(e).splitlines()[-1][:300]}")
                        b_log = work / f"{b.repo.name}.log"
                        for line in (b_log.read_text(errors="replace").splitlines()[-15:] if b_log.exists() else []):
                            log(f"    B: {line[:300]}")
                    bench.stop(b)
                log(f"  {kind} run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s (Nix {spent[k][-1]:.2f} CPU-s)"
                                                         for k, v in res.items() if v))
        timelines: dict[str, list[dict]] = {}
        if args.timeline:
            traced = [v.strip() for v in args.timeline_variants.split(",") if v.strip()]
            if set(traced) - set(VARIANTS):
                raise SystemExit(f"--timeline-variants: not one of {', '.join(VARIANTS)}")
            for kind, content in kinds.items():
                timelines[kind] = [traced_copy(bench, statics["zstd"][0], content, "static zstd")]
                for variant in traced:
                    b = cold_b(variant, traced=True)
                    try:
                        logs = {"A": work / "a.log", "B": work / f"{b.repo.name}.log"}
                        timelines[kind].append(traced_copy(bench, b.api, content, f"p2pcache {variant}", logs,
                                                           {"A": a.proc.pid, "B": b.proc.pid} if args.spy else None))
                    finally:
                        bench.stop(b)
        bench.close()
        for kind, res in results.items():
            content = kinds[kind]
            mib = content["nar_bytes"] / MiB
            what = f"{len(content['paths'])} paths" if kind == "closure" else f"{content['files']} files"
            log(f"\n== nix copy --from, {kind}: {what}, {mib:.1f} MiB of NAR (min of {args.runs})")
            best = {k: min(v) for k, v in res.items() if v}
            for k, v in best.items():
                log(f"  {k:18} {v:7.2f}s  {mib / v:7.1f} MiB/s   runs [{', '.join(f'{x:.2f}' for x in res[k])}]")
                emit(f"{kind}_{k.replace(' ', '_')}_seconds", v, "s", "lower", nar_mib=round(mib, 1),
                     runs=[round(x, 3) for x in res[k]], quick=args.quick)
            for comp in ("zstd", "xz"):
                for protocol in VARIANTS:
                    if f"p2pcache {protocol}" not in best:
                        continue
                    ratio = best[f"p2pcache {protocol}"] / best[f"static {comp}"]
                    goal = " (goal <= 1.0)" if protocol == "dag" else ""
                    log(f"  p2pcache {protocol} / static {comp}: {ratio:.2f}x{goal}")
                    emit(f"{kind}_{protocol.replace(' ', '_')}_over_static_{comp}", ratio, "ratio", "lower",
                         **({"goal": "<= 1.0"} if protocol == "dag" else {}), nar_mib=round(mib, 1))
            # Nix's wait: wall time minus Nix's own CPU (Nix 2.8 unpacks on one thread, so a copy whose source
            # keeps up is as long as Nix's CPU). The median over runs: what the source makes Nix wait, far
            # less swayed than the wall time by how slowly ext4 creates the files this time.
            for k in best:
                waits = sorted(w - c for w, c in zip(res[k], nix_cpu[kind][k]))
                if waits:
                    wait = waits[len(waits) // 2]
                    log(f"  Nix waited on {k}: median {wait:.2f} s (wall - Nix CPU), runs "
                        f"[{', '.join(f'{w:.2f}' for w in waits)}]")
                    emit(f"{kind}_{k.replace(' ', '_')}_nix_wait_seconds", wait, "s", "lower",
                         runs=[round(w, 3) for w in waits])
            if "p2pcache dag" in best and "p2pcache dag prefetch" in best:
                ratio = best["p2pcache dag prefetch"] / best["p2pcache dag"]
                log(f"  p2pcache dag with the NAR prefetch / dag without it (the default): {ratio:.2f}x")
                emit(f"{kind}_prefetch_over_no_prefetch", ratio, "ratio", "lower", nar_mib=round(mib, 1))
        for what, runs in cpu.items():
            for who in ("A", "B"):
                best = min(r[who] for r in runs)
                log(f"  CPU of {who} in a {what} copy: min {best:.2f} s, runs [{', '.join(f'{r[who]:.2f}' for r in runs)}]")
                emit(f"{what.replace(' ', '_')}_cpu_{who}_seconds", best, "s", "lower",
                     runs=[round(r[who], 3) for r in runs])
        for kind, traces in timelines.items():
            print_timelines(kind, traces)
        for what, n in failures.items():
            log(f"  FAILED copies: {what}: {n} of {args.runs}")
            emit(f"{what.replace(' ', '_')}_failed_copies", n, "copies", "lower", runs=args.runs)
        return 1 if failures else 0
    finally:
        nixbench.clean_up(bench, made, work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
