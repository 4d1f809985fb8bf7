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

``compat`` (an argument of every loss and objective): ``None`` (the default) computes the
formulas as documented here; ``"open_unlearning"`` computes them as the paper's reference code
does (sustech-nlp/SAGO on locuslab/open-unlearning; docs/reference.md, section 4 and its table of
differences). In that mode:

* NLL: the token mean of a micro-batch without any label token is NaN (0/0, as torch's
  ``CrossEntropyLoss``), not 0; its gradient is zero in both modes;
* KL: over every position, unshifted, padding and the last position included, divided by
  ``b*s`` (``kl_div(..., reduction="batchmean")`` of ``[b*s, vocab]`` rows);
* NPO: the mean over all rows (a row without label tokens has log-ratio 0 and still counts);
* SimNPO: the length is the count of *unshifted* labels ``!= -100`` (one more than the
  predicted tokens when ``labels[:, 0]`` is a label; equal when it is masked, as the
  reference's chunks with a masked BOS); an empty row makes the micro-batch's loss NaN
  while the gradient is torch's: the other rows' (``1/b`` each), nothing from the empty row;
* RMU: tokens are ``labels != -100`` (unshifted), and the per-row normalisation has the
  reference's broadcasting quirk: ``mean_ij s_j / n_i = mean(s) * mean(1/n)``.

Every mode reports ``metrics["weight"]``: label tokens (NLL, default KL, default RMU), rows
with a label token (default NPO/SimNPO), all rows (compat NPO/SimNPO/RMU) or positions
(compat KL).

`OBJECTIVES` is the registry of objective factories by name (configs and the CLI read it):
the paper's ``grad_ascent``, ``grad_diff``, ``npo``, ``simnpo``, ``rmu`` and open-unlearning's
``dpo``, ``idk_dpo`` (DPO here; its forget batches carry the preferred answers in ``alt_*``
columns, `ALT`), ``undial``, ``wga``, ``satimp``, ``ce_u``, ``pdu`` (their forget losses in
`jax_unlearn.token_losses`; docs/reference.md, section 15).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_unlearn import token_losses as tl
from jax_unlearn.registry import Registry
from jax_unlearn.token_math import ALT, IGNORE, at_least_f32, check_chunk, model_label_logprobs

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, Metrics]]


OPEN_UNLEARNING = "open_unlearning"
COMPAT_MODES: tuple[str, ...] = (OPEN_UNLEARNING,)


def check_compat(compat: str | None) -> None:
    """``compat`` must be None or one of `COMPAT_MODES` (raises ValueError naming it)."""
    if compat is not None and compat not in COMPAT_MODES:
        raise ValueError(f"compat={compat!r} is not supported; expected None or one of {COMPAT_MODES}")


def _masked_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum(values*mask)/max(sum(mask), 1), sum(mask))``."""
    weight = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.maximum(weight, 1.0), weight


def _nan_if(empty: jax.Array) -> jax.Array:
    """0, or NaN where ``empty``: added to a guarded loss, it reports the NaN that the reference
    computes as 0/0, while the gradient stays the guarded one (zero from the empty part), as
    torch's, whose ignored targets give zero gradient whatever the loss value."""
    return jax.lax.stop_gradient(jnp.where(empty, jnp.nan, 0.0).astype(jnp.float32))


def _rows(batch: Batch) -> jax.Array:
    """The number of rows ``b`` as a float32 weight."""
    return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)


def nll_loss(logit_chunk: int | None = None, compat: str | None = None) -> LossFn:
    """Token-mean negative log-likelihood of the label tokens: ``-sum(logp)/n_tokens``.

    ``n_tokens`` pools the rows (a micro-batch's token mean, as the Hugging Face loss). With no
    label token the loss is 0 with zero gradient; with ``compat="open_unlearning"`` its value
    is NaN (torch's ``CrossEntropyLoss`` computes 0/0) and its gradient still zero (as torch's).
    """
    check_chunk(logit_chunk)
    check_compat(compat)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        del ref
        logp, mask = model_label_logprobs(model, batch, logit_chunk)
        loss, n = _masked_mean(-logp, mask)
        if compat:
            loss = loss + _nan_if(n == 0)
        return loss, {"nll": loss, "weight": n}

    return loss_fn


