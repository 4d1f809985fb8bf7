"""Token-level forget losses of the field: WGA, SatImp, UNDIAL, CE-U and PDU (pure functions).

Each factory returns ``loss_fn(model, batch, ref) -> (loss, metrics)`` with the conventions of
`jax_unlearn.objectives` (batch: ``input_ids``, ``attention_mask``, ``labels`` ``[b, s]``, HF
alignment: position ``t`` predicts ``labels[:, t+1]``; ``metrics["weight"]`` is what the loss
averages over). Every loss is a *pooled* token mean over the micro-batch, as open-unlearning's
(``mean`` over the flattened valid positions), with ``compat=None | "open_unlearning"``:

* default: the label positions (``labels[:, t+1] != -100``); no label token gives 0 (zero gradient);
* ``"open_unlearning"``: the reference's value for an empty batch (NaN, torch's mean of nothing;
  the gradient stays zero) and, where the reference's positions differ, its positions: UNDIAL
  averages over *every* shifted position ``b*(s-1)`` (prompt and padding included, whose
  target is the teacher's distribution with token ``-100 mod V`` demoted, torch's negative
  index), PDU over the *unshifted* label mask (position ``t`` counts when ``labels[:, t] != -100``).

Citations (locuslab/open-unlearning @d3d7cf9) are in docs/reference.md, section 6.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_unlearn.token_math import IGNORE, at_least_f32, check_chunk, model_label_logprobs

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, dict[str, jax.Array]]]
COMPAT = "open_unlearning"


def pooled_mean(values: jax.Array, mask: jax.Array, compat: str | None) -> tuple[jax.Array, jax.Array]:
    """``(sum(values*mask) / sum(mask), sum(mask))``; an empty ``mask`` gives 0 by default and NaN
    (with zero gradient) with ``compat`` (torch's mean of no element)."""
    weight = jnp.sum(mask)
    loss = jnp.sum(values * mask) / jnp.maximum(weight, 1.0)
    if compat:
        loss = loss + jax.lax.stop_gradient(jnp.where(weight == 0, jnp.nan, 0.0).astype(loss.dtype))
    return loss, weight


def check_compat_mode(compat: str | None) -> None:
    if compat is not None and compat != COMPAT:
        raise ValueError(f"compat={compat!r} is not supported; expected None or {COMPAT!r}")


def _shifted(model, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """``(logits [b, s-1, V] in at least float32, target labels [b, s-1])``."""
    logits = at_least_f32(model(batch["input_ids"], batch.get("attention_mask")))
    return logits[:, :-1], batch["labels"][:, 1:]


def _weighted_ascent(weight_of: Callable[[jax.Array], jax.Array], logit_chunk: int | None,
                     compat: str | None, name: str) -> LossFn:
    """``L = -mean_t w_t * nll_t`` over label tokens, ``w_t = weight_of(p_t)`` with the gradient
    stopped (``p_t = exp(-nll_t)``, the label's probability)."""
    check_chunk(logit_chunk)
    check_compat_mode(compat)

    def loss_fn(model, batch: Batch, ref=None):
        del ref
        logp, mask = model_label_logprobs(model, batch, logit_chunk)  # [b, s-1] each
        w = jax.lax.stop_gradient(weight_of(jnp.exp(logp)))
        loss, n = pooled_mean(w * logp, mask, compat)  # -(w * nll) = w * logp
        return loss, {name: loss, "weight": n}

    return loss_fn


def wga_loss(beta: float, logit_chunk: int | None = None, compat: str | None = None) -> LossFn:
    """WGA (weighted gradient ascent): ``L = -mean_t p_t^beta * nll_t`` over the label tokens, with
    ``p_t = exp(-nll_t)`` the label's probability, its weight not differentiated."""
    return _weighted_ascent(lambda p: p ** beta, logit_chunk, compat, "wga")


def satimp_loss(beta1: float, beta2: float, logit_chunk: int | None = None, compat: str | None = None) -> LossFn:
    """SatImp: ``L = -mean_t p_t^beta1 (1 - p_t)^beta2 * nll_t`` over the label tokens (weights not
    differentiated): tokens already forgotten (small ``p``) and saturated ones (``p`` near 1) weigh less."""
    return _weighted_ascent(lambda p: p ** beta1 * (1.0 - p) ** beta2, logit_chunk, compat, "satimp")


def _one_hot(target: jax.Array, vocab: int) -> jax.Array:
    """``[..., V]`` float32, 1 at ``target mod V`` (torch's negative index: ``-100`` is ``V - 100``)."""
    return jax.nn.one_hot(jnp.mod(target, vocab), vocab, dtype=jnp.float32)


def undial_loss(beta: float, compat: str | None = None) -> LossFn:
    """UNDIAL: self-distillation towards the frozen teacher's distribution with the label logit
    lowered by ``beta``: ``L = mean_t CE(softmax(z_ref,t - beta*e_{y_t}), softmax(z_t))``.

    Default: over the label positions. ``compat="open_unlearning"``: over every shifted position
    ``b*(s-1)``, the ignored ones with the teacher's logit of token ``-100 mod V`` lowered (the
    reference's ``mask[..., shift_labels] = 1`` with index -100). Needs ``ref`` (full-vocabulary
    teacher logits: a resident reference, nothing to precompute in less than ``b*s*V`` floats).
    """
    check_compat_mode(compat)

    def loss_fn(model, batch: Batch, ref):
        if ref is None:
            raise ValueError("UNDIAL needs the frozen start model as teacher (objective needs_reference)")
        logits, target = _shifted(model, batch)
        teacher, _ = _shifted(ref, batch)
        soft = jax.lax.stop_gradient(jax.nn.softmax(teacher - beta * _one_hot(target, logits.shape[-1]), axis=-1))
        ce = -jnp.sum(soft * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # [b, s-1]
        mask = jnp.ones(ce.shape, jnp.float32) if compat else (target != IGNORE).astype(jnp.float32)
        loss, n = pooled_mean(ce, mask, compat)
        return loss, {"undial": loss, "weight": n}

    return loss_fn


def drop_first_answer_tokens(labels: jax.Array, n: int) -> jax.Array:
    """``labels`` with each row's first ``n`` label tokens (``!= -100``, unshifted) set to -100."""
    valid = labels != IGNORE
    return jnp.where(valid & (jnp.cumsum(valid, axis=-1) <= n), IGNORE, labels)


def ce_u_loss(ignore_first: int = 1, compat: str | None = None) -> LossFn:
    """CE-U (cross-entropy unlearning): ``L = mean_t CE(q_t, softmax(z_t))`` over the label tokens,
    the target ``q_t = softmax(z_t with z_t[y_t] = -inf)`` (not differentiated): the model's own
    distribution with the true token's probability moved to the others. Each row's first
    ``ignore_first`` label tokens take no loss (the paper's trick, open-unlearning's default 1)."""
    check_compat_mode(compat)
    if isinstance(ignore_first, bool) or not isinstance(ignore_first, int) or ignore_first < 0:
        raise ValueError(f"ce_u ignore_first must be an integer >= 0, got {ignore_first!r}")

    def loss_fn(model, batch: Batch, ref=None):
        del ref
        labels = drop_first_answer_tokens(batch["labels"], ignore_first)
        logits, target = _shifted(model, {**batch, "labels": labels})
        hot = _one_hot(target, logits.shape[-1]) > 0
        q = jax.lax.stop_gradient(jax.nn.softmax(jnp.where(hot, -jnp.inf, logits), axis=-1))
        ce = -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # [b, s-1]
        loss, n = pooled_mean(ce, (target != IGNORE).astype(jnp.float32), compat)
        return loss, {"ce_u": loss, "weight": n}

    return loss_fn


def pdu_forget_loss(compat: str | None = None) -> LossFn:
    """PDU's forget loss: ``L = mean_t (max_v z_t,v - mean_v z_t,v)^2``, pushing each position's
    logits towards uniform. Default: the positions that predict a label token (``labels[:, t+1]
    != -100``); ``compat="open_unlearning"``: the reference's unshifted mask (``labels[:, t] != -100``
    over all ``s`` positions: the logits at a label token, which predict the token after it). A
    micro-batch without label tokens gives NaN there, value and gradient (torch's 0/0); here
    the value is NaN and the gradient zero, as for the other losses (XLA need not keep a
    ``0 * inf`` NaN under jit, so the reference's NaN gradient is not reproducible)."""
    check_compat_mode(compat)

    def loss_fn(model, batch: Batch, ref=None):
        del ref
        logits = at_least_f32(model(batch["input_ids"], batch.get("attention_mask")))  # [b, s, V]
        gap = (jnp.max(logits, axis=-1) - jnp.mean(logits, axis=-1)) ** 2  # [b, s]
        labels = batch["labels"]
        if compat:
            mask = labels != IGNORE
        else:
            mask = jnp.concatenate([(labels[:, 1:] != IGNORE), jnp.zeros_like(labels[:, :1], bool)], axis=1)
        loss, n = pooled_mean(gap, mask.astype(jnp.float32), compat)
        return loss, {"pdu": loss, "weight": n}

    return loss_fn
