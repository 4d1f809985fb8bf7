"""``compat="open_unlearning"`` reproduces the reference's losses and gradients; the default keeps
the documented formulas.

The reference formulas are restated in torch from sustech-nlp/SAGO @2363ee7 (``SAGO:``) and
transformers 4.45.1 (``hf:``), line by line (docs/reference.md, section 4). Both sides get the same
float32 inputs: a stand-in model whose logits are ``h @ w^T`` and whose layer output is ``h``,
so losses and gradients (with respect to ``h`` and ``w``) are compared directly, on batches
with left and right padding, masked prompts, rows without labels, ``labels == input_ids`` (the
default packed layout) and a masked first position (the reference's BOS chunks). A step test
then checks the accumulation: with uniform weighting the step's two gradients are the means of
the reference's micro-batch gradients, pulled back through a real model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from step_fixtures import CFG, tiny_model

from jax_unlearn import objectives as obj
from jax_unlearn import step as st
from jax_unlearn.combiners import TwoTaskGrads

OU = "open_unlearning"
B, S, D, V = 4, 6, 8, 11
RTOL = 1e-5  # float32 on both sides


# ----------------------------------------------------------------------------- the reference, in torch


def ref_nll(logits, labels):
    """hf:models/llama/modeling_llama.py:1219-1230 (mistral :1059-1074): shift, then the mean
    ``CrossEntropyLoss()`` over the non-ignored tokens of the whole micro-batch."""
    shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].contiguous().view(-1)
    return torch.nn.CrossEntropyLoss()(shift_logits, shift_labels)


def ref_kl(logits, ref_logits):
    """SAGO:src/trainer/utils.py:17-32 (``compute_kl_divergence``)."""
    ref_probs = F.log_softmax(ref_logits, dim=-1).view(-1, ref_logits.shape[-1])
    current_probs = F.log_softmax(logits, dim=-1).view(-1, logits.shape[-1])
    return F.kl_div(current_probs, ref_probs, reduction="batchmean", log_target=True)


def ref_batch_nll(logits, labels):
    """SAGO:src/trainer/utils.py:35-45 (``compute_batch_nll``)."""
    shifted_labels = labels[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss_function = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)


def ref_npo(logits, ref_logits, labels, beta):
    """SAGO:src/trainer/utils.py:48-68 (``compute_dpo_loss`` with ``win_inputs=None``)."""
    lose_loss = ref_batch_nll(logits, labels)
    with torch.no_grad():
        lose_ref_loss = ref_batch_nll(ref_logits, labels)
    lose_log_ratio = -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()


def ref_simnpo(logits, labels, beta, delta):
    """SAGO:src/trainer/unlearn/simnpo.py:16-20 (and grad_surgery.py:529-534)."""
    loss_mask = labels != -100
    forget_loss = ref_batch_nll(logits, labels)
    forget_loss = forget_loss / loss_mask.sum(-1) - delta
    return -F.logsigmoid(beta * forget_loss).mean() * 2 / beta


def ref_activation_loss(activation1, activation2, mask):
    """SAGO:src/trainer/unlearn/rmu.py:109-118 (``compute_activation_loss``), with ``mask =
    labels != -100`` (:130, :159)."""
    squared_diff = F.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=1)
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


# ----------------------------------------------------------------------------- this library's default, in torch


def _logp(logits, labels):
    """(log p(labels[t+1]) masked, mask), shifted: ``[b, s-1]`` each."""
    target = labels[:, 1:]
    mask = (target != -100).to(logits.dtype)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


def def_nll(logits, labels):
    logp, mask = _logp(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1.0)


def def_kl(logits, ref_logits, labels):
    logq = torch.log_softmax(logits[:, :-1], -1)
    logp = torch.log_softmax(ref_logits[:, :-1], -1).detach()
    kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = (labels[:, 1:] != -100).to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


def def_npo(logits, ref_logits, labels, beta):
    logp, mask = _logp(logits, labels)
    ref_logp, _ = _logp(ref_logits, labels)
    ratio = logp.sum(-1) - ref_logp.detach().sum(-1)
    seq = (mask.sum(-1) > 0).to(logits.dtype)
    return (-(2 / beta) * F.logsigmoid(-beta * ratio) * seq).sum() / seq.sum().clamp(min=1.0)


def def_simnpo(logits, labels, beta, delta):
    logp, mask = _logp(logits, labels)
    avg = -logp.sum(-1) / mask.sum(-1).clamp(min=1.0)
    seq = (mask.sum(-1) > 0).to(logits.dtype)
    return (-(2 / beta) * F.logsigmoid(beta * (avg - delta)) * seq).sum() / seq.sum().clamp(min=1.0)


def def_activation(h, target, attention_mask):
    sq = ((h - target) ** 2).mean(-1)
    m = attention_mask.to(h.dtype)
    return (sq * m).sum() / m.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- batches


def _batch(ids, am, labels):
    return {"input_ids": np.asarray(ids, np.int32), "attention_mask": np.asarray(am, np.int32),
            "labels": np.asarray(labels, np.int32)}


def batches() -> dict[str, dict]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, V, (B, S))
    ones = np.ones((B, S), np.int32)
    out = {"labels_eq_input_ids": _batch(ids, ones, ids)}  # the default packed layout: no padding
    am = ones.copy()
    am[1, :2] = 0  # left padding
    labels = np.where(am == 1, ids, -100)
    labels[0, :3] = -100  # a prompt without loss
    labels[2, :] = -100  # a row without any label token
    out["ragged_with_empty_row"] = _batch(ids, am, labels)
    am = ones.copy()
    am[1, 4:], am[3, 3:] = 0, 0  # right padding, as this library pads
    labels = np.where(am == 1, ids, -100)
    labels[:, 0] = -100  # the reference's chunks: a masked BOS first
    out["bos_masked_right_padded"] = _batch(np.where(am == 1, ids, 0), am, labels)
    labels = np.where(am == 1, ids, -100)  # labels == input_ids where not padded
    out["right_padded"] = _batch(np.where(am == 1, ids, 0), am, labels)
    labels = np.full((B, S), -100)
    labels[0, 0] = ids[0, 0]  # one unshifted label that predicts nothing
    out["no_predicted_token"] = _batch(ids, ones, labels)
    return out


BATCHES = batches()


# ----------------------------------------------------------------------------- comparison


class ArrayModel:
    """A stand-in model: logits ``h @ w^T`` (float32), layer output ``h``, every layer the same."""

    def __init__(self, h, w):
        self.h, self.w = h, w

    def __call__(self, input_ids, attention_mask=None):
        return jnp.einsum("bsd,vd->bsv", self.h, self.w)

    def final_hidden(self, input_ids, attention_mask=None):
        return self.h

    def head_weight(self, tokens=None):
        return self.w

    def hidden_at(self, input_ids, attention_mask, layer):
        return self.h


def _inputs(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, S, D)).astype(np.float32), rng.normal(size=(V, D)).astype(np.float32) / 2)


H, W = _inputs(1)
H_REF, W_REF = _inputs(2)
CONTROL = obj.control_vector(D, steering=3.0, seed=4)


def assert_close(got, want, rtol=RTOL):
    """Same non-finite entries; finite ones within ``rtol`` of the largest finite magnitude
    (``rtol`` relative for a scalar)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    if fin.any():
        scale = np.abs(want[fin]).max()
        err = np.abs(got[fin] - want[fin]).max()
        assert err <= rtol * scale + 1e-30, (err, scale)


