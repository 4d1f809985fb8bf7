"""The retain gradient of the output projection and of the token embedding, one vocabulary chunk
at a time, combined with the forget gradient chunk by chunk (`StepConfig(chunk_head=True)`).

Why: the gradient of ``W [vocab, D]`` (the output projection, the input embedding when tied) is
complete only at the very end of the backward pass (the lookup's scatter-add comes after the
layers), so a step that combines two whole gradients holds both ``W`` gradients at once: the one
gradient-sized tensor the two-gradient step keeps over the one-backward step (docs/benchmarks.md,
issue 27). Here the retain backward leaves ``W`` out: the model uses ``stop_gradient(W)`` and
records what ``W``'s gradient is made of,

* head: ``dL/dW_v = sum_t c_t (1[y_t = v] - p_tv) h_t`` with ``h [t, D]`` the final-normed hidden
  states, ``p = softmax(h W^T)`` (from the recorded ``lse``), ``y`` the labels and
  ``c_t = dL/dlogp_t`` (the cotangent of a zero "probe" added to the label log-probs);
* lookup: ``dL/dW_v = sum_{t: ids_t = v} dL/dx0_t`` (``dL/dx0``: the cotangent of a zero probe
  added to the looked-up embeddings),

and `combine_leaf` rebuilds it ``chunk`` vocabulary rows at a time after the backward, forms
that chunk of the update with the forget gradient's rows and writes it over them, so no whole
retain gradient of ``W`` ever exists (a combiner that needs whole-tensor sums first, per-tensor
PCGrad, takes a first pass for them). Exact in real arithmetic; the sums are taken in float32
(autodiff accumulates the head's chunks in the weight's dtype).

It applies with a combiner that says how a leaf's update is formed from slices
(`combiners.make_combiner`: ``sago``, ``weighted_sum``, per-tensor ``pcgrad``), when the retain
loss takes the head once, through `token_math.chunked_label_logprobs`
(``logit_chunk`` set), and the lookup at most once, and ``W`` is a trainable leaf; otherwise
`trace_plan` says no and the step combines as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

CHUNK: int | None = None  # vocabulary rows per chunk; None: `chunk_rows`


def chunk_rows(vocab: int, width: int, itemsize: int, tokens: int) -> int:
    """Rows per chunk: the chunk's float32 logits ``[tokens, rows]`` take at most 1/8 of the
    leaf's gradient bytes ``vocab * width * itemsize`` (the chunk's few temporaries stay well
    under the gradient they replace), in multiples of 128 rows, at least 128."""
    rows = vocab * width * itemsize // (8 * 4 * max(tokens, 1))
    return int(min(vocab, max(128, rows // 128 * 128)))


@dataclasses.dataclass
class Tape:
    """What one retain forward records. With ``probes=None`` it only counts and takes shapes
    (`trace_plan`); with probes it adds them and records the arrays `combine_leaf` needs."""

    probes: dict | None = None
    lookups: list = dataclasses.field(default_factory=list)  # (ids [b, s], embedded x [b, s, D])
    heads: list = dataclasses.field(default_factory=list)  # (h [b, s-1, D], lse [b, s-1], target [b, s-1])
    head_names: list = dataclasses.field(default_factory=list)  # the variable each head_weight call read

    def saved(self) -> dict:
        """The arrays the chunks are rebuilt from (aux output of the retain loss)."""
        out = {}
        if self.heads:
            out["h"], out["lse"], out["target"] = self.heads[0]
        if self.lookups:
            out["ids"] = self.lookups[0][0]
        return out


_TAPE: contextvars.ContextVar[Tape | None] = contextvars.ContextVar("jax_unlearn_head_tape", default=None)


@contextlib.contextmanager
def recording(tape: Tape) -> Iterator[Tape]:
    """Makes the model's lookup and head hooks record into ``tape`` while the loss is traced."""
    token = _TAPE.set(tape)
    try:
        yield tape
    finally:
        _TAPE.reset(token)


# ----------------------------------------------------------------------------- hooks (model, token_math)


def weight(w: jax.Array) -> jax.Array:
    """``w`` itself, or ``stop_gradient(w)`` while a tape records (its gradient is rebuilt later)."""
    return w if _TAPE.get() is None else jax.lax.stop_gradient(w)


def head_used(name: str) -> None:
    """The model read its output projection from variable ``name`` (``lm_head``/``embed_tokens``)."""
    tape = _TAPE.get()
    if tape is not None:
        tape.head_names.append(name)


def looked_up(ids: jax.Array, x: jax.Array) -> jax.Array:
    """The embeddings ``x [b, s, D]`` of ``ids``, plus the lookup probe while a tape records."""
    tape = _TAPE.get()
    if tape is None:
        return x
    tape.lookups.append((ids, jax.ShapeDtypeStruct(x.shape, x.dtype)))
    return x if tape.probes is None else x + tape.probes["x0"].astype(x.dtype)


def label_logprobs(h: jax.Array, lse: jax.Array, target: jax.Array, logp: jax.Array) -> jax.Array:
    """``logp [b, s-1]`` of `token_math.chunked_label_logprobs` (from ``h [b, s-1, D]``, its
    ``lse``, ``target``), plus the log-prob probe while a tape records."""
    tape = _TAPE.get()
    if tape is None:
        return logp
    tape.heads.append((h, lse, target))
    return logp if tape.probes is None else logp + tape.probes["logp"]


