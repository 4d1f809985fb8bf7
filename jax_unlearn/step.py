"""The jitted two-gradient unlearning step: the only place that takes gradients.

``make_two_grad_step`` builds ``step(state, forget_batch, retain_batch) -> (state, metrics)``:

1. ``(L_f, g_f)`` and ``(L_r, g_r)`` are computed separately, each accumulated over ``k``
   micro-batches with ``lax.scan`` and weighted by token count (``metrics["weight"]``):
   ``g = sum_j w_j g_j / sum_j w_j`` equals the gradient of the whole batch's token mean;
2. ``TwoTaskGrads(g_f, g_r)`` goes to the optax chain, whose head is a combiner;
3. only trainable parameters are differentiated; the rest and the frozen reference model
   carry no gradient and no optimizer state; the state is donated.

``mode="naive"`` takes one backward pass of ``gamma*L_f + alpha*L_r`` instead (loss
summation, for benchmarks); its chain must not start with a combiner.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_unlearn.combiners import CombinerState, TwoTaskGrads
from jax_unlearn.objectives import Batch, Objective


class TrainState(NamedTuple):
    """Everything a step changes or reads (a pytree; donated to the step)."""

    step: jax.Array  # int32 optimizer steps taken
    params: nnx.State  # trainable parameters
    opt_state: Any  # optax state of the chain over ``params``
    frozen: nnx.State  # non-trainable model variables
    ref: nnx.State | None  # the frozen reference model (None when the objective needs none)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static halves of the split model: ``merge(graphdef, params, frozen)`` rebuilds it."""

    graphdef: Any
    ref_graphdef: Any | None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How a step runs.

    Attributes:
      micro_batches: ``k``; each batch ``[b, s]`` is split into ``k`` strided micro-batches
        ``[b/k, s]`` (rows ``j, j+k, ...``), so each device's rows divide evenly.
      mode: ``"combined"`` (two gradients, combiner at the head of the chain) or ``"naive"``
        (one backward of ``gamma*L_f + alpha*L_r``; needs ``micro_batches == 1``).
      alpha, gamma: loss weights of the naive mode (the combiners carry their own).
    """

    micro_batches: int = 1
    mode: Literal["combined", "naive"] = "combined"
    alpha: float = 1.0
    gamma: float = 1.0

    def __post_init__(self):
        if self.mode not in ("combined", "naive"):
            raise ValueError(f"step mode={self.mode!r} is not supported; expected 'combined' or 'naive'")
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches must be an integer >= 1, got {self.micro_batches!r}")
        if self.mode == "naive" and self.micro_batches != 1:
            raise ValueError("mode='naive' takes one backward pass per step and supports micro_batches=1 only; "
                             "use the weighted_sum combiner for loss summation with accumulation")


def path_filter(pattern: str) -> Callable[[tuple, Any], bool]:
    """NNX filter: parameters whose dotted path (``layers.5.mlp.down_proj``) fully matches ``pattern``."""
    regex = re.compile(pattern)
    return lambda path, _: bool(regex.fullmatch(".".join(str(p) for p in path)))


def init_state(
    model: nnx.Module, tx: optax.GradientTransformation, objective: Objective, copy: bool = True
) -> tuple[ModelDef, TrainState]:
    """Splits ``model`` into trainable / frozen parts, keeps a reference copy when the
    objective needs one, and initialises ``tx`` on the trainable parameters.

    The step donates its state, so with ``copy=True`` the state gets its own buffers and
    ``model`` stays usable; ``copy=False`` hands the model's buffers over (no extra memory,
    but ``model`` must not be used afterwards).
    """
    if objective.trainable is not None and getattr(getattr(model, "options", None), "scan_layers", False):
        raise ValueError(f"objective {objective.name!r} trains a subset of layers ({objective.trainable!r}); "
                         "that needs a model built with scan_layers=False")
    flt = nnx.Param if objective.trainable is None else nnx.All(nnx.Param, path_filter(objective.trainable))
    graphdef, params, frozen = nnx.split(model, flt, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"trainable={objective.trainable!r} matches no parameter of the model; "
                         "parameter paths look like 'layers.5.mlp.down_proj'")
    ref_graphdef = ref = None
    if objective.needs_reference:
        ref_graphdef, ref = nnx.split(model)
        ref = jax.tree.map(jnp.copy, ref)  # never donated away with the trained parameters
    if copy:
        params, frozen = jax.tree.map(jnp.copy, (params, frozen))
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen, ref)
    return ModelDef(graphdef, ref_graphdef), state


def merge_model(defs: ModelDef, state: TrainState) -> nnx.Module:
    """The current model (trainable and frozen parts merged)."""
    return nnx.merge(defs.graphdef, state.params, state.frozen)


def _micro(batch: Batch, k: int) -> Batch:
    """``[b, ...] -> [k, b/k, ...]`` with micro-batch ``j`` = rows ``j, j+k, ...``."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _weighted_grads(value_and_grad, params, batch: Batch, k: int):
    """Token-weighted mean loss, metrics and gradient over ``k`` micro-batches."""
    if k == 1:
        (loss, metrics), g = value_and_grad(params, batch)
        return loss, metrics, g

    def body(carry, mb):
        g_sum, w_sum, l_sum, m_sum = carry
        (loss, metrics), g = value_and_grad(params, mb)
        w = metrics["weight"]
        g_sum = jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), g_sum, g)
        m_sum = jax.tree.map(lambda a, b: a + w * b, m_sum, metrics)
        return (g_sum, w_sum + w, l_sum + w * loss, m_sum), None

    shapes = jax.eval_shape(lambda: value_and_grad(params, jax.tree.map(lambda x: x[0], batch)))
    (_, m_shape), g_shape = shapes
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)
    init = (zeros(g_shape), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros(m_shape))
    (g_sum, w_sum, l_sum, m_sum), _ = jax.lax.scan(body, init, batch)
    denom = jnp.maximum(w_sum, 1e-30)
    grads = jax.tree.map(lambda s, p: (s / denom).astype(p.dtype), g_sum, params)
    metrics = jax.tree.map(lambda s: s / denom, m_sum)
    metrics["weight"] = w_sum
    return l_sum / denom, metrics, grads


