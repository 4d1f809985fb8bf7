"""jax_unlearn: asymmetric two-task LLM unlearning in JAX (retain primary, forget auxiliary)."""

from jax_unlearn.accumulate import TwoTaskMultiStepsState, two_task_multi_steps
from jax_unlearn.combiners import (
    COMBINERS,
    CombinerState,
    StatefulCombinerState,
    TwoTaskGrads,
    aligned_mtl,
    blur,
    cagrad,
    con_fig,
    dual_proj,
    global_diagnostics,
    grad_vac,
    gru,
    imtl_g,
    mgda,
    nash_mtl,
    ngdiff,
    pcgrad,
    per_leaf_diagnostics,
    sago,
    upgrad,
    weighted_sum,
)

__version__ = "0.1.0"

__all__ = [
    "COMBINERS",
    "CombinerState",
    "StatefulCombinerState",
    "TwoTaskGrads",
    "TwoTaskMultiStepsState",
    "aligned_mtl",
    "blur",
    "cagrad",
    "con_fig",
    "dual_proj",
    "global_diagnostics",
    "grad_vac",
    "gru",
    "imtl_g",
    "mgda",
    "nash_mtl",
    "ngdiff",
    "pcgrad",
    "per_leaf_diagnostics",
    "sago",
    "two_task_multi_steps",
    "upgrad",
    "weighted_sum",
]
