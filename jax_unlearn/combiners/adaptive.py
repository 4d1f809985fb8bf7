"""Combiner weights that change during a run: schedules, and one rule driven by the conflicts.

- `scheduled`: ``alpha`` and ``gamma`` as optax schedules of the update count, through
  ``optax.inject_hyperparams`` (the state's ``hyperparams`` hold the last update's weights).
- `conflict_adaptive`: the forget weight follows the measured sign-conflict fraction ``c``
  (the share of coordinates where ``sign(g_f) * sign(g_r) < 0``, the combiners' diagnostic):

      gamma_t = gamma * clip(((1 - cbar_t) / (1 - c_1)) ** power, floor, 1)

  ``c_1`` is the first update's conflict fraction and ``cbar_t`` an exponential moving average
  (decay ``ema``) of the fractions of updates ``1 .. t-1`` (``gamma_1 = gamma``). The share of
  coordinates where forgetting and retention agree is the room forgetting has without working
  against retention; when it shrinks below its starting value the forget weight shrinks with it
  (``power`` sharpens the response), and it never grows above ``gamma``: retention is the primary
  task. The rule scales ``gamma`` rather than integrating an error on ``c``, because the sign
  conflicts of two gradients do not depend on how they are weighted (a controller that raised
  ``gamma`` until ``c`` reached a target would saturate). ``alpha`` stays fixed.

Both wrap any registered combiner factory (``jax_unlearn.sago``, ...): the update is the
factory's with the weights of that step, so every guarantee of the combiner holds at each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax.numpy as jnp
import optax

from jax_unlearn.combiners.core import check_number

_F32 = jnp.float32


def scheduled(factory: Callable[..., optax.GradientTransformation], alpha: optax.ScalarOrSchedule = 1.0,
              gamma: optax.ScalarOrSchedule = 1.0, **settings: Any) -> optax.GradientTransformation:
    """``factory(alpha=alpha(t), gamma=gamma(t), **settings)`` at update ``t`` (0-based): numbers
    stay constant, callables are optax schedules (``optax.linear_schedule(1.0, 0.2, 500)``).
    Other settings are fixed (passed as static arguments).

    >>> import optax, jax_unlearn as ju
    >>> tx = scheduled(ju.sago, gamma=optax.linear_schedule(1.0, 0.25, 100))
    >>> sorted(tx.init({}).hyperparams)
    ['alpha', 'gamma']
    """
    return optax.inject_hyperparams(factory, static_args=tuple(settings), hyperparam_dtype=_F32)(
        alpha=alpha, gamma=gamma, **settings)


class ConflictAdaptiveState(NamedTuple):
    """`conflict_adaptive`'s state (float32 scalars but ``count``) and the wrapped combiner's."""

    count: chex.Array  # int32 updates taken
    first: chex.Array  # c_1, the first update's conflict fraction
    average: chex.Array  # cbar, the moving average of the conflict fractions so far
    gamma: chex.Array  # the forget weight of the next update
    inner: Any  # the combiner's state (its diagnostics: the last update's)


def adaptive_factor(first: chex.Array, average: chex.Array, power: float, floor: float) -> chex.Array:
    """``clip(((1 - average) / (1 - first)) ** power, floor, 1)`` (float32; ``first = 1``, every
    coordinate in conflict at the start, counts as a ratio of 1)."""
    agree_now = jnp.maximum(1.0 - average.astype(_F32), 0.0)
    agree_first = 1.0 - first.astype(_F32)
    ratio = jnp.where(agree_first > 0, agree_now / jnp.where(agree_first > 0, agree_first, 1.0), 1.0)
    return jnp.clip(ratio ** power, floor, 1.0)


def conflict_adaptive(factory: Callable[..., optax.GradientTransformation], alpha: float = 1.0,
                      gamma: float = 1.0, power: float = 2.0, ema: float = 0.9, floor: float = 0.1,
                      **settings: Any) -> optax.GradientTransformation:
    """``factory(alpha, gamma_t, **settings)`` with ``gamma_t`` from the conflict fractions the
    combiner measured at the previous updates (the module docstring's rule).

    Args:
      factory: a combiner factory taking ``alpha`` and ``gamma`` (any of `COMBINERS`); its
        diagnostics must be on (they measure ``c``).
      alpha, gamma: the retain weight and the starting (largest) forget weight, >= 0.
      power: exponent of the agreement ratio, >= 0 (0: ``gamma`` constant).
      ema: decay of the moving average of ``c``, in [0, 1) (0: the last update's ``c``).
      floor: the smallest factor applied to ``gamma``, in [0, 1].

    Returns:
      An ``optax.GradientTransformation`` over ``TwoTaskGrads``; its state is a
      `ConflictAdaptiveState` (``gamma``: the next weight) around the combiner's, whose
      diagnostics ``optax.tree_utils.tree_get`` finds as for the combiner alone.
    """
    if settings.get("diagnostics") is False:
        raise ValueError("conflict_adaptive reads the combiner's conflict fraction: diagnostics must stay on")
    check_number("conflict_adaptive", "power", power, 0.0)
    check_number("conflict_adaptive", "ema", ema, 0.0, 1.0)
    if ema == 1.0:
        raise ValueError("conflict_adaptive: ema must lie in [0, 1), got 1.0 (the average would never move)")
    check_number("conflict_adaptive", "floor", floor, 0.0, 1.0)
    base = factory(alpha=alpha, gamma=gamma, **settings)  # checks the weights and settings now

    def init_fn(params):
        # each field its own buffer (a state whose fields shared one could not be donated)
        return ConflictAdaptiveState(jnp.zeros((), jnp.int32), jnp.zeros((), _F32), jnp.zeros((), _F32),
                                     jnp.full((), gamma, _F32), base.init(params))

    def update_fn(updates, state, params=None):
        u, inner = factory(alpha=alpha, gamma=state.gamma, **settings).update(updates, state.inner, params)
        c = optax.tree_utils.tree_get(inner, "conflict_fraction").astype(_F32)
        start = state.count == 0
        first = jnp.where(start, c, state.first)
        average = jnp.where(start, c, ema * state.average + (1.0 - ema) * c)
        g = jnp.asarray(gamma, _F32) * adaptive_factor(first, average, power, floor)
        return u, ConflictAdaptiveState(state.count + 1, first, average, g, inner)

    return optax.GradientTransformation(init_fn, update_fn)
