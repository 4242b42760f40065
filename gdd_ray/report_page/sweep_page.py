"""ROOT/report.html of a sweep, and its two plots: the leaderboard (sortable, each point linked to its own run
page), accuracy vs IPC (one line per --pda-variants) and accuracy vs generation GPU-seconds (the frontier of
accuracy per unit of compute). Built from the leaderboard rows alone (gdd_ray.sweep writes them)."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

from gdd_ray import storage
from gdd_ray.report_page import html as h
from gdd_ray.report_page.run_page import PAGE

PLOT_IPC = "accuracy_vs_ipc.png"
PLOT_COST = "accuracy_vs_cost.png"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4))


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("accuracy_mean") is not None]


def pooled(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean and population std over every run of `rows` (each a point's mean, std and run count): the points
    at one (IPC, K) that differ in eval seed or training options are one sample of runs."""
    n = [max(1, int(r.get("runs") or 1)) for r in rows]
    m = [r["accuracy_mean"] for r in rows]
    sd = [r.get("accuracy_std") or 0.0 for r in rows]
    total = sum(n)
    mean = sum(k * x for k, x in zip(n, m)) / total
    second = sum(k * (s * s + x * x) for k, s, x in zip(n, sd, m)) / total
    return mean, max(0.0, second - mean * mean) ** 0.5


def plot_accuracy_vs_ipc(rows: list[dict[str, Any]]) -> bytes:
    """Accuracy against IPC, one line per K: the mean over every run of the points at (IPC, K), error bars
    one std over those runs (eval seeds and runs alike)."""
    plt, fig, ax = _figure()
    by_k: dict[Any, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in _scored(rows):
        by_k[r.get("pda_variants", "-")][int(r.get("ipc", 0))].append(r)
    for k, points in sorted(by_k.items(), key=lambda kv: str(kv[0])):
        xs = sorted(points)
        stats = [pooled(points[x]) for x in xs]
        ax.errorbar(
            xs, [100 * m for m, _ in stats], yerr=[100 * sd for _, sd in stats], marker="o", capsize=3, label=f"K = {k}"
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="images per class (IPC)", ylabel="test accuracy (%), ± 1 std over runs", title="Accuracy vs IPC")
    if by_k:
        ax.legend()
    return _png(plt, fig)


def frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The non-dominated (cost, accuracy, name) points: none cheaper-or-equal is at least as accurate. Sorted by
    cost, the best first at equal cost, a point joins only when it beats every cheaper one."""
    out: list[tuple[float, float, str]] = []
    best = float("-inf")
    for cost, acc, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            out.append((cost, acc, name))
            best = acc
    return out


def plot_accuracy_vs_cost(rows: list[dict[str, Any]]) -> bytes:
    """Every point at (its generation GPU-seconds, accuracy), labelled with its name; the frontier of the
    non-dominated points drawn through them."""
    plt, fig, ax = _figure()
    pts = [
        (r["generation_gpu_s"], 100 * r["accuracy_mean"], str(r["point"]))
        for r in _scored(rows)
        if r.get("generation_gpu_s")
    ]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        names: dict[tuple[float, float], list[str]] = defaultdict(list)
        for cost, acc, name in pts:  # points at one place share one label, not a pile of overprinted ones
            names[(cost, acc)].append(name)
        for (cost, acc), group in names.items():
            ax.annotate("\n".join(group), (cost, acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = frontier(pts)
        xs, ys = [p[0] for p in front], [p[1] for p in front]
        ax.step(xs, ys, where="post", color="C1")
        ax.plot(xs, ys, "o", mfc="none", mec="C1", ms=11, label="frontier (non-dominated)")
        ax.legend(fontsize=7)
    ax.set(xlabel="render GPU-seconds of the images trained on", ylabel="test accuracy (%)",
           title="Accuracy per unit of generation")  # fmt: skip
    return _png(plt, fig)


# Leaderboard columns of the evaluation protocols (sweep.protocol_columns) shown as percentages, besides the
# per-network accuracies ("ResNet-18 hard"...).
PERCENT_COLUMNS = ("random_real", "full_data", "ior", "hlr", "lrs")


def write_sweep_page(root: str, rows: list[dict[str, Any]], title: str = "") -> str:
    """Write ROOT/report.html and the two plots beside it; returns the page's path."""
    loc = storage.Location(root)
    plots = {PLOT_IPC: plot_accuracy_vs_ipc(rows), PLOT_COST: plot_accuracy_vs_cost(rows)}
    for name, data in plots.items():
        loc.write_bytes(name, data)
    # Points may differ in their columns (networks, baselines): the union, in first-seen order.
    fields = [f for f in dict.fromkeys(k for r in rows for k in r) if f not in ("point", "accuracy_std")]
    numeric = [False] + [any(isinstance(r.get(f), (int, float)) for r in rows) or f == "accuracy_mean" for f in fields]

    def cells(r: dict[str, Any]) -> list[Any]:
        link = f"<a href='points/{h.esc(r['point'])}/{PAGE}'>{h.esc(r['point'])}</a>"
        out: list[Any] = [(link, r["point"])]
        for f in fields:
            if f == "accuracy_mean":
                value = r[f] if r[f] is not None else -1
                out.append((h.esc(h.percent(r[f], r.get("accuracy_std"))), value))
            elif isinstance(r.get(f), float) and (f in PERCENT_COLUMNS or " " in f):  # accuracies and scores
                out.append((h.esc(h.percent(r[f])), r[f]))
            else:
                out.append("" if r.get(f) is None else r[f])
        return out

    table = h.table(["point", *fields], (cells(r) for r in rows), sortable=True, ident="leaderboard", numeric=numeric)
    figures = "".join(h.png(data, name, "plot") for name, data in plots.items())
    text = h.page(
        title or f"gdd-ray sweep: {len(rows)} points",
        f"{root} · click a column to sort · each point links to its run page",
        [h.section("Leaderboard", table, "leaderboard-section"), h.section("Plots", figures)],
    )
    loc.write_bytes(PAGE, text.encode())
    return storage.join(root, PAGE)
