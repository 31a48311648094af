"""The main figure of a run (`--plot out.png`). Needs matplotlib, an optional extra: the rest of simnet
does not import this module."""

from __future__ import annotations

from typing import Any

from .metrics import Results

__all__ = ["check_available", "plot"]


def check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: .venv/bin/pip install matplotlib") from None


def plot(results: Results, series: dict[str, Any], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    title = f"{results.scenario}, seed {results.seed}"
    if "times" in series:
        times = series["times"]
        ax = axes[0]
        if times:
            ax.plot(times, [(i + 1) / len(times) for i in range(len(times))], label="p2p fleet (simnet)")
        ax.axvline(series["one"], color="green", ls="--", label=f"one unshared transfer {series['one']:.2f}s")
        ax.axvline(1.5 * series["one"], color="green", ls=":", label="1.5 × one transfer")
        if series["central"] < 20 * max(times or [1]):
            ax.axvline(series["central"], color="red", ls="--", label=f"central server {series['central']:.1f}s")
        else:
            ax.text(0.98, 0.05, f"central server: {series['central']:.0f} s (off scale)", transform=ax.transAxes,
                    ha="right", color="red")
        ax.set_xlabel("fetch completion time (s, virtual)")
        ax.set_ylabel("fraction of runners done")
        ax.legend(fontsize=8, loc="lower right" if not times else "center right")
        ax.set_title(title)
        ax = axes[1]
        tl = series.get("timeline", [])
        if tl:
            total = max(v for _, v in tl) or 1
            ax.plot([t for t, _ in tl], [v / total for _, v in tl], label="blocks stored by runners")
        for t in series.get("partition", []):
            ax.axvline(t, color="grey", ls="--")
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("fraction of all runner blocks")
        ax.set_title("progress" + (" (dashed: partition / heal)" if series.get("partition") else ""))
    elif "lookups" in series:
        lookups = [r for r in series["lookups"] if "found" in r]
        ax = axes[0]
        rounds = [r["rounds"] for r in lookups if r["found"]]
        if rounds:
            ax.hist(rounds, bins=range(1, max(rounds) + 2), align="left", rwidth=0.8)
        ax.set_xlabel("rounds (hop of the answer naming the first provider)")
        ax.set_ylabel("lookups")
        ax.set_title(title)
        ax = axes[1]
        xs = [r["at"] - series["start"] for r in lookups]
        ax.scatter(xs, [r["time"] for r in lookups], s=4,
                   c=["tab:blue" if r["found"] else "tab:red" for r in lookups])
        ax.set_xlabel("time into the churn phase (s)")
        ax.set_ylabel("lookup time (s); red = not found")
        ax.set_title("lookups during churn")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
