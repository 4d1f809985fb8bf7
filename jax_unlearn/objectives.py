"""Unlearning objectives: pure losses of a model on a batch (DESIGN.md's formulas).

A batch is a dict of ``input_ids [b, s]`` (int32), ``attention_mask [b, s]`` (1 = token) and
``labels [b, s]`` (int32, ``-100`` = no loss; aligned with ``input_ids``: position ``t``
predicts ``labels[t+1]``, the Hugging Face convention). A model is anything with
``model(input_ids, attention_mask) -> logits [b, s, vocab]`` and, for RMU,
``model.hidden_at(input_ids, attention_mask, layer) -> [b, s, d]``.

Every loss returns ``(loss, metrics)`` where ``metrics["weight"]`` is what the loss averages
over (label tokens, or sequences for NPO/SimNPO): micro-batches are combined by that weight,
so k micro-batches give the gradient of one batch of the same tokens. Both the forget and
the retain loss are losses to *minimise* (gradient ascent's forget loss is ``-NLL``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_unlearn.data import IGNORE  # label of a position without loss (-100)

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, Metrics]]


# ----------------------------------------------------------------------------- token maths


def label_logprobs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of the next-token labels.

    Args:
      logits: ``[b, s, vocab]`` (any float dtype; computed in float32).
      labels: ``[b, s]`` int, ``-100`` where no loss is taken.

    Returns:
      ``(logp [b, s-1], mask [b, s-1])``: ``logp[:, t] = log p(labels[:, t+1] | <= t)`` and
      float32 ``mask`` 1 where ``labels[:, t+1] != -100``.
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [b, s-1, vocab]
    target = labels[:, 1:]  # [b, s-1]
    mask = (target != IGNORE).astype(jnp.float32)
    safe = jnp.where(target == IGNORE, 0, target)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return logp * mask, mask


def chunked_label_logprobs(h: jax.Array, w: jax.Array, labels: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`label_logprobs` of ``logits = h @ w^T`` without materialising ``[b, s, vocab]``.

    Args:
      h: final-normed hidden states ``[b, s, D]``.
      w: output projection ``[vocab, D]``.
      labels: ``[b, s]`` int, ``-100`` where no loss is taken.
      chunk: positions per chunk; each chunk's float32 logits ``[b, chunk, vocab]`` exist only
        inside one ``lax.map`` iteration and are recomputed in the backward pass.

    Returns:
      ``(logp [b, s-1], mask [b, s-1])`` equal to ``label_logprobs(h @ w^T, labels)``.
    """
    b, s, d = h.shape
    n = s - 1
    pad = (-n) % chunk
    target = jnp.pad(labels[:, 1:], ((0, 0), (0, pad)), constant_values=IGNORE)
    hs = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0)))
    hs = hs.reshape(b, -1, chunk, d).swapaxes(0, 1)  # [chunks, b, chunk, D]
    ts = target.reshape(b, -1, chunk).swapaxes(0, 1)  # [chunks, b, chunk]

    @jax.checkpoint
    def one(h_c, t_c):
        logits = jnp.einsum("btd,vd->btv", h_c, w.astype(h_c.dtype), preferred_element_type=jnp.float32)
        safe = jnp.where(t_c == IGNORE, 0, t_c)
        picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)  # [b, chunk]

    logp = jax.lax.map(lambda xs: one(*xs), (hs, ts)).swapaxes(0, 1).reshape(b, -1)[:, :n]
    mask = (labels[:, 1:] != IGNORE).astype(jnp.float32)
    return logp * mask, mask


def _masked_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum(values*mask)/max(sum(mask), 1), sum(mask))``."""
    weight = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.maximum(weight, 1.0), weight


def _model_logprobs(model, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Label log-probs of ``model`` on ``batch``, chunked over positions when the model's
    options set ``logit_chunk`` (see `chunked_label_logprobs`)."""
    ids, am, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    chunk = getattr(getattr(model, "options", None), "logit_chunk", None)
    if chunk:
        return chunked_label_logprobs(model.final_hidden(ids, am), model.head_weight(), labels, chunk)
    return label_logprobs(model(ids, am), labels)


