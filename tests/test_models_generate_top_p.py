"""Nucleus (top-p) sampling in `jax_unlearn.models.generate`: the kept tokens are transformers',
samples follow the renormalised nucleus, and top_p is traced (no recompilation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import checkpoint, left_pad
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jax_unlearn.models import generate, load_hf
from jax_unlearn.models.generation import _generate, sampling_logits


def _hf_kept(logits, temperature, top_k, top_p):
    """transformers' warpers (temperature, top-k, top-p, in its order): bool mask of kept tokens."""
    scores = torch.tensor(logits, dtype=torch.float32)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores).numpy()


def _clear_margins(logits, temperature, top_k, top_p, margin=1e-5):
    """Rows whose kept set cannot flip under float32 rounding: no top-k tie, and no cumulative
    probability of the sorted (renormalised) tokens within ``margin`` of ``top_p``."""
    ok = []
    for row in np.asarray(logits, np.float64) / temperature:
        desc = np.sort(row)[::-1]
        if top_k is not None:
            if abs(desc[top_k - 1] - desc[top_k]) < margin:
                ok.append(False)
                continue
            desc = desc[:top_k]
        p = np.exp(desc - desc.max())
        p /= p.sum()
        ok.append(bool(np.all(np.abs(np.cumsum(p) - top_p) > margin)))
    return np.array(ok)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 0.9), (0.7, None, 0.5), (1.5, 20, 0.8),
                                                     (1.0, None, 0.01)])
def test_nucleus_keeps_the_tokens_transformers_keeps(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(64, 200).astype(np.float32) * 3.0
    ours = np.isfinite(np.asarray(sampling_logits(jnp.asarray(logits), temperature, top_k, jnp.float32(top_p))))
    hf = _hf_kept(logits, temperature, top_k, top_p)
    rows = _clear_margins(logits, temperature, top_k, top_p)
    assert rows.sum() >= 48  # almost every random row has clear margins
    np.testing.assert_array_equal(ours[rows], hf[rows])
    assert np.all(ours.sum(-1) >= 1)
    if top_p == 0.01:  # a tiny nucleus is the most likely token alone
        assert np.all(ours.sum(-1) == 1) and np.all(ours.argmax(-1) == logits.argmax(-1))


def _nucleus(logits, temperature, top_k, top_p):
    """The sampling distribution by definition (float64): softmax of ``logits / temperature`` over
    the top ``top_k``, then over the fewest most likely tokens reaching ``top_p``, renormalised;
    also the smallest gap between a cumulative probability and ``top_p`` (a near-tie if tiny)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(z)[::-1][:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    cum = np.cumsum(p)
    keep = order[cum - p < top_p]
    probs = np.zeros_like(z)
    probs[keep] = np.exp(z[keep] - z[keep].max())
    return probs / probs.sum(), float(np.min(np.abs(cum - top_p)))


@pytest.mark.parametrize("top_k,top_p", [(None, 0.6), (4, 0.75)])
def test_sampling_distribution_is_the_renormalised_nucleus(top_k, top_p):
    path, _ = checkpoint("llama_gqa")
    model = load_hf(path)
    prompt = np.asarray([list(np.random.RandomState(8).randint(3, 128, size=6))] * 4000)
    temperature = 0.3  # nuclei of 6 tokens (top_p=0.6) and 3 of the top 4 (top_p=0.75)
    logits = np.asarray(model(jnp.asarray(prompt[:1])))[0, -1]
    probs, gap = _nucleus(logits, temperature, top_k, top_p)
    assert gap > 0.01  # the nucleus's edge is not a near-tie
    assert 1 < np.count_nonzero(probs) < (top_k or 10)  # the cut removes tokens and keeps several
    out = generate(model, prompt, max_new_tokens=1, stop_ids=(), temperature=temperature, top_k=top_k,
                   top_p=top_p, rng=jax.random.key(3))
    freq = np.bincount(np.asarray(out.tokens)[:, 0], minlength=probs.size) / len(prompt)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
    assert 0.5 * np.abs(freq - probs).sum() < 0.04  # total variation; ~0.02 expected from noise


def test_top_p_one_is_plain_sampling_and_values_do_not_recompile():
    path, _ = checkpoint("mqa_tied")
    model = load_hf(path)
    ids, mask = left_pad([list(np.random.RandomState(s).randint(3, 128, size=n)) for s, n in ((1, 5), (2, 3))])
    kw = {"max_new_tokens": 8, "stop_ids": (), "temperature": 1.3, "rng": jax.random.key(7)}
    np.testing.assert_array_equal(generate(model, ids, mask, top_p=1.0, **kw).tokens,
                                  generate(model, ids, mask, **kw).tokens)
    generate(model, ids, mask, top_p=0.5, **kw)
    before = _generate._cache_size()
    a = generate(model, ids, mask, top_p=0.3, **kw)
    b = generate(model, ids, mask, top_p=0.95, **kw)
    assert _generate._cache_size() == before
    assert not np.array_equal(a.tokens, b.tokens)
    greedy = generate(model, ids, mask, max_new_tokens=8, stop_ids=())
    np.testing.assert_array_equal(generate(model, ids, mask, top_p=0.5, max_new_tokens=8, stop_ids=()).tokens,
                                  greedy.tokens)  # temperature 0: top_p does not matter
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            generate(model, ids, mask, max_new_tokens=3, temperature=1.0, top_p=bad)
