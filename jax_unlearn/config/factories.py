"""Factories: a run's sections -> the objects that run it (objective, combiner, optax chain).

`build_objective`, `build_combiner`, `build_schedule`, `build_optimizer` and `build_tx` build
the objective and the optax chain ``combiner -> clip -> AdamW``; `step_config` the step's
settings; `set_hyperparams` sets a constant hyperparameter of a built optimizer's state.

>>> from jax_unlearn import config
>>> cfg = config.TrainConfig(output_dir="runs/x", combiner=config.CombinerConfig(name="pcgrad", scope="global"))
>>> tx = config.build_tx(cfg, total_steps=100)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_unlearn.combiners import COMBINERS, conflict_adaptive, scheduled
from jax_unlearn.objectives import OBJECTIVES, Objective
from jax_unlearn.step import StepConfig, reuse_forget

from .schema import WEIGHT_KEYS, CombinerConfig, ObjectiveConfig, OptimConfig, TrainConfig


def section_settings(cfg: Any) -> tuple[dict, dict]:
    """``(settings, defaults)`` of a section, without its name."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name != "name"}
    return values, defaults


def objective_settings(cfg: ObjectiveConfig) -> tuple[dict, dict]:
    settings, defaults = section_settings(cfg)
    if settings.get("trainable") is None:  # keep the factory's own default (RMU's layers)
        settings.pop("trainable")
    return settings, defaults


def build_objective(cfg: ObjectiveConfig, hidden_size: int) -> Objective:
    """The objective ``cfg.name`` with the settings its factory takes. Raises ValueError for a
    setting it does not take."""
    return OBJECTIVES.build(cfg.name, *objective_settings(cfg), "objective", {"hidden_size": hidden_size})


def build_combiner(cfg: CombinerConfig, total_steps: int = 1) -> optax.GradientTransformation:
    """The combiner ``cfg.name`` with the settings its factory takes; with ``weight_schedule``
    its weights move to ``alpha_end``/``gamma_end`` over ``total_steps`` updates
    (`jax_unlearn.combiners.scheduled`), with ``adapt: conflict`` its forget weight follows the
    conflicts (`jax_unlearn.combiners.conflict_adaptive`)."""
    settings, defaults = section_settings(cfg)
    weights = {k: settings.pop(k) for k in WEIGHT_KEYS}
    for k in WEIGHT_KEYS:
        defaults.pop(k)
    if weights["weight_schedule"] != "constant" and weights["adapt"] != "none":
        raise ValueError("'combiner.weight_schedule' and 'combiner.adapt' both change the weights; set one of them")
    if weights["weight_schedule"] == "constant" and weights["adapt"] == "none":
        return COMBINERS.build(cfg.name, settings, defaults, "combiner")
    args = COMBINERS.arguments(cfg.name, settings, defaults, "combiner")
    alpha, gamma = args.pop("alpha", cfg.alpha), args.pop("gamma", cfg.gamma)
    factory = COMBINERS.get(cfg.name)
    if weights["adapt"] == "conflict":
        return conflict_adaptive(factory, alpha, gamma, power=weights["adapt_power"], ema=weights["adapt_ema"],
                                 floor=weights["adapt_floor"], **args)
    shape = {"linear": optax.linear_schedule, "cosine": _cosine}[weights["weight_schedule"]]

    def schedule(start: float, end: float | None):
        return start if end is None or end == start else shape(start, end, max(total_steps, 1))

    return scheduled(factory, alpha=schedule(alpha, weights["alpha_end"]), gamma=schedule(gamma, weights["gamma_end"]),
                     **args)


def _cosine(start: float, end: float, steps: int) -> optax.Schedule:
    """``end + (start - end) * (1 + cos(pi * min(t, steps) / steps)) / 2``: half a cosine from
    ``start`` to ``end`` (either way, unlike ``optax.cosine_decay_schedule``)."""
    return lambda t: end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, steps) / steps))


def build_schedule(cfg: OptimConfig, total_steps: int) -> optax.ScalarOrSchedule:
    """Linear warmup, then constant, linear or cosine decay to 0 over the remaining steps.

    A constant rate without warmup is returned as a number, so that it stays a settable
    hyperparameter of the optimizer state (``optax.tree_utils.tree_set(state, learning_rate=...)``).
    """
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(math.ceil(cfg.warmup_ratio * total_steps))
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        if warmup == 0:
            return cfg.lr
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, rest)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, rest)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not supported; expected 'constant', 'linear' or 'cosine'")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm, inject_hyperparams(adamw))``: every AdamW hyperparameter
    (``learning_rate``, ``b1``, ``b2``, ``eps``, ``weight_decay``) lives in the state and can be
    read or, for a constant rate, set with ``optax.tree_utils.tree_get`` / ``tree_set``; they
    are float32 for parameters of any dtype. The moments are stored in ``cfg.moment_dtype``
    (default: the parameters' dtype) and keep it from step to step (`moments_in`)."""
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    # hyperparameters in float32 whatever the parameters' dtype: in bfloat16, b2=0.999 rounds to
    # 1.0 and Adam's bias correction 1 - b2^t divides by zero (NaN after the first step)
    adamw = optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=build_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay)
    parts.append(moments_in(adamw, cfg.moment_dtype))
    return optax.chain(*parts)


