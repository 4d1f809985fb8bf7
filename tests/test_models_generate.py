"""Cached generation vs transformers' greedy ``generate``; sampling, stop ids, compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import checkpoint, left_pad
from ties import TIE_TOL, assert_greedy_agree

from jax_unlearn.models import generate, load_hf
from jax_unlearn.models.generation import _generate

NEW = 20


def _prompts(seed=1, lengths=(7, 3, 5)):
    rs = np.random.RandomState(seed)
    return [list(rs.randint(3, 128, size=n)) for n in lengths]


def _hf_greedy(hf, ids, mask, stop=None):
    """transformers' greedy tokens ``[b, NEW]`` and the logits each was chosen from ``[b, NEW, vocab]``."""
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=NEW, do_sample=False, eos_token_id=stop, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:].numpy(), torch.stack(out.logits, 1).float().numpy()


def _our_logits(model, ids, mask, tokens):
    """Our full (uncached) forward over prompt + ``tokens``: the logits each token was chosen from."""
    tokens = np.asarray(tokens)
    seq = np.concatenate([ids, tokens], axis=1)
    full = np.concatenate([mask, np.ones(tokens.shape, np.int32)], axis=1)
    logits = np.asarray(model(jnp.asarray(seq), jnp.asarray(full)))
    return logits[:, ids.shape[1] - 1:-1]


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window", "mqa_tied"])
def test_greedy_matches_transformers_on_left_padded_batch(case):
    path, hf = checkpoint(case)
    model = load_hf(path)
    ids, mask = left_pad(_prompts())
    out = generate(model, ids, mask, max_new_tokens=NEW, stop_ids=())
    assert out.tokens.shape == (3, NEW) and out.tokens.dtype == jnp.int32
    assert_greedy_agree(out.tokens, *_hf_greedy(hf, ids, mask))  # equal up to near-ties (tests/ties.py)
    np.testing.assert_array_equal(out.lengths, [NEW] * 3)
    if case != "mistral_window":
        return
    # each padded row generates what it generates alone (window shorter than the output)
    for i, row in enumerate(_prompts()):
        row = np.asarray([row])
        alone = generate(model, row, max_new_tokens=NEW, stop_ids=())
        padded = np.asarray(out.tokens)[i:i + 1]
        assert_greedy_agree(alone.tokens, padded, _our_logits(model, row, np.ones_like(row), padded))


def test_stop_ids_match_transformers():
    path, hf = checkpoint("llama_gqa")
    model = load_hf(path)
    ids, mask = left_pad(_prompts(seed=3))
    free = np.asarray(generate(model, ids, mask, max_new_tokens=NEW, stop_ids=()).tokens)
    stop = int(free[0, 4])  # row 0 stops after at most 5 tokens
    out = generate(model, ids, mask, max_new_tokens=NEW, stop_ids=[stop], pad_id=0)
    ref, ref_logits = _hf_greedy(hf, ids, mask, stop=stop)
    toks = np.asarray(out.tokens)
    assert_greedy_agree(toks[:, :ref.shape[1]], ref, ref_logits[:, :ref.shape[1]])
    lengths = np.asarray(out.lengths)
    free_logits = _our_logits(model, ids, mask, free)
    for i in range(3):  # the stop token is kept, everything after it is padding
        assert (toks[i, lengths[i]:] == 0).all()
        if lengths[i] < NEW:
            assert toks[i, lengths[i] - 1] == stop
        n = lengths[i]
        if assert_greedy_agree(toks[i:i + 1, :n], free[i:i + 1, :n], free_logits[i:i + 1, :n]):
            continue  # the two runs parted at a near-tie: their stop positions need not agree
        first = int(np.argmax(free[i] == stop)) + 1 if (free[i] == stop).any() else NEW
        assert n == first, (i, n, first)
    assert lengths[0] <= 5
    # default stop ids come from the config's eos_token_id; the loop ends when all rows stopped
    one = generate(model, ids[:1], mask[:1], max_new_tokens=NEW, stop_ids=stop, pad_id=99)
    assert int(one.lengths[0]) == lengths[0] and (np.asarray(one.tokens)[0, lengths[0]:] == 99).all()