def jax_value_and_grads(loss_fn, batch, needs_ref):
    """The library loss and its gradients with respect to ``h`` and ``w``."""
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    ref = ArrayModel(jnp.asarray(H_REF), jnp.asarray(W_REF)) if needs_ref else None

    def f(h, w):
        return loss_fn(ArrayModel(h, w), jb, ref)[0]

    value, (gh, gw) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(H), jnp.asarray(W))
    return float(value), np.asarray(gh), np.asarray(gw)


def torch_value_and_grads(formula, batch):
    """``formula(h, w, ref_logits, labels, attention_mask)`` in torch, and its gradients."""
    h = torch.tensor(H, requires_grad=True)
    w = torch.tensor(W, requires_grad=True)
    ref_logits = torch.tensor(H_REF) @ torch.tensor(W_REF).T
    value = formula(h, w, ref_logits, torch.tensor(batch["labels"], dtype=torch.long),
                    torch.tensor(batch["attention_mask"]))
    gh, gw = torch.autograd.grad(value, (h, w), allow_unused=True)
    zeros = lambda x, like: np.zeros(like.shape, np.float32) if x is None else x.numpy()  # noqa: E731
    return float(value.detach()), zeros(gh, H), zeros(gw, W)


BETA, DELTA = 0.7, 0.3
LOSSES = {  # name -> (library loss for a compat mode and a logit chunk, needs ref, reference formula, default formula)
    "nll": (lambda c, k: obj.nll_loss(k, compat=c), False,
            lambda h, w, r, y, am: ref_nll(h @ w.T, y), lambda h, w, r, y, am: def_nll(h @ w.T, y)),
    "neg_nll": (lambda c, k: obj.neg_nll_loss(k, compat=c), False,
                lambda h, w, r, y, am: -ref_nll(h @ w.T, y), lambda h, w, r, y, am: -def_nll(h @ w.T, y)),
    "kl": (lambda c, k: obj.kl_loss(c), True,
           lambda h, w, r, y, am: ref_kl(h @ w.T, r), lambda h, w, r, y, am: def_kl(h @ w.T, r, y)),
    "npo": (lambda c, k: obj.npo_loss(BETA, k, compat=c), True,
            lambda h, w, r, y, am: ref_npo(h @ w.T, r, y, BETA), lambda h, w, r, y, am: def_npo(h @ w.T, r, y, BETA)),
    "simnpo": (lambda c, k: obj.simnpo_loss(BETA, DELTA, k, compat=c), False,
               lambda h, w, r, y, am: ref_simnpo(h @ w.T, y, BETA, DELTA),
               lambda h, w, r, y, am: def_simnpo(h @ w.T, y, BETA, DELTA)),
    "rmu_forget": (lambda c, k: obj.rmu_forget_loss(1, CONTROL, compat=c), False,
                   lambda h, w, r, y, am: ref_activation_loss(h, torch.tensor(CONTROL).expand_as(h), y != -100),
                   lambda h, w, r, y, am: def_activation(h, torch.tensor(CONTROL), am)),
    "rmu_retain": (lambda c, k: obj.rmu_retain_loss(1, compat=c), True,
                   lambda h, w, r, y, am: ref_activation_loss(h, torch.tensor(H_REF), y != -100),
                   lambda h, w, r, y, am: def_activation(h, torch.tensor(H_REF), am)),
}
CHUNKED = ("nll", "neg_nll", "npo", "simnpo")  # the losses that take logit_chunk


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("compat", [None, OU])
def test_losses_and_gradients_match_the_formulas(name, batch, compat):
    make, needs_ref, reference, default = LOSSES[name]
    want = torch_value_and_grads(reference if compat else default, BATCHES[batch])
    for chunk in (None, 4) if name in CHUNKED else (None,):
        got = jax_value_and_grads(make(compat, chunk), BATCHES[batch], needs_ref)
        for g, w in zip(got, want):
            assert_close(g, w)


