"""The sweep's tables (text) and Pareto plot (matplotlib)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

COLUMNS = (("forget", "forget_acc"), ("retain", "retain_acc"), ("held-out", "retain_heldout_acc"),
           ("neighbours", "heldout_neighbour_acc"), ("others", "heldout_other_acc"), ("general", "general_acc"),
           ("MIA AUROC", "mia_auroc"), ("forget quality", "forget_quality"), ("PrivLeak", "privleak"))


def robustness_columns(results: dict) -> list[tuple[str, str]]:
    """``(header, key)`` of the robustness columns present in ``results["gold"]``."""
    gold = results["gold"]
    cols = [("forget half", "relearn_unseen_before"), ("relearn", "relearn_forget_acc"),
            ("recovered", "relearn_recovered"), ("benign relearn", "relearn_benign_forget_acc")]
    cols += [(k[:-len("_forget_acc")], k) for k in gold if k.startswith("int") and k.endswith("_forget_acc")]
    cols += [("int4 held-out", "int4_retain_heldout_acc"), ("paraphrase", "paraphrase_forget_acc"),
             ("+context", "paraphrase_context_forget_acc"), ("+context held-out", "paraphrase_context_retain_heldout_acc")]
    return [(h, k) for h, k in cols if k in gold]


def _selected_table(results: dict, criterion: str, cols: list[tuple[str, str]]) -> tuple[str, str, list[str]]:
    """``(title, " (means over worlds)" or "", table lines)``: the ``cols`` (header, key) of the runs
    selected under ``criterion``, the gold model's and, where the worlds hold them
    (``pretrained_attacks``), the pretrained model's (mean over worlds)."""
    rows = []
    for o, by_c in results["summary"][criterion].items():
        for c, s in by_c.items():
            rows.append([o, c, "no run reached the bar"] if s is None else [o, c, *(_cell(s.get(k)) for _, k in cols)])
    rows.append(["(gold)", "retrained", *(_cell(results["gold"].get(k)) for _, k in cols)])
    pre = [w["pretrained_attacks"] for w in results["worlds"] if cols[0][1] in w.get("pretrained_attacks", {})]
    if pre:
        mean = lambda k: None if any(p.get(k) is None for p in pre) else float(np.mean([p[k] for p in pre]))
        rows.append(["(start)", "pretrained", *(_cell(mean(k)) for _, k in cols)])
    title = "gold-matched" if criterion == "gold" else "fixed bar"
    multi = " (means over worlds)" if len(results["worlds"]) > 1 else ""
    return title, multi, _table(["objective", "combiner", *(h for h, _ in cols)], rows)


def robustness_table(results: dict, criterion: str = "gold") -> list[str]:
    """Forget accuracy under each attack of the runs selected under ``criterion``, next to the
    gold model's (the floor) and the pretrained model's; ``[]`` without robustness columns."""
    cols = robustness_columns(results)
    if not cols:
        return []
    title, multi, table = _selected_table(results, criterion, cols)
    return [f"[robustness, {title}] forget accuracy under attack of the selected runs{multi}"
            ": relearn = the unseen forget half after fine-tuning on the other half, benign = after fine-tuning on "
            "retain texts, intN = weight-only round-to-nearest, paraphrase = held-out question templates:",
            *table]


TOFU_COLUMNS = (("truth ratio", "tofu_truth_ratio"), ("forget quality", "tofu_forget_quality"),
                ("model utility", "tofu_model_utility"))


def tofu_table(results: dict, criterion: str = "gold") -> list[str]:
    """TOFU's metrics (open-unlearning's definitions on the world, `jax_unlearn.bench.tofu_world`)
    of the runs selected under ``criterion``, the gold model's and the pretrained model's; ``[]``
    when the sweep did not compute them."""
    if "tofu_truth_ratio" not in results["gold"]:
        return []
    title, multi, table = _selected_table(results, criterion, TOFU_COLUMNS)
    return [f"[TOFU, {title}] open-unlearning's metrics of the selected runs{multi}: forget truth ratio (closer to "
            "the gold model's is better), forget quality (KS p-value of the truth ratios against the gold model's; "
            "high = indistinguishable), model utility (harmonic mean of retain, held-out and general facts):",
            *table]


