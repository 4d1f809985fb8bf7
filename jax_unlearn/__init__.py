"""jax_unlearn: asymmetric two-task LLM unlearning in JAX (retain primary, forget auxiliary)."""

from jax_unlearn.accumulate import TwoTaskMultiStepsState, two_task_multi_steps
from jax_unlearn.combiners import (
    COMBINERS,
    CombinerState,
    TwoTaskGrads,
    global_diagnostics,
    pcgrad,
    per_leaf_diagnostics,
    sago,
    weighted_sum,
)

__version__ = "0.1.0"

__all__ = [
    "COMBINERS",
    "CombinerState",
    "TwoTaskGrads",
    "TwoTaskMultiStepsState",
    "global_diagnostics",
    "pcgrad",
    "per_leaf_diagnostics",
    "sago",
    "two_task_multi_steps",
    "weighted_sum",
]
