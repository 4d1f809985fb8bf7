"""Sweeps on the embedded benchmark: every objective x combiner x value of one hyperparameter,
on one or several pretrained worlds, judged against each world's gold model.

A *run* is one evaluation point of a trajectory (a run with ``max_steps`` = its step). Each
world has a gold model, retrained without the forget people (exact unlearning). Two criteria
pick, per objective and combiner, the run with the best held-out retain accuracy among those
that forgot enough:

- ``summary["gold"]``: forget accuracy at most the gold model's plus ``gold_tolerance`` (what a
  model that never saw the forget people scores on them);
- ``summary["fixed"]``: forget accuracy at most ``forget_threshold`` (0.10 by default; below the
  gold level it rewards over-forgetting).

``best_forget_quality[objective][combiner]`` is the run whose forget quality (KS test against
the gold model) is highest. With several worlds every summary is the mean over the worlds where
the combiner got there, and ``paired[criterion]`` holds per-world differences of held-out
accuracy between combiners with their mean, a 95% t-interval and a Wilcoxon test.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jax_unlearn.bench.config import BenchConfig
from jax_unlearn.bench.pretrain import pretrained

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("forget_acc", "retain_acc", "retain_heldout_acc", "heldout_neighbour_acc", "heldout_other_acc",
                "general_acc", "mia_auroc", "forget_quality", "privleak", "retain_heldout_rel", "general_rel")
GOLD_KEYS = ("forget_acc", "retain_acc", "retain_heldout_acc", "heldout_neighbour_acc", "heldout_other_acc",
             "general_acc", "mia_auroc", "unseen_acc")
CRITERIA = ("gold", "fixed")
#: robustness columns whose paired differences between combiners the sweep reports (when present)
PAIRED_ROBUSTNESS = ("relearn_forget_acc", "relearn_benign_forget_acc", "int4_forget_acc", "int4_g128_forget_acc",
                     "paraphrase_forget_acc", "paraphrase_context_forget_acc", "tofu_forget_quality",
                     "tofu_model_utility")


#: TOFU's metrics of the selected runs (``cfg.tofu``; `jax_unlearn.bench.tofu_world`) and of the gold model
TOFU_KEYS = ("tofu_truth_ratio", "tofu_forget_quality", "tofu_model_utility")
TOFU_GOLD_KEYS = ("tofu_truth_ratio", "tofu_model_utility")


def summary_keys(cfg: BenchConfig) -> tuple[str, ...]:
    """`SUMMARY_KEYS` plus the robustness columns of ``cfg.robustness`` and TOFU's (``cfg.tofu``)."""
    from jax_unlearn.bench.attacks import robustness_keys

    return SUMMARY_KEYS + robustness_keys(cfg.robustness) + (TOFU_KEYS if cfg.tofu else ())


def gold_keys(cfg: BenchConfig) -> tuple[str, ...]:
    """`GOLD_KEYS` plus the robustness columns of ``cfg.robustness`` (the gold model's floor) and
    TOFU's truth ratio and model utility (``cfg.tofu``)."""
    from jax_unlearn.bench.attacks import robustness_keys

    return GOLD_KEYS + robustness_keys(cfg.robustness) + (TOFU_GOLD_KEYS if cfg.tofu else ())