def nll(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
    """Token-mean negative log-likelihood of the label tokens: ``-sum(logp)/n_tokens``."""
    del ref
    logp, mask = _model_logprobs(model, batch)
    loss, n = _masked_mean(-logp, mask)
    return loss, {"nll": loss, "weight": n}


def neg_nll(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
    """Gradient ascent: ``L = -NLL`` (token mean)."""
    loss, metrics = nll(model, batch, ref)
    return -loss, metrics


def kl_to_reference(model, batch: Batch, ref) -> tuple[jax.Array, Metrics]:
    """``KL(p_ref || p_theta)`` averaged over the label tokens: ``sum_v p_ref (log p_ref - log p_theta)``."""
    ids, am = batch["input_ids"], batch.get("attention_mask")
    logq = jax.nn.log_softmax(model(ids, am)[:, :-1].astype(jnp.float32), axis=-1)  # [b, s-1, vocab]
    logp = jax.lax.stop_gradient(jax.nn.log_softmax(ref(ids, am)[:, :-1].astype(jnp.float32), axis=-1))
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)  # [b, s-1]
    mask = (batch["labels"][:, 1:] != IGNORE).astype(jnp.float32)
    loss, n = _masked_mean(kl, mask)
    return loss, {"kl": loss, "weight": n}


def zero_loss(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
    """No retain objective (plain gradient ascent): ``L = 0`` with zero gradient."""
    del ref
    return jnp.zeros((), jnp.float32), {"weight": jnp.asarray(batch["input_ids"].shape[0], jnp.float32)}


def _sequences(mask: jax.Array) -> jax.Array:
    """1 for sequences with at least one label token: ``[b]``."""
    return (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)


def npo_loss(beta: float) -> LossFn:
    """NPO: ``L = -(2/beta) * mean_seq logsigmoid(-beta * (logp_theta(y) - logp_ref(y)))`` with
    sequence log-probs summed over the answer (label) tokens and ``ref`` the frozen start model."""

    def loss_fn(model, batch: Batch, ref) -> tuple[jax.Array, Metrics]:
        logp, mask = _model_logprobs(model, batch)
        ref_logp, _ = jax.lax.stop_gradient(_model_logprobs(ref, batch))
        log_ratio = jnp.sum(logp, axis=-1) - jnp.sum(ref_logp, axis=-1)  # [b]
        seq = _sequences(mask)
        loss, n = _masked_mean(-(2.0 / beta) * jax.nn.log_sigmoid(-beta * log_ratio), seq)
        return loss, {"log_ratio": _masked_mean(log_ratio, seq)[0], "weight": n}

    return loss_fn


def simnpo_loss(beta: float, delta: float) -> LossFn:
    """SimNPO: ``L = -(2/beta) * mean_seq logsigmoid(beta * (NLL_sum(y)/|y| - delta))``, no reference."""

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        del ref
        logp, mask = _model_logprobs(model, batch)
        length = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        avg_nll = -jnp.sum(logp, axis=-1) / length  # [b]
        seq = _sequences(mask)
        loss, n = _masked_mean(-(2.0 / beta) * jax.nn.log_sigmoid(beta * (avg_nll - delta)), seq)
        return loss, {"nll": _masked_mean(avg_nll, seq)[0], "weight": n}

    return loss_fn


def control_vector(hidden_size: int, steering: float, seed: int) -> np.ndarray:
    """RMU's fixed random direction ``c = s * u/|u|`` with ``u ~ U[0,1)^d`` drawn once from ``seed``."""
    u = np.random.default_rng(seed).random(hidden_size, dtype=np.float64)
    return (steering * u / np.linalg.norm(u)).astype(np.float32)


def _token_mask(batch: Batch) -> jax.Array:
    am = batch.get("attention_mask")
    return jnp.ones(batch["input_ids"].shape, jnp.float32) if am is None else am.astype(jnp.float32)


def rmu_forget_loss(layer: int, control: np.ndarray) -> LossFn:
    """RMU forget: masked token mean of ``mean_d (h_l(x) - c)^2`` at layer ``l``."""
    c = jnp.asarray(control)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        del ref
        h = model.hidden_at(batch["input_ids"], batch.get("attention_mask"), layer).astype(jnp.float32)
        loss, n = _masked_mean(jnp.mean((h - c) ** 2, axis=-1), _token_mask(batch))
        return loss, {"rmu_forget": loss, "weight": n}

    return loss_fn


def rmu_retain_loss(layer: int) -> LossFn:
    """RMU retain: masked token mean of ``mean_d (h_l(x) - h_l^ref(x))^2`` against the frozen model."""

    def loss_fn(model, batch: Batch, ref) -> tuple[jax.Array, Metrics]:
        ids, am = batch["input_ids"], batch.get("attention_mask")
        h = model.hidden_at(ids, am, layer).astype(jnp.float32)
        h_ref = jax.lax.stop_gradient(ref.hidden_at(ids, am, layer).astype(jnp.float32))
        loss, n = _masked_mean(jnp.mean((h - h_ref) ** 2, axis=-1), _token_mask(batch))
        return loss, {"rmu_retain": loss, "weight": n}

    return loss_fn


# ----------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    """A forget loss, a retain loss, and what they need.

    Attributes:
      name: e.g. ``"npo"``.
      forget: ``(model, forget_batch, ref) -> (loss, metrics)``.
      retain: ``(model, retain_batch, ref) -> (loss, metrics)``.
      needs_reference: whether ``ref`` (a frozen copy of the starting model) must be given.
      trainable: regex over parameter paths (``"layers.5.mlp.down_proj"``) selecting the
        parameters that train; ``None`` trains all.
    """

    name: str
    forget: LossFn
    retain: LossFn
    needs_reference: bool = False
    trainable: str | None = None


RETAIN_LOSSES = ("nll", "kl")


def _retain(kind: str) -> tuple[LossFn, bool]:
    if kind not in RETAIN_LOSSES:
        raise ValueError(f"retain={kind!r} is not supported; expected one of {RETAIN_LOSSES}")
    return (nll, False) if kind == "nll" else (kl_to_reference, True)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def grad_ascent() -> Objective:
    """GradAscent: ``L_f = -NLL(forget)``, no retain loss (``L_r = 0``)."""
    return Objective("grad_ascent", neg_nll, zero_loss)


def grad_diff(retain: str = "nll") -> Objective:
    """GradDiff: ``L_f = -NLL(forget)``; ``L_r = NLL(retain)`` or ``KL(p_ref || p_theta)`` (``retain="kl"``)."""
    fn, needs_ref = _retain(retain)
    return Objective("grad_diff", neg_nll, fn, needs_reference=needs_ref)


def npo(beta: float = 0.1, retain: str = "nll") -> Objective:
    """NPO forget loss (see `npo_loss`) with an NLL or KL retain loss."""
    _positive("npo beta", beta)
    fn, _ = _retain(retain)
    return Objective("npo", npo_loss(beta), fn, needs_reference=True)


def simnpo(beta: float = 2.5, delta: float = 0.0, retain: str = "nll") -> Objective:
    """SimNPO forget loss (see `simnpo_loss`) with an NLL or KL retain loss."""
    _positive("simnpo beta", beta)
    fn, needs_ref = _retain(retain)
    return Objective("simnpo", simnpo_loss(beta, delta), fn, needs_reference=needs_ref)


def rmu(
    hidden_size: int,
    layer: int = 7,
    steering: float = 2.0,
    seed: int = 0,
    trainable: str = r"layers\.(5|6|7)\.mlp\.down_proj",
) -> Objective:
    """RMU: steer layer-``l`` activations on forget data to ``c = s*u/|u|`` and keep them on
    retain data equal to the frozen model's; only ``trainable`` parameters train."""
    _positive("rmu steering", steering)
    if layer < 0:
        raise ValueError(f"rmu layer must be >= 0, got {layer}")
    c = control_vector(hidden_size, steering, seed)
    return Objective("rmu", rmu_forget_loss(layer, c), rmu_retain_loss(layer), needs_reference=True, trainable=trainable)
