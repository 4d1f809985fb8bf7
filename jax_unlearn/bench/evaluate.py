"""Accuracy of the benchmark's probes, a membership-inference AUROC, and metrics against the gold model.

A probe is correct when the greedy next token over the whole vocabulary is its answer
(`jax_unlearn.eval.answer_accuracy`). ``mia_auroc`` is the LOSS attack between forget and
unseen people: ``P(NLL_unseen > NLL_forget)`` over (unseen, forget) person pairs, each person
scored by the mean answer NLL of its probes (1.0 before unlearning: the model knows the
forget people; 0.5: indistinguishable from people it never saw; below 0.5: forget people now
look *less* familiar than strangers).

Against the gold model (retrained without the forget people, `Gold`):

- ``forget_quality``: the p-value of a two-sample Kolmogorov-Smirnov test (scipy) between the
  unlearned and the gold model's probability of the true answer, ``p(answer | question)``,
  over the forget people's probes (TOFU's forget quality, with the answer probability as the
  per-probe statistic: every answer is one token, so no perturbed answers are needed). High:
  the two distributions are indistinguishable; near 0: the model still knows (or over-forgot).
- ``privleak``: ``(AUC - AUC_gold) / AUC_gold`` of the MIA AUROC (MUSE's PrivLeak): 0 is exact
  unlearning, positive under-unlearning, negative over-unlearning.
- ``*_rel``: accuracy divided by the gold model's (retain, held-out, neighbours, others, general).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_unlearn.bench.tokens import ProbeRows
from jax_unlearn.eval import answer_accuracy
from jax_unlearn.eval.mia import auroc

GROUPS = ("forget", "retain", "heldout", "heldout_neighbour", "heldout_other", "general", "unseen")
RELATIVE = ("retain", "heldout", "heldout_neighbour", "heldout_other", "general")


@dataclasses.dataclass(frozen=True)
class Gold:
    """The gold model's metrics (`evaluate`) and its probability of the true answer on each
    forget probe (``forget_p [n_forget_probes]``)."""

    metrics: dict
    forget_p: np.ndarray


def probe_predictions(model, rows: ProbeRows, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(correct [n] bool, answer_nll [n])`` of every probe."""
    result = answer_accuracy(model, rows.contexts, rows.answer, batch_size=batch_size)
    return result.correct, -result.logprob


def _person_nll(rows: ProbeRows, nll: np.ndarray, group: str) -> np.ndarray:
    sel = rows.group == group
    subjects, inverse = np.unique(rows.subject[sel], return_inverse=True)
    return np.bincount(inverse, weights=nll[sel]) / np.bincount(inverse)


def forget_quality(forget_p: np.ndarray, gold_p: np.ndarray) -> float | None:
    """KS-test p-value between two samples of answer probabilities (None if either is not finite)."""
    from scipy.stats import ks_2samp

    if not (np.isfinite(forget_p).all() and np.isfinite(gold_p).all()):
        return None
    return float(ks_2samp(forget_p, gold_p).pvalue)


def _evaluate(model, rows: ProbeRows) -> tuple[dict, np.ndarray]:
    correct, nll = probe_predictions(model, rows)
    out: dict[str, float | None] = {}
    for g in GROUPS:
        sel = np.char.startswith(rows.group.astype(str), g) if g == "heldout" else rows.group == g
        out[f"{g}_acc"] = float(correct[sel].mean()) if sel.any() else None
    f, u = _person_nll(rows, nll, "forget"), _person_nll(rows, nll, "unseen")
    finite = f.size and u.size and np.isfinite(f).all() and np.isfinite(u).all()
    out["mia_auroc"] = auroc(f, u) if finite else None
    return out, np.exp(-nll[rows.group == "forget"])


def gold_reference(model, rows: ProbeRows) -> Gold:
    """Evaluates the gold model once per world."""
    metrics, forget_p = _evaluate(model, rows)
    return Gold(metrics, forget_p)


def evaluate(model, rows: ProbeRows, gold: Gold | None = None) -> dict[str, float | None]:
    """``{GROUP_acc: accuracy}`` for every group in `GROUPS` (``heldout`` = both held-out kinds;
    ``None`` for a group without probes) plus ``mia_auroc`` (forget vs unseen people; ``None``
    when a diverged model gives non-finite losses); with ``gold`` also ``forget_quality``,
    ``privleak`` and ``GROUP_rel`` (see the module docstring)."""
    out, forget_p = _evaluate(model, rows)
    if gold is None:
        return out
    g = gold.metrics
    out["forget_quality"] = forget_quality(forget_p, gold.forget_p)
    auc, auc_gold = out["mia_auroc"], g["mia_auroc"]
    out["privleak"] = None if auc is None or not auc_gold else (auc - auc_gold) / auc_gold
    for group in RELATIVE:
        a, b = out[f"{group}_acc"], g[f"{group}_acc"]
        out[f"{group}_rel"] = None if a is None or not b else a / b
    return out
