"""Unlearning runs on the benchmark world: one compiled two-gradient step per
(objective, combiner, loss settings), reused for every learning rate.

The optimizer is ``chain(combiner, inject_hyperparams(adamw))`` with a constant learning rate
and no clipping, so a run evaluated after ``s`` steps *is* the run with ``max_steps = s``:
each evaluation point along a trajectory is reported as its own run (early stopping as a
hyperparameter). Batches are forget-anchored: each step takes the next ``batch_size`` forget
rows of a seeded permutation (reshuffled every epoch) and ``batch_size`` retain rows drawn by
the same generator.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_unlearn.bench.evaluate import evaluate
from jax_unlearn.bench.tokens import ProbeRows
from jax_unlearn.step import StepConfig, init_state, make_two_grad_step, merge_model
from jax_unlearn.train import CombinerConfig, ObjectiveConfig, build_combiner, build_objective


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Evaluations of one run (``points[0]`` is the starting model at step 0)."""

    objective: str
    combiner: str
    lr: float
    points: list[dict]  # {"step", metrics..., "conflict_fraction" (mean since the last point)}
    seconds: float


def _batches(rows: dict[str, np.ndarray], forget: dict[str, np.ndarray], batch: int,
             rng: np.random.Generator) -> Iterator[tuple[dict, dict]]:
    n_f, n_r = len(forget["input_ids"]), len(rows["input_ids"])
    if n_f < batch:
        raise ValueError(f"the forget set has {n_f} rows, fewer than batch_size={batch}")
    order, cursor = rng.permutation(n_f), 0
    while True:
        if cursor + batch > n_f:
            order, cursor = rng.permutation(n_f), 0
        fi = order[cursor: cursor + batch]
        cursor += batch
        ri = rng.choice(n_r, size=batch, replace=False)
        yield {k: v[fi] for k, v in forget.items()}, {k: v[ri] for k, v in rows.items()}


class Runner:
    """Runs trajectories of one (objective, combiner) from ``model`` at any learning rate."""

    def __init__(self, model, objective: ObjectiveConfig, combiner: CombinerConfig):
        self.model, self.objective, self.combiner = model, objective, combiner
        self.obj = build_objective(objective, model.config.hidden_size)
        self.tx = optax.chain(build_combiner(combiner), optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, weight_decay=0.0))
        self.defs, _ = init_state(model, self.tx, self.obj)
        self.step = make_two_grad_step(self.defs, self.obj, self.tx, StepConfig())

    def _initial(self, lr: float):
        _, state = init_state(self.model, self.tx, self.obj)
        combiner_state, adam = state.opt_state
        adam.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        return state._replace(opt_state=(combiner_state, adam))

    def run(self, forget: dict, retain: dict, probes: ProbeRows, *, lr: float, steps: int, eval_every: int,
            batch_size: int, seed: int, start: dict | None = None) -> Trajectory:
        """``steps`` steps at ``lr``, evaluating every ``eval_every`` steps (``start``: the
        step-0 evaluation, if already known)."""
        t0 = time.perf_counter()
        state = self._initial(lr)
        points = [{"step": 0, **(start or evaluate(self.model, probes))}]
        conflicts = []
        batches = _batches(retain, forget, batch_size, np.random.default_rng(seed))
        for s in range(1, steps + 1):
            fb, rb = next(batches)
            state, metrics = self.step(state, fb, rb)
            conflicts.append(metrics["conflict_fraction"])
            if s % eval_every == 0 or s == steps:
                point = {"step": s, **evaluate(merge_model(self.defs, state), probes)}
                point["conflict_fraction"] = float(np.mean(jax.device_get(conflicts)))
                point["forget_loss"], point["retain_loss"] = float(metrics["forget_loss"]), float(metrics["retain_loss"])
                points.append(point)
                conflicts = []
        return Trajectory(self.objective.name, self.combiner.name, lr, points, time.perf_counter() - t0)
