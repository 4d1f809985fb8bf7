"""The sweep's ranking table (`jax_unlearn.bench.report.ranking_table`) on hand-made results:
means, paired differences with their t-intervals, wins, and the time per step."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from jax_unlearn.bench import report

HELD_OUT = {  # world -> combiner -> held-out retain accuracy of the gold-matched run (None: never reached the bar)
    "0": {"weighted_sum": 0.50, "pcgrad": 0.55, "sago": 0.70, "mgda": 0.70},
    "1": {"weighted_sum": 0.60, "pcgrad": 0.58, "sago": 0.72, "mgda": None},
    "2": {"weighted_sum": 0.40, "pcgrad": 0.50, "sago": 0.65, "mgda": 0.66},
}
SECONDS = {"weighted_sum": [0.010, 0.012, 0.011], "pcgrad": [0.020, 0.022, 0.021], "sago": [0.013, 0.011, 0.012],
           "mgda": [0.030, 0.031, 0.032]}


def _results() -> dict:
    combiners = list(HELD_OUT["0"])
    by_world = {w: {c: {"gold": None} for c in ("gold", "fixed")} for w in HELD_OUT}
    for w, cs in HELD_OUT.items():
        sel = {c: None if v is None else {"retain_heldout_acc": v} for c, v in cs.items()}
        by_world[w] = {"gold": {"grad_diff": sel}, "fixed": {"grad_diff": sel}}
    runs = []
    for c, secs in SECONDS.items():
        for w, s in zip(HELD_OUT, secs):
            for lr, t in ((4e-3, None), (2e-3, s), (1e-3, s * 1.1)):  # the first trajectory compiled
                for step in (0, 5, 10):  # one time per trajectory, repeated on each of its points
                    runs.append({"world": int(w), "objective": "grad_diff", "combiner": c, "lr": lr, "steps": step,
                                 "seconds_per_step": t})
    return {"config": {"objectives": ["grad_diff"], "combiners": combiners}, "worlds": [{"seed": int(w)} for w in HELD_OUT],
            "summary_by_world": by_world, "runs": runs}


def _row(lines: list[str], combiner: str) -> list[str]:
    return next(line.split() for line in lines[2:] if line.split()[1] == combiner)


def test_ranking_rows_are_means_paired_intervals_wins_and_step_times():
    lines = report.ranking_table(_results(), "gold")
    order = [line.split()[1] for line in lines[2:]]
    assert order == ["sago", "mgda", "pcgrad", "weighted_sum"]  # by mean held-out: 0.690, 0.680, 0.543, 0.500
    sago = _row(lines, "sago")
    d = [0.70 - 0.50, 0.72 - 0.60, 0.65 - 0.40]
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(d), scale=stats.sem(d))
    assert sago[2:4] == ["0.690", "3/3"]
    assert " ".join(sago[4:8]) == f"{100 * np.mean(d):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (3/3)"
    assert sago[8] == "2/3"  # best in worlds 1 and 2; world 0 is mgda's tie at 0.70, which counts for both
    assert _row(lines, "mgda")[2:4] == ["0.680", "2/3"]  # world 1 never reached the bar
    # mgda - sago over the 2 worlds both reached: 0.00 and +0.01, positive in 1
    assert " ".join(_row(lines, "mgda")).count("(1/2)") == 1
    # the median time of the timed trajectories (compiling ones carry none), relative to the sum
    ws = np.median([s * f for s in SECONDS["weighted_sum"] for f in (1.0, 1.1)])
    mg = np.median([s * f for s in SECONDS["mgda"] for f in (1.0, 1.1)])
    assert _row(lines, "mgda")[-2:] == [f"{1e3 * mg:.1f}", f"{mg / ws:.2f}"]
    assert _row(lines, "weighted_sum")[-2:] == [f"{1e3 * ws:.1f}", "1.00"]


@pytest.mark.parametrize("many", [False, True])
def test_paired_lines_keep_only_anchor_pairs_when_many_combiners(many):
    names = ["weighted_sum", "pcgrad", "sago", "mgda", "cagrad"][: 5 if many else 3]
    results = {"config": {"combiners": names}, "paired": {"gold": {"grad_diff": {
        f"{a} - {b}": {"n": 1, "mean": 0.1, "positive": 1} for i, a in enumerate(names) for b in names[:i]}}}}
    text = "\n".join(report.paired_lines(results, "gold"))
    assert "sago - weighted_sum" in text and "sago - pcgrad" in text
    if many:  # pairs without weighted_sum or sago are left to results.json
        assert "mgda - pcgrad" not in text and "mgda - sago" in text and "cagrad - weighted_sum" in text
    else:
        assert "pcgrad - weighted_sum" in text and len(text.splitlines()) == 1 + 3


def test_attack_gains_are_paired_per_world_after_minus_before():
    """What relearning brought back (after - before on the same probes), paired between combiners:
    SAGO gains 0.02, 0.00, 0.04 where the sum gains 0.10, 0.12, 0.05."""
    before = {"weighted_sum": [0.10, 0.12, 0.20], "sago": [0.18, 0.20, 0.16]}
    after = {"weighted_sum": [0.20, 0.24, 0.25], "sago": [0.20, 0.20, 0.20]}
    by_world = {str(w): {"gold": {"grad_diff": {c: {"relearn_forget_acc": after[c][w], "relearn_unseen_before": before[c][w]}
                                                for c in before}}} for w in range(3)}
    results = {"config": {"objectives": ["grad_diff"], "combiners": ["weighted_sum", "sago"]},
               "worlds": [{"seed": w} for w in range(3)], "gold": {"relearn_forget_acc": 0.2},
               "summary_by_world": by_world}
    lines = report.paired_gain_lines(results)
    assert len(lines) == 2 and "relearning" in lines[1] and "sago - weighted_sum" in lines[1]
    d = [0.02 - 0.10, 0.00 - 0.12, 0.04 - 0.05]
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(d), scale=stats.sem(d))
    assert lines[1].endswith(f"{100 * np.mean(d):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (0/3)")
    assert report.paired_gain_lines(dict(results, gold={})) == []  # no robustness columns, no lines