def test_the_modes_differ_where_the_reference_differs():
    """Each compat difference changes the value on a batch that exercises it (the test above
    could not pass with the two modes swapped)."""
    differs = lambda name, batch: not np.isclose(  # noqa: E731
        *(jax_value_and_grads(LOSSES[name][0](c, None), BATCHES[batch], LOSSES[name][1])[0] for c in (None, OU)),
        rtol=1e-4, equal_nan=False)
    assert differs("kl", "labels_eq_input_ids")  # every position, unshifted
    assert differs("kl", "right_padded")  # padding included
    assert differs("npo", "ragged_with_empty_row")  # the empty row counts in the mean
    assert differs("simnpo", "labels_eq_input_ids")  # unshifted length: one more token
    assert not differs("simnpo", "bos_masked_right_padded")  # the masked BOS makes the lengths equal
    assert differs("rmu_forget", "right_padded")  # mean(s) * mean(1/n) != sum(s) / sum(n)
    assert differs("rmu_forget", "labels_eq_input_ids") is False  # equal rows: the quirk is invisible
    assert differs("rmu_retain", "bos_masked_right_padded")  # labels mask the BOS, the attention mask does not
    assert not differs("nll", "ragged_with_empty_row")  # NLL differs only on an empty micro-batch


def test_degenerate_micro_batches_report_nan_with_the_references_gradient():
    """The reference computes 0/0 for an empty micro-batch (NLL) or row (SimNPO): the value is NaN,
    while torch's ignored targets give the other rows' gradient (and zero for the empty part)."""
    empty = dict(BATCHES["labels_eq_input_ids"], labels=np.full((B, S), -100, np.int32))
    value, gh, gw = jax_value_and_grads(obj.nll_loss(compat=OU), empty, False)
    assert np.isnan(value) and not gh.any() and not gw.any()
    assert jax_value_and_grads(obj.nll_loss(), empty, False)[0] == 0.0
    value, gh, _ = jax_value_and_grads(obj.simnpo_loss(BETA, DELTA, compat=OU), BATCHES["ragged_with_empty_row"], False)
    assert np.isnan(value) and np.all(np.isfinite(gh)) and not gh[2].any() and gh[0].any()
    value, gh, _ = jax_value_and_grads(obj.rmu_forget_loss(1, CONTROL, compat=OU), BATCHES["ragged_with_empty_row"], False)
    assert np.isnan(value) and not np.isfinite(gh).any()  # the reference breaks here too


