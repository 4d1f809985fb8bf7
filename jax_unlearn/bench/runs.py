"""Unlearning runs on the benchmark world, with the library's step, batching and loop.

A benchmark run is a run config (`run_config`: a `jax_unlearn.config.TrainConfig` with the
objective, combiner and LoRA sections, AdamW at a constant rate without clipping or weight
decay), built by the same factories as ``jax-unlearn unlearn`` (`jax_unlearn.config.build_tx`,
`jax_unlearn.config.step_config`, `jax_unlearn.train.with_adapters`), so its step is a run's
step. What the benchmark does not take from `jax_unlearn.run` is the run folder (no
checkpoints, no export: a trajectory lives in memory) and one compilation per run: one compiled
two-gradient step (`jax_unlearn.step.make_two_grad_step`) per (objective, combiner, loss
settings) serves every learning rate, set in the optimizer's state with
`jax_unlearn.config.set_hyperparams`. With a
constant rate, a run evaluated after ``s`` steps *is* the run with ``max_steps = s``: each
evaluation point of a trajectory is reported as its own run (early stopping as a
hyperparameter). Batches are `jax_unlearn.data.PairedBatches`, as in ``jax-unlearn unlearn``.
With ``lora.rank`` set, LoRA adapters train alone (`jax_unlearn.train.with_adapters`, as in a
run with a ``lora:`` section).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jax_unlearn import step as st
from jax_unlearn.bench.evaluate import Gold, evaluate
from jax_unlearn.bench.tokens import ProbeRows
from jax_unlearn.config import (
    CombinerConfig,
    LoraConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    build_objective,
    build_tx,
    set_hyperparams,
    step_config,
)
from jax_unlearn.data import PairedBatches
from jax_unlearn.train import Every, run_steps, with_adapters


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Evaluations of one run (``points[0]`` is the starting model at step 0)."""

    objective: str
    combiner: str
    lr: float
    points: list[dict]  # {"step", metrics..., "conflict_fraction" (mean since the last point)}
    seconds: float
    # wall seconds per step without the evaluations (the state is synced before each one); None
    # for the trajectory that compiled the runner's step
    seconds_per_step: float | None = None
    models: list | None = None  # with keep_models: the model at each point (points[0]: the starting model)


def run_config(objective: ObjectiveConfig, combiner: CombinerConfig, lora: LoraConfig = LoraConfig(),
               forget_every: int = 1) -> TrainConfig:
    """The run config of a benchmark run: its objective, combiner and adapters, AdamW at a constant
    rate (set per trajectory) without clipping or weight decay, one micro-batch."""
    return TrainConfig(output_dir="", objective=objective, combiner=combiner, lora=lora, forget_every=forget_every,
                       optim=OptimConfig(lr=1.0, schedule="constant", clip_norm=None, weight_decay=0.0))


class Runner:
    """Runs trajectories of one (objective, combiner) from ``model`` at any learning rate."""

    def __init__(self, model, objective: ObjectiveConfig, combiner: CombinerConfig,
                 lora: LoraConfig = LoraConfig(), forget_every: int = 1, total_steps: int = 1):
        """``forget_every``: the step's (`jax_unlearn.step.StepConfig`); ``total_steps``: the length
        of the combiner's weight schedule (``combiner.weight_schedule``; the learning rate is
        constant, so nothing else depends on it)."""
        cfg = run_config(objective, combiner, lora, forget_every)
        self.model, self.train = with_adapters(model, cfg.lora)
        self.objective, self.combiner = objective, combiner
        self.obj = build_objective(cfg.objective, model.config.hidden_size)
        self.tx = build_tx(cfg, total_steps=total_steps)
        self.defs, _ = st.init_state(self.model, self.tx, self.obj, train=self.train)
        self.step = st.make_two_grad_step(self.defs, self.obj, self.tx, step_config(cfg, model.options))
        self.compiled = False  # whether a trajectory has run (and so compiled) the step

    def run(self, forget: dict, retain: dict, probes: ProbeRows, *, lr: float, steps: int, eval_every: int,
            batch_size: int, seed: int, start: dict | None = None, gold: Gold | None = None,
            keep_models: bool = False) -> Trajectory:
        """``steps`` steps at ``lr``, evaluating every ``eval_every`` steps (``start``: the
        step-0 evaluation, if already known; ``gold``: the metrics against the gold model too;
        ``keep_models``: keep a copy of the model at each point, for the robustness attacks)."""
        t0 = time.perf_counter()
        _, state = st.init_state(self.model, self.tx, self.obj, train=self.train)
        state = state._replace(opt_state=set_hyperparams(state.opt_state, learning_rate=lr))
        points = [{"step": 0, **(start or evaluate(self.model, probes, gold))}]
        conflicts = []
        evaluating = []  # seconds of each evaluation during the steps
        models = [self.model] if keep_models else None
        data = PairedBatches(forget, retain, batch_size, seed)

        def collect(done, state, metrics):
            conflicts.append(metrics["conflict_fraction"])

        def point(done, state, metrics):
            jax.block_until_ready(state.params)  # the steps' time ends here
            t = time.perf_counter()
            model = st.merge_model(self.defs, state, copy=False)
            model.eval()  # no adapter dropout while evaluating
            p = {"step": done, **evaluate(model, probes, gold)}
            p["conflict_fraction"] = float(np.mean(jax.device_get(conflicts)))
            p["forget_loss"], p["retain_loss"] = float(metrics["forget_loss"]), float(metrics["retain_loss"])
            points.append(p)
            conflicts.clear()
            if models is not None:
                kept = st.merge_model(self.defs, state, copy=True)
                kept.eval()
                models.append(kept)
            evaluating.append(time.perf_counter() - t)

        t_steps = time.perf_counter()
        run_steps(self.step, state, data, 0, steps, [Every(1, collect), Every(eval_every, point)])
        end = time.perf_counter()
        per_step = None if not self.compiled else (end - t_steps - sum(evaluating)) / steps
        self.compiled = True
        return Trajectory(self.objective.name, self.combiner.name, lr, points, end - t0, per_step, models)
