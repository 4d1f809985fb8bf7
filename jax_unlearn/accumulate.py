"""Gradient accumulation for two-task chains: accumulate both gradients, combine once.

``optax.MultiSteps`` assumes updates shaped like the params and fails on ``TwoTaskGrads``.
``two_task_multi_steps(tx, k)`` is its two-task counterpart: it averages the forget and the
retain gradient separately over ``k`` calls and runs ``tx`` (a chain whose head is a
combiner) once on the averages, as the paper's reference trainer does. The other ``k-1``
calls return zero updates and leave ``tx``'s state untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jax_unlearn.combiners import TwoTaskGrads


class TwoTaskMultiStepsState(NamedTuple):
    """State of ``two_task_multi_steps``."""

    mini_step: chex.Array  # int32 in [0, k): micro-steps accumulated so far
    gradient_step: chex.Array  # int32: optimizer steps taken (combines applied)
    acc: TwoTaskGrads  # running means of the forget and retain gradients
    inner_state: Any  # the wrapped chain's state


def two_task_multi_steps(
    inner: optax.GradientTransformation, every_k: int, accumulator_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
    """Accumulates ``TwoTaskGrads`` over ``every_k`` micro-steps, then applies ``inner`` once.

    After micro-step ``t`` of a cycle, ``acc = acc + (g_t - acc)/(t+1)`` for each task, so on
    the ``k``-th call ``acc`` is the mean of the ``k`` gradients and ``inner`` receives
    ``TwoTaskGrads(mean g_f, mean g_r)``. No Python branching on traced values: the choice is
    a ``lax.cond``, so the wrapped update jits as one function.

    Args:
      inner: the transformation to run once per optimizer step; its update takes
        ``TwoTaskGrads`` (e.g. ``optax.chain(ju.sago(), optax.adamw(1e-5))``).
      every_k: number of micro-steps per optimizer step (>= 1).
      accumulator_dtype: dtype of the running means (None keeps each parameter's dtype;
        ``jnp.float32`` avoids bf16 rounding over many micro-steps).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update takes ``TwoTaskGrads`` and
      returns zeros on the first ``k-1`` calls of each cycle and ``inner``'s update on the last.
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"every_k must be an integer >= 1, got {every_k!r}")
    inner = optax.with_extra_args_support(inner)

    def zeros(params):
        return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), accumulator_dtype or jnp.result_type(p)), params)

    def init_fn(params):
        return TwoTaskMultiStepsState(
            mini_step=jnp.zeros((), jnp.int32),
            gradient_step=jnp.zeros((), jnp.int32),
            acc=TwoTaskGrads(zeros(params), zeros(params)),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if not isinstance(updates, TwoTaskGrads):
            raise TypeError(
                "two_task_multi_steps: update expects jax_unlearn.TwoTaskGrads(forget=..., retain=...), "
                f"got {type(updates).__name__}"
            )
        if jax.tree.structure(updates) != jax.tree.structure(state.acc):
            raise ValueError(
                "two_task_multi_steps: gradient tree structure differs from the params given to init:\n"
                f"  gradients: {jax.tree.structure(updates)}\n  expected:  {jax.tree.structure(state.acc)}"
            )
        t = state.mini_step.astype(jnp.float32)
        acc = jax.tree.map(lambda a, g: (a + (g.astype(a.dtype) - a) / (t + 1.0)).astype(a.dtype), state.acc, updates)

        def apply(_):
            mean = jax.tree.map(lambda a, g: a.astype(g.dtype), acc, updates)
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            return new_updates, jax.tree.map(jnp.zeros_like, acc), inner_state, state.gradient_step + 1

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