def test_rmu_quirk_is_mean_s_times_mean_inverse_n():
    batch = BATCHES["bos_masked_right_padded"]
    mask = batch["labels"] != -100
    s = ((((H - CONTROL) ** 2).mean(-1)) * mask).sum(-1).astype(np.float64)
    n = mask.sum(-1)
    value = jax_value_and_grads(obj.rmu_forget_loss(1, CONTROL, compat=OU), batch, False)[0]
    np.testing.assert_allclose(value, s.mean() * (1 / n).mean(), rtol=1e-5)
    assert abs(value - (s / n).mean()) > 1e-3 * value  # not the per-row mean


def test_objectives_pass_compat_to_both_losses():
    for make in (lambda c: obj.grad_ascent(compat=c), lambda c: obj.grad_diff(retain="kl", compat=c),
                 lambda c: obj.npo(compat=c), lambda c: obj.simnpo(compat=c), lambda c: obj.rmu(D, layer=1, compat=c)):
        assert make(None).compat is None and make(OU).compat == OU
    batch = {k: jnp.asarray(v) for k, v in BATCHES["labels_eq_input_ids"].items()}
    model, ref = ArrayModel(jnp.asarray(H), jnp.asarray(W)), ArrayModel(jnp.asarray(H_REF), jnp.asarray(W_REF))
    o = obj.grad_diff(retain="kl", compat=OU)
    np.testing.assert_allclose(float(o.retain(model, batch, ref)[0]), float(obj.kl_to_reference(model, batch, ref,
                                                                                              compat=OU)[0]))
    o = obj.simnpo(beta=BETA, delta=DELTA, compat=OU)
    assert float(o.forget(model, batch, None)[0]) == float(obj.simnpo_loss(BETA, DELTA, compat=OU)(model, batch)[0])
    with pytest.raises(ValueError, match=r"compat='hf' is not supported; expected None or one of \('open_unlearning',\)"):
        obj.npo(compat="hf")
    with pytest.raises(ValueError, match="compat='x'"):
        obj.kl_to_reference(model, batch, ref, compat="x")


# ----------------------------------------------------------------------------- the step: uniform mean of the reference's micro-batch gradients


def _capture() -> optax.GradientTransformation:
    """A chain head that keeps the step's two gradients in its state and updates nothing."""
    return optax.GradientTransformation(
        lambda p: TwoTaskGrads(jax.tree.map(jnp.zeros_like, p), jax.tree.map(jnp.zeros_like, p)),
        lambda u, s, p=None: (jax.tree.map(jnp.zeros_like, u.forget), u))