def moments_in(tx: optax.GradientTransformation, dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose Adam moments (``mu`` and ``nu`` of every ``optax.ScaleByAdamState`` in its
    state) are stored in ``dtype`` (``None``: the dtype ``tx.init`` gives them, the
    parameters') and keep their dtype after every update; the update itself is computed in
    float32 (the hyperparameters' dtype)."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)

    def init(params):
        state = tx.init(params)
        if dtype is None:
            return state
        cast = lambda s: s._replace(mu=optax.tree.cast(s.mu, dtype), nu=optax.tree.cast(s.nu, dtype))
        return jax.tree.map(lambda s: cast(s) if is_adam(s) else s, state, is_leaf=is_adam)

    def update(updates, state, params=None, **extra):
        updates, new = optax.with_extra_args_support(tx).update(updates, state, params, **extra)
        keep = lambda n, o: n._replace(mu=optax.tree.cast_like(n.mu, o.mu), nu=optax.tree.cast_like(n.nu, o.nu))
        return updates, jax.tree.map(lambda n, o: keep(n, o) if is_adam(n) else n, new, state, is_leaf=is_adam)

    return optax.GradientTransformationExtraArgs(init, update)


def set_hyperparams(opt_state: Any, **values: float) -> Any:
    """``optax.tree_utils.tree_set`` for the injected hyperparameters (``learning_rate=1e-4``, ...)
    of `build_optimizer`, each cast to its entry's dtype: a Python float would change the
    state's types and make a jitted step compile again.

    Raises ValueError for a hyperparameter that follows a schedule (``optim.schedule`` linear or
    cosine, or a warmup): ``optax.inject_hyperparams`` recomputes it from the schedule at every
    update, so a value set here would be overwritten silently. Build the optimizer with a
    constant rate (``OptimConfig(schedule="constant")`` without warmup) to set it.
    """
    scheduled = set()
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams_states")):
        if hasattr(node, "hyperparams_states"):
            scheduled |= set(node.hyperparams_states)
    refused = sorted(set(values) & scheduled)
    if refused:
        raise ValueError(f"cannot set {', '.join(refused)}: it follows a schedule, which would overwrite the value "
                         "at the next update; build the optimizer with optim.schedule='constant' and no warmup to "
                         "set it")
    cast = {k: jnp.asarray(v, jnp.result_type(optax.tree_utils.tree_get(opt_state, k))) for k, v in values.items()}
    return optax.tree_utils.tree_set(opt_state, **cast)


def build_tx(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``chain(combiner, clip, adamw)``; naive mode drops the combiner; ``forget_every > 1``
    wraps the chain in `jax_unlearn.step.reuse_forget` (room for the reused forget gradient). With
    ``optim.skip_nonfinite=N > 0`` the part after the combiner is wrapped in
    ``optax.apply_if_finite(..., max_consecutive_errors=N)`` (it must follow the combiner:
    it expects updates shaped like the parameters)."""
    head = [] if cfg.mode == "naive" else [build_combiner(cfg.combiner, total_steps)]
    optimizer = build_optimizer(cfg.optim, total_steps)
    if cfg.optim.skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=cfg.optim.skip_nonfinite)
    tx = optax.chain(*head, optimizer)
    return reuse_forget(tx) if cfg.forget_every > 1 else tx


def step_config(cfg: TrainConfig, model_options: Any = None) -> StepConfig:
    """The `jax_unlearn.step.StepConfig` of a run (naive mode weighs the losses like the combiner).
    ``sequence_tasks: null`` is on when ``model_options`` (the model's `ModelOptions`) has no
    remat policy."""
    sequence = cfg.sequence_tasks
    if sequence is None:
        sequence = model_options is not None and model_options.remat_policy is None
    return StepConfig(micro_batches=cfg.micro_batches, mode=cfg.mode, alpha=cfg.combiner.alpha,
                      gamma=cfg.combiner.gamma, weighting=cfg.micro_batch_weighting, forget_every=cfg.forget_every,
                      chunk_head=cfg.chunk_head and cfg.mode == "combined",
                      sequence_tasks=sequence and cfg.mode == "combined")
