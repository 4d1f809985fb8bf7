"""Sweeps on the embedded benchmark: every objective x combiner x value of one hyperparameter,
on one or several pretrained worlds, summarised at a forget-accuracy threshold.

``summary[objective][combiner]`` is the run (one evaluation point of a trajectory: a run with
``max_steps`` = its step) with the best held-out retain accuracy among those whose forget
accuracy is at most ``forget_threshold``, or ``None`` where no run forgot that much. With
several worlds the summary is the mean over the worlds where the combiner got there, and
``paired`` holds per-world differences of that held-out accuracy between combiners.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from jax_unlearn.bench.config import BenchConfig
from jax_unlearn.bench.pretrain import pretrained
from jax_unlearn.combiners import COMBINERS

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("forget_acc", "retain_acc", "retain_heldout_acc", "heldout_neighbour_acc", "heldout_other_acc",
                "general_acc", "mia_auroc")


def run_sweep(cfg: BenchConfig, cache: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs the whole grid and returns the results dict written to ``results.json``."""
    from tqdm import tqdm

    from jax_unlearn.bench.evaluate import evaluate
    from jax_unlearn.bench.runs import Runner
    from jax_unlearn.bench.tokens import probe_rows, text_rows

    cfg.check()
    t0 = time.perf_counter()
    runs: list[dict] = []
    worlds = []
    groups = [(o, c, v) for o, c in itertools.product(cfg.objectives, cfg.combiners) for v in cfg.grid.values]
    total = len(cfg.worlds) * len(groups)
    models = [pretrained(dataclasses.replace(cfg.world, seed=seed), cfg.model, cfg.pretrain, cache, progress)
              for seed in cfg.worlds]  # first, so that their progress bars come before the runs'
    bar = tqdm(total=total, desc="unlearning runs", disable=not progress, unit="run")
    for seed, pre in zip(cfg.worlds, models):
        worlds.append({"seed": seed, "cached": pre.cached, "path": str(pre.path), "pretrain": pre.info})
        tok, w = pre.tokenizer, pre.world
        forget, retain = text_rows(tok, w.texts("forget"), name="forget"), text_rows(tok, w.texts("retain"), name="retain")
        probes = probe_rows(tok, w.probes())
        start = evaluate(pre.model, probes)
        runner, runner_key = None, None  # a Runner's compiled step serves every learning rate
        for objective, combiner, value in groups:
            obj_cfg, comb_cfg, p = cfg.run_configs(objective, combiner, value)
            if runner_key != (obj_cfg, comb_cfg):
                runner, runner_key = Runner(pre.model, obj_cfg, comb_cfg), (obj_cfg, comb_cfg)
            lr, steps, every = cfg.schedule(value)
            traj = runner.run(forget, retain, probes, lr=lr, steps=steps, eval_every=every,
                              batch_size=cfg.batch_size, seed=cfg.seed, start=start)
            for point in traj.points:
                runs.append({"world": seed, "objective": objective, "combiner": combiner, "lr": lr, **p,
                             "steps": point.pop("step"), **_renamed(point)})
            bar.update()
            bar.set_postfix_str(f"{objective}/{combiner} {cfg.grid.param}={value:g}")
    bar.close()
    out = {"config": dataclasses.asdict(cfg), "worlds": worlds, "runs": runs,
           "summary_by_world": {s: summarize([r for r in runs if r["world"] == s], cfg) for s in cfg.worlds}}
    out["summary"] = mean_summary(out["summary_by_world"], cfg)
    out["paired"] = paired_differences(out["summary_by_world"], cfg)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _renamed(point: dict) -> dict:
    point = dict(point)
    point["retain_heldout_acc"] = point.pop("heldout_acc")
    return point


def best_run(runs: list[dict], threshold: float) -> dict | None:
    """The run with the highest ``retain_heldout_acc`` among those with ``forget_acc <= threshold``
    (ties: higher general accuracy, then fewer steps)."""
    ok = [r for r in runs if r["forget_acc"] <= threshold + 1e-9]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["retain_heldout_acc"], r["general_acc"], -r["steps"]))


def summarize(runs: list[dict], cfg: BenchConfig) -> dict:
    """``{objective: {combiner: best run's metrics and hyperparameters, or None}}`` of one world."""
    out: dict = {}
    for o in cfg.objectives:
        out[o] = {}
        for c in cfg.combiners:
            best = best_run([r for r in runs if r["objective"] == o and r["combiner"] == c], cfg.forget_threshold)
            out[o][c] = None if best is None else {k: best[k] for k in (*SUMMARY_KEYS, "lr", cfg.grid.param, "steps")}
    return out


def mean_summary(by_world: dict, cfg: BenchConfig) -> dict:
    """Per objective and combiner: the mean of each metric over the worlds where a run forgot
    enough, and ``worlds`` = how many did (``None`` when none)."""
    out: dict = {}
    for o in cfg.objectives:
        out[o] = {}
        for c in cfg.combiners:
            found = [s[o][c] for s in by_world.values() if s[o][c] is not None]
            if not found:
                out[o][c] = None
                continue
            out[o][c] = {k: _mean([f[k] for f in found]) for k in SUMMARY_KEYS}
            if len(by_world) == 1:
                out[o][c].update({k: found[0][k] for k in ("lr", cfg.grid.param, "steps")})
            out[o][c]["worlds"] = len(found)
    return out


def _mean(values: list) -> float | None:
    """Mean, or None when any value is missing (e.g. a diverged run's MIA AUROC)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def paired_differences(by_world: dict, cfg: BenchConfig, key: str = "retain_heldout_acc") -> dict:
    """For each objective and ordered pair ``a - b`` of combiners: the per-world differences of
    ``key`` over the worlds where both forgot enough, their mean, how many are positive and,
    with at least 2 worlds, a two-sided Wilcoxon signed-rank p-value (scipy)."""
    from scipy.stats import wilcoxon

    out: dict = {}
    for o in cfg.objectives:
        out[o] = {}
        for a, b in itertools.combinations(cfg.combiners, 2):
            order = COMBINERS.names()
            a, b = (b, a) if order.index(b) > order.index(a) else (a, b)
            diffs = [s[o][a][key] - s[o][b][key] for s in by_world.values()
                     if s[o][a] is not None and s[o][b] is not None]
            entry: dict = {"differences": diffs, "n": len(diffs)}
            if diffs:
                entry["mean"] = float(np.mean(diffs))
                entry["positive"] = int(sum(d > 0 for d in diffs))
            if len(diffs) >= 2 and any(d != 0 for d in diffs):
                entry["wilcoxon_p"] = float(wilcoxon(diffs).pvalue)
            out[o][f"{a} - {b}"] = entry
    return out
