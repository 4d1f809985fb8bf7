"""Perplexity: rolling windows as the harness makes them, values equal to transformers."""

import math

import pytest
import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from test_eval_fixtures import TEXTS, exported

from jax_unlearn.eval import perplexity, rolling_windows


@pytest.mark.parametrize("n,max_length", [(1, 4), (4, 4), (5, 4), (9, 4), (17, 5), (3, 1), (10, 3)])
def test_rolling_windows_equal_lm_eval(n, max_length):
    tokens = list(range(100, 100 + n))
    expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_length, 1)]
    assert rolling_windows(tokens, 7, max_length) == [(list(a), list(b)) for a, b in expected]
    assert sum(len(b) for _, b in rolling_windows(tokens, 7, max_length)) == n


def torch_text_logprob(hf, tok, text, max_length):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_token_id, max_length, 1)):
        row = list(ctx) + list(cont)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([row])).logits[0].double(), -1)
        total += float(sum(lp[t - 1, row[t]] for t in range(len(ctx), len(row))))
    return total, len(ids)


@pytest.mark.parametrize("max_length", [None, 6])
def test_perplexity_equals_transformers(max_length):
    _, model, tok, hf = exported()
    got = perplexity(model, tok, [{"text": t} for t in TEXTS], max_length=max_length, batch_size=4)
    ref = [torch_text_logprob(hf, tok, t, max_length or 256) for t in TEXTS]
    nll, n = -sum(r[0] for r in ref), sum(r[1] for r in ref)
    assert got.num_tokens == n
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got.text_nll == pytest.approx([-r[0] for r in ref], rel=1e-5)