def paired_robustness_lines(results: dict, criterion: str = "gold") -> list[str]:
    """Paired per-world differences of each robustness column under ``criterion``."""
    lines = []
    for key, by_o in results.get("paired_robustness", {}).get(criterion, {}).items():
        hint = "lower = deeper forgetting" if key.endswith("_forget_acc") else "higher = better"
        lines.append(f"Paired differences of {key} over worlds ({criterion} criterion; a - b, mean [95% interval]; "
                     f"{hint}):")
        for o, pairs in by_o.items():
            for name, e in pairs.items():
                if not _shown(results, name):
                    continue
                if not e["n"]:
                    lines.append(f"  {o:10s} {name:24s} no world where both were attacked")
                    continue
                ci = f" [{100 * e['ci95'][0]:+.1f}, {100 * e['ci95'][1]:+.1f}]" if "ci95" in e else ""
                lines.append(f"  {o:10s} {name:24s} mean {100 * e['mean']:+.1f} points{ci}, "
                             f"positive in {e['positive']}/{e['n']}")
    return lines


#: what each attack brought back: (label, attacked key, key of the same probes before the attack)
GAINS = (("relearning", "relearn_forget_acc", "relearn_unseen_before"),
         ("benign relearning", "relearn_benign_forget_acc", "relearn_unseen_before"),
         ("int4", "int4_forget_acc", "forget_acc"), ("int4_g128", "int4_g128_forget_acc", "forget_acc"))


