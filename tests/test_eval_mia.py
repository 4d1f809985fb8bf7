"""Membership inference: scores equal NumPy statements of their formulas; AUROC on hand-checked values."""

import zlib

import numpy as np
import pytest
import torch
from test_eval_fixtures import HOLDOUT, TEXTS, exported

from jax_unlearn.eval import ATTACKS, auroc, mia_auroc, mia_scores


def numpy_scores(hf, tok, text: str, k: float = 0.4, max_length: int | None = None) -> dict[str, float]:
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    if max_length is not None:
        ids = ids[:max_length + 1]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].double().numpy()
    lsm = logits - logits.max(-1, keepdims=True)
    lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))              # log softmax [n, V]
    logp = lsm[np.arange(len(ids) - 1), ids[1:]]                        # log p(x_t | x_<t)
    p = np.exp(lsm)
    mu = (p * lsm).sum(-1)                                              # E[log p]
    sigma = np.sqrt((p * lsm ** 2).sum(-1) - mu ** 2)                   # std of log p
    n_k = max(1, int(len(logp) * k))
    loss = -logp.mean()
    return {"loss": loss,
            "zlib": loss / len(zlib.compress(text.encode("utf-8"))),
            "min_k": -np.sort(logp)[:n_k].mean(),
            "min_k_plus_plus": -np.sort((logp - mu) / sigma)[:n_k].mean()}


@pytest.mark.parametrize("k,max_length", [(0.4, None), (0.2, 6)])
def test_scores_equal_numpy_formulas(k, max_length):
    _, model, tok, hf = exported()
    ours = mia_scores(model, tok, TEXTS, k=k, max_length=max_length, batch_size=4).as_dict()
    for i, text in enumerate(TEXTS):
        ref = numpy_scores(hf, tok, text, k, max_length)
        for attack in ATTACKS:
            assert ours[attack][i] == pytest.approx(ref[attack], rel=1e-4, abs=1e-6), (attack, i)
    assert len(set(np.round(ours["min_k_plus_plus"], 6))) == len(TEXTS)


def test_auroc_hand_checked_with_ties():
    # pairs (holdout h, forget f): h=2 beats 1, ties 2, loses to 3 -> 1.5; h=3 -> 2.5; h=4 -> 3; total 7 of 9
    assert auroc([1, 2, 3], [2, 3, 4]) == pytest.approx(7 / 9)
    assert auroc([1, 1, 1], [1, 1]) == 0.5
    assert auroc([0.1, 0.2], [0.3, 0.9, 0.5]) == 1.0
    assert auroc([5.0, 6.0], [1.0, 2.0]) == 0.0
    # h=2 vs f=1,2,2,5: 1 + 0.5 + 0.5 + 0; h=3: 1 + 1 + 1 + 0 -> 5 of 8
    assert auroc([1, 2, 2, 5], [2, 3]) == pytest.approx(5 / 8)


def test_mia_auroc_combines_scores_of_both_sets():
    _, model, tok, _ = exported()
    got = mia_auroc(model, tok, TEXTS, HOLDOUT, batch_size=4)
    f, h = mia_scores(model, tok, TEXTS).as_dict(), mia_scores(model, tok, HOLDOUT).as_dict()
    assert set(got) == set(ATTACKS)
    for attack in ATTACKS:
        pairs = [(x > y) + 0.5 * (x == y) for x in h[attack] for y in f[attack]]
        assert got[attack] == pytest.approx(np.mean(pairs))