# ----------------------------------------------------------------------------- the step's side


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which trainable leaves are rebuilt (index -> parts ``{"head", "lookup"}``) and the probes."""

    parts: dict[int, frozenset]
    probes: dict[str, jax.ShapeDtypeStruct]


def trace_plan(loss_fn: Callable, params: Any, batch: Any, leaf_names: list[str | None]) -> Plan | None:
    """Traces ``loss_fn(params, batch)`` abstractly once with a counting tape: a `Plan` when the
    head goes once through the chunked log-probs, the lookup at most once, and each ``W`` they read
    is a trainable leaf (``leaf_names[i]``: ``"embed_tokens"``/``"lm_head"`` for a top-level leaf
    of that name, else None); None otherwise."""
    tape = Tape()
    with recording(tape):
        jax.eval_shape(loss_fn, params, batch)
    if len(tape.heads) != 1 or len(tape.head_names) != 1 or len(tape.lookups) > 1:
        return None
    where = {name: i for i, name in enumerate(leaf_names) if name is not None}
    parts: dict[int, set] = {}
    for part, name in (("head", tape.head_names[0]), ("lookup", "embed_tokens" if tape.lookups else None)):
        if name is None:
            continue
        if name not in where:
            return None  # W frozen (LoRA, a trainable filter): nothing to rebuild
        parts.setdefault(where[name], set()).add(part)
    h, lse, _ = tape.heads[0]
    probes = {"logp": jax.ShapeDtypeStruct(lse.shape, jnp.float32)}
    if tape.lookups:
        probes["x0"] = tape.lookups[0][1]
    return Plan({i: frozenset(p) for i, p in parts.items()}, probes)


def chunk_gradient(w: jax.Array, saved: dict, d_logp: jax.Array, d_x0: jax.Array | None, parts: frozenset,
                   start: jax.Array, size: int) -> jax.Array:
    """Rows ``[start, start + size)`` of the retain gradient of ``w [vocab, D]``: ``[size, D]``
    in ``w``'s dtype (sums in float32); ``h`` keeps the layout the model gave it."""
    rows = start + jnp.arange(size)
    g = jnp.zeros((size, w.shape[1]), jnp.float32)
    if "head" in parts:
        h = saved["h"]  # [b, s-1, D]
        target = saved["target"]  # [b, s-1]
        c = jnp.where(target != -100, d_logp, 0.0)  # dL/dlogp, 0 off the labels (-100: token_math.IGNORE)
        wc = jax.lax.dynamic_slice_in_dim(w, start, size, 0).astype(h.dtype)  # [size, D]
        logits = jnp.einsum("btd,vd->btv", h, wc, preferred_element_type=jnp.float32)  # [b, s-1, size]
        p = jnp.exp(logits - saved["lse"][..., None])
        dlogits = c[..., None] * ((target[..., None] == rows).astype(jnp.float32) - p)
        g = g + jnp.einsum("btv,btd->vd", dlogits, h.astype(jnp.float32))
    if "lookup" in parts:
        ids = saved["ids"]  # [b, s]
        local = jnp.where((ids >= start) & (ids < start + size), ids - start, size)  # size: dropped
        g = g.at[local].add(d_x0.astype(jnp.float32), mode="drop")
    return g.astype(w.dtype)


def combine_leaf(w: jax.Array, f: jax.Array, sums: Callable | None, apply: Callable, gradient: Callable,
                 tokens: int) -> tuple[jax.Array, Any]:
    """``(u, stats)`` of the leaf ``w [vocab, D]`` with its retain gradient ``r`` rebuilt a chunk
    of rows at a time (``gradient(start, size)``; `CHUNK` rows, or `chunk_rows` for a batch of
    ``tokens``) and each chunk of ``u`` written over the forget gradient ``f``'s rows; ``stats``
    are summed over the chunks.

    ``apply(f_c, r_c, totals) -> (u_c, stats_c)`` forms a chunk; ``sums(f_c, r_c)`` (None for an
    element-wise combiner: one pass) are partial sums added up over a first pass over all chunks
    into the ``totals`` that the second pass gives ``apply`` (PCGrad's per-tensor projection).
    Each pass is a loop over the full chunks, then the remaining rows."""
    vocab = w.shape[0]
    size = min(CHUNK or chunk_rows(vocab, w.shape[1], f.dtype.itemsize, tokens), vocab)
    full = vocab // size
    rows = jax.ShapeDtypeStruct((size,) + f.shape[1:], f.dtype)

    def zeros(fn):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, rows, rows))

    def passes(step, carry):
        carry = jax.lax.fori_loop(0, full, lambda k, c: step(c, k * size, size), carry)
        return step(carry, full * size, vocab % size) if vocab % size else carry

    totals = None
    if sums is not None:
        def add(acc, start, n):
            part = sums(jax.lax.dynamic_slice_in_dim(f, start, n, 0), gradient(start, n))
            return jax.tree.map(jnp.add, acc, part)

        totals = passes(add, zeros(sums))

    def write(carry, start, n):
        buf, stats = carry
        u, s = apply(jax.lax.dynamic_slice_in_dim(buf, start, n, 0), gradient(start, n), totals)
        return (jax.lax.dynamic_update_slice_in_dim(buf, u.astype(buf.dtype), start, 0),
                jax.tree.map(jnp.add, stats, s))

    return passes(write, (f, zeros(lambda a, b: apply(a, b, totals)[1])))
