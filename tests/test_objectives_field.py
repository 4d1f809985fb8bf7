"""The field's objectives (DPO/IdkDPO, UNDIAL, WGA, SatImp, CE-U, PDU) equal open-unlearning's code.

Both sides get the same float32 inputs: a stand-in model whose logits are ``(E[ids] + P) @ W^T``
(so a row's logits depend on its tokens: DPO's two answers differ), the reference model the
same with other tables. Values and gradients (with respect to ``E`` and ``W``) are compared to
1e-5 of the largest magnitude, in ``compat="open_unlearning"`` mode on every batch layout
(tests/ou_objectives.py restates the reference, tests/test_compat.py's layouts: left and right
padding, masked prompts, a row without labels, a batch without any) and in the default mode
against this library's documented formulas (the reference's where they agree).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ou_objectives import ou_ceu, ou_dpo, ou_pdu_forget, ou_satimp, ou_undial, ou_wga

from jax_unlearn import objectives as obj
from jax_unlearn import token_losses as tl

OU = "open_unlearning"
B, S, D, V = 4, 7, 8, 128  # V >= 100: the reference's UNDIAL indexes token -100 (V - 100) at ignored positions
RTOL = 1e-5  # float32 on both sides: a few roundings of O(1) sums of <= B*S*V terms


def _tables(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(V, D)).astype(np.float32), rng.normal(size=(V, D)).astype(np.float32) / 2,
            rng.normal(size=(S, D)).astype(np.float32) / 4)


E, W, P = _tables(1)
E_REF, W_REF, P_REF = _tables(2)


class EmbedModel:
    """Logits ``(e[ids] + p) @ w^T`` ``[b, s, V]`` in float32."""

    def __init__(self, e, w, p):
        self.e, self.w, self.p = e, w, p

    def __call__(self, input_ids, attention_mask=None):
        return jnp.einsum("bsd,vd->bsv", self.e[input_ids] + self.p[: input_ids.shape[1]], self.w)

    def final_hidden(self, input_ids, attention_mask=None):
        return self.e[input_ids] + self.p[: input_ids.shape[1]]

    def head_weight(self, tokens=None):
        return self.w


def torch_logits(e, w, p, ids):
    return (e[ids] + p[: ids.shape[1]]) @ w.T


# ----------------------------------------------------------------------------- batches


def _batch(ids, am, labels):
    return {"input_ids": np.asarray(ids, np.int32), "attention_mask": np.asarray(am, np.int32),
            "labels": np.asarray(labels, np.int32)}


def layouts(seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (B, S))
    ones = np.ones((B, S), np.int32)
    out = {"labels_eq_input_ids": _batch(ids, ones, ids)}
    am = ones.copy()
    am[1, :2] = 0  # left padding
    labels = np.where(am == 1, ids, -100)
    labels[0, :3] = -100  # a prompt without loss
    labels[2, :] = -100  # a row without any label token
    out["ragged_with_empty_row"] = _batch(ids, am, labels)
    am = ones.copy()
    am[1, 4:], am[3, 3:] = 0, 0  # right padding, as this library pads
    labels = np.where(am == 1, ids, -100)
    labels[:, :2] = -100  # a masked prompt
    out["prompt_masked_right_padded"] = _batch(np.where(am == 1, ids, 0), am, labels)
    out["no_label_at_all"] = _batch(ids, ones, np.full((B, S), -100))
    return out


FORGET = layouts(3)
ALTERNATE = layouts(4)  # DPO's preferred answers: the same layouts, other tokens
EMPTY = {"no_label_at_all"}


def with_alternate(name):
    f, a = FORGET[name], ALTERNATE[name]
    return {**f, **{obj.ALT + k: v for k, v in a.items()}}


# ----------------------------------------------------------------------------- the two sides


@functools.cache
def _compiled(name: str, compat: str | None):
    """The jitted value and gradients of loss ``name`` in mode ``compat`` (one compilation serves
    every batch layout: they share their shapes)."""
    loss_fn = LOSSES[name][0](compat)

    def f(e, w, batch):
        ref = EmbedModel(jnp.asarray(E_REF), jnp.asarray(W_REF), jnp.asarray(P_REF))
        return loss_fn(EmbedModel(e, w, jnp.asarray(P)), batch, ref)[0]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def jax_value_and_grads(name, compat, batch):
    value, (ge, gw) = _compiled(name, compat)(jnp.asarray(E), jnp.asarray(W), batch)
    return float(value), np.asarray(ge), np.asarray(gw)


def torch_value_and_grads(formula, batch):
    """``formula(logits_of, ref_logits_of, batch)`` with ``logits_of(ids)`` the model's logits."""
    e, w = torch.tensor(E, requires_grad=True), torch.tensor(W, requires_grad=True)
    p = torch.tensor(P)
    tb = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    er, wr, pr = torch.tensor(E_REF), torch.tensor(W_REF), torch.tensor(P_REF)
    value = formula(lambda ids: torch_logits(e, w, p, ids), lambda ids: torch_logits(er, wr, pr, ids), tb)
    ge, gw = torch.autograd.grad(value, (e, w), allow_unused=True)
    zero = lambda g, like: np.zeros(like.shape, np.float32) if g is None else g.numpy()  # noqa: E731
    return float(value.detach()), zero(ge, E), zero(gw, W)


