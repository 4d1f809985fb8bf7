"""Typed configuration of an unlearning run and the factories that turn it into objects.

`TrainConfig` (with its sections `OptimConfig`, `CombinerConfig`, `ObjectiveConfig` and
`jax_unlearn.sharding.MeshConfig`) says what a run does; `build_objective`, `build_combiner`,
`build_schedule`, `build_optimizer` and `build_tx` build the objective and the optax chain.
Combiner and objective names come from the registries (`combiners.COMBINERS`,
`objectives.OBJECTIVES`): a key of a section that the chosen factory does not take is an
error naming it. `jax_unlearn.run_config` reads these dataclasses from YAML; `train` runs them.

>>> from jax_unlearn import config
>>> cfg = config.TrainConfig(output_dir="runs/x", combiner=config.CombinerConfig(name="pcgrad", scope="global"))
>>> tx = config.build_tx(cfg, total_steps=100)
>>> config.CombinerConfig(name="adam")
Traceback (most recent call last):
...
ValueError: combiner.name='adam' is not supported; expected one of weighted_sum, pcgrad, sago
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import optax

from jax_unlearn import sharding as sh
from jax_unlearn.combiners import COMBINERS
from jax_unlearn.objectives import OBJECTIVES, Objective
from jax_unlearn.registry import Registry
from jax_unlearn.step import StepConfig


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key and what it allows."""