def test_scan_model_generates_the_same():
    path, _ = checkpoint("mistral_window")
    ids, mask = left_pad(_prompts(seed=5))
    a = generate(load_hf(path), ids, mask, max_new_tokens=NEW, stop_ids=())
    b = generate(load_hf(path, scan_layers=True), ids, mask, max_new_tokens=NEW, stop_ids=())
    assert_greedy_agree(b.tokens, a.tokens, _our_logits(load_hf(path), ids, mask, a.tokens))


def test_sampling_respects_top_k_and_rng():
    path, _ = checkpoint("llama_gqa")
    model = load_hf(path)
    ids, mask = left_pad(_prompts(seed=6))
    greedy = generate(model, ids, mask, max_new_tokens=NEW, stop_ids=())
    k1 = generate(model, ids, mask, max_new_tokens=NEW, stop_ids=(), temperature=0.7, top_k=1)
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)
    kw = dict(max_new_tokens=NEW, stop_ids=(), temperature=1.5, top_k=5)
    s1 = generate(model, ids, mask, rng=jax.random.key(1), **kw)
    s1b = generate(model, ids, mask, rng=jax.random.key(1), **kw)
    s2 = generate(model, ids, mask, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(s1.tokens, s1b.tokens)
    assert not np.array_equal(s1.tokens, s2.tokens)
    assert not np.array_equal(s1.tokens, greedy.tokens)
    # every sampled token is among the 5 most likely under a full forward pass of the sequence
    seq = np.concatenate([ids, np.asarray(s1.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, NEW), np.int32)], axis=1)
    logits = np.asarray(model(jnp.asarray(seq), jnp.asarray(full_mask)))
    p = ids.shape[1]
    for t in range(NEW):  # (a token tied with the 5th largest may be in or out: the two passes round apart)
        step = logits[:, p + t - 1].astype(np.float64)
        fifth = np.sort(step, axis=-1)[:, -5]
        chosen = step[np.arange(3), seq[:, p + t]]
        assert np.all(chosen >= fifth - TIE_TOL * np.maximum(1.0, np.abs(step).max(-1)))


def test_sampling_distribution_matches_softmax():
    path, _ = checkpoint("llama_gqa")
    model = load_hf(path)
    prompt = np.asarray(_prompts(seed=8, lengths=(6,)) * 4000)
    temperature, k = 2.0, 8
    out = generate(model, prompt, max_new_tokens=1, stop_ids=(), temperature=temperature, top_k=k,
                   rng=jax.random.key(3))
    logits = np.asarray(model(jnp.asarray(prompt[:1])))[0, -1].astype(np.float64) / temperature
    top = np.argsort(logits)[-k:]
    probs = np.zeros_like(logits)
    probs[top] = np.exp(logits[top] - logits[top].max())
    probs /= probs.sum()
    freq = np.bincount(np.asarray(out.tokens)[:, 0], minlength=probs.size) / len(prompt)
    assert set(np.flatnonzero(freq)) <= set(top)
    assert 0.5 * np.abs(freq - probs).sum() < 0.04  # total variation; ~0.02 expected from noise


def test_no_recompilation_across_calls_and_steps():
    path, _ = checkpoint("mqa_tied")
    model = load_hf(path)
    ids, mask = left_pad(_prompts(seed=9))
    generate(model, ids, mask, max_new_tokens=12, stop_ids=(), temperature=0.8, top_k=4)
    before = _generate._cache_size()
    other = np.random.RandomState(10).randint(3, 128, size=ids.shape)
    for temperature in (0.3, 1.7):
        generate(model, other, mask, max_new_tokens=12, stop_ids=(), temperature=temperature, top_k=4,
                 rng=jax.random.key(5))
    assert _generate._cache_size() == before
    # the decode loop is a single while_loop: the program does not grow with max_new_tokens
    graphdef, state = nnx.split(model)
    sizes = []
    for n in (4, 40):
        jaxpr = jax.make_jaxpr(lambda s, n=n: _generate.__wrapped__(
            graphdef, s, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), jnp.float32(1.0),
            max_new_tokens=n, top_k=None, greedy=True, stop_ids=(2,), pad_id=0))(state)
        sizes.append(len(str(jaxpr).splitlines()))
    assert sizes[0] == sizes[1]


def test_generate_argument_errors():
    path, _ = checkpoint("mqa_tied")
    model = load_hf(path)
    ids, mask = left_pad(_prompts())
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask[:, ::-1], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, ids, mask, max_new_tokens=3, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match=r"\[batch, prompt_len\]"):
        generate(model, ids[0], max_new_tokens=3)