def neg_nll_loss(logit_chunk: int | None = None, compat: str | None = None) -> LossFn:
    """Gradient ascent: ``L = -NLL`` (token mean, see `nll_loss`)."""
    nll_fn = nll_loss(logit_chunk, compat)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        loss, metrics = nll_fn(model, batch, ref)
        return -loss, metrics

    return loss_fn


nll = nll_loss()  # ``nll(model, batch) -> (token-mean NLL, metrics)``
neg_nll = neg_nll_loss()


def kl_to_reference(model, batch: Batch, ref, *, compat: str | None = None) -> tuple[jax.Array, Metrics]:
    """``KL(p_ref || p_theta) = sum_v p_ref (log p_ref - log p_theta)`` per position, averaged.

    Default: over the positions that predict a label token (``labels[:, t+1] != -100``).
    ``compat="open_unlearning"``: over every position ``t`` of ``[b, s]``, unshifted, padding
    and the last position included, divided by ``b*s`` (the reference's
    ``kl_div(log_softmax(logits).view(-1, V), log_softmax(ref_logits).view(-1, V),
    reduction="batchmean", log_target=True)``).
    """
    check_compat(compat)
    ids, am = batch["input_ids"], batch.get("attention_mask")
    cut = slice(None) if compat else slice(None, -1)
    logq = jax.nn.log_softmax(at_least_f32(model(ids, am)[:, cut]), axis=-1)  # [b, s(-1), vocab]
    logp = jax.lax.stop_gradient(jax.nn.log_softmax(at_least_f32(ref(ids, am)[:, cut]), axis=-1))
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)  # [b, s(-1)]
    if compat:
        mask = jnp.ones(kl.shape, jnp.float32)
    else:
        mask = (batch["labels"][:, 1:] != IGNORE).astype(jnp.float32)
    loss, n = _masked_mean(kl, mask)
    return loss, {"kl": loss, "weight": n}


def kl_loss(compat: str | None = None) -> LossFn:
    """`kl_to_reference` with its ``compat`` bound: ``(model, batch, ref) -> (loss, metrics)``."""
    check_compat(compat)
    return kl_to_reference if compat is None else functools.partial(kl_to_reference, compat=compat)


