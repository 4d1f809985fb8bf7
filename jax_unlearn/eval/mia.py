"""Membership-inference attacks: per-text scores and AUROC between a forget and a holdout set.

A text ``x_1..x_n`` is scored after the prefix token (BOS, else EOS) with
``l_t = log p(x_t | prefix, x_<t)``; texts longer than ``max_length`` keep their first
``max_length`` tokens. Every score is a *non-membership* score (higher = the model finds the
text less familiar), as in open-unlearning:

* LOSS: ``-(1/n) sum_t l_t`` (mean token NLL);
* ZLib: ``LOSS / len(zlib.compress(text.encode("utf-8")))``;
* Min-K% (``k = 0.4``): ``-mean`` of the ``max(1, floor(k n))`` smallest ``l_t``;
* Min-K%++: with ``mu_t = sum_v p_v log p_v`` and ``var_t = sum_v p_v (log p_v - mu_t)^2`` of the
  model's next-token distribution at step ``t``, ``z_t = (l_t - mu_t) / sqrt(var_t)``
  (``var_t`` floored at ``1e-12``); ``-mean`` of the ``max(1, floor(k n))`` smallest ``z_t``.

``AUROC(forget, holdout) = P(s_holdout > s_forget) + 0.5 P(s_holdout = s_forget)`` over all
pairs, ``= U / (n_f n_h)`` with scipy's Mann-Whitney ``U`` of the holdout scores: near 1 when
the model still recognises the forget set, 0.5 when forget and holdout look alike.

These four scores and the AUC are open-unlearning's formulas (``src/evals/metrics/mia/``; the
AUC is their ``roc_auc_score`` with forget rows labelled 0) applied to a plain text. Where the
two differ (`jax_unlearn.eval.open_unlearning` and `evaluate_tofu` / `evaluate_muse` compute
theirs exactly; ``docs/reference.md``, section 13):

* the scored span: here every token of the text after the prefix token; there a row's *label
  tokens* (a TOFU answer and its EOS, a MUSE text after BOS), and Min-K%/Min-K%++ drop the last
  of them (their ``tokenwise_logprobs``);
* Min-K%++: the variance is floored at ``1e-12`` here, clamped at ``1e-6`` there;
* ZLib: the compressed length of the text itself here, of its decoded label tokens there;
* length: here the first ``max_length`` tokens; there 512-token QA rows (TOFU) or the prefix plus
  2048 text tokens (MUSE);
* ``k = 0.4`` is their configs' value (their class default 0.2 is always overridden).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_unlearn.data import as_text, nonempty

from . import scoring
from .tokens import encode_many, prefix_token_id

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


@dataclasses.dataclass(frozen=True)
class MIAScores:
    """Per-text scores ``[n]`` of each attack (higher = less likely a member)."""

    loss: np.ndarray
    zlib: np.ndarray
    min_k: np.ndarray
    min_k_plus_plus: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {a: getattr(self, a) for a in ATTACKS}


def _check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    return float(k)


def _lowest_mean(values: np.ndarray, k: float) -> float:
    n = max(1, int(len(values) * k))
    return float(np.mean(np.sort(values)[:n]))


def zlib_length(text: str) -> int:
    """Bytes of ``zlib.compress(text.encode("utf-8"))``."""
    return len(zlib.compress(text.encode("utf-8")))


def scores_from_token_stats(logp: np.ndarray, mu: np.ndarray, var: np.ndarray, text: str,
                            k: float = 0.4) -> dict[str, float]:
    """The four attack scores of one text from its token log-probs ``logp [n]`` and the
    next-token distribution's ``mu [n]`` and ``var [n]`` (see the module docstring)."""
    k = _check_k(k)
    logp, mu, var = (np.asarray(a, np.float64) for a in (logp, mu, var))
    if logp.size == 0:
        raise ValueError("a text needs at least one scored token")
    loss = float(-np.mean(logp))
    z = (logp - mu) / np.sqrt(np.maximum(var, 1e-12))
    return {"loss": loss, "zlib": loss / zlib_length(text), "min_k": -_lowest_mean(logp, k),
            "min_k_plus_plus": -_lowest_mean(z, k)}


def mia_scores(model: Any, tokenizer: Any, texts: Sequence[Any], *, k: float = 0.4, batch_size: int = 8,
               max_length: int | None = None) -> MIAScores:
    """LOSS, ZLib, Min-K% and Min-K%++ scores of each text (strings or records with ``text``)."""
    k = _check_k(k)
    texts = [as_text(t, f"text {i}") for i, t in enumerate(nonempty(texts, "texts to score"))]
    prefix = prefix_token_id(tokenizer)
    pairs = []
    for i, (t, ids) in enumerate(zip(texts, encode_many(tokenizer, texts, add_special_tokens=False))):
        if not ids:
            raise ValueError(f"text {i} has no tokens to score: {t!r}")
        pairs.append(([prefix], ids))
    stats = scoring.token_statistics(model, pairs, moments=True, batch_size=batch_size, max_length=max_length,
                                     pad_id=getattr(tokenizer, "pad_token_id", None) or 0)
    rows = [scores_from_token_stats(s["logp"], s["mu"], s["var"], t, k) for s, t in zip(stats, texts)]
    return MIAScores(**{a: np.array([r[a] for r in rows]) for a in ATTACKS})


def auroc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """``P(holdout > forget) + 0.5 P(tie)`` over all pairs (Mann-Whitney ``U / (n_h n_f)``)."""
    from scipy.stats import mannwhitneyu

    f = np.asarray(forget_scores, np.float64).reshape(-1)
    h = np.asarray(holdout_scores, np.float64).reshape(-1)
    for name, a in (("forget", f), ("holdout", h)):
        if a.size == 0:
            raise ValueError(f"the {name} set of scores is empty")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"the {name} scores contain NaN or infinite values")
    u = mannwhitneyu(h, f, alternative="two-sided", method="asymptotic").statistic
    return float(u / (h.size * f.size))


def mia_auroc(model: Any, tokenizer: Any, forget_texts: Sequence[Any], holdout_texts: Sequence[Any], *,
              k: float = 0.4, batch_size: int = 8, max_length: int | None = None) -> dict[str, float]:
    """AUROC of every attack between ``forget_texts`` and ``holdout_texts``: ``{attack: auroc}``."""
    forget_texts = nonempty(forget_texts, "forget texts")
    holdout_texts = nonempty(holdout_texts, "holdout texts")
    kw = dict(k=k, batch_size=batch_size, max_length=max_length)
    f = mia_scores(model, tokenizer, forget_texts, **kw).as_dict()
    h = mia_scores(model, tokenizer, holdout_texts, **kw).as_dict()
    return {a: auroc(f[a], h[a]) for a in ATTACKS}
