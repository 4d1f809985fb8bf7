"""Accuracy of the benchmark's probes and a membership-inference AUROC, in one forward pass.

A probe is correct when the greedy next token over the whole vocabulary is its answer
(`jax_unlearn.eval.answer_accuracy`). ``mia_auroc`` is the LOSS attack between forget and
unseen people: ``P(NLL_unseen > NLL_forget)`` over (unseen, forget) person pairs, each person
scored by the mean answer NLL of its probes (1.0 before unlearning: the model knows the
forget people; 0.5: indistinguishable from people it never saw; below 0.5: forget people now
look *less* familiar than strangers).
"""

from __future__ import annotations

import numpy as np

from jax_unlearn.bench.tokens import ProbeRows
from jax_unlearn.eval import answer_accuracy
from jax_unlearn.eval.mia import auroc

GROUPS = ("forget", "retain", "heldout", "heldout_neighbour", "heldout_other", "general", "unseen")


def probe_predictions(model, rows: ProbeRows, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(correct [n] bool, answer_nll [n])`` of every probe."""
    result = answer_accuracy(model, rows.contexts, rows.answer, batch_size=batch_size)
    return result.correct, -result.logprob


def _person_nll(rows: ProbeRows, nll: np.ndarray, group: str) -> np.ndarray:
    sel = rows.group == group
    subjects, inverse = np.unique(rows.subject[sel], return_inverse=True)
    return np.bincount(inverse, weights=nll[sel]) / np.bincount(inverse)


def evaluate(model, rows: ProbeRows) -> dict[str, float | None]:
    """``{GROUP_acc: accuracy}`` for every group in `GROUPS` (``heldout`` = both held-out kinds;
    ``None`` for a group without probes) plus ``mia_auroc`` (forget vs unseen people; ``None``
    when a diverged model gives non-finite losses)."""
    correct, nll = probe_predictions(model, rows)
    out: dict[str, float | None] = {}
    for g in GROUPS:
        sel = np.char.startswith(rows.group.astype(str), g) if g == "heldout" else rows.group == g
        out[f"{g}_acc"] = float(correct[sel].mean()) if sel.any() else None
    f, u = _person_nll(rows, nll, "forget"), _person_nll(rows, nll, "unseen")
    finite = f.size and u.size and np.isfinite(f).all() and np.isfinite(u).all()
    out["mia_auroc"] = auroc(f, u) if finite else None
    return out
