"""Gradient accumulation: weighted means over micro-batches, and a two-task ``MultiSteps``.

One implementation of each micro-batch weighting, used both by the jitted step
(`jax_unlearn.step`, over the micro-batches of one batch) and by `two_task_multi_steps` (over
calls of an optax update):

- ``"tokens"``: ``g = sum_j w_j g_j / sum_j w_j`` with ``w_j`` what micro-batch ``j``'s loss
  averages over (label tokens, or sequences for NPO/SimNPO): the gradient of the whole
  batch's mean, as if it were one batch.
- ``"uniform"``: ``g = mean_j g_j``: each micro-batch's mean counts once, whatever its size
  (HF Trainer + accelerate, the paper's reference).

``optax.MultiSteps`` assumes updates shaped like the params and fails on ``TwoTaskGrads``;
``two_task_multi_steps(tx, k)`` accumulates the forget and the retain gradient separately over
``k`` calls and runs ``tx`` (a chain whose head is a combiner) once on the two means.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jax_unlearn.combiners import TwoTaskGrads, materialize

Weighting = Literal["tokens", "uniform"]
WEIGHTINGS: tuple[str, ...] = ("tokens", "uniform")


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"micro-batch weighting {weighting!r} is not supported; expected one of {WEIGHTINGS}")


class WeightedMean(NamedTuple):
    """A running weighted sum: ``mean = total / weight``."""

    total: Any  # sum_j w_j x_j, a tree in float32 (or wider)
    weight: chex.Array  # sum_j w_j, float32 scalar


def mean_start(like: Any, dtype: Any = None) -> WeightedMean:
    """Zeros shaped like ``like`` (arrays or ``ShapeDtypeStruct``s), in ``dtype`` or
    ``promote_types(float32, leaf dtype)``."""
    zeros = lambda x: jnp.zeros(jnp.shape(x), dtype or jnp.promote_types(jnp.float32, x.dtype))
    return WeightedMean(jax.tree.map(zeros, like), jnp.zeros((), jnp.float32))


def mean_add(acc: WeightedMean, x: Any, w: chex.Array) -> WeightedMean:
    """``total += w * x``, ``weight += w``."""
    total = jax.tree.map(lambda t, v: t + (w * v.astype(t.dtype)).astype(t.dtype), acc.total, x)
    return WeightedMean(total, acc.weight + w)


def mean_value(acc: WeightedMean, like: Any) -> Any:
    """``total / weight`` cast to the dtypes of ``like`` (0 when nothing was added)."""
    denom = jnp.maximum(acc.weight, 1e-30)
    return jax.tree.map(lambda t, x: (t / denom.astype(t.dtype)).astype(x.dtype), acc.total, like)


def micro_batch_weight(weighting: str, loss_weight: chex.Array) -> chex.Array:
    """The weight of one micro-batch: its loss's own weight (``"tokens"``) or 1 (``"uniform"``)."""
    check_weighting(weighting)
    return jnp.asarray(loss_weight, jnp.float32) if weighting == "tokens" else jnp.ones((), jnp.float32)


class TwoTaskMultiStepsState(NamedTuple):
    """State of ``two_task_multi_steps``."""

    mini_step: chex.Array  # int32 in [0, k): micro-steps accumulated so far
    gradient_step: chex.Array  # int32: optimizer steps taken (combines applied)
    acc: TwoTaskGrads  # a WeightedMean of the forget and of the retain gradients
    inner_state: Any  # the wrapped chain's state


