"""Two-task gradient combiners as optax transformations (see docs/architecture.md).

- `jax_unlearn.combiners.core`: ``TwoTaskGrads``, the diagnostics and their state, the registry
  ``COMBINERS``, and ``weighted_sum``, ``pcgrad``, ``sago``.
- `jax_unlearn.combiners.unlearning`: ``blur``, ``gru``, ``ngdiff`` (from the unlearning papers).
- `jax_unlearn.combiners.aggregators`: ``mgda``, ``cagrad``, ``nash_mtl``, ``imtl_g``,
  ``aligned_mtl``, ``upgrad``, ``dual_proj``, ``grad_vac``, ``con_fig`` (multi-task aggregators
  over the Jacobian rows ``[forget, retain]``), on the closed forms of
  `jax_unlearn.combiners.weightings`.
- `jax_unlearn.combiners.adaptive`: ``scheduled`` (alpha/gamma as optax schedules) and
  ``conflict_adaptive`` (gamma driven by the measured conflict fraction), around any of them.

Importing the package registers every combiner in ``COMBINERS``, in the order below (configs, the
CLI help and the benchmark list them so).
"""

from jax_unlearn.combiners.adaptive import ConflictAdaptiveState, conflict_adaptive, scheduled
from jax_unlearn.combiners.aggregators import (
    GradVacMemory,
    NashMTLMemory,
    aligned_mtl,
    cagrad,
    con_fig,
    dual_proj,
    grad_vac,
    imtl_g,
    mgda,
    nash_mtl,
    upgrad,
)
from jax_unlearn.combiners.core import (
    COMBINERS,
    PCGRAD_EPS,
    STACK_AXIS,
    CombinerState,
    LeafStats,
    RetainBackward,
    StatefulCombinerState,
    TwoTaskGrads,
    acc_dtype,
    global_diagnostics,
    leaf_stats,
    materialize,
    pcgrad,
    per_leaf_diagnostics,
    sago,
    stacked_axes,
    weighted_sum,
)
from jax_unlearn.combiners.unlearning import BLUR_EPS, GRUMemory, blur, gru, ngdiff

for _name, _factory in (("blur", blur), ("gru", gru), ("ngdiff", ngdiff), ("mgda", mgda), ("cagrad", cagrad),
                        ("nash_mtl", nash_mtl), ("imtl_g", imtl_g), ("aligned_mtl", aligned_mtl),
                        ("upgrad", upgrad), ("dual_proj", dual_proj), ("grad_vac", grad_vac), ("con_fig", con_fig)):
    COMBINERS.register(_name, _factory)

__all__ = [
    "BLUR_EPS",
    "COMBINERS",
    "PCGRAD_EPS",
    "STACK_AXIS",
    "CombinerState",
    "ConflictAdaptiveState",
    "GRUMemory",
    "GradVacMemory",
    "LeafStats",
    "NashMTLMemory",
    "RetainBackward",
    "StatefulCombinerState",
    "TwoTaskGrads",
    "acc_dtype",
    "aligned_mtl",
    "blur",
    "cagrad",
    "con_fig",
    "conflict_adaptive",
    "dual_proj",
    "global_diagnostics",
    "grad_vac",
    "gru",
    "imtl_g",
    "leaf_stats",
    "materialize",
    "mgda",
    "nash_mtl",
    "ngdiff",
    "pcgrad",
    "per_leaf_diagnostics",
    "sago",
    "scheduled",
    "stacked_axes",
    "upgrad",
    "weighted_sum",
]
