"""Unlearning objectives: pure losses of a model on a batch.

A batch is a dict of ``input_ids [b, s]`` (int32), ``attention_mask [b, s]`` (1 = token) and
``labels [b, s]`` (int32, ``IGNORE`` = -100 = no loss; aligned with ``input_ids``: position ``t``
predicts ``labels[t+1]``, the Hugging Face convention). A model is anything with
``model(input_ids, attention_mask) -> logits [b, s, vocab]`` (plus ``final_hidden`` and
``head_weight`` for chunked log-probs) and, for RMU,
``model.hidden_at(input_ids, attention_mask, layer) -> [b, s, D]``.

Every loss returns ``(loss, metrics)`` where ``metrics["weight"]`` is what the loss averages
over (label tokens, or sequences for NPO/SimNPO): the step can combine micro-batches by that
weight, so k micro-batches give the gradient of one batch of the same tokens. Both the forget
and the retain loss are losses to *minimise* (gradient ascent's forget loss is ``-NLL``).

``logit_chunk`` (an argument of the log-likelihood losses and their objectives) computes the
label log-probabilities that many positions at a time (`token_math.chunked_label_logprobs`),
so the float32 ``[b, s, vocab]`` logits never exist at once.

`OBJECTIVES` is the registry of objective factories by name (configs and the CLI read it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_unlearn.registry import Registry
from jax_unlearn.token_math import IGNORE, check_chunk, model_label_logprobs

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, Metrics]]


def _masked_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum(values*mask)/max(sum(mask), 1), sum(mask))``."""
    weight = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.maximum(weight, 1.0), weight


def nll_loss(logit_chunk: int | None = None) -> LossFn:
    """Token-mean negative log-likelihood of the label tokens: ``-sum(logp)/n_tokens``."""
    check_chunk(logit_chunk)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        del ref
        logp, mask = model_label_logprobs(model, batch, logit_chunk)
        loss, n = _masked_mean(-logp, mask)
        return loss, {"nll": loss, "weight": n}

    return loss_fn


def neg_nll_loss(logit_chunk: int | None = None) -> LossFn:
    """Gradient ascent: ``L = -NLL`` (token mean)."""
    nll_fn = nll_loss(logit_chunk)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        loss, metrics = nll_fn(model, batch, ref)
        return -loss, metrics

    return loss_fn


nll = nll_loss()  # ``nll(model, batch) -> (token-mean NLL, metrics)``
neg_nll = neg_nll_loss()


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


REF_LOGP = "ref_logp"  # batch column: the reference model's sequence log-prob of each row, [b] float32


def sequence_logprob(model, batch: Batch, logit_chunk: int | None = None) -> jax.Array:
    """``log p(y)`` per row, ``[b]``: the label tokens' log-probs summed (NPO's sequence log-prob)."""
    logp, _ = model_label_logprobs(model, batch, logit_chunk)
    return jnp.sum(logp, axis=-1)


def reference_logprob(batch: Batch, ref, logit_chunk: int | None = None) -> jax.Array:
    """The reference's ``log p_ref(y)`` per row ``[b]`` (no gradient): the batch's precomputed
    `REF_LOGP` column when present, else computed with the resident ``ref`` model."""
    if REF_LOGP in batch:
        return jax.lax.stop_gradient(batch[REF_LOGP].astype(jnp.float32))
    if ref is None:
        raise ValueError(f"NPO needs the reference's log-probs: a resident reference model or a "
                         f"{REF_LOGP!r} batch column (objective.reference: precompute)")
    return jax.lax.stop_gradient(sequence_logprob(ref, batch, logit_chunk))


