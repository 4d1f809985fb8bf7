"""Token maths shared by the losses, the evaluation and the data: label log-probabilities.

Labels follow the Hugging Face convention: ``labels [b, s]`` is aligned with ``input_ids``,
position ``t`` predicts ``labels[:, t+1]``, and ``IGNORE`` (-100) marks a position without loss.
Nothing here differentiates anything; the step takes the gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_unlearn import head_grad

IGNORE = -100  # label of a position without loss
ALT = "alt_"  # prefix of a forget set's alternate-answer columns (DPO): alt_input_ids, alt_labels, ...


def at_least_f32(x: jax.Array) -> jax.Array:
    """``x`` in ``promote_types(dtype, float32)``: bfloat16/float16 in float32, float32 and
    float64 unchanged (the losses' working precision, as the combiners')."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def label_logprobs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of the next-token labels.

    Args:
      logits: ``[b, s, vocab]`` (any float dtype; computed in at least float32, `at_least_f32`).
      labels: ``[b, s]`` int, ``IGNORE`` where no loss is taken.

    Returns:
      ``(logp [b, s-1], mask [b, s-1])``: ``logp[:, t] = log p(labels[:, t+1] | <= t)`` (0 where
      masked) and float32 ``mask`` 1 where ``labels[:, t+1] != IGNORE``.
    """
    logits = at_least_f32(logits[:, :-1])  # [b, s-1, vocab]
    target = labels[:, 1:]  # [b, s-1]
    mask = (target != IGNORE).astype(jnp.float32)
    logp = _pick(logits, target) - jax.nn.logsumexp(logits, axis=-1)
    return logp * mask, mask


def _pick(logits: jax.Array, target: jax.Array) -> jax.Array:
    """``logits[..., target]`` (0 where ``target`` is ``IGNORE``) as a masked sum over the
    vocabulary: exact, and on logits split by vocabulary over devices it is a local sum plus
    one small reduction (a gather would move the logits between devices)."""
    vocab = jax.lax.broadcasted_iota(target.dtype, (1,) * target.ndim + (logits.shape[-1],), target.ndim)
    return jnp.sum(jnp.where(vocab == target[..., None], logits, 0.0), axis=-1)


def chunked_label_logprobs(h: jax.Array, w: jax.Array, labels: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`label_logprobs` of ``logits = h @ w^T`` without materialising ``[b, s, vocab]``.

    Args:
      h: final-normed hidden states ``[b, s, D]``.
      w: output projection ``[vocab, D]``.
      labels: ``[b, s]`` int, ``IGNORE`` where no loss is taken.
      chunk: positions per chunk; each chunk's logits ``[b, chunk, vocab]`` (at least float32) exist only
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

    w = head_grad.weight(w)  # under a head_grad tape: W's gradient is rebuilt after the backward

    @jax.checkpoint
    def one(h_c, t_c):
        logits = jnp.einsum("btd,vd->btv", h_c, w.astype(h_c.dtype),
                            preferred_element_type=jnp.promote_types(h_c.dtype, jnp.float32))
        lse = jax.nn.logsumexp(logits, axis=-1)
        return _pick(logits, t_c) - lse, lse  # [b, chunk] each

    logp, lse = (x.swapaxes(0, 1).reshape(b, -1)[:, :n] for x in jax.lax.map(lambda xs: one(*xs), (hs, ts)))
    mask = (labels[:, 1:] != IGNORE).astype(jnp.float32)
    return head_grad.label_logprobs(h[:, :-1], lse, labels[:, 1:], logp * mask), mask


def model_label_logprobs(model: Any, batch: Mapping[str, jax.Array], chunk: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
    """Label log-probs ``(logp [b, s-1], mask [b, s-1])`` of ``model`` on ``batch``
    (``input_ids``, optional ``attention_mask``, ``labels``).

    With ``chunk`` the logits are computed ``chunk`` positions at a time
    (`chunked_label_logprobs`; needs ``model.final_hidden`` and ``model.head_weight``), so the
    float32 ``[b, s, vocab]`` logits never exist at once.
    """
    ids, am, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    if chunk:
        # head_weight(tokens=...): the projection laid out for this batch (see CausalLM.head_weight)
        return chunked_label_logprobs(model.final_hidden(ids, am), model.head_weight(tokens=ids.size), labels, chunk)
    return label_logprobs(model(ids, am), labels)


def check_chunk(chunk: int | None) -> None:
    """``chunk`` must be None or a positive integer (raises ValueError naming it)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"logit_chunk must be a positive integer or None, got {chunk!r}")
