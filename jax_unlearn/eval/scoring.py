"""Batched, jitted log-likelihood scoring of token sequences with fixed padded shapes.

Rows are sorted by length (longest first), cut into batches of exactly ``batch_size`` rows
(the last one filled with copies of a real row, whose results are dropped) and left-padded to
a bucketed length (the next of 8, 12, 16, 24, 32, 48, ...: powers of two and 1.5x powers of
two), so each jitted kernel compiles once per ``(batch_size, bucket)`` and padding wastes at
most a third of a row. Positions follow the attention mask, so padding changes nothing.

Three kernels, all on a `CausalLM` split into ``(graphdef, state)``:

* `continuation_logprobs`: for ``(context, continuation)`` token lists,
  ``sum_t log p(cont_t | context, cont_<t)`` and whether every continuation token is the argmax.
* `next_token_logprobs`: ``log p(candidate | context)`` for a few candidate ids per context,
  from the last position only (one forward pass scores all choices of a question).
* `token_statistics`: per continuation token ``log p(x_t)`` and, on request, the mean
  ``mu_t = sum_v p_v log p_v`` and variance ``var_t = sum_v p_v (log p_v - mu_t)^2`` of the
  log-probability under the model's own next-token distribution (for Min-K%++), and whether
  ``x_t`` is the argmax of its distribution (for exact memorization / extraction strength).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_unlearn.data import pad_rows
from jax_unlearn.models.partitioning import host_value
from jax_unlearn.token_math import IGNORE, label_logprobs

Pair = tuple[Sequence[int], Sequence[int]]


def bucket_length(n: int) -> int:
    """Smallest of 8, 12, 16, 24, 32, 48, ... (``2^k`` and ``1.5 * 2^k``) that is ``>= n``."""
    p = 8
    while True:
        if n <= p:
            return p
        if n <= p + p // 2:
            return p + p // 2
        p *= 2


def plan_batches(lengths: Sequence[int], batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(row indices, bucket length)`` per batch, longest rows first; every index array
    has exactly ``batch_size`` entries, ``-1`` marking filler rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        full = np.full(batch_size, -1, np.int64)
        full[:len(idx)] = idx
        yield full, bucket_length(int(lengths[idx].max()) if len(idx) else 1)


def run_batched(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, batch_size: int, pad_id: int,
         kernel: Callable[..., Any], extra: Callable[[np.ndarray], tuple] = lambda idx: ()) -> list[tuple[int, tuple]]:
    """Apply ``kernel(ids, mask[, labels], *extra(idx))`` batch by batch; returns ``(row, outputs)``
    pairs with the outputs as host NumPy arrays (one slice per real row). Every batch is
    dispatched before any result is read back, so host padding overlaps device work. With a model
    spread over several processes every process calls this with the same rows (each output is
    gathered to every host, `jax_unlearn.models.partitioning.host_value`)."""
    pending = []
    for idx, length in plan_batches([len(r) for r in rows], batch_size):
        fill = np.where(idx >= 0, idx, idx[0])  # filler rows repeat the batch's first (real) row
        batch_rows = [rows[i] for i in fill]
        batch_labels = None if labels is None else [labels[i] for i in fill]
        arrays = pad_rows(batch_rows, length, pad_id, batch_labels, side="left")
        pending.append((idx, kernel(*arrays, *extra(fill))))
    results = []
    for idx, out in pending:
        out = jax.tree.map(host_value, out)
        out = out if isinstance(out, tuple) else (out,)
        for j, i in enumerate(idx):
            if i >= 0:
                results.append((int(i), tuple(np.asarray(o[j]) for o in out)))
    return results


def check_token_ids(rows: Sequence[Sequence[int]], model: Any) -> None:
    """Raise unless every id lies in the model's vocabulary ``[0, vocab_size)`` (a tokenizer/model mismatch)."""
    vocab = model.config.vocab_size
    for i, r in enumerate(rows):
        if len(r) and (max(r) >= vocab or min(r) < 0):
            raise ValueError(f"sequence {i} holds token id {max(r) if max(r) >= vocab else min(r)}, outside the "
                             f"model's vocabulary [0, {vocab}): the tokenizer does not match the model")


def default_max_length(model: Any, max_length: int | None) -> int:
    """``max_length`` or the model's ``max_position_embeddings``."""
    n = model.config.max_position_embeddings if max_length is None else int(max_length)
    if n < 2:
        raise ValueError(f"max_length must be >= 2, got {n}")
    return n


# ----------------------------------------------------------------------------- kernels
@partial(jax.jit, static_argnames=("graphdef",))
def _continuation_kernel(graphdef, state, ids, mask, labels):
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask)
    logp, lmask = label_logprobs(logits, labels)  # [b, t-1]
    hit = jnp.argmax(logits[:, :-1], axis=-1) == labels[:, 1:]
    return jnp.sum(logp, axis=-1), jnp.all(hit | (lmask == 0), axis=-1)


@partial(jax.jit, static_argnames=("graphdef",))
def _next_token_kernel(graphdef, state, ids, mask, candidates):
    model = nnx.merge(graphdef, state)
    h = model.final_hidden(ids, mask)[:, -1:]  # left-padded: the last position is the last token
    logp = jax.nn.log_softmax(model.logits(h)[:, 0], axis=-1)  # [b, vocab]
    return jnp.take_along_axis(logp, candidates, axis=-1)  # [b, C]