def zero_loss(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
    """No retain objective (plain gradient ascent): ``L = 0`` with zero gradient."""
    del ref
    return jnp.zeros((), jnp.float32), {"weight": jnp.asarray(batch["input_ids"].shape[0], jnp.float32)}


def _sequences(mask: jax.Array) -> jax.Array:
    """1 for sequences with at least one label token: ``[b]``."""
    return (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)


def _row_mask(mask: jax.Array, compat: str | None) -> jax.Array:
    """The rows a sequence loss averages over: those with a label token, or every row (compat)."""
    return jnp.ones(mask.shape[:1], jnp.float32) if compat else _sequences(mask)


REF_LOGP = "ref_logp"  # batch column: the reference model's sequence log-prob of each row, [b] float32


def sequence_logprob(model, batch: Batch, logit_chunk: int | None = None) -> jax.Array:
    """``log p(y)`` per row, ``[b]``: the label tokens' log-probs summed (NPO's sequence log-prob)."""
    logp, _ = model_label_logprobs(model, batch, logit_chunk)
    return jnp.sum(logp, axis=-1)


def reference_logprob(batch: Batch, ref, logit_chunk: int | None = None) -> jax.Array:
    """The reference's ``log p_ref(y)`` per row ``[b]`` (no gradient): the batch's precomputed
    `REF_LOGP` column when present, else computed with the resident ``ref`` model."""
    if REF_LOGP in batch:
        return jax.lax.stop_gradient(at_least_f32(jnp.asarray(batch[REF_LOGP])))
    if ref is None:
        raise ValueError(f"NPO and DPO need the reference's log-probs: a resident reference model or a "
                         f"{REF_LOGP!r} batch column (objective.reference: precompute)")
    return jax.lax.stop_gradient(sequence_logprob(ref, batch, logit_chunk))


def npo_loss(beta: float, logit_chunk: int | None = None, compat: str | None = None) -> LossFn:
    """NPO: ``L = -(2/beta) * mean_seq logsigmoid(-beta * (logp_theta(y) - logp_ref(y)))`` with
    sequence log-probs summed over the answer (label) tokens and ``ref`` the frozen start model;
    ``logp_ref(y)`` is read from the batch's `REF_LOGP` column when it has one (`reference_logprob`).

    The mean is over the rows with a label token; with ``compat="open_unlearning"`` over every
    row (a row without label tokens has log-ratio 0 and adds the constant ``(2/beta) log 2``).
    """
    check_chunk(logit_chunk)
    check_compat(compat)

    def loss_fn(model, batch: Batch, ref) -> tuple[jax.Array, Metrics]:
        logp, mask = model_label_logprobs(model, batch, logit_chunk)
        log_ratio = jnp.sum(logp, axis=-1) - reference_logprob(batch, ref, logit_chunk)  # [b]
        seq = _row_mask(mask, compat)
        loss, n = _masked_mean(-(2.0 / beta) * jax.nn.log_sigmoid(-beta * log_ratio), seq)
        return loss, {"log_ratio": _masked_mean(log_ratio, seq)[0], "weight": n}

    return loss_fn


def alternate_batch(batch: Batch) -> dict[str, jax.Array]:
    """The alternate (preferred) answers of a DPO forget batch: its ``alt_*`` columns, unprefixed
    (``alt_input_ids`` -> ``input_ids``, ``alt_ref_logp`` -> `REF_LOGP`)."""
    alt = {k[len(ALT):]: v for k, v in batch.items() if k.startswith(ALT)}
    missing = [k for k in ("input_ids", "labels") if k not in alt]
    if missing:
        raise ValueError(f"DPO needs the forget batch's alternate answers: columns {[ALT + k for k in missing]} "
                         f"are missing (jax_unlearn.data.add_alternates; data.idk for idk_dpo)")
    return alt


def dpo_loss(beta: float, logit_chunk: int | None = None, compat: str | None = None) -> LossFn:
    """DPO on the forget set with the alternate answer preferred:
    ``L = -(2/beta) * mean_rows logsigmoid(beta * (r(y_alt) - r(y)))``, ``r(y) = logp_theta(y) -
    logp_ref(y)`` with sequence log-probs summed over the label tokens (as NPO's, `npo_loss`;
    the reference's from the batch's `REF_LOGP` / ``alt_ref_logp`` columns when present).

    ``y`` is the forget batch's answer, ``y_alt`` its ``alt_*`` columns (`alternate_batch`).
    The mean is over the rows whose two answers both have a label token; with
    ``compat="open_unlearning"`` over every row (an empty answer has ratio 0).
    """
    check_chunk(logit_chunk)
    check_compat(compat)

    def loss_fn(model, batch: Batch, ref) -> tuple[jax.Array, Metrics]:
        alt = alternate_batch(batch)
        lose, lose_mask = model_label_logprobs(model, batch, logit_chunk)
        win, win_mask = model_label_logprobs(model, alt, logit_chunk)
        lose_ratio = jnp.sum(lose, axis=-1) - reference_logprob(batch, ref, logit_chunk)  # [b]
        win_ratio = jnp.sum(win, axis=-1) - reference_logprob(alt, ref, logit_chunk)  # [b]
        rows = _rows_mask_both(lose_mask, win_mask, compat)
        loss, n = _masked_mean(-(2.0 / beta) * jax.nn.log_sigmoid(beta * (win_ratio - lose_ratio)), rows)
        return loss, {"log_ratio": _masked_mean(lose_ratio, rows)[0],
                      "alt_log_ratio": _masked_mean(win_ratio, rows)[0], "weight": n}

    return loss_fn


def _rows_mask_both(a: jax.Array, b: jax.Array, compat: str | None) -> jax.Array:
    return _row_mask(a, compat) if compat else _sequences(a) * _sequences(b)


def simnpo_loss(beta: float, delta: float, logit_chunk: int | None = None, compat: str | None = None) -> LossFn:
    """SimNPO: ``L = -(2/beta) * mean_seq logsigmoid(beta * (NLL_sum(y)/|y| - delta))``, no reference.

    Default: ``|y|`` counts the predicted label tokens (``labels[:, 1:] != -100``) and the mean
    is over the rows that have one. ``compat="open_unlearning"``: ``|y|`` counts the *unshifted*
    labels (``labels != -100``, position 0 included) and the mean is over every row; a row
    without labels makes the loss value NaN (0/0, as in the reference) while its gradient is
    the reference's too: zero from that row, ``1/b`` per other row.
    """
    check_chunk(logit_chunk)
    check_compat(compat)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        del ref
        logp, mask = model_label_logprobs(model, batch, logit_chunk)
        length = jnp.sum(batch["labels"] != IGNORE, axis=-1) if compat else jnp.sum(mask, axis=-1)
        length = length.astype(jnp.float32)
        avg_nll = -jnp.sum(logp, axis=-1) / jnp.maximum(length, 1.0)  # [b]
        seq = _row_mask(mask, compat)
        loss, n = _masked_mean(-(2.0 / beta) * jax.nn.log_sigmoid(beta * (avg_nll - delta)), seq)
        if compat:
            loss = loss + _nan_if(jnp.any(length == 0))
        return loss, {"nll": _masked_mean(avg_nll, seq)[0], "weight": n}

    return loss_fn


def control_vector(hidden_size: int, steering: float, seed: int) -> np.ndarray:
    """RMU's fixed random direction ``c = s * u/|u|`` with ``u ~ U[0,1)^d`` drawn once from ``seed``."""
    u = np.random.default_rng(seed).random(hidden_size, dtype=np.float64)
    return (steering * u / np.linalg.norm(u)).astype(np.float32)


def _token_mask(batch: Batch) -> jax.Array:
    am = batch.get("attention_mask")
    return jnp.ones(batch["input_ids"].shape, jnp.float32) if am is None else am.astype(jnp.float32)


def _activation_loss(sq: jax.Array, batch: Batch, compat: str | None) -> tuple[jax.Array, jax.Array]:
    """``(loss, weight)`` of per-token distances ``sq [b, s]`` (already ``mean_d``).

    Default: the token mean over the attention mask, pooled over rows: ``sum(s)/sum(n)``.
    ``compat="open_unlearning"``: tokens are ``labels != -100``; with ``s_i = sum_t mask*sq``
    and ``n_i = sum_t mask`` the reference divides ``s [b]`` by ``n [b, 1]``, which broadcasts
    to ``[b, b]``, and averages that: ``mean_ij s_j / n_i = mean(s) * mean(1/n)`` (not the
    intended ``mean(s/n)``; a row without labels gives inf/NaN). Weight: the rows ``b``.
    """
    if not compat:
        return _masked_mean(sq, _token_mask(batch))
    mask = (batch["labels"] != IGNORE).astype(jnp.float32)
    s = jnp.sum(sq * mask, axis=-1)  # [b]
    n = jnp.sum(mask, axis=-1)  # [b]
    return jnp.mean(s[None, :] / n[:, None]), _rows(batch)  # the reference's [b] / [b, 1] quirk


def rmu_forget_loss(layer: int, control: np.ndarray, compat: str | None = None) -> LossFn:
    """RMU forget: token mean of ``mean_d (h_l(x) - c)^2`` at layer ``l``.

    Default: over the attention-mask tokens, pooled over the rows (``sum_i s_i / sum_i n_i``
    with ``s_i`` row ``i``'s summed distances and ``n_i`` its tokens).

    ``compat="open_unlearning"``: the tokens are ``labels != -100`` (unshifted), and the loss
    keeps the reference's **broadcasting quirk**: it divides ``s`` of shape ``[b]`` by ``n`` of
    shape ``[b, 1]`` (``mask.sum(dim=-1, keepdim=True)``), which broadcasts to ``[b, b]``, and
    averages that matrix: ``mean_ij s_j / n_i = mean(s) * mean(1/n)``, not the per-row mean
    ``mean(s/n)`` its comments describe. A row without labels makes it inf/NaN, as there.
    """
    check_compat(compat)
    c = jnp.asarray(control)

    def loss_fn(model, batch: Batch, ref=None) -> tuple[jax.Array, Metrics]:
        del ref
        h = at_least_f32(model.hidden_at(batch["input_ids"], batch.get("attention_mask"), layer))
        loss, n = _activation_loss(jnp.mean((h - c) ** 2, axis=-1), batch, compat)
        return loss, {"rmu_forget": loss, "weight": n}

    return loss_fn


def rmu_retain_loss(layer: int, compat: str | None = None) -> LossFn:
    """RMU retain: token mean of ``mean_d (h_l(x) - h_l^ref(x))^2`` against the frozen model;
    tokens and mean as in `rmu_forget_loss` (``compat`` included, quirk and all)."""
    check_compat(compat)

    def loss_fn(model, batch: Batch, ref) -> tuple[jax.Array, Metrics]:
        ids, am = batch["input_ids"], batch.get("attention_mask")
        h = at_least_f32(model.hidden_at(ids, am, layer))
        h_ref = jax.lax.stop_gradient(at_least_f32(ref.hidden_at(ids, am, layer)))
        loss, n = _activation_loss(jnp.mean((h - h_ref) ** 2, axis=-1), batch, compat)
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
      compat: the loss semantics both losses were built with (``None`` or ``"open_unlearning"``).
      alternates: where the forget batches' alternate answers (`ALT` columns) come from, for
        DPO: ``"records"`` (each forget QA record's ``alternate`` field), ``"idk"`` (a random
        line of an "I don't know" file, ``data.idk``) or None (the objective needs none).
    """

    name: str
    forget: LossFn
    retain: LossFn
    needs_reference: bool = False
    trainable: str | None = None
    compat: str | None = None
    alternates: str | None = None


RETAIN_LOSSES = ("nll", "kl", "none")
OBJECTIVES = Registry("objective")


def _retain(kind: str, logit_chunk: int | None, compat: str | None = None) -> tuple[LossFn, bool]:
    """The retain loss ``kind`` (``"nll"``; ``"kl"`` to the frozen start model, which is computed
    over the whole vocabulary and so is not chunked; ``"none"``: `zero_loss`) and whether it
    needs the reference."""
    if kind not in RETAIN_LOSSES:
        raise ValueError(f"retain={kind!r} is not supported; expected one of {RETAIN_LOSSES}")
    if kind == "none":
        return zero_loss, False
    return (nll_loss(logit_chunk, compat), False) if kind == "nll" else (kl_loss(compat), True)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@OBJECTIVES.register("grad_ascent")
def grad_ascent(logit_chunk: int | None = None, compat: str | None = None) -> Objective:
    """GradAscent: ``L_f = -NLL(forget)``, no retain loss (``L_r = 0``); ``compat`` as in the module docstring."""
    return Objective("grad_ascent", neg_nll_loss(logit_chunk, compat), zero_loss, compat=compat)


@OBJECTIVES.register("grad_diff")
def grad_diff(retain: str = "nll", logit_chunk: int | None = None, compat: str | None = None) -> Objective:
    """GradDiff: ``L_f = -NLL(forget)``; ``L_r = NLL(retain)`` or ``KL(p_ref || p_theta)`` (``retain="kl"``);
    ``compat`` (None or ``"open_unlearning"``) as in the module docstring."""
    fn, needs_ref = _retain(retain, logit_chunk, compat)
    return Objective("grad_diff", neg_nll_loss(logit_chunk, compat), fn, needs_reference=needs_ref, compat=compat)


REFERENCES = ("resident", "precompute")


@OBJECTIVES.register("npo")
def npo(beta: float = 0.1, retain: str = "nll", logit_chunk: int | None = None,
        compat: str | None = None, reference: str = "resident") -> Objective:
    """NPO forget loss (see `npo_loss`) with an NLL or KL retain loss, both with ``compat``.

    ``reference="resident"`` keeps a frozen copy of the start model for ``logp_ref(y)``;
    ``"precompute"`` reads it from the forget batches' `REF_LOGP` column (filled once before
    training, `jax_unlearn.step.add_reference_logprobs`), so only one model is held. The KL
    retain loss needs the reference's whole distribution on retain tokens, hence the resident model.
    """
    _positive("npo beta", beta)
    if reference not in REFERENCES:
        raise ValueError(f"npo reference={reference!r} is not supported; expected one of {REFERENCES}")
    fn, kl = _retain(retain, logit_chunk, compat)
    if reference == "precompute" and kl:
        raise ValueError("npo reference='precompute' holds no reference model, but retain='kl' needs the "
                         "resident one; use retain='nll' or reference='resident'")
    return Objective("npo", npo_loss(beta, logit_chunk, compat), fn, needs_reference=reference == "resident",
                     compat=compat)


@OBJECTIVES.register("simnpo")
def simnpo(beta: float = 2.5, delta: float = 0.0, retain: str = "nll", logit_chunk: int | None = None,
           compat: str | None = None) -> Objective:
    """SimNPO forget loss (see `simnpo_loss`) with an NLL or KL retain loss, both with ``compat``."""
    _positive("simnpo beta", beta)
    fn, needs_ref = _retain(retain, logit_chunk, compat)
    return Objective("simnpo", simnpo_loss(beta, delta, logit_chunk, compat), fn, needs_reference=needs_ref,
                     compat=compat)


@OBJECTIVES.register("rmu")
def rmu(
    hidden_size: int,
    layer: int = 7,
    steering: float = 2.0,
    seed: int = 0,
    trainable: str = r"layers\.(5|6|7)\.mlp\.down_proj",
    compat: str | None = None,
) -> Objective:
    """RMU: steer layer-``l`` activations on forget data to ``c = s*u/|u|`` and keep them on
    retain data equal to the frozen model's; only ``trainable`` parameters train. ``compat="open_unlearning"``: the reference's token
    mask (``labels != -100``) and its ``mean(s) * mean(1/n)`` normalisation quirk (`rmu_forget_loss`)."""
    _positive("rmu steering", steering)
    if layer < 0:
        raise ValueError(f"rmu layer must be >= 0, got {layer}")
    check_compat(compat)
    c = control_vector(hidden_size, steering, seed)
    return Objective("rmu", rmu_forget_loss(layer, c, compat), rmu_retain_loss(layer, compat),
                     needs_reference=True, trainable=trainable, compat=compat)


def _dpo(name: str, alternates: str, beta: float, retain: str, logit_chunk: int | None, compat: str | None,
         reference: str) -> Objective:
    _positive(f"{name} beta", beta)
    if reference not in REFERENCES:
        raise ValueError(f"{name} reference={reference!r} is not supported; expected one of {REFERENCES}")
    fn, kl = _retain(retain, logit_chunk, compat)
    if reference == "precompute" and kl:
        raise ValueError(f"{name} reference='precompute' holds no reference model, but retain='kl' needs the "
                         "resident one; use retain='nll' or reference='resident'")
    return Objective(name, dpo_loss(beta, logit_chunk, compat), fn, needs_reference=reference == "resident",
                     compat=compat, alternates=alternates)


@OBJECTIVES.register("dpo")
def dpo(beta: float = 0.1, retain: str = "nll", logit_chunk: int | None = None, compat: str | None = None,
        reference: str = "resident") -> Objective:
    """DPO forget loss (`dpo_loss`) preferring each forget QA record's ``alternate`` answer (AltPO's
    data, open-unlearning's ``QAwithAlternateDataset``); retain, ``reference`` and ``compat`` as `npo`'s
    (``"precompute"`` fills both answers' reference log-probs once)."""
    return _dpo("dpo", "records", beta, retain, logit_chunk, compat, reference)


@OBJECTIVES.register("idk_dpo")
def idk_dpo(beta: float = 0.1, retain: str = "nll", logit_chunk: int | None = None, compat: str | None = None,
            reference: str = "resident") -> Objective:
    """IdkDPO: `dpo` whose preferred answer is an "I don't know" response (a line of ``data.idk``,
    drawn per forget row; open-unlearning's ``QAwithIdkDataset``)."""
    return _dpo("idk_dpo", "idk", beta, retain, logit_chunk, compat, reference)


@OBJECTIVES.register("undial")
def undial(beta: float = 10.0, retain: str = "nll", logit_chunk: int | None = None,
           compat: str | None = None) -> Objective:
    """UNDIAL: self-distillation to the start model's logits with the label's lowered by ``beta``
    (`token_losses.undial_loss`; always a resident reference: the teacher's whole distribution)."""
    _positive("undial beta", beta)
    fn, _ = _retain(retain, logit_chunk, compat)
    return Objective("undial", tl.undial_loss(beta, compat), fn, needs_reference=True, compat=compat)


@OBJECTIVES.register("wga")
def wga(beta: float = 1.0, retain: str = "nll", logit_chunk: int | None = None, compat: str | None = None) -> Objective:
    """WGA: gradient ascent weighted per token by ``p^beta`` (`token_losses.wga_loss`)."""
    _positive("wga beta", beta)
    fn, needs_ref = _retain(retain, logit_chunk, compat)
    return Objective("wga", tl.wga_loss(beta, logit_chunk, compat), fn, needs_reference=needs_ref, compat=compat)


@OBJECTIVES.register("satimp")
def satimp(beta1: float = 5.0, beta2: float = 1.0, retain: str = "nll", logit_chunk: int | None = None,
           compat: str | None = None) -> Objective:
    """SatImp: gradient ascent weighted per token by ``p^beta1 (1-p)^beta2`` (`token_losses.satimp_loss`)."""
    _positive("satimp beta1", beta1)
    _positive("satimp beta2", beta2)
    fn, needs_ref = _retain(retain, logit_chunk, compat)
    return Objective("satimp", tl.satimp_loss(beta1, beta2, logit_chunk, compat), fn, needs_reference=needs_ref,
                     compat=compat)


@OBJECTIVES.register("ce_u")
def ce_u(ignore_first: int = 1, retain: str = "nll", logit_chunk: int | None = None,
         compat: str | None = None) -> Objective:
    """CE-U: cross-entropy to the model's own distribution without the true token
    (`token_losses.ce_u_loss`). open-unlearning's CEU has no retain term: ``retain="none"``."""
    fn, needs_ref = _retain(retain, logit_chunk, compat)
    return Objective("ce_u", tl.ce_u_loss(ignore_first, compat), fn, needs_reference=needs_ref, compat=compat)


@OBJECTIVES.register("pdu")
def pdu(retain: str = "nll", logit_chunk: int | None = None, compat: str | None = None) -> Objective:
    """PDU's losses: forget ``(max_v z - mean_v z)^2`` (`token_losses.pdu_forget_loss`), retain NLL
    (or KL). Its primal-dual update of the retain weight is not an objective's: the combiner's
    ``alpha`` stays fixed (docs/reference.md)."""
    fn, needs_ref = _retain(retain, logit_chunk, compat)
    return Objective("pdu", tl.pdu_forget_loss(compat), fn, needs_reference=needs_ref, compat=compat)
