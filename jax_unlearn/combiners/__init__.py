"""Two-task gradient combiners as optax transformations (see docs/architecture.md).

- `jax_unlearn.combiners.core`: ``TwoTaskGrads``, the diagnostics and their state, the registry
  ``COMBINERS``, and ``weighted_sum``, ``pcgrad``, ``sago``.

Importing the package registers every combiner in ``COMBINERS``.
"""

from jax_unlearn.combiners.core import (
    COMBINERS,
    PCGRAD_EPS,
    STACK_AXIS,
    CombinerState,
    LeafStats,
    StatefulCombinerState,
    TwoTaskGrads,
    acc_dtype,
    global_diagnostics,
    leaf_stats,
    pcgrad,
    per_leaf_diagnostics,
    sago,
    stacked_axes,
    weighted_sum,
)

__all__ = [
    "COMBINERS",
    "PCGRAD_EPS",
    "STACK_AXIS",
    "CombinerState",
    "LeafStats",
    "StatefulCombinerState",
    "TwoTaskGrads",
    "acc_dtype",
    "global_diagnostics",
    "leaf_stats",
    "pcgrad",
    "per_leaf_diagnostics",
    "sago",
    "stacked_axes",
    "weighted_sum",
]
