"""The metric maths of jax_unlearn.eval.open_unlearning equal restatements of open-unlearning's code.

The ``ou_*`` functions of ``tests/ou_reference.py`` restate, in torch/NumPy, the lines of locuslab/open-unlearning at
``d3d7cf9`` cited in its docstring (``src/evals/metrics/...``), with the model call replaced by
given logits; the library's functions get what our scoring kernel computes from the same logits
(per label token: log-prob, argmax hit, mean and variance of log p). Agreement is to 1e-9 in
float64. GradNorm, which needs a model, is checked against open-unlearning's torch code in the
TOFU and MUSE end-to-end tests (tests/test_eval_tofu.py, tests/test_eval_muse.py).
"""

import zlib

import numpy as np
import pytest
import torch
from ou_reference import (
    IGNORE,
    ou_evaluate_probability,
    ou_exact_memorization,
    ou_extraction_strength,
    ou_min_k,
    ou_min_k_plus_plus,
    ou_privleak,
    ou_probability_w_options,
    ou_tokenwise_logprobs,
    ou_tokenwise_vocab_logprobs,
    ou_truth_ratio,
)
from scipy import stats as sc_stats
from sklearn.metrics import roc_auc_score

from jax_unlearn.eval import open_unlearning as ou

TOL = dict(rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- our per-token statistics
def our_token_stats(logits: np.ndarray, labels: np.ndarray) -> list[dict]:
    """What `scoring.token_statistics` returns per row, from the same logits (float64): over the
    positions ``t`` with ``labels[t+1] != -100``: logp, hit, mu, var."""
    out = []
    for lg, lab in zip(logits, labels):
        lsm = lg[:-1] - lg[:-1].max(-1, keepdims=True)
        lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
        t = np.flatnonzero(lab[1:] != IGNORE)
        y = lab[1:][t]
        p = np.exp(lsm[t])
        mu = (p * lsm[t]).sum(-1)
        out.append({"logp": lsm[t, y], "hit": (lg[:-1][t].argmax(-1) == y).astype(float), "mu": mu,
                    "var": (p * (lsm[t] - mu[:, None]) ** 2).sum(-1)})
    return out


def batch_with_hits(seed: int, b: int = 6, s: int = 14, vocab: int = 11):
    """Right-padded QA-like rows (prompt without labels, answer with), logits that make some label
    tokens the argmax (so extraction suffixes of every length occur)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, s))
    labels = np.full((b, s), IGNORE)
    for i in range(b):
        n = int(rng.integers(4, s + 1))  # row length
        p = int(rng.integers(1, n - 1))  # prompt length (>= 1: index 0 never has a label)
        labels[i, p:n] = ids[i, p:n]
        ids[i, n:] = 0
    logits = rng.normal(size=(b, s, vocab)) * 2.0
    for i in range(b):
        idx = np.flatnonzero(labels[i, 1:] != IGNORE)
        cut = int(rng.integers(0, len(idx) + 1))  # positions from `cut` on are argmax hits, a few earlier too
        for j, t in enumerate(idx):
            if j >= cut or rng.random() < 0.3:
                logits[i, t, labels[i, t + 1]] += 12.0
    return logits, ids, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probability_and_avg_loss_equal_evaluate_probability(seed):
    logits, _, labels = batch_with_hits(seed)
    ref = ou_evaluate_probability(torch.tensor(logits), torch.tensor(labels))
    for r, s in zip(ref, our_token_stats(logits, labels)):
        assert ou.avg_loss(s["logp"]) == pytest.approx(r["avg_loss"], **TOL)
        assert ou.probability(s["logp"]) == pytest.approx(r["prob"], **TOL)
        assert ou.loss_score(s["logp"]) == pytest.approx(r["avg_loss"], **TOL)  # mia/loss.py:14-16


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [0.4, 0.2, 1.0])
def test_tokenwise_metrics_equal_open_unlearning(seed, k):
    logits, ids, labels = batch_with_hits(seed)
    lt, it, labt = torch.tensor(logits), torch.tensor(ids), torch.tensor(labels)
    token_lp = ou_tokenwise_logprobs(lt, it, labt)
    vocab_lp, vocab_lab = ou_tokenwise_vocab_logprobs(lt, labt)
    es_values = set()
    for i, s in enumerate(our_token_stats(logits, labels)):
        assert ou.exact_memorization(s["hit"]) == pytest.approx(ou_exact_memorization(vocab_lp[i], vocab_lab[i]), **TOL)
        ref_es = ou_extraction_strength(vocab_lp[i], vocab_lab[i])
        assert ou.extraction_strength(s["hit"]) == pytest.approx(ref_es, **TOL)
        es_values.add(round(ref_es, 6))
        assert ou.min_k_score(s["logp"], k) == pytest.approx(ou_min_k(token_lp[i], k), **TOL)
        assert ou.min_k_plus_plus_score(s["logp"], s["mu"], s["var"], k) == pytest.approx(
            ou_min_k_plus_plus(vocab_lp[i], token_lp[i], k), rel=1e-8)
    assert len(es_values) > 2  # the rows exercise different suffix lengths


def test_extraction_strength_definitions_on_known_rows():
    # kept tokens = all but the last label token
    assert ou.extraction_strength([1, 1, 1, 1, 0]) == 1.0
    assert ou.extraction_strength([0, 1, 1, 1, 1]) == pytest.approx(1 - 1 / 4)
    assert ou.extraction_strength([0, 0, 0, 1, 1]) == pytest.approx(1 - 3 / 4)
    # nothing extracted: open-unlearning's loop leaves k = n - 1 (1/n), the paper's definition gives 0
    assert ou.extraction_strength([1, 1, 0, 0, 1]) == pytest.approx(1 / 4)
    assert ou.extraction_strength([1, 1, 0, 0, 1], "paper") == 0.0
    assert ou.extraction_strength([0, 1, 1, 1, 1], "paper") == pytest.approx(1 - 1 / 4)
    assert ou.extraction_strength([1]) == 0.0 and ou.exact_memorization([1]) is None
    with pytest.raises(ValueError, match="extraction strength definition"):
        ou.extraction_strength([1, 1], "other")


def test_zlib_and_reference_scores():
    lp, ref = np.log([0.5, 0.25, 0.1]), np.log([0.9, 0.8, 0.7])
    text = "The heart pumps blood."
    # mia/zlib.py:25-29: loss / len(zlib.compress(text.encode("utf-8")))
    assert ou.zlib_score(lp, text) == pytest.approx(-lp.mean() / len(zlib.compress(text.encode("utf-8"))), **TOL)
    # mia/reference.py:23-25: target_loss - ref_loss
    assert ou.reference_score(lp, ref) == pytest.approx(-lp.mean() + ref.mean(), **TOL)


@pytest.mark.parametrize("aggregator", ["closer_to_1_better", "true_better", "prob_mean"])
def test_truth_ratio_equals_open_unlearning(aggregator):
    rng = np.random.default_rng(5)
    correct, wrong = rng.uniform(0.1, 3, size=20), rng.uniform(0.1, 3, size=(20, 5))
    ref_tr, ref_agg = ou_truth_ratio(correct, wrong, aggregator)
    tr = ou.truth_ratios(correct, list(wrong), aggregator=aggregator)
    np.testing.assert_allclose(tr, ref_tr, rtol=1e-12)
    assert ou.aggregate_truth_ratio(tr, aggregator) == pytest.approx(ref_agg, **TOL)


def test_truth_ratio_tofu_paper_definition_and_locuslab_tofu_code():
    rng = np.random.default_rng(6)
    para, pert = rng.uniform(0.1, 3, size=15), rng.uniform(0.1, 3, size=(15, 5))
    # the TOFU paper: R = mean_j P(a_j|q)^(1/|a_j|) / P(a~|q)^(1/|a~|), P^(1/|a|) = exp(-avg_loss)
    paper = np.exp(-pert).mean(1) / np.exp(-para)
    np.testing.assert_allclose(ou.truth_ratios(para, list(pert), definition="tofu_paper"), paper, rtol=1e-12)
    code = ou.truth_ratios(para, list(pert))
    assert np.all(paper >= code) and np.any(paper > code * 1.01)  # AM >= GM, strictly here
    # locuslab/tofu aggregate_eval_stat.py:64-71: curr_stat_1 = exp(mean pert loss - para loss) (true/false);
    # retain-like sets: mean(max(0, 1 - 1/curr_stat_1)), forget: mean(min(curr, 1/curr)): the same values
    curr = np.exp(pert.mean(-1) - para)
    assert ou.aggregate_truth_ratio(code, "true_better") == pytest.approx(np.mean(np.maximum(0, 1 - 1 / curr)), rel=1e-8)
    assert ou.aggregate_truth_ratio(code, "closer_to_1_better") == pytest.approx(
        np.mean(np.minimum(curr, 1 / curr)), rel=1e-8)
    # ragged perturbed sets: each item averages its own
    ragged = ou.truth_ratios([1.0, 2.0], [[1.0, 3.0], [0.5]])
    np.testing.assert_allclose(ragged, [np.exp(-2.0) / (np.exp(-1.0) + 1e-10), np.exp(-0.5) / (np.exp(-2.0) + 1e-10)])


def test_probability_w_options_equals_open_unlearning():
    rng = np.random.default_rng(7)
    correct, wrong = rng.uniform(0.1, 3, size=12), rng.uniform(0.1, 3, size=(12, 4))
    ref, ref_mean = ou_probability_w_options(np.exp(-correct), np.exp(-wrong))
    got = ou.probability_w_options(correct, list(wrong))
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert np.mean(got) == pytest.approx(ref_mean, **TOL)


def test_forget_quality_is_ks_pvalue_of_truth_ratios():
    rng = np.random.default_rng(8)
    a, b = rng.lognormal(0, 0.5, 40), rng.lognormal(0.3, 0.5, 40)
    # privacy.py:25 ks_2samp(forget_tr_stats, retain_tr_stats).pvalue
    ref = sc_stats.ks_2samp(a, b)
    fq = ou.forget_quality(a, b)
    assert fq["pvalue"] == pytest.approx(ref.pvalue, **TOL) and fq["statistic"] == pytest.approx(ref.statistic, **TOL)
    # utils.py:39-41 (get_forget_quality, on 1/tr) and locuslab/tofu (on true/false) give the same p-value
    assert sc_stats.ks_2samp(1 / (a + 1e-10), 1 / (b + 1e-10)).pvalue == pytest.approx(fq["pvalue"], **TOL)
    assert ou.forget_quality(a, a)["pvalue"] == pytest.approx(1.0)


def test_model_utility_is_harmonic_mean_of_nine_components():
    values = dict(zip(ou.MODEL_UTILITY_COMPONENTS, np.linspace(0.2, 0.9, 9)))
    # utility.py:13-16: sc.stats.hmean of the pre-computes' agg_values (model_utility.yaml lists nine)
    assert ou.model_utility(values) == pytest.approx(sc_stats.hmean(list(values.values())), **TOL)
    assert ou.model_utility(values) == pytest.approx(9 / sum(1 / v for v in values.values()), **TOL)
    assert len(ou.MODEL_UTILITY_COMPONENTS) == 9


def test_mia_auc_and_privleak_equal_open_unlearning():
    rng = np.random.default_rng(9)
    f, h = rng.normal(0, 1, 30).round(1), rng.normal(0.5, 1, 25).round(1)  # rounding makes ties
    # mia/utils.py:64-68: roc_auc_score(labels forget 0 / holdout 1, scores)
    ref = roc_auc_score(np.array([0] * 30 + [1] * 25), np.concatenate([f, h]))
    assert ou.mia_auc(f, h) == pytest.approx(ref, **TOL)
    for auc, retain in [(0.8, 0.55), (0.3, None), (0.5, 0.5)]:
        assert ou.privleak(auc, retain) == pytest.approx(ou_privleak(auc, 0.5 if retain is None else retain), **TOL)
    assert ou.rel_diff(0.6, 0.4) == pytest.approx((0.6 - 0.4) / (0.4 + 1e-10) * 100)

