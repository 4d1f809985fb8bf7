"""The metric maths of jax_unlearn.eval.open_unlearning equal restatements of open-unlearning's code.

Each ``ou_*`` function below restates, in torch/NumPy, the lines of locuslab/open-unlearning at
``d3d7cf9`` cited in its docstring (``src/evals/metrics/...``), with the model call replaced by
given logits; the library's functions get what our scoring kernel computes from the same logits
(per label token: log-prob, argmax hit, mean and variance of log p). Agreement is to 1e-9 in
float64, except GradNorm (a float32 backward pass of two frameworks: 1e-4 relative).
"""

import zlib

import numpy as np
import pytest
import torch
from hf_fixtures import checkpoint
from scipy import stats as sc_stats
from sklearn.metrics import roc_auc_score

from jax_unlearn.eval import open_unlearning as ou
from jax_unlearn.eval.ou_scoring import Row, grad_norms
from jax_unlearn.models import load_hf

IGNORE = -100
TOL = dict(rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- restatements of open-unlearning
def ou_evaluate_probability(logits: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """src/evals/metrics/utils.py:82-103 (``evaluate_probability``), model output = ``logits``."""
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, reduction="none")
    losses = loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)
    num_token_gt = (labels != IGNORE).sum(-1)
    avg_losses = losses / num_token_gt
    normalized_probs = torch.exp(-avg_losses)
    return [{"prob": p, "avg_loss": a} for p, a in zip(normalized_probs.tolist(), avg_losses.tolist())]


def ou_tokenwise_logprobs(logits, input_ids, labels):
    """src/evals/metrics/utils.py:106-146 (``tokenwise_logprobs``)."""
    bsz = logits.shape[0]
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    next_tokens = input_ids[:, 1:].unsqueeze(-1)
    target_log_probs = torch.gather(log_probs, dim=2, index=next_tokens).squeeze(-1)
    out = []
    for i in range(bsz):
        actual_indices = (labels[i] != IGNORE).nonzero(as_tuple=True)[0][:-1]
        if actual_indices.numel() == 0:
            out.append(torch.tensor([], dtype=logits.dtype))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        out.append(target_log_probs[i, start_idx - 1:end_idx])
    return out


def ou_tokenwise_vocab_logprobs(logits, labels):
    """src/evals/metrics/utils.py:149-190 (``tokenwise_vocab_logprobs``, ``return_labels=True``)."""
    V = logits.shape[-1]
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    lps, labs = [], []
    for i in range(logits.shape[0]):
        actual_indices = (labels[i] != IGNORE).nonzero(as_tuple=True)[0][:-1]
        if len(actual_indices) == 0:
            labs.append(torch.tensor([], dtype=torch.long))
            lps.append(torch.zeros(0, V, dtype=logits.dtype))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        lps.append(log_probs[i, start_idx - 1:end_idx])
        labs.append(labels[i][actual_indices])
    return lps, labs


def ou_exact_memorization(log_probs, labels):
    """src/evals/metrics/memorization.py:189-204 (the division in float64; torch's int/int is float32)."""
    valid_len = len(labels)
    if valid_len == 0:
        return None
    preds = torch.argmax(log_probs, dim=-1)
    return ((preds == labels).sum().double() / valid_len).item()


def ou_extraction_strength(log_probs, labels):
    """src/evals/metrics/memorization.py:234-254."""
    valid_len = len(labels)
    preds = torch.argmax(log_probs, dim=-1)
    for k in range(valid_len):
        suff_preds = preds[k:]
        suff_labels = labels[k:]
        if torch.equal(suff_preds, suff_labels):
            break
    if valid_len == 0:
        return 0
    return 1 - (k / valid_len)


def ou_min_k(lp: torch.Tensor, k: float):
    """src/evals/metrics/mia/min_k.py:18-26 (``compute_score``; float64 kept, their ``.float()`` would round)."""
    lp = lp.float().cpu().numpy() if lp.dtype != torch.float64 else lp.numpy()
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ou_min_k_plus_plus(all_probs, target_prob, k: float):
    """src/evals/metrics/mia/min_k_plus_plus.py:17-39 (``compute_score``), in float64."""
    if len(target_prob) == 0:
        return 0
    mu = (torch.exp(all_probs) * all_probs).sum(-1)
    sigma = (torch.exp(all_probs) * torch.square(all_probs)).sum(-1) - torch.square(mu)
    sigma = torch.clamp(sigma, min=1e-6)
    scores = (target_prob.numpy() - mu.numpy()) / torch.sqrt(sigma).numpy()
    num_k = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num_k])