def paired_gain_lines(results: dict, criterion: str = "gold") -> list[str]:
    """Paired per-world differences between combiners of what each attack *brought back* (forget
    accuracy after the attack minus the same probes before it), which compares depth of forgetting
    across runs selected at different forget levels. Only the pairs with an anchor when there are
    many combiners; ``[]`` without robustness columns."""
    present = [g for g in GAINS if g[1] in results.get("gold", {})]
    if not present or len(results["worlds"]) < 2:
        return []
    combiners = results["config"]["combiners"]
    order = [c for c in combiners if c in ANCHORS] + [c for c in combiners if c not in ANCHORS]
    lines = [f"Paired differences of what each attack brought back ({criterion} criterion; forget accuracy after "
             "the attack minus before it, a - b in points, mean [95% interval] (worlds positive/both); "
             "lower = deeper forgetting):"]
    for label, after, before in present:
        gains = _values_by_world(results, criterion, after)
        starts = _values_by_world(results, criterion, before)
        for o in results["config"]["objectives"]:
            g = {c: {w: v - starts[o][c][w] for w, v in gains.get(o, {}).get(c, {}).items()}
                 for c in combiners if c in gains.get(o, {})}
            for a, b in itertools.combinations(order, 2):
                if a not in g or b not in g or not _shown(results, f"{a} - {b}"):
                    continue
                a, b = (b, a) if combiners.index(a) < combiners.index(b) else (a, b)
                lines.append(f"  {label:17s} {o:10s} {a + ' - ' + b:24s} {_diff_cell(g[a], g[b])}")
    return lines


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}" if 0 < abs(value) < 1e-3 else f"{value:.3f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns; a row of 3 cells is ``objective, combiner, note``."""
    widths = [max(len(str(r[i])) for r in [head, *rows] if i < len(r) and not (len(r) == 3 and i == 2))
              for i in range(len(head))]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() if len(r) > 3 else "  ".join(
        [str(r[0]).ljust(widths[0]), str(r[1]).ljust(widths[1]), r[2]])
    return [fmt(head), *(fmt(r) for r in rows)]


def summary_table(results: dict, criterion: str) -> list[str]:
    """The best run per objective x combiner under ``criterion`` (``"gold"`` or ``"fixed"``),
    with the gold model's row and the starting model's row."""
    cfg = results["config"]
    param = cfg["grid"]["param"]
    multi = len(results["worlds"]) > 1
    gold = results["gold"]
    bar = (f"<= the gold model's {gold['forget_acc']:.3f} + {cfg['gold_tolerance']:g}" if criterion == "gold"
           else f"<= {cfg['forget_threshold']:g}")
    head = ["objective", "combiner", *(c for c, _ in COLUMNS)] + (["worlds"] if multi else [param, "steps"])
    rows = []
    for o, by_c in results["summary"][criterion].items():
        for c, s in by_c.items():
            if s is None:
                rows.append([o, c, f"no run reached forget accuracy {bar}"])
                continue
            extra = [f"{s['worlds']}/{len(results['worlds'])}"] if multi else [f"{s[param]:g}", str(s["steps"])]
            rows.append([o, c, *(_cell(s[k]) for _, k in COLUMNS), *extra])
    rows.append(["(gold)", "retrained", *(_cell(gold.get(k)) for _, k in COLUMNS[:7]), "1", "0",
                 *([""] if multi else ["", ""])])
    start = [r for r in results["runs"] if r["steps"] == 0]
    if start:
        mean = lambda k: None if any(r.get(k) is None for r in start) else float(np.mean([r[k] for r in start]))
        rows.append(["(start)", "", *(_cell(mean(k)) for _, k in COLUMNS), *([""] if multi else ["", "0"])])
    seeds = ", ".join(str(w["seed"]) for w in results["worlds"])
    title = "gold-matched" if criterion == "gold" else "fixed bar"
    return [f"[{title}] best held-out retain accuracy among runs with forget accuracy {bar} "
            f"(world{'s' if multi else ''} {seeds}{'; means over worlds' if multi else ''}):", *_table(head, rows)]


def paired_lines(results: dict, criterion: str) -> list[str]:
    """Paired per-world differences of held-out retain accuracy under ``criterion``."""
    lines = [f"Paired differences of held-out retain accuracy over worlds ({criterion} criterion; a - b, "
             "mean [95% interval]):"]
    for o, pairs in results["paired"][criterion].items():
        for name, e in pairs.items():
            if not _shown(results, name):
                continue
            if not e["n"]:
                lines.append(f"  {o:10s} {name:24s} no world where both forgot enough")
                continue
            ci = f" [{100 * e['ci95'][0]:+.1f}, {100 * e['ci95'][1]:+.1f}]" if "ci95" in e else ""
            p = f", Wilcoxon p={e['wilcoxon_p']:.3f}" if "wilcoxon_p" in e else ""
            lines.append(f"  {o:10s} {name:24s} mean {100 * e['mean']:+.1f} points{ci}, "
                         f"positive in {e['positive']}/{e['n']}{p}")
    return lines


#: the combiners every other is compared with in `ranking_table` (and, with many combiners, in the paired lines)
ANCHORS = ("weighted_sum", "sago")
#: above this many combiners the paired lines keep only the pairs with an anchor (all pairs stay in results.json)
ALL_PAIRS_UP_TO = 4


def _shown(results: dict, name: str) -> bool:
    """Whether the paired line ``"a - b"`` is printed (every pair, or with many combiners those with an anchor)."""
    if len(results["config"]["combiners"]) <= ALL_PAIRS_UP_TO:
        return True
    return any(c in ANCHORS for c in name.split(" - "))


def _values_by_world(results: dict, criterion: str, key: str = "retain_heldout_acc") -> dict:
    """``{objective: {combiner: {world: value}}}`` of the runs selected under ``criterion`` (worlds
    where the combiner reached the bar)."""
    out: dict = {}
    for seed, by_c in results["summary_by_world"].items():
        for o, cs in by_c[criterion].items():
            for c, s in cs.items():
                if s is not None and s.get(key) is not None:
                    out.setdefault(o, {}).setdefault(c, {})[str(seed)] = s[key]
    return out


def _diff_cell(mine: dict, other: dict | None) -> str:
    """``mean [95% interval] (positive/n)`` in points of the paired per-world differences."""
    from jax_unlearn.bench.sweep import t_interval

    if other is None:
        return "-"
    d = [mine[w] - other[w] for w in mine if w in other]
    if not d:
        return "-"
    ci = "" if len(d) < 2 else "[{:+.1f}, {:+.1f}] ".format(*(100 * x for x in t_interval(d)))
    return f"{100 * float(np.mean(d)):+.1f} {ci}({sum(x > 0 for x in d)}/{len(d)})"


def step_seconds(results: dict) -> dict:
    """``{(objective, combiner): median wall seconds per step}`` over the trajectories that did not
    compile their step (``seconds_per_step`` of the runs; one value per trajectory)."""
    per: dict = {}
    for r in results["runs"]:
        if r.get("seconds_per_step") is not None:
            per.setdefault((r["objective"], r["combiner"]), {})[(r["world"], r["lr"])] = r["seconds_per_step"]
    return {k: float(np.median(list(v.values()))) for k, v in per.items()}


def ranking_table(results: dict, criterion: str = "gold") -> list[str]:
    """The combiners of each objective ranked by mean held-out retain accuracy of their selected
    runs: that mean, the paired difference to ``weighted_sum`` and to ``sago`` (mean, 95%
    t-interval, worlds where it is positive), the worlds where the combiner is the best of all
    (ties count for each), and the median time per step (also relative to ``weighted_sum``)."""
    values = _values_by_world(results, criterion)
    times = step_seconds(results)
    n_worlds = len(results["worlds"])
    head = ["objective", "combiner", "held-out", "worlds", "vs weighted_sum", "vs sago", "best in", "ms/step",
            "x sum"]
    rows = []
    for o in results["config"]["objectives"]:
        by_c = values.get(o, {})
        best = {w: max(v[w] for v in by_c.values() if w in v) for w in {w for v in by_c.values() for w in v}}
        ranked = sorted(results["config"]["combiners"], key=lambda c: -np.mean(list(by_c[c].values()))
                        if by_c.get(c) else 1.0)
        for c in ranked:
            mine = by_c.get(c)
            t, t_sum = times.get((o, c)), times.get((o, "weighted_sum"))
            timing = ["-" if t is None else f"{1e3 * t:.1f}", "-" if t is None or not t_sum else f"{t / t_sum:.2f}"]
            if not mine:
                rows.append([o, c, "-", f"0/{n_worlds}", "-", "-", "-", *timing])
                continue
            wins = sum(mine[w] >= best[w] for w in mine)
            rows.append([o, c, f"{float(np.mean(list(mine.values()))):.3f}", f"{len(mine)}/{n_worlds}",
                         "" if c == "weighted_sum" else _diff_cell(mine, by_c.get("weighted_sum")),
                         "" if c == "sago" else _diff_cell(mine, by_c.get("sago")),
                         f"{wins}/{len(mine)}", *timing])
    title = "gold-matched" if criterion == "gold" else "fixed bar"
    return [f"[ranking, {title}] held-out retain accuracy of each combiner's selected runs (mean over the worlds "
            "where it reached the bar); paired differences in points, mean [95% interval] (worlds positive/both); "
            "best in = worlds where it has the highest; ms/step = median wall time of a step:", *_table(head, rows)]


def format_table(results: dict) -> str:
    """Both summary tables (gold-matched first), the gold model's forget level, and with several
    worlds the paired differences."""
    gold = results["gold"]
    lines = summary_table(results, "gold") + [""] + summary_table(results, "fixed")
    lines.append(f"gold model (retrained without the forget people): forget accuracy {gold['forget_acc']:.3f}, "
                 f"MIA AUROC {_cell(gold['mia_auroc'])}; unseen people under the pretrained model: "
                 f"{_cell(_start_mean(results, 'unseen_acc'))}")
    robust = robustness_table(results, "gold")
    if robust:
        lines += [""] + robust
    tofu = tofu_table(results, "gold")
    if tofu:
        lines += [""] + tofu
    if len(results["worlds"]) > 1:
        for criterion in ("gold", "fixed"):
            lines += [""] + ranking_table(results, criterion)
        for criterion in ("gold", "fixed"):
            lines += [""] + paired_lines(results, criterion)
        robust_pairs = paired_robustness_lines(results, "gold")
        if robust_pairs:
            lines += [""] + robust_pairs
        gains = paired_gain_lines(results, "gold")
        if gains:
            lines += [""] + gains
    return "\n".join(lines)


def _start_mean(results: dict, key: str) -> float | None:
    start = [r[key] for r in results["runs"] if r["steps"] == 0]
    return float(np.mean(start)) if start else None


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
    accuracy; dots are all runs, lines each combiner's Pareto front; the star is the gold
    (retrained) model, the dashed line its forget level, the dotted line the fixed bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = list(results["summary"]["gold"])
    combiners = results["config"]["combiners"]
    gold = results["gold"]
    points = mean_points(results)
    fig, axes = plt.subplots(2, len(objectives), figsize=(5 * len(objectives), 8), squeeze=False)
    colors = dict(zip(combiners, itertools.cycle(["tab:gray", "tab:blue", "tab:red", "tab:green"])))
    for j, o in enumerate(objectives):
        for i, (label, idx, key) in enumerate((("held-out retain accuracy", 1, "retain_heldout_acc"),
                                               ("general accuracy", 2, "general_acc"))):
            ax = axes[i][j]
            for c in combiners:
                pts = [(p[0], p[idx]) for p in points.get((o, c), [])]
                if not pts:
                    continue
                ax.scatter(*zip(*pts), s=10, alpha=0.3, color=colors[c])
                ax.plot(*zip(*pareto_front(pts)), marker="o", ms=4, color=colors[c], label=c)
            ax.axvline(results["config"]["forget_threshold"], ls=":", color="k", lw=1)
            ax.axvline(gold["forget_acc"], ls="--", color="tab:orange", lw=1)
            ax.scatter([gold["forget_acc"]], [gold[key]], marker="*", s=160, color="tab:orange", zorder=5,
                       label="gold (retrained without forget people)")
            ax.set(xlabel="forget accuracy", ylabel=label, title=o, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