def make_two_grad_step(
    defs: ModelDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    config: StepConfig = StepConfig(),
    state_shardings: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
) -> Callable[[TrainState, Batch, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the jitted ``step(state, forget_batch, retain_batch) -> (state, metrics)``.

    Args:
      defs, objective: from `init_state` and `jax_unlearn.objectives`.
      tx: an optax chain; in ``"combined"`` mode its head is a combiner (``ju.sago()``, ...).
      config: micro-batching and mode (`StepConfig`).
      state_shardings: a `TrainState` of shardings (`jax_unlearn.sharding.train_state_shardings`);
        ``None`` leaves placement to jit.
      batch_sharding: sharding of every batch array ``[b, s]``.
      donate: donate the input state's buffers to the output.

    Metrics: ``forget_loss``, ``retain_loss``, ``forget_weight``/``retain_weight`` (tokens or
    sequences), the objectives' own metrics prefixed ``forget_``/``retain_``, the combiner's
    diagnostics (``conflict_fraction``, ``cos_forget_retain``, ``cos_update_retain``,
    ``forget_norm``, ``retain_norm``, ``update_norm``) or, in naive mode, ``grad_norm``.
    """
    k = config.micro_batches

    def grad_fn(loss_fn):
        def f(params, frozen, ref, batch):
            model = nnx.merge(defs.graphdef, params, frozen)
            ref_model = None if ref is None else nnx.merge(defs.ref_graphdef, ref)
            return loss_fn(model, batch, ref_model)

        return f

    forget_fn, retain_fn = grad_fn(objective.forget), grad_fn(objective.retain)

    def combined(state: TrainState, fb: Batch, rb: Batch):
        def task(fn, batch):
            vg = jax.value_and_grad(lambda p, b: fn(p, state.frozen, state.ref, b), has_aux=True)
            return _weighted_grads(vg, state.params, _micro(batch, k) if k > 1 else batch, k)

        lf, mf, gf = task(forget_fn, fb)
        lr, mr, gr = task(retain_fn, rb)
        updates, opt_state = tx.update(TwoTaskGrads(gf, gr), state.opt_state, state.params)
        metrics = _task_metrics(lf, mf, lr, mr)
        for name in CombinerState._fields:
            metrics[name] = optax.tree_utils.tree_get(opt_state, name, jnp.nan)
        return updates, opt_state, metrics

    def naive(state: TrainState, fb: Batch, rb: Batch):
        def total(p):
            lf, mf = forget_fn(p, state.frozen, state.ref, fb)
            lr, mr = retain_fn(p, state.frozen, state.ref, rb)
            return config.gamma * lf + config.alpha * lr, (lf, mf, lr, mr)

        (_, (lf, mf, lr, mr)), g = jax.value_and_grad(total, has_aux=True)(state.params)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        metrics = _task_metrics(lf, mf, lr, mr)
        metrics["grad_norm"] = optax.tree.norm(g)
        return updates, opt_state, metrics

    body = combined if config.mode == "combined" else naive

    def step(state: TrainState, forget_batch: Batch, retain_batch: Batch):
        updates, opt_state, metrics = body(state, forget_batch, retain_batch)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None or batch_sharding is not None:
        jit_kwargs["in_shardings"] = (state_shardings, batch_sharding, batch_sharding)
        jit_kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, **jit_kwargs)


def _task_metrics(lf, mf, lr, mr) -> dict[str, jax.Array]:
    metrics = {"forget_loss": lf, "retain_loss": lr, "forget_weight": mf["weight"], "retain_weight": mr["weight"]}
    metrics.update({f"forget_{k}": v for k, v in mf.items() if k != "weight"})
    metrics.update({f"retain_{k}": v for k, v in mr.items() if k != "weight"})
    return metrics