def npo_loss(beta: float, logit_chunk: int | None = None) -> LossFn:
    """NPO: ``L = -(2/beta) * mean_seq logsigmoid(-beta * (logp_theta(y) - logp_ref(y)))`` with
    sequence log-probs summed over the answer (label) tokens and ``ref`` the frozen start model;
    ``logp_ref(y)`` is read from the batch's `REF_LOGP` column when it has one (`reference_logprob`)."""
    check_chunk(logit_chunk)

    def loss_fn(model, batch: Batch, ref) -> tuple[jax.Array, Metrics]:
        logp, mask = model_label_logprobs(model, batch, logit_chunk)
        log_ratio = jnp.sum(logp, axis=-1) - reference_logprob(batch, ref, logit_chunk)  # [b]
        seq = _sequences(mask)
        loss, n = _masked_mean(-(2.0 / beta) * jax.nn.log_sigmoid(-beta * log_ratio), seq)
        return loss, {"log_ratio": _masked_mean(log_ratio, seq)[0], "weight": n}

    return loss_fn


def simnpo_loss(beta: float, delta: float, logit_chunk: int | None = None) -> LossFn:
    """SimNPO: ``L = -(2/beta) * mean_seq logsigmoid(beta * (NLL_sum(y)/|y| - delta))``, no reference."""
    check_chunk(logit_chunk)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        del ref
        logp, mask = model_label_logprobs(model, batch, logit_chunk)
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
OBJECTIVES = Registry("objective")


def _retain(kind: str, logit_chunk: int | None) -> tuple[LossFn, bool]:
    """The retain loss ``kind`` (``"nll"``, or ``"kl"`` to the frozen start model, which is
    computed over the whole vocabulary and so is not chunked) and whether it needs the reference."""
    if kind not in RETAIN_LOSSES:
        raise ValueError(f"retain={kind!r} is not supported; expected one of {RETAIN_LOSSES}")
    return (nll_loss(logit_chunk), False) if kind == "nll" else (kl_to_reference, True)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@OBJECTIVES.register("grad_ascent")
def grad_ascent(logit_chunk: int | None = None) -> Objective:
    """GradAscent: ``L_f = -NLL(forget)``, no retain loss (``L_r = 0``)."""
    return Objective("grad_ascent", neg_nll_loss(logit_chunk), zero_loss)


@OBJECTIVES.register("grad_diff")
def grad_diff(retain: str = "nll", logit_chunk: int | None = None) -> Objective:
    """GradDiff: ``L_f = -NLL(forget)``; ``L_r = NLL(retain)`` or ``KL(p_ref || p_theta)`` (``retain="kl"``)."""
    fn, needs_ref = _retain(retain, logit_chunk)
    return Objective("grad_diff", neg_nll_loss(logit_chunk), fn, needs_reference=needs_ref)


REFERENCES = ("resident", "precompute")


@OBJECTIVES.register("npo")
def npo(beta: float = 0.1, retain: str = "nll", logit_chunk: int | None = None,
        reference: str = "resident") -> Objective:
    """NPO forget loss (see `npo_loss`) with an NLL or KL retain loss.

    ``reference="resident"`` keeps a frozen copy of the start model for ``logp_ref(y)``;
    ``"precompute"`` reads it from the forget batches' `REF_LOGP` column (filled once before
    training, `jax_unlearn.step.add_reference_logprobs`), so only one model is held. The KL
    retain loss needs the reference's whole distribution on retain tokens, hence the resident model.
    """
    _positive("npo beta", beta)
    if reference not in REFERENCES:
        raise ValueError(f"npo reference={reference!r} is not supported; expected one of {REFERENCES}")
    fn, kl = _retain(retain, logit_chunk)
    if reference == "precompute" and kl:
        raise ValueError("npo reference='precompute' holds no reference model, but retain='kl' needs the "
                         "resident one; use retain='nll' or reference='resident'")
    return Objective("npo", npo_loss(beta, logit_chunk), fn, needs_reference=reference == "resident")


@OBJECTIVES.register("simnpo")
def simnpo(beta: float = 2.5, delta: float = 0.0, retain: str = "nll", logit_chunk: int | None = None) -> Objective:
    """SimNPO forget loss (see `simnpo_loss`) with an NLL or KL retain loss."""
    _positive("simnpo beta", beta)
    fn, needs_ref = _retain(retain, logit_chunk)
    return Objective("simnpo", simnpo_loss(beta, delta, logit_chunk), fn, needs_reference=needs_ref)


@OBJECTIVES.register("rmu")
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