def assert_close(got, want, rtol=RTOL):
    """Same non-finite entries; finite ones within ``rtol`` of the largest finite magnitude."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    if fin.any():
        scale = np.abs(want[fin]).max()
        assert np.abs(got[fin] - want[fin]).max() <= rtol * scale + 1e-30, (got, want)


# ----------------------------------------------------------------------------- this library's default, in torch


def _shift(logits, labels):
    return logits[:, :-1], labels[:, 1:], (labels[:, 1:] != -100).to(torch.float32)


def _pooled(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _seq_logp(logits, labels):
    lg, y, m = _shift(logits, labels)
    return (torch.log_softmax(lg, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * m).sum(-1), m


def def_dpo(lo, lr, b, beta):
    lose, ml = _seq_logp(lo(b["input_ids"]), b["labels"])
    win, mw = _seq_logp(lo(b["alt_input_ids"]), b["alt_labels"])
    lose_ref, _ = _seq_logp(lr(b["input_ids"]), b["labels"])
    win_ref, _ = _seq_logp(lr(b["alt_input_ids"]), b["alt_labels"])
    rows = ((ml.sum(-1) > 0) & (mw.sum(-1) > 0)).to(torch.float32)
    return _pooled(-(2 / beta) * F.logsigmoid(beta * ((win - win_ref) - (lose - lose_ref))), rows)


def def_undial(lo, lr, b, beta):
    lg, y, m = _shift(lo(b["input_ids"]), b["labels"])
    teacher = lr(b["input_ids"])[:, :-1] - beta * F.one_hot(y.clamp(min=0), V)
    ce = -(torch.softmax(teacher, -1) * torch.log_softmax(lg, -1)).sum(-1)
    return _pooled(ce, m)


def def_pdu(lo, lr, b):
    z = lo(b["input_ids"])
    gap = (z.max(-1)[0] - z.mean(-1)) ** 2
    m = torch.cat([(b["labels"][:, 1:] != -100), torch.zeros_like(b["labels"][:, :1], dtype=torch.bool)], 1)
    return _pooled(gap, m.to(torch.float32))


def _or_zero(ou):
    """The reference's formula, 0 where it is NaN for want of a label token (the default mode's guard)."""
    def f(lo, lr, b):
        v = ou(lo, lr, b)
        return torch.nan_to_num(v, nan=0.0) if torch.isnan(v) else v
    return f


BETA, BETA1, BETA2 = 0.7, 2.0, 1.5
LOSSES = {  # name -> (library loss for a compat mode, reference formula, default formula)
    "dpo": (lambda c: obj.dpo_loss(BETA, compat=c),
            lambda lo, lr, b: ou_dpo(lo(b["alt_input_ids"]), lr(b["alt_input_ids"]), b["alt_labels"],
                                     lo(b["input_ids"]), lr(b["input_ids"]), b["labels"], BETA),
            lambda lo, lr, b: def_dpo(lo, lr, b, BETA)),
    "undial": (lambda c: tl.undial_loss(3.0, compat=c),
               lambda lo, lr, b: ou_undial(lo(b["input_ids"]), lr(b["input_ids"]), b["labels"], 3.0),
               lambda lo, lr, b: def_undial(lo, lr, b, 3.0)),
    "wga": (lambda c: tl.wga_loss(BETA, compat=c),
            lambda lo, lr, b: ou_wga(lo(b["input_ids"]), b["labels"], BETA), None),
    "satimp": (lambda c: tl.satimp_loss(BETA1, BETA2, compat=c),
               lambda lo, lr, b: ou_satimp(lo(b["input_ids"]), b["labels"], BETA1, BETA2), None),
    "ce_u": (lambda c: tl.ce_u_loss(1, compat=c),
             lambda lo, lr, b: ou_ceu(lo(b["input_ids"]), b["labels"], 1), None),
    "ce_u_first2": (lambda c: tl.ce_u_loss(2, compat=c),
                    lambda lo, lr, b: ou_ceu(lo(b["input_ids"]), b["labels"], 2), None),
    "pdu": (lambda c: tl.pdu_forget_loss(compat=c),
            lambda lo, lr, b: ou_pdu_forget(lo(b["input_ids"]), b["labels"]), def_pdu),
}


@pytest.mark.parametrize("layout", sorted(FORGET))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compat_mode_equals_open_unlearning(name, layout):
    _, ou, _ = LOSSES[name]
    batch = with_alternate(layout)
    got, want = jax_value_and_grads(name, OU, batch), torch_value_and_grads(ou, batch)
    if name == "pdu" and layout in EMPTY:  # the reference's 0/0 gradient is NaN; ours is zero (documented)
        assert np.isnan(want[2]).all() and not np.abs(got[2]).any() and not np.abs(got[1]).any()
        got, want = got[:1], want[:1]
    for g, w in zip(got, want):
        assert_close(g, w)
    # the reference's NaN (a mean over no label token) is kept; DPO (log-ratios 0) and UNDIAL
    # (every position counts) stay finite
    assert np.isfinite(want[0]) == (layout not in EMPTY or name in ("dpo", "undial"))
    assert layout in EMPTY or np.abs(want[2]).max() > 0  # a real gradient reaches W (no vacuous match)


@pytest.mark.parametrize("layout", sorted(FORGET))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_default_mode_equals_the_documented_formula(name, layout):
    _, ou, default = LOSSES[name]
    batch = with_alternate(layout)
    got = jax_value_and_grads(name, None, batch)
    want = torch_value_and_grads(default or _or_zero(ou), batch)
    for g, w in zip(got, want):
        assert_close(g, w)
    if layout in EMPTY:  # no label token: 0 with zero gradient, not NaN
        assert got[0] == 0.0 and not np.abs(got[2]).any()


def test_the_modes_differ_where_the_reference_counts_other_positions():
    """Control: on a batch with masked prompts and padding, UNDIAL (every position vs label
    positions), PDU (unshifted vs shifted mask) and DPO (all rows vs rows with both answers)
    give different values in the two modes, so the parity tests tell the modes apart."""
    batch = with_alternate("ragged_with_empty_row")
    for name in ("undial", "pdu", "dpo"):
        a = jax_value_and_grads(name, None, batch)[0]
        b = jax_value_and_grads(name, OU, batch)[0]
        assert abs(a - b) > 1e-3 * max(abs(a), abs(b)), name


def test_precomputed_reference_equals_the_resident_one():
    """DPO with the batch's ``ref_logp`` / ``alt_ref_logp`` columns (precomputed by the start
    model) equals DPO with the resident reference, value and gradients."""
    batch = with_alternate("ragged_with_empty_row")
    ref = EmbedModel(jnp.asarray(E_REF), jnp.asarray(W_REF), jnp.asarray(P_REF))
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    pre = dict(jb, ref_logp=obj.sequence_logprob(ref, jb),
               alt_ref_logp=obj.sequence_logprob(ref, obj.alternate_batch(jb)))
    loss = obj.dpo_loss(BETA)

    def f(e, w, b, r):
        return loss(EmbedModel(e, w, jnp.asarray(P)), b, r)[0]

    g1 = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(E), jnp.asarray(W), jb, ref)
    g2 = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(E), jnp.asarray(W), pre, None)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6), g1, g2)


def test_dpo_without_alternate_columns_names_them():
    batch = {k: jnp.asarray(v) for k, v in FORGET["labels_eq_input_ids"].items()}
    with pytest.raises(ValueError, match="alt_input_ids"):
        obj.dpo_loss(BETA)(EmbedModel(jnp.asarray(E), jnp.asarray(W), jnp.asarray(P)), batch, None)


def test_factories_check_their_settings():
    for bad in (lambda: obj.wga(beta=0.0), lambda: obj.satimp(beta1=-1.0), lambda: obj.undial(beta=0.0),
                lambda: obj.ce_u(ignore_first=-1), lambda: obj.dpo(reference="precompute", retain="kl"),
                lambda: obj.pdu(retain="mse"), lambda: obj.idk_dpo(compat="other")):
        with pytest.raises(ValueError):
            bad()
    assert obj.idk_dpo().alternates == "idk" and obj.dpo().alternates == "records"
    assert obj.undial().needs_reference and not obj.dpo(reference="precompute").needs_reference
    assert obj.ce_u(retain="none").retain is obj.zero_loss
