"""The objectives equal float64 NumPy statements of their formulas (objectives.py docstrings) on a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_unlearn import objectives as obj
from jax_unlearn import token_math
from jax_unlearn.models import CausalLM, ModelConfig

CFG = ModelConfig(model_type="llama", vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4)


@pytest.fixture(scope="module")
def models():
    return CausalLM(CFG, rngs=nnx.Rngs(0)), CausalLM(CFG, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (3, 7))
    am = np.ones((3, 7), np.int32)
    am[2, :2] = 0  # left padding
    labels = np.where(am == 1, ids, -100)
    labels[0, :3] = -100  # a prompt without loss
    labels[1, :] = -100  # a row without any label token
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(am), "labels": jnp.asarray(labels, jnp.int32)}


def np_logprobs(model, batch):
    """float64 log p(label_{t+1}) and mask, from the model's float32 logits."""
    logits = np.asarray(model(batch["input_ids"], batch["attention_mask"]), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.asarray(batch["labels"])[:, 1:]
    mask = target != -100
    picked = np.take_along_axis(logits, np.where(mask, target, 0)[..., None], -1)[..., 0]
    return np.where(mask, picked - logz, 0.0), mask, logits - logz[..., None]


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_nll_and_gradient_ascent(models, batch):
    model, _ = models
    logp, mask, _ = np_logprobs(model, batch)
    want = -logp.sum() / mask.sum()
    loss, m = obj.nll(model, batch)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(m["weight"]) == mask.sum()
    np.testing.assert_allclose(float(obj.neg_nll(model, batch)[0]), -want, rtol=1e-5)


def test_kl_to_reference(models, batch):
    model, ref = models
    _, mask, logq = np_logprobs(model, batch)
    _, _, logp = np_logprobs(ref, batch)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    want = (kl * mask).sum() / mask.sum()
    loss, _ = obj.kl_to_reference(model, batch, ref)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(obj.kl_to_reference(model, batch, model)[0]) == pytest.approx(0.0, abs=1e-6)


def test_npo(models, batch):
    model, ref = models
    beta = 0.7
    logp, mask, _ = np_logprobs(model, batch)
    ref_logp, _, _ = np_logprobs(ref, batch)
    ratio = logp.sum(-1) - ref_logp.sum(-1)
    seq = mask.sum(-1) > 0
    want = np.mean(-(2 / beta) * log_sigmoid(-beta * ratio)[seq])
    loss, m = obj.npo_loss(beta)(model, batch, ref)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(m["weight"]) == seq.sum() == 2
    # At the reference itself the log ratio is 0 and the loss is (2/beta) log 2.
    np.testing.assert_allclose(float(obj.npo_loss(beta)(ref, batch, ref)[0]), 2 / beta * np.log(2), rtol=1e-5)


def test_simnpo(models, batch):
    model, _ = models
    beta, delta = 2.5, 0.3
    logp, mask, _ = np_logprobs(model, batch)
    seq = mask.sum(-1) > 0
    avg_nll = -logp.sum(-1)[seq] / mask.sum(-1)[seq]
    want = np.mean(-(2 / beta) * log_sigmoid(beta * (avg_nll - delta)))
    np.testing.assert_allclose(float(obj.simnpo_loss(beta, delta)(model, batch)[0]), want, rtol=1e-5)


def test_rmu_losses(models, batch):
    model, ref = models
    layer = 1
    c = obj.control_vector(CFG.hidden_size, steering=2.0, seed=3)
    np.testing.assert_allclose(np.linalg.norm(c), 2.0, rtol=1e-6)
    assert np.all(c >= 0)
    np.testing.assert_array_equal(c, obj.control_vector(CFG.hidden_size, 2.0, 3))  # drawn once, seeded
    mask = np.asarray(batch["attention_mask"], np.float64)
    h = np.asarray(model.hidden_at(batch["input_ids"], batch["attention_mask"], layer), np.float64)
    h_ref = np.asarray(ref.hidden_at(batch["input_ids"], batch["attention_mask"], layer), np.float64)
    want_f = (((h - c) ** 2).mean(-1) * mask).sum() / mask.sum()
    want_r = (((h - h_ref) ** 2).mean(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(obj.rmu_forget_loss(layer, c)(model, batch)[0]), want_f, rtol=1e-5)
    np.testing.assert_allclose(float(obj.rmu_retain_loss(layer)(model, batch, ref)[0]), want_r, rtol=1e-5)


def test_gradient_ascent_gradient_raises_forget_nll(models, batch):
    model, _ = models
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: obj.neg_nll(nnx.merge(graphdef, p), batch)[0]
    g = jax.grad(loss)(params)
    stepped = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
    assert float(obj.nll(nnx.merge(graphdef, stepped), batch)[0]) > float(obj.nll(model, batch)[0])


def test_objective_factories_and_bad_arguments():
    assert obj.grad_diff().needs_reference is False
    assert obj.grad_diff(retain="kl").needs_reference is True
    assert obj.npo(0.1).needs_reference is True
    assert obj.simnpo(2.5, 0.1).needs_reference is False
    r = obj.rmu(hidden_size=16)
    assert r.needs_reference and r.trainable is not None
    with pytest.raises(ValueError, match="retain='mse'.*'nll', 'kl'"):
        obj.grad_diff(retain="mse")
    with pytest.raises(ValueError, match="npo beta must be > 0"):
        obj.npo(beta=0.0)
    with pytest.raises(ValueError, match="simnpo beta must be > 0"):
        obj.simnpo(beta=-1.0)
    with pytest.raises(ValueError, match="rmu steering must be > 0"):
        obj.rmu(hidden_size=16, steering=0.0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunked_logprobs_equal_full_logits_in_value_and_gradient(models, batch, chunk):
    model, _ = models
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, chunk):
        m = nnx.merge(graphdef, p)
        return obj.npo_loss(0.5, logit_chunk=chunk)(m, batch, model)[0] + obj.nll_loss(chunk)(m, batch)[0]

    full_l, full_g = jax.value_and_grad(loss)(params, None)
    ch_l, ch_g = jax.value_and_grad(loss)(params, chunk)
    np.testing.assert_allclose(float(ch_l), float(full_l), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ch_g), jax.tree.leaves(full_g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_chunked_loss_never_holds_full_vocab_logits():
    cfg = ModelConfig(model_type="llama", vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    ids = jnp.zeros((4, 256), jnp.int32)
    b = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def temp_bytes(chunk):
        grad = jax.jit(jax.grad(lambda p: obj.nll_loss(chunk)(nnx.merge(graphdef, p), b)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    full_logits = 4 * 255 * 4096 * 4  # float32 [b, s-1, vocab]
    full, chunked = temp_bytes(None), temp_bytes(16)
    # the unchunked gradient holds the logits and their cotangent; the chunked one neither
    # (what remains is the rest of the model: attention scores, MLP activations, ...)
    assert full - chunked >= 2 * full_logits
    assert chunked < full / 3


@pytest.mark.parametrize("compat", [None, "open_unlearning"])
def test_a_float64_model_keeps_float64_in_the_losses(compat):
    """Logits of a float64 model stay float64 (promoted to at least float32, never cast down):
    the KL retain loss equals torch's ``kl_div`` (the reference's code, float64) to 1e-10 where the
    two distributions nearly agree; a float32 cast was 1e-4 relative off there. The label
    log-probs (NLL, NPO, SimNPO) likewise."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    ref_logits = 3.0 * rng.standard_normal((2, 6, 40))
    logits = ref_logits + 1e-4 * rng.standard_normal(ref_logits.shape)  # nearly the reference
    labels = rng.integers(0, 40, (2, 6))
    labels[0, :2] = -100
    with jax.enable_x64(True):
        batch = {"input_ids": jnp.zeros((2, 6), jnp.int32), "attention_mask": jnp.ones((2, 6), jnp.int32),
                 "labels": jnp.asarray(labels)}
        model, ref = (lambda ids, am: jnp.asarray(logits)), (lambda ids, am: jnp.asarray(ref_logits))
        kl, _ = obj.kl_to_reference(model, batch, ref, compat=compat)
        logp, mask = token_math.label_logprobs(jnp.asarray(logits), jnp.asarray(labels))
        assert kl.dtype == jnp.float64 and logp.dtype == jnp.float64
    cut = slice(None) if compat else slice(None, -1)
    q = F.log_softmax(torch.tensor(logits[:, cut], dtype=torch.float64), -1)
    p = F.log_softmax(torch.tensor(ref_logits[:, cut], dtype=torch.float64), -1)
    per_position = F.kl_div(q, p, reduction="none", log_target=True).sum(-1)  # [b, s(-1)]
    keep = torch.ones_like(per_position) if compat else torch.tensor(labels[:, 1:] != -100, dtype=torch.float64)
    want = float((per_position * keep).sum() / keep.sum())
    # rounding scale of the summed terms p * (log p - log q): each log-prob is off by ~eps * |log p|
    scale = float((p.exp() * (p.abs() + q.abs())).sum(-1).mean())
    tol = lambda dtype: 16 * np.finfo(dtype).eps * scale
    assert tol(np.float32) > want > 1e3 * tol(np.float64)  # float32 could not resolve this KL; float64 can
    np.testing.assert_allclose(float(kl), want, rtol=0, atol=tol(np.float64))
    target = torch.tensor(np.where(labels[:, 1:] == -100, 0, labels[:, 1:]))
    want_logp = torch.gather(F.log_softmax(torch.tensor(logits[:, :-1]), -1), -1, target[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(logp), (want_logp * torch.tensor(np.asarray(mask))).numpy(), rtol=1e-13,
                               atol=1e-13)