def run_sweep(cfg: BenchConfig, cache: Path | None = None, progress: bool = True, done: dict | None = None,
              checkpoint: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Runs the whole grid and returns the results dict written to ``results.json``.

    ``done``: the `partial` dict of an interrupted sweep of the same config; its finished worlds
    are kept and not run again. ``checkpoint(partial)`` is called after each world."""
    from tqdm import tqdm

    from jax_unlearn.bench.attacks import Attacks, attack_data
    from jax_unlearn.bench.evaluate import evaluate, gold_reference
    from jax_unlearn.bench.runs import Runner
    from jax_unlearn.bench.tofu_world import COLUMNS, WorldTofu
    from jax_unlearn.bench.tokens import probe_rows, text_rows
    from jax_unlearn.token_math import ALT

    cfg.check()
    t0 = time.perf_counter()
    done = done or {}
    worlds = [w for w in done.get("worlds", []) if w["seed"] in cfg.worlds]
    finished = {w["seed"] for w in worlds}
    runs: list[dict] = [r for r in done.get("runs", []) if r["world"] in finished]
    earlier = float(done.get("seconds", 0.0)) if finished else 0.0
    todo = [seed for seed in cfg.worlds if seed not in finished]
    total = len(todo) * len(cfg.objectives) * len(cfg.combiners) * len(cfg.grid.values)
    models = [(pretrained(dataclasses.replace(cfg.world, seed=seed), cfg.model, cfg.pretrain, cache, progress),
               pretrained(dataclasses.replace(cfg.world, seed=seed), cfg.model, cfg.pretrain, cache, progress,
                          gold=True))
              for seed in todo]  # first, so that their progress bars come before the runs'
    bar = tqdm(total=total, desc="unlearning runs", disable=not progress, unit="run")
    for seed, (pre, gold_model) in zip(todo, models):
        tok, w = pre.tokenizer, pre.world
        forget, retain = text_rows(tok, w.texts("forget"), name="forget"), text_rows(tok, w.texts("retain"), name="retain")
        alternates = {kind: {**forget, **{ALT + k: v for k, v in text_rows(tok, w.alternate_texts("forget", kind),
                                                                           name="alternate").items()}}
                      for kind in ("idk", "records")}  # DPO's forget rows: with their preferred answers
        probes = probe_rows(tok, w.probes())
        gold = gold_reference(gold_model.model, probes)
        attacks = probe = None
        if cfg.robustness.enabled:
            attacks = Attacks(cfg.robustness, attack_data(w, tok))
            attacks.set_original(pre.model)
        tofu = WorldTofu.of(w, tok) if cfg.tofu else None
        gold_tofu = tofu.result(gold_model.model) if tofu else None
        if attacks or tofu:
            def probe(model, attacks=attacks, tofu=tofu, gold_tofu=gold_tofu):  # on each selected run's model
                return {**(attacks(model) if attacks else {}), **(tofu.metrics(model, gold_tofu) if tofu else {})}
        tofu_gold = {} if tofu is None else {COLUMNS[k]: gold_tofu["summary"][k] for k in ("forget_truth_ratio",
                                                                                         "model_utility")}
        worlds.append({"seed": seed, "cached": pre.cached, "path": str(pre.path), "pretrain": pre.info,
                       "gold": {"cached": gold_model.cached, "path": str(gold_model.path),
                                "pretrain": gold_model.info, **_renamed(gold.metrics),
                                **(attacks(gold_model.model) if attacks else {}), **tofu_gold},
                       **({"pretrained_attacks": probe(pre.model)} if probe else {})})
        start = evaluate(pre.model, probes, gold)
        bars = {"gold": gold.metrics["forget_acc"] + cfg.gold_tolerance, "fixed": cfg.forget_threshold}
        runner, runner_key = None, None  # a Runner's compiled step serves every learning rate
        for objective, combiner in itertools.product(cfg.objectives, cfg.combiners):
            mine, kept = [], []  # this objective x combiner's runs and their models (for the attacks)
            for value in cfg.grid.values:
                obj_cfg, comb_cfg, p = cfg.run_configs(objective, combiner, value)
                lr, steps, every = cfg.schedule(value)
                forget_every = cfg.variant(combiner)[1]
                # a weight schedule spans its trajectory: a step of its own per length
                length = steps if comb_cfg.weight_schedule != "constant" else 1
                if runner_key != (obj_cfg, comb_cfg, forget_every, length):
                    runner = Runner(pre.model, obj_cfg, comb_cfg, cfg.lora, forget_every, length)
                    runner_key = (obj_cfg, comb_cfg, forget_every, length)
                rows = forget if runner.obj.alternates is None else alternates[runner.obj.alternates]
                traj = runner.run(rows, retain, probes, lr=lr, steps=steps, eval_every=every,
                                  batch_size=cfg.batch_size, seed=cfg.seed, start=start, gold=gold,
                                  keep_models=probe is not None)
                for i, point in enumerate(traj.points):
                    mine.append({"world": seed, "objective": objective, "combiner": combiner, "lr": lr, **p,
                                 "steps": point.pop("step"), **_renamed(point),
                                 "seconds_per_step": traj.seconds_per_step})
                    kept.append(None if traj.models is None else traj.models[i])
                bar.update()
                bar.set_postfix_str(f"{objective}/{combiner} {cfg.grid.param}={value:g}")
            if probe is not None:
                attack_selected(mine, kept, probe, bars)
            runs += mine
        if checkpoint is not None:
            checkpoint(partial(cfg, worlds, runs, earlier + time.perf_counter() - t0))
    bar.close()
    order = {seed: i for i, seed in enumerate(cfg.worlds)}
    worlds.sort(key=lambda w: order[w["seed"]])
    runs.sort(key=lambda r: order[r["world"]])  # stable: each world's runs keep their order
    return summarize_sweep(cfg, worlds, runs, round(earlier + time.perf_counter() - t0, 1))


def partial(cfg: BenchConfig, worlds: list[dict], runs: list[dict], seconds: float) -> dict[str, Any]:
    """What an unfinished sweep has so far: its config, finished worlds and their runs
    (``partial.json``; `run_sweep` resumes from it, `merge_results` and ``report`` read it)."""
    return {"config": dataclasses.asdict(cfg), "worlds": list(worlds), "runs": list(runs),
            "seconds": round(seconds, 1), "partial": True}


def config_differences(a: dict, b: dict) -> list[str]:
    """The dotted keys other than ``worlds`` where two configs (`dataclasses.asdict`, or as read
    back from JSON: tuples and lists compare equal) differ."""
    import json

    def diff(a: dict, b: dict, prefix: str) -> list[str]:
        out = []
        for k in sorted(set(a) | set(b)):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out += diff(a[k], b[k], f"{prefix}{k}.")
            elif a.get(k) != b.get(k):
                out.append(prefix + k)
        return out

    a, b = (json.loads(json.dumps({k: v for k, v in c.items() if k != "worlds"})) for c in (a, b))
    return diff(a, b, "")


def merge_results(parts: list[dict], names: list[str]) -> dict[str, Any]:
    """One results dict from sweeps (or `partial` ones) of the same config over disjoint worlds:
    their worlds and runs joined in the order given, every summary and paired difference computed
    again over all the worlds, ``seconds`` summed. Raises ValueError naming the file that differs
    (its config keys, or the worlds it shares with another)."""
    from jax_unlearn.config import load_config

    first = parts[0]["config"]
    seen: dict[int, str] = {}
    for part, name in zip(parts, names):
        diff = config_differences(first, part["config"])
        if diff:
            raise ValueError(f"{name}: a sweep of another config than {names[0]} (differs in {', '.join(diff)}); "
                             "only sweeps of one config over different worlds merge")
        for w in part["worlds"]:
            if w["seed"] in seen:
                raise ValueError(f"{name}: world {w['seed']} is also in {seen[w['seed']]}; merge sweeps of "
                                 "different worlds")
            seen[w["seed"]] = name
    worlds = [w for part in parts for w in part["worlds"]]
    runs = [r for part in parts for r in part["runs"]]
    cfg = load_config(names[0], schema=BenchConfig, tree={**first, "worlds": [w["seed"] for w in worlds]})
    return summarize_sweep(cfg, worlds, runs, round(sum(float(p.get("seconds", 0.0)) for p in parts), 1))


def attack_selected(runs: list[dict], models: list, attacks, bars: dict[str, float]) -> None:
    """Runs ``attacks`` (model -> metrics: the robustness attacks, TOFU's metrics) on the model of
    each run `best_run` selects under each bar (the runs of one objective x combiner in one world)
    and adds their metrics to that run."""
    done: set[int] = set()
    for threshold in bars.values():
        best = best_run(runs, threshold)
        if best is None or id(best) in done:
            continue
        done.add(id(best))
        best.update(attacks(models[next(i for i, r in enumerate(runs) if r is best)]))


def summarize_sweep(cfg: BenchConfig, worlds: list[dict], runs: list[dict], seconds: float) -> dict[str, Any]:
    """The results dict of a sweep from its worlds (with their gold metrics) and runs."""
    gold_by_world = {w["seed"]: {k: w["gold"].get(k) for k in gold_keys(cfg)} for w in worlds}
    by_world = {}
    for w in worlds:
        mine = [r for r in runs if r["world"] == w["seed"]]
        bars = {"gold": w["gold"]["forget_acc"] + cfg.gold_tolerance, "fixed": cfg.forget_threshold}
        by_world[w["seed"]] = {c: summarize(mine, cfg, bars[c]) for c in CRITERIA}
        by_world[w["seed"]]["best_forget_quality"] = summarize(mine, cfg, None)
    out = {"config": dataclasses.asdict(cfg), "worlds": worlds, "runs": runs,
           "gold": {k: _mean([g[k] for g in gold_by_world.values()]) for k in gold_keys(cfg)},
           "summary_by_world": by_world,
           "summary": {c: mean_summary({s: b[c] for s, b in by_world.items()}, cfg) for c in CRITERIA},
           "best_forget_quality": mean_summary({s: b["best_forget_quality"] for s, b in by_world.items()}, cfg),
           "paired": {c: paired_differences({s: b[c] for s, b in by_world.items()}, cfg) for c in CRITERIA},
           "paired_robustness": {c: {k: paired_differences({s: b[c] for s, b in by_world.items()}, cfg, k)
                                     for k in PAIRED_ROBUSTNESS if k in summary_keys(cfg)} for c in CRITERIA},
           "seconds": seconds}
    return out


def _renamed(point: dict) -> dict:
    point = dict(point)
    point["retain_heldout_acc"] = point.pop("heldout_acc")
    if "heldout_rel" in point:
        point["retain_heldout_rel"] = point.pop("heldout_rel")
    return point


def best_run(runs: list[dict], threshold: float | None) -> dict | None:
    """The run with the highest ``retain_heldout_acc`` among those with ``forget_acc <= threshold``
    (ties: higher general accuracy, then fewer steps); with ``threshold=None`` the run with the
    highest ``forget_quality`` (ties: held-out accuracy, then fewer steps)."""
    if threshold is None:
        ok = [r for r in runs if r.get("forget_quality") is not None]
        return max(ok, key=lambda r: (r["forget_quality"], r["retain_heldout_acc"], -r["steps"])) if ok else None
    ok = [r for r in runs if r["forget_acc"] <= threshold + 1e-9]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["retain_heldout_acc"], r["general_acc"], -r["steps"]))


def summarize(runs: list[dict], cfg: BenchConfig, threshold: float | None) -> dict:
    """``{objective: {combiner: best run's metrics and hyperparameters, or None}}`` of one world
    (`best_run` at ``threshold``)."""
    out: dict = {}
    for o in cfg.objectives:
        out[o] = {}
        for c in cfg.combiners:
            best = best_run([r for r in runs if r["objective"] == o and r["combiner"] == c], threshold)
            out[o][c] = None if best is None else {k: best.get(k) for k in (*summary_keys(cfg), "lr",
                                                                            cfg.grid.param, "steps")}
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
            out[o][c] = {k: _mean([f[k] for f in found]) for k in summary_keys(cfg)}
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
    with at least 2 worlds, a 95% t-interval of the mean (``ci95``) and a two-sided Wilcoxon
    signed-rank p-value (scipy)."""
    from scipy.stats import wilcoxon

    out: dict = {}
    for o in cfg.objectives:
        out[o] = {}
        for a, b in itertools.combinations(cfg.combiners, 2):
            order = cfg.combiner_order()
            a, b = (b, a) if order.index(b) > order.index(a) else (a, b)
            diffs = [s[o][a][key] - s[o][b][key] for s in by_world.values()
                     if s[o][a] is not None and s[o][b] is not None
                     and s[o][a].get(key) is not None and s[o][b].get(key) is not None]
            entry: dict = {"differences": diffs, "n": len(diffs)}
            if diffs:
                entry["mean"] = float(np.mean(diffs))
                entry["positive"] = int(sum(d > 0 for d in diffs))
            if len(diffs) >= 2:
                entry["ci95"] = list(t_interval(diffs))
            if len(diffs) >= 2 and any(d != 0 for d in diffs):
                entry["wilcoxon_p"] = float(wilcoxon(diffs).pvalue)
            out[o][f"{a} - {b}"] = entry
    return out


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``values`` (scipy)."""
    from scipy import stats

    m, se = float(np.mean(values)), float(stats.sem(values))
    if se == 0.0:
        return m, m
    lo, hi = stats.t.interval(level, len(values) - 1, loc=m, scale=se)
    return float(lo), float(hi)