def _step_batch(seed: int) -> dict:
    """Right-padded rows with a masked first position (the reference's chunks)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (8, 7))
    am = np.ones_like(ids)
    for i in range(8):
        am[i, 7 - rng.integers(0, 4):] = 0
    labels = np.where(am == 1, ids, -100)
    labels[:, 0] = -100
    return {"input_ids": jnp.asarray(np.where(am == 1, ids, 0), jnp.int32), "attention_mask": jnp.asarray(am, jnp.int32),
            "labels": jnp.asarray(labels, jnp.int32)}


STEP_OBJECTIVES = {  # objective (compat) and the reference's micro-batch loss of the model's outputs
    "grad_diff_kl": (lambda: obj.grad_diff(retain="kl", compat=OU),
                     lambda lg, rl, y, h, hr: -ref_nll(lg, y), lambda lg, rl, y, h, hr: ref_kl(lg, rl)),
    "npo": (lambda: obj.npo(beta=BETA, compat=OU),
            lambda lg, rl, y, h, hr: ref_npo(lg, rl, y, BETA), lambda lg, rl, y, h, hr: ref_nll(lg, y)),
    "simnpo": (lambda: obj.simnpo(beta=BETA, delta=DELTA, compat=OU),
               lambda lg, rl, y, h, hr: ref_simnpo(lg, y, BETA, DELTA), lambda lg, rl, y, h, hr: ref_nll(lg, y)),
    "rmu": (lambda: obj.rmu(CFG.hidden_size, layer=1, steering=4.0, trainable=r"layers\.[01]\.mlp\.down_proj",
                            compat=OU),
            lambda lg, rl, y, h, hr: ref_activation_loss(h, torch.tensor(obj.control_vector(CFG.hidden_size, 4.0, 0))
                                                         .expand_as(h), y != -100),
            lambda lg, rl, y, h, hr: ref_activation_loss(h, hr, y != -100)),
}


@pytest.mark.parametrize("name", sorted(STEP_OBJECTIVES))
def test_uniform_step_gradients_are_the_mean_of_the_references_micro_batch_gradients(name):
    make, forget_formula, retain_formula = STEP_OBJECTIVES[name]
    objective, k = make(), 4
    defs, state = st.init_state(tiny_model(0), _capture(), objective)
    # a reference apart from the model, so KL and RMU retain have gradients: the state's reference holds
    # the trainable parameters (the frozen ones are shared), here another seed's
    other = dict(nnx.to_flat_state(nnx.state(tiny_model(1))))
    ref_params = nnx.from_flat_state([(path, other[path]) for path, _ in nnx.to_flat_state(state.params)])
    ref_model = nnx.merge(defs.graphdef, ref_params, state.frozen)
    if objective.needs_reference:
        state = state._replace(ref=ref_params)
    fb, rb = _step_batch(10), _step_batch(11)
    params = jax.tree.map(jnp.copy, state.params)
    step = st.make_two_grad_step(defs, objective, _capture(), st.StepConfig(micro_batches=k, weighting="uniform"),
                                 donate=False)
    new, metrics = step(state, fb, rb)
    got = new.opt_state

    def outputs(p, mb):
        model = nnx.merge(defs.graphdef, p, state.frozen)
        return model(mb["input_ids"], mb["attention_mask"]), model.hidden_at(mb["input_ids"], mb["attention_mask"], 1)

    for batch, formula, g_got, loss_got in ((fb, forget_formula, got.forget, metrics["forget_loss"]),
                                            (rb, retain_formula, got.retain, metrics["retain_loss"])):
        want, losses = jax.tree.map(jnp.zeros_like, params), []
        for j in range(k):  # micro-batch j = rows j, j+k, ... (StepConfig)
            mb = {key: x[j::k] for key, x in batch.items()}
            (lg, h), vjp = jax.vjp(lambda p, mb=mb: outputs(p, mb), params)
            ref_lg = ref_model(mb["input_ids"], mb["attention_mask"])
            h_ref = ref_model.hidden_at(mb["input_ids"], mb["attention_mask"], 1)
            t_lg = torch.tensor(np.asarray(lg), requires_grad=True)
            t_h = torch.tensor(np.asarray(h), requires_grad=True)
            value = formula(t_lg, torch.tensor(np.asarray(ref_lg)), torch.tensor(np.asarray(mb["labels"]), dtype=torch.long),
                            t_h, torch.tensor(np.asarray(h_ref)))
            d_lg, d_h = torch.autograd.grad(value, (t_lg, t_h), allow_unused=True)
            cot = tuple(jnp.zeros_like(x) if d is None else jnp.asarray(d.numpy()) for x, d in ((lg, d_lg), (h, d_h)))
            want = jax.tree.map(lambda a, b: a + b / k, want, vjp(cot)[0])  # accelerate: loss / GA, summed
            losses.append(float(value.detach()))
        np.testing.assert_allclose(float(loss_got), np.mean(losses), rtol=RTOL)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(want)):
            assert_close(a, b)
