"""The sweep's table (text) and Pareto plot (matplotlib)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

COLUMNS = (("forget", "forget_acc"), ("retain", "retain_acc"), ("held-out", "retain_heldout_acc"),
           ("neighbours", "heldout_neighbour_acc"), ("others", "heldout_other_acc"), ("general", "general_acc"),
           ("MIA AUROC", "mia_auroc"))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: dict) -> str:
    """One row per objective x combiner of ``results["summary"]``, then the paired differences."""
    cfg = results["config"]
    param = cfg["grid"]["param"]
    threshold = cfg["forget_threshold"]
    multi = len(results["worlds"]) > 1
    head = ["objective", "combiner", *(c for c, _ in COLUMNS)] + (["worlds"] if multi else [param, "steps"])
    rows = []
    for o, by_c in results["summary"].items():
        for c, s in by_c.items():
            if s is None:
                rows.append([o, c, f"no run reached forget <= {threshold:g}"])
                continue
            cells = [_cell(s[k]) for _, k in COLUMNS]
            extra = [f"{s['worlds']}/{len(results['worlds'])}"] if multi else [f"{s[param]:g}", str(s["steps"])]
            rows.append([o, c, *cells, *extra])
    widths = [max(len(str(r[i])) for r in [head, *rows] if i < len(r) and not (len(r) == 3 and i == 2))
              for i in range(len(head))]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)) if len(r) > 3 else "  ".join(
        [str(r[0]).ljust(widths[0]), str(r[1]).ljust(widths[1]), r[2]])
    seeds = ", ".join(str(w["seed"]) for w in results["worlds"])
    lines = [f"Best held-out retain accuracy among runs with forget accuracy <= {threshold:g} "
             f"(world{'s' if multi else ''} {seeds}{'; means over worlds' if multi else ''}):", fmt(head)]
    lines += [fmt(r) for r in rows]
    start = [r for r in results["runs"] if r["steps"] == 0]
    if start:
        mean = lambda k: float(np.mean([r[k] for r in start]))
        lines.append(fmt(["(start)", "", *(_cell(mean(k)) for _, k in COLUMNS)]
                         + ([""] if multi else ["", "0"])))
        lines.append(f"unseen people (never trained on; what a model that never saw the forget people would "
                     f"score on them): accuracy {mean('unseen_acc'):.3f}")
    if multi:
        lines.append("")
        lines.append("Paired differences of held-out retain accuracy over worlds (a - b):")
        for o, pairs in results["paired"].items():
            for name, e in pairs.items():
                if not e["n"]:
                    lines.append(f"  {o:10s} {name:24s} no world where both forgot enough")
                    continue
                p = f", Wilcoxon p={e['wilcoxon_p']:.3f}" if "wilcoxon_p" in e else ""
                lines.append(f"  {o:10s} {name:24s} mean {100 * e['mean']:+.1f} points, "
                             f"positive in {e['positive']}/{e['n']}{p}")
    return "\n".join(lines)


def mean_points(results: dict) -> dict:
    """``{(objective, combiner): [(forget, heldout, general), ...]}``: every grid value and step,
    averaged over the worlds."""
    param = results["config"]["grid"]["param"]
    acc: dict = {}
    for r in results["runs"]:
        key = (r["objective"], r["combiner"], r[param], r["steps"])
        acc.setdefault(key, []).append((r["forget_acc"], r["retain_heldout_acc"], r["general_acc"]))
    out: dict = {}
    for (o, c, _, _), pts in acc.items():
        out.setdefault((o, c), []).append(tuple(np.mean(pts, axis=0)))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with lower-or-equal forget and higher-or-equal y, by forget."""
    front, best = [], -np.inf
    for f, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((f, y))
            best = y
    return front


def plot_pareto(results: dict, path: Path) -> Path:
    """``pareto.png``: per objective, held-out retain and general accuracy against forget
    accuracy; dots are all runs, lines each combiner's Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = list(results["summary"])
    combiners = results["config"]["combiners"]
    points = mean_points(results)
    fig, axes = plt.subplots(2, len(objectives), figsize=(5 * len(objectives), 8), squeeze=False)
    colors = dict(zip(combiners, itertools.cycle(["tab:gray", "tab:blue", "tab:red", "tab:green"])))
    for j, o in enumerate(objectives):
        for i, (label, idx) in enumerate((("held-out retain accuracy", 1), ("general accuracy", 2))):
            ax = axes[i][j]
            for c in combiners:
                pts = [(p[0], p[idx]) for p in points.get((o, c), [])]
                if not pts:
                    continue
                ax.scatter(*zip(*pts), s=10, alpha=0.3, color=colors[c])
                ax.plot(*zip(*pareto_front(pts)), marker="o", ms=4, color=colors[c], label=c)
            ax.axvline(results["config"]["forget_threshold"], ls=":", color="k", lw=1)
            ax.set(xlabel="forget accuracy", ylabel=label, title=o, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