def ou_truth_ratio(correct_avg_losses, wrong_avg_losses, aggregator):
    """src/evals/metrics/memorization.py:114-173 (``truth_ratio``)."""
    def closer_to_1_better(arr):
        return np.mean(np.minimum(arr, 1 / (arr + 1e-10)))

    def true_better(arr):
        return np.mean(np.maximum(0, 1 - arr))

    def prob_mean(arr):
        return np.mean(arr)

    agg = {"closer_to_1_better": closer_to_1_better, "true_better": true_better, "prob_mean": prob_mean}[aggregator]
    correct = np.mean(np.array(correct_avg_losses), axis=tuple(range(1, np.array(correct_avg_losses).ndim)))
    wrong = np.mean(np.array(wrong_avg_losses), axis=tuple(range(1, np.array(wrong_avg_losses).ndim)))
    correct_prob, wrong_prob = np.exp(-correct), np.exp(-wrong)
    if aggregator != "prob_mean":
        tr = wrong_prob / (correct_prob + 1e-10)
    else:
        tr = correct_prob / (correct_prob + wrong_prob + 1e-10)
    return tr, agg(tr)


def ou_probability_w_options(correct_prob, all_wrong):
    """src/evals/metrics/memorization.py:62-72."""
    correct, all_wrong = np.array(correct_prob), np.array(all_wrong)
    wrong = np.sum(all_wrong, axis=tuple(range(1, all_wrong.ndim)))
    probs = correct / (correct + wrong + 1e-10)
    return probs, np.mean(probs)


def ou_privleak(score, ref):
    """src/evals/metrics/privacy.py:50-52."""
    score, ref = 1 - score, 1 - ref
    return (score - ref) / (ref + 1e-10) * 100


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


def ou_gradnorm(model, input_ids, attention_mask, labels, ps):
    """src/evals/metrics/mia/gradnorm.py:19-34 on a batch of one row, with ``tokenwise_logprobs``
    (utils.py:106-146, ``grad=True``); the norms of one backward pass for each ``p`` in ``ps``."""
    model.train()
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    lps = ou_tokenwise_logprobs(out.logits, input_ids, labels)[0]
    (-torch.mean(lps)).backward()
    result = {}
    for p in ps:
        norms = [param.grad.detach().norm(p=p) for param in model.parameters() if param.grad is not None]
        result[p] = torch.stack(norms).mean().item()
    model.eval()
    model.zero_grad(set_to_none=True)  # the checkpoint's model is shared by other tests
    return result


def test_gradnorm_equals_open_unlearning_torch():
    folder, hf = checkpoint("llama_gqa", seed=4)  # biases and an untied head: 30 parameter tensors
    model = load_hf(folder)
    rng = np.random.default_rng(3)
    rows = []
    for n_ctx, n_tgt in [(3, 5), (6, 2), (2, 7)]:  # one padded length: one compilation
        ids = rng.integers(3, 120, size=n_ctx + n_tgt).tolist()
        rows.append(Row((1, *ids[:n_ctx - 1]), tuple(ids[n_ctx - 1:]), (), ""))
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2})()
    ps = (2, 1, float("inf"))
    refs = []
    for r in rows:
        ids = torch.tensor([list(r.context) + list(r.target)])
        labels = torch.tensor([[IGNORE] * len(r.context) + list(r.target)])
        refs.append(ou_gradnorm(hf, ids, torch.ones_like(ids), labels, ps))
    for p in ps:
        ours = grad_norms(model, tok, rows, p=p, batch_size=2)
        for got, ref in zip(ours, refs):
            assert got == pytest.approx(ref[p], rel=1e-4), p
        assert len({round(v, 5) for v in ours}) == len(rows)


def test_gradnorm_counts_each_layer_of_a_scanned_stack_as_one_tensor():
    from flax import nnx

    from jax_unlearn.models import CausalLM, ModelConfig, ModelOptions
    from jax_unlearn.step import per_example_grad_norms

    cfg = ModelConfig(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1)
    plain = CausalLM(cfg, rngs=nnx.Rngs(0))
    scanned = CausalLM(cfg, ModelOptions(scan_layers=True), rngs=nnx.Rngs(1))
    flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    state = nnx.state(scanned, nnx.Param)
    for path, var in nnx.to_flat_state(state):  # the plain model's weights, stacked
        var.set_value(np.stack([np.asarray(flat[("layers", i, *path[1:])].get_value()) for i in range(3)])
                      if path[0] == "layers" else np.asarray(flat[path].get_value()))
    nnx.update(scanned, state)
    ids = np.array([[1, 2, 3, 4, 5], [0, 1, 6, 7, 8]], np.int32)
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32),
             "labels": np.where(np.arange(5) >= 2, ids, IGNORE).astype(np.int32)}
    for p in (1, 2, float("inf")):
        a, b = per_example_grad_norms(plain, batch, p=p), per_example_grad_norms(scanned, batch, p=p)
        np.testing.assert_allclose(a, b, rtol=1e-5)
        assert np.all(a > 0)
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        per_example_grad_norms(plain, batch, p=3)