@partial(jax.jit, static_argnames=("graphdef", "moments", "greedy"))
def _stats_kernel(graphdef, state, ids, mask, labels, moments: bool, greedy: bool = False):
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask)
    logp, lmask = label_logprobs(logits, labels)
    out = (logp, lmask)
    if moments:
        lsm = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [b, t-1, vocab]
        p = jnp.exp(lsm)
        mu = jnp.sum(p * lsm, axis=-1)
        var = jnp.sum(p * jnp.square(lsm - mu[..., None]), axis=-1)
        out += (mu, var)
    if greedy:
        out += (jnp.argmax(logits[:, :-1], axis=-1) == labels[:, 1:],)
    return out


def rows_and_labels(pairs: Sequence[Pair], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """``context + continuation`` keeping the last ``max_length + 1`` tokens (the last token is
    only a label), and labels ``-100`` except on the continuation."""
    rows, labels = [], []
    for i, (ctx, cont) in enumerate(pairs):
        ctx, cont = list(ctx), list(cont)
        if len(cont) > max_length:
            raise ValueError(f"continuation {i} has {len(cont)} tokens, more than max_length={max_length}")
        if not ctx:
            raise ValueError(f"pair {i} has an empty context: at least one token (e.g. BOS) must precede "
                             "the continuation")
        row = (ctx + cont)[-(max_length + 1):]
        rows.append(row)
        labels.append([IGNORE] * (len(row) - len(cont)) + cont)
    return rows, labels


def continuation_logprobs(model: Any, pairs: Sequence[Pair], *, batch_size: int = 16,
                          max_length: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(logprob [n] float64, is_greedy [n] bool)`` of each continuation given its context.

    ``logprob_i = sum_t log p(cont_t | ctx, cont_<t)``; ``is_greedy_i`` is true when every
    continuation token is the argmax of its distribution. Contexts longer than fit are
    left-truncated to ``max_length`` input tokens (default ``max_position_embeddings``).
    """
    max_length = default_max_length(model, max_length)
    rows, labels = rows_and_labels(pairs, max_length)
    check_token_ids(rows, model)
    graphdef, state = nnx.split(model)
    out = run_batched(rows, labels, batch_size, pad_id, lambda i, m, lab: _continuation_kernel(graphdef, state, i, m, lab))
    logp, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    for i, (lp, g) in out:
        logp[i], greedy[i] = float(lp), bool(g)
    return logp, greedy


def next_token_logprobs(model: Any, contexts: Sequence[Sequence[int]], candidates: np.ndarray, *,
                        batch_size: int = 16, max_length: int | None = None, pad_id: int = 0) -> np.ndarray:
    """``[n, C]`` float64: ``log p(candidates[i, c] | contexts[i])`` from one forward pass per context
    (left-truncated to ``max_length`` tokens)."""
    max_length = default_max_length(model, max_length)
    candidates = np.asarray(candidates, np.int32)
    if candidates.ndim != 2 or candidates.shape[0] != len(contexts):
        raise ValueError(f"candidates must be [n_contexts={len(contexts)}, n_choices], got {candidates.shape}")
    rows = [list(c)[-max_length:] for c in contexts]
    if any(not r for r in rows):
        raise ValueError("every context needs at least one token")
    check_token_ids(rows + [candidates.reshape(-1).tolist()], model)
    graphdef, state = nnx.split(model)
    out = run_batched(rows, None, batch_size, pad_id,
               lambda i, m, c: _next_token_kernel(graphdef, state, i, m, c),
               extra=lambda idx: (candidates[idx],))
    result = np.zeros(candidates.shape)
    for i, (lp,) in out:
        result[i] = lp
    return result


def token_statistics(model: Any, pairs: Sequence[Pair], *, moments: bool = False, greedy: bool = False,
                     batch_size: int = 8, max_length: int | None = None, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Per pair, arrays over the continuation tokens kept: ``logp``, with ``moments`` also
    ``mu`` and ``var``, with ``greedy`` also ``hit`` (1.0 where the token is the argmax; see the
    module docstring). Rows longer than ``max_length + 1`` tokens keep their *first*
    ``max_length + 1`` tokens (the continuation is cut at the end)."""
    max_length = default_max_length(model, max_length)
    cut = []
    for ctx, cont in pairs:
        ctx, cont = list(ctx), list(cont)
        keep = max(max_length + 1 - len(ctx), 0)
        cut.append((ctx, cont[:keep]))
    rows, labels = rows_and_labels(cut, max_length)
    check_token_ids(rows, model)
    graphdef, state = nnx.split(model)
    out = run_batched(rows, labels, batch_size, pad_id,
                      lambda i, m, lab: _stats_kernel(graphdef, state, i, m, lab, moments, greedy))
    stats: list[dict[str, np.ndarray]] = [{} for _ in rows]
    names = ("logp", "mask") + (("mu", "var") if moments else ()) + (("hit",) if greedy else ())
    for i, arrays in out:
        n = len(cut[i][1])
        d = dict(zip(names, arrays))
        d.pop("mask")  # 1 on exactly the last n positions, by construction
        stats[i] = {k: np.asarray(v[-n:] if n else v[:0], np.float64) for k, v in d.items()}
    return stats