def _known(registry: Registry, section: str, name: str) -> None:
    if name not in registry.names():
        raise ValueError(f"{section}.name={name!r} is not supported; expected one of {', '.join(registry.names())}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and a decay schedule, after global-norm clipping.

    ``warmup_steps`` (when set) overrides ``warmup_ratio``, whose steps are
    ``ceil(warmup_ratio * total_steps)`` as in the Hugging Face Trainer.

    ``skip_nonfinite`` (used by `build_tx`): 0 (the default) leaves non-finite updates to the
    loop, which stops the run at the first one; ``N > 0`` wraps the optimizer in
    ``optax.apply_if_finite(max_consecutive_errors=N)``: a non-finite combined gradient is
    skipped (no update, optimizer state kept), up to ``N`` in a row.
    ``moment_dtype`` stores both Adam moments in that dtype (``None``: the parameters' dtype,
    optax's default). ``bfloat16`` halves the optimizer state of float32 parameters
    (float32 master weights, ``model.dtype: float32`` with ``model.compute_dtype: bfloat16``)
    and ``float32`` keeps exact moments for bfloat16 parameters. The second moment in
    bfloat16 rounds its small per-step changes (``(1-b2) g^2`` against ``nu``): on unit
    Gaussian gradients with ``b2=0.999`` it reads 0.4% high after 200 steps, 2% after 500,
    6% after 1000 (docs/benchmarks.md), so the steps shrink slightly in long runs.
    """

    lr: float = 1e-5
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    skip_nonfinite: int = 0
    moment_dtype: Literal["float32", "bfloat16"] | None = None


@dataclasses.dataclass(frozen=True)
class CombinerConfig:
    """Which combiner heads the chain (a name of `combiners.COMBINERS`) and its settings;
    ``scope`` applies to ``pcgrad``, ``agree`` to ``sago``."""

    name: str = "sago"
    alpha: float = 1.0
    gamma: float = 1.0
    scope: Literal["module", "global"] = "module"
    agree: Literal["forget", "sum"] = "forget"
    diagnostics: bool = True

    def __post_init__(self):
        _known(COMBINERS, "combiner", self.name)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective (a name of `objectives.OBJECTIVES`) and its settings: ``retain`` and
    ``logit_chunk`` for the log-likelihood objectives, ``beta`` for NPO/SimNPO, ``delta`` for
    SimNPO, ``reference`` for NPO (``resident``: a frozen copy of the start model;
    ``precompute``: its sequence log-probs computed once into the forget set, one model held),
    ``layer``/``steering``/``trainable``/``seed`` for RMU; ``compat`` for all
    (``"open_unlearning"``: the reference code's loss semantics, see `jax_unlearn.objectives`)."""

    name: str = "grad_diff"
    retain: Literal["nll", "kl"] = "nll"
    beta: float = 0.1
    delta: float = 0.0
    layer: int = 7
    steering: float = 2.0
    trainable: str | None = None
    seed: int = 0
    logit_chunk: int | None = None
    compat: Literal["open_unlearning"] | None = None
    reference: Literal["resident", "precompute"] = "resident"

    def __post_init__(self):
        _known(OBJECTIVES, "objective", self.name)


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Which state a run exports: with ``metric`` (an evaluation metric name such as
    ``mc/wmdp_bio/accuracy``, evaluated every ``eval.every`` steps) the evaluated step whose
    metric is best (``mode`` ``min`` or ``max``; ties keep the earlier step), else the last step."""

    metric: str | None = None
    mode: Literal["min", "max"] = "max"


@dataclasses.dataclass(frozen=True)
class StopConfig:
    """Ends a run early, as finished, at the first evaluation where ``metric`` <= ``below`` or
    >= ``above`` (one of the two), e.g. forget accuracy at chance."""

    metric: str | None = None
    below: float | None = None
    above: float | None = None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Parameter-efficient unlearning: with ``rank`` set, LoRA adapters
    (`jax_unlearn.models.add_lora`) on the ``targets`` projections are the only parameters that
    train (RMU's ``objective.trainable`` then picks the adapters of the modules it names); the
    NPO/KL reference is the base model (the adapters' starting values: B = 0), not a second copy
    of the base weights. ``dropout`` acts on the adapters' inputs during training only."""

    rank: int | None = None
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One unlearning run."""

    output_dir: str
    batch_size: int = 8
    micro_batches: int = 1
    micro_batch_weighting: Literal["tokens", "uniform"] = "tokens"
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    seed: int = 0
    save_every: int = 50
    keep: int = 2
    log_every: int = 1
    mode: Literal["combined", "naive"] = "combined"
    export: bool = True
    progress: bool = True
    mesh: sh.MeshConfig = sh.MeshConfig()
    optim: OptimConfig = OptimConfig()
    combiner: CombinerConfig = CombinerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    select: SelectConfig = SelectConfig()
    stop_when: StopConfig = StopConfig()
    lora: LoraConfig = LoraConfig()


def _settings(cfg: Any) -> tuple[dict, dict]:
    """``(settings, defaults)`` of a section, without its name."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name != "name"}
    return values, defaults


def _objective_settings(cfg: ObjectiveConfig) -> tuple[dict, dict]:
    settings, defaults = _settings(cfg)
    if settings.get("trainable") is None:  # keep the factory's own default (RMU's layers)
        settings.pop("trainable")
    return settings, defaults


def build_objective(cfg: ObjectiveConfig, hidden_size: int) -> Objective:
    """The objective ``cfg.name`` with the settings its factory takes. Raises ValueError for a
    setting it does not take."""
    return OBJECTIVES.build(cfg.name, *_objective_settings(cfg), "objective", {"hidden_size": hidden_size})


def build_combiner(cfg: CombinerConfig) -> optax.GradientTransformation:
    """The combiner ``cfg.name`` with the settings its factory takes."""
    return COMBINERS.build(cfg.name, *_settings(cfg), "combiner")


def check(cfg: TrainConfig) -> None:
    """Raises `ConfigError` (a ValueError) naming the key when a numeric key is out of its range
    (`check_ranges`), the combiner or objective section sets a key its factory does not take,
    or the step settings are invalid (checks that build nothing)."""
    check_ranges(cfg)
    st = cfg.stop_when
    if st.metric is not None and (st.below is None) == (st.above is None):
        raise ConfigError(f"'stop_when' with metric {st.metric!r} needs one of 'stop_when.below' or "
                          "'stop_when.above'")
    if st.metric is None and (st.below is not None or st.above is not None):
        raise ConfigError("'stop_when.below' / 'stop_when.above' need 'stop_when.metric' (an evaluation metric)")
    try:
        COMBINERS.arguments(cfg.combiner.name, *_settings(cfg.combiner), "combiner")
        OBJECTIVES.arguments(cfg.objective.name, *_objective_settings(cfg.objective), "objective")
        step_config(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# (key, test, what the key allows) for every numeric key of a TrainConfig
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("batch_size", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("micro_batches", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("epochs", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("max_steps", lambda v: v is None or _integer(v) and v > 0, "an integer > 0 or null"),
    ("seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("save_every", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("keep", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("log_every", lambda v: _integer(v) and v > 0, "an integer > 0"),
    ("optim.lr", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("optim.warmup_ratio", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.warmup_steps", lambda v: v is None or _integer(v) and v >= 0, "an integer >= 0 or null"),
    ("optim.weight_decay", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("optim.clip_norm", lambda v: v is None or _number(v) and v > 0, "a finite number > 0 or null (no clipping)"),
    ("optim.b1", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.b2", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.eps", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("optim.skip_nonfinite", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: stop at a non-finite step)"),
    ("combiner.alpha", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("combiner.gamma", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("objective.beta", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("objective.delta", _number, "a finite number"),
    ("objective.layer", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("objective.steering", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("objective.seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("objective.logit_chunk", lambda v: v is None or _integer(v) and v > 0, "an integer > 0 or null"),
    ("lora.rank", lambda v: v is None or _integer(v) and v > 0, "an integer > 0 or null (no adapters)"),
    ("lora.alpha", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("lora.dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("lora.seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
)


def _get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: TrainConfig) -> None:
    """Raises `ConfigError` naming the first numeric key outside its range (learning rate > 0,
    ``0 <= warmup_ratio < 1``, positive sizes, ...; see ``_RANGES``). Ranges that depend on
    the model or the data (sequence length, batch size against the data set, RMU's layer,
    warmup steps against the run's length) are checked where those are known."""
    for key, ok, expected in _RANGES:
        value = _get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"'{key}' is {value!r}; expected {expected}")
    from jax_unlearn.models.lora import TARGETS

    targets = list(cfg.lora.targets)
    if not targets or targets != ["all-linear"] and any(t not in TARGETS for t in targets):
        raise ConfigError(f"'lora.targets' is {targets!r}; expected a list of projection names from "
                          f"{', '.join(TARGETS)}, or ['all-linear']")
    if cfg.combiner.alpha == 0 and cfg.combiner.gamma == 0:
        raise ConfigError("'combiner.alpha' and 'combiner.gamma' are both 0: every update would be zero")
    if cfg.batch_size % cfg.micro_batches:
        raise ConfigError(f"'batch_size'={cfg.batch_size} is not divisible by 'micro_batches'={cfg.micro_batches}")


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
    import jax.numpy as jnp

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
    import jax

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
    state's types and make a jitted step compile again."""
    import jax.numpy as jnp

    cast = {k: jnp.asarray(v, jnp.result_type(optax.tree_utils.tree_get(opt_state, k))) for k, v in values.items()}
    return optax.tree_utils.tree_set(opt_state, **cast)


def build_tx(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``chain(combiner, clip, adamw)``; naive mode drops the combiner. With
    ``optim.skip_nonfinite=N > 0`` the part after the combiner is wrapped in
    ``optax.apply_if_finite(..., max_consecutive_errors=N)`` (it must follow the combiner:
    it expects updates shaped like the parameters)."""
    head = [] if cfg.mode == "naive" else [build_combiner(cfg.combiner)]
    optimizer = build_optimizer(cfg.optim, total_steps)
    if cfg.optim.skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=cfg.optim.skip_nonfinite)
    return optax.chain(*head, optimizer)


def step_config(cfg: TrainConfig) -> StepConfig:
    """The `jax_unlearn.step.StepConfig` of a run (naive mode weighs the losses like the combiner)."""
    return StepConfig(micro_batches=cfg.micro_batches, mode=cfg.mode, alpha=cfg.combiner.alpha,
                      gamma=cfg.combiner.gamma, weighting=cfg.micro_batch_weighting)
