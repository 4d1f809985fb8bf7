"""Evaluations during a run: a row per evaluation, the best evaluated state kept (``select``),
and the run ended early, as finished, when a metric crosses a bound (``stop_when``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_unlearn.config import ConfigError, TrainConfig

from .checkpoints import manager, saved
from .folder import BEST_DIR, BEST_FILE, STOPPED_FILE, write_atomic


class Selection:
    """The decisions: does an evaluation beat the best so far (``select``), does it end the run
    (``stop_when``). ``recorded`` is the ``best.json`` of an earlier part of the run (kept when it
    selected by the same metric and mode). A step whose ``select.metric`` beats every earlier
    evaluated step (strictly: ties keep the earlier) is the selected one."""

    def __init__(self, cfg: TrainConfig, recorded: dict | None = None):
        self.cfg = cfg
        sel = cfg.select
        same = recorded and recorded.get("metric") == sel.metric and recorded.get("mode") == sel.mode
        self.best: dict | None = recorded if same else None

    def _metric(self, results: dict, name: str, key: str) -> float:
        if name not in results:
            raise ConfigError(f"'{key}' is {name!r}, which the evaluation does not produce; it gives "
                              f"{', '.join(sorted(results)) or 'nothing'}")
        return float(results[name])

    def check(self, results: dict) -> None:
        """Raises `ConfigError` when ``select.metric`` or ``stop_when.metric`` is not in ``results``."""
        self.improves(results)
        self.stops(results)

    def improves(self, results: dict) -> bool:
        sel = self.cfg.select
        if sel.metric is None:
            return False
        value = self._metric(results, sel.metric, "select.metric")
        if self.best is None:
            return True
        return value > self.best["value"] if sel.mode == "max" else value < self.best["value"]

    def stops(self, results: dict) -> bool:
        st = self.cfg.stop_when
        if st.metric is None:
            return False
        value = self._metric(results, st.metric, "stop_when.metric")
        return (st.below is not None and value <= st.below) or (st.above is not None and value >= st.above)


class Evaluations:
    """The hook that evaluates a run's state every ``eval.every`` steps.

    ``evaluate(model) -> {metric: value}`` runs on ``model_of(state)``; each result is one row
    ``{"step", "eval/<metric>": value, ...}`` of ``log``. The best state (`Selection`) is saved
    into ``run_dir/best`` with ``best.json``; a met ``stop_when`` saves the state (`Checkpointer`,
    unless this step was just saved), writes ``stopped.json`` and stops the loop.
    """

    def __init__(self, selection: Selection, evaluate: Callable[[Any], dict], model_of: Callable[[Any], Any],
                 run_dir: Path, log: Any, checkpointer: Any, spec: dict, bar: Any = None):
        self.selection, self.evaluate, self.model_of = selection, evaluate, model_of
        self.run_dir, self.log, self.checkpointer, self.spec, self.bar = run_dir, log, checkpointer, spec, bar
        self.best_mngr = manager(run_dir / BEST_DIR, 1) if selection.cfg.select.metric else None
        self.stopped: dict = {}
        self.is_main = jax.process_index() == 0

    def __call__(self, done: int, state: Any, metrics: Any = None, results: dict | None = None) -> bool:
        """Evaluates the state (or takes ``results``); True when the run must stop."""
        cfg, guard = self.selection.cfg, self.checkpointer.guard
        if guard.failure or not guard.state_finite(done, state):
            return True
        if results is None:
            results = self.evaluate(self.model_of(state))
        self.log.write({"step": done, **{f"eval/{k}": float(v) for k, v in results.items()}})
        if done > 0 and self.selection.improves(results):
            self._keep_best(done, state, float(results[cfg.select.metric]))
        best = self.selection.best
        if best is not None and self.bar is not None:
            self.bar.set_postfix_str(f"best {cfg.select.metric}={best['value']:.4g} @ {best['step']}")
        if done > 0 and self.selection.stops(results):
            self.stopped.update(step=done, metric=cfg.stop_when.metric, value=float(results[cfg.stop_when.metric]))
            if done % cfg.save_every and done != self.checkpointer.total:  # the save hook ran before this one otherwise
                self.checkpointer.save(done, state)
            if self.is_main:
                write_atomic(self.run_dir / STOPPED_FILE, json.dumps(self.stopped, indent=1) + "\n")
            return True
        return False

    def _keep_best(self, done: int, state: Any, value: float) -> None:
        cfg = self.selection.cfg
        self.selection.best = {"metric": cfg.select.metric, "mode": cfg.select.mode, "step": done, "value": value}
        self.best_mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(saved(state)),
                                                           meta=ocp.args.JsonSave({"tree": self.spec})), force=True)
        self.best_mngr.wait_until_finished()
        if self.is_main:
            write_atomic(self.run_dir / BEST_FILE, json.dumps(self.selection.best, indent=1) + "\n")

    def close(self) -> None:
        if self.best_mngr is not None:
            self.best_mngr.close()