def two_task_multi_steps(
    inner: optax.GradientTransformation, every_k: int, accumulator_dtype: Any = None,
    weighting: Weighting = "tokens",
) -> optax.GradientTransformationExtraArgs:
    """Accumulates ``TwoTaskGrads`` over ``every_k`` micro-steps, then applies ``inner`` once.

    On the ``k``-th call ``inner`` receives ``TwoTaskGrads(mean g_f, mean g_r)``, each mean
    weighted as ``weighting`` says (see the module docstring); with ``"tokens"`` every call
    passes ``task_weights=(w_f, w_r)`` (`jax_unlearn.step.make_two_grad_step` passes each
    gradient's token or sequence count).
    No Python branching on traced values: the choice is a ``lax.cond``, so the wrapped update
    jits as one function.

    Args:
      inner: the transformation to run once per optimizer step; its update takes
        ``TwoTaskGrads`` (e.g. ``optax.chain(ju.sago(), optax.adamw(1e-5))``).
      every_k: number of micro-steps per optimizer step (>= 1).
      accumulator_dtype: dtype of the running sums (default ``promote_types(float32, param
        dtype)``, so bf16 gradients do not round away over many micro-steps).
      weighting: ``"tokens"`` (default, as `jax_unlearn.step.StepConfig` and the run config:
        the gradient of the whole batch's mean; every update then takes ``task_weights``) or
        ``"uniform"`` (each call's mean counts once, as the paper's reference).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update takes ``TwoTaskGrads`` and
      returns zeros on the first ``k-1`` calls of each cycle and ``inner``'s update on the last.

    Example:
      >>> import jax.numpy as jnp, optax, jax_unlearn as ju
      >>> tx = ju.two_task_multi_steps(optax.chain(ju.weighted_sum(), optax.sgd(1.0)), every_k=2)
      >>> p = {"w": jnp.zeros(1)}
      >>> state = tx.init(p)
      >>> g = lambda f, r: ju.TwoTaskGrads({"w": jnp.array([f])}, {"w": jnp.array([r])})
      >>> u, state = tx.update(g(1.0, 0.0), state, p, task_weights=(3.0, 1.0))  # 3 forget, 1 retain tokens
      >>> u["w"].tolist()          # accumulating
      [0.0]
      >>> u, state = tx.update(g(3.0, 2.0), state, p, task_weights=(1.0, 1.0))
      >>> u["w"].tolist()          # -(token-weighted g_f + g_r) = -((3*1 + 1*3)/4 + (1*0 + 1*2)/2)
      [-2.5]
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"every_k must be an integer >= 1, got {every_k!r}")
    check_weighting(weighting)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return TwoTaskMultiStepsState(
            mini_step=jnp.zeros((), jnp.int32),
            gradient_step=jnp.zeros((), jnp.int32),
            acc=TwoTaskGrads(mean_start(params, accumulator_dtype), mean_start(params, accumulator_dtype)),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, task_weights=None, **extra_args):
        updates = materialize(updates)  # the retain gradient is accumulated, so it must exist
        if not isinstance(updates, TwoTaskGrads):
            raise TypeError(
                "two_task_multi_steps: update expects jax_unlearn.TwoTaskGrads(forget=..., retain=...), "
                f"got {type(updates).__name__}"
            )
        if jax.tree.structure(updates.forget) != jax.tree.structure(state.acc.forget.total):
            raise ValueError(
                "two_task_multi_steps: gradient tree structure differs from the params given to init:\n"
                f"  gradients: {jax.tree.structure(updates.forget)}\n"
                f"  expected:  {jax.tree.structure(state.acc.forget.total)}"
            )
        if weighting == "tokens" and task_weights is None:
            raise ValueError("two_task_multi_steps(weighting='tokens'): pass task_weights=(forget_weight, "
                             "retain_weight) to every update")
        w_f, w_r = (1.0, 1.0) if weighting == "uniform" else task_weights
        acc = TwoTaskGrads(mean_add(state.acc.forget, updates.forget, micro_batch_weight(weighting, w_f)),
                           mean_add(state.acc.retain, updates.retain, micro_batch_weight(weighting, w_r)))

        def apply(_):
            mean = TwoTaskGrads(mean_value(acc.forget, updates.forget), mean_value(acc.retain, updates.retain))
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            fresh = jax.tree.map(jnp.zeros_like, acc)
            return new_updates, fresh, inner_state, state.gradient_step + 1

        update_shapes = jax.eval_shape(apply, None)[0]

        def skip(_):
            new_updates = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), update_shapes)
            return new_updates, acc, state.inner_state, state.gradient_step

        last = state.mini_step == every_k - 1
        new_updates, acc, inner_state, gradient_step = jax.lax.cond(last, apply, skip, None)
        return new_updates, TwoTaskMultiStepsState(
            mini_step=jnp.where(last, 0, state.mini_step + 1).astype(jnp.int32),
            gradient_step=gradient_step,
            acc=acc,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
