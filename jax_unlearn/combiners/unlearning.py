"""Combiners from the LLM-unlearning literature: BLUR, GRU, NGDiff.

All three are global (dot products and norms over every parameter, as sums of per-leaf partial
sums) and keep the retain/forget roles of the papers: ``g_f`` is the gradient of the forget loss
to *minimise* (e.g. ``-NLL``), ``g_r`` of the retain loss, ``alpha`` weighs retain and ``gamma``
forget. Where a paper writes the forget gradient of a loss to *maximise* (``g_F = -g_f``) the
formulas below are rewritten in this convention. docs/reference.md (last section) cites the
reference lines.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jax_unlearn.combiners.core import (
    DIAGNOSTICS_ARG,
    RETURNS_DOC,
    as_weight,
    check_number,
    combine_global,
    global_pairs,
    make_combiner,
    pair_stats,
    tensor_sum,
    widen,
    with_update,
)

BLUR_EPS = 1e-10  # added to |g_f|^2 in BLUR's projection, as in the reference (grad_surgery.py:173)


def _doc(fn):
    if fn.__doc__:  # absent under python -OO
        fn.__doc__ = fn.__doc__.format(diagnostics=DIAGNOSTICS_ARG, returns=RETURNS_DOC)
    return fn


# ----------------------------------------------------------------------------- BLUR


@_doc
def blur(alpha: float = 1.0, gamma: float = 1.0, diagnostics: bool = True) -> optax.GradientTransformation:
    """BLUR: project the retain gradient off the forget gradient, globally, always.

    The SAGO reference's ``"blur"`` strategy (``SAGO:src/trainer/unlearn/grad_surgery.py:164-187``,
    after Reisizadeh et al., "BLUR: A Bi-Level Optimization Approach for LLM Unlearning"):
    ``r' = g_r - <g_r, g_f>/(|g_f|^2 + 1e-10) * g_f`` with dot products over all parameters, then
    ``u = gamma*g_f + alpha*r'``, computed as ``u = (gamma - alpha*<g_f,g_r>/(|g_f|^2 + 1e-10)) g_f
    + alpha*g_r``. The projection is applied whatever the sign of ``<g_f, g_r>`` (unlike
    PCGrad, and with the roles swapped: the forget step is kept whole, the retain step is what
    is projected). Guarantee: ``<u, g_f> = gamma|g_f|^2 + alpha<g_f,g_r> 1e-10/(|g_f|^2 + 1e-10)``,
    i.e. the full forget progress, with the retain step orthogonal to it.

    Args:
      alpha: weight of the projected retain gradient (>= 0).
      gamma: weight of the forget gradient (>= 0).
      {diagnostics}

    {returns}
    """

    def combine(fs, rs, a, g, stacks):
        del stacks
        pairs, tot = global_pairs(fs, rs)
        aw, gw = jnp.asarray(a).astype(tot.ff.dtype), jnp.asarray(g).astype(tot.ff.dtype)
        return combine_global(fs, rs, pairs, gw - aw * tot.fr / (tot.ff + BLUR_EPS), aw)

    return make_combiner("blur", combine, alpha, gamma, diagnostics)


# ----------------------------------------------------------------------------- GRU


class GRUMemory(NamedTuple):
    """GRU's memory: the moving average of the retain gradient, shaped like the params (each leaf
    in its own dtype), or ``None`` when ``moving_avg = 1`` keeps no memory."""

    retain_ema: Any


@_doc
def gru(alpha: float = 1.0, gamma: float = 1.0, moving_avg: float = 0.8, cos_clip: float | None = None,
        diagnostics: bool = True) -> optax.GradientTransformation:
    """GRU (Gradient Rectified Unlearning): project the forget gradient off a moving average of
    the retain gradient when they conflict.

    Wang et al., ICML 2025 (arXiv 2503.09117); reference ``tmlr-group/GRU``
    ``dataloader_faster_refactor1.py``: the retain memory
    ``m = moving_avg * g_r + (1 - moving_avg) * m_prev`` (``m_prev = 0`` at first, :516-517),
    ``d = <g_f, m>`` over all parameters (:518-519); if ``d < 0`` (:443),
    ``g_f' = g_f - d/|m|^2 * m`` (``orthogonal_component_precise``, :232-254), or with cosine
    clipping ``g_f' = g_f - |g_f| max(cos(g_f, m), cos_clip)/|m| * m`` (:257-281, which hard-codes
    ``-0.5``); then the raw retain gradient is added, ``u = gamma*g_f' + alpha*g_r`` (the ``+ce``
    variants, :526-527, with ``ce_coeff = 1``; ``alpha = 0`` is the forget-only ``_gru`` variant).
    Guarantee (no clipping): ``<g_f', m> >= 0``; with ``moving_avg = 1`` this is
    ``<u, g_r> >= alpha |g_r|^2``, and GRU is `pcgrad` over all parameters without its 1e-10.

    Deviations: the reference projects in float64 on the CPU; here the sums accumulate in
    ``promote_types(float32, dtype)`` on the device. The memory is stored in each leaf's dtype
    (as the reference stores it in the gradients' dtype) and updated before it is used.

    Args:
      alpha: weight of the retain gradient added after the projection (>= 0).
      gamma: weight of the rectified forget gradient (>= 0).
      moving_avg: weight of the new retain gradient in the memory, in (0, 1] (the reference's
        configs use 0.8); ``1`` keeps no memory (none is stored).
      cos_clip: ``None`` (exact projection) or a cosine in [-1, 0] below which the conflict is
        only partly removed (the reference's ``cos_clip: true`` is ``-0.5``).
      {diagnostics}

    {returns}
    """
    check_number("gru", "moving_avg", moving_avg, 0.0, 1.0, low_open=True)
    if cos_clip is not None:
        check_number("gru", "cos_clip", cos_clip, -1.0, 0.0)
    remember = not (isinstance(moving_avg, numbers.Real) and moving_avg == 1)

    def init_memory(params):
        return GRUMemory(jax.tree.map(jnp.zeros_like, params) if remember else None)

    def combine(fs, rs, a, g, stacks, memory: GRUMemory):
        del stacks
        if remember:
            prev = jax.tree.leaves(memory.retain_ema)
            if len(prev) != len(fs):
                raise ValueError(f"gru: the state holds {len(prev)} retain-average leaves but the gradients "
                                 f"have {len(fs)}; initialize the state with the params the gradients are of")
            ms = [(as_weight(moving_avg, r) * widen(r) + (1 - as_weight(moving_avg, r)) * widen(m)).astype(m.dtype)
                  for r, m in zip(rs, prev)]
        else:
            ms = rs
        pairs = [pair_stats(f, r) for f, r in zip(fs, rs)]
        fm = sum((tensor_sum(widen(f) * widen(m)) for f, m in zip(fs, ms)), jnp.zeros((), jnp.float32))
        mm = sum((tensor_sum(widen(m) * widen(m)) for m in ms), jnp.zeros((), jnp.float32))
        ff = sum((p[3] for p in pairs), jnp.zeros((), jnp.float32))
        if cos_clip is None:
            k = fm / jnp.where(mm > 0, mm, 1.0)
        else:
            fn, mn = jnp.sqrt(ff), jnp.sqrt(mm)
            cos = fm / jnp.where(fn * mn > 0, fn * mn, 1.0)
            k = fn * jnp.maximum(cos, cos_clip) / jnp.where(mn > 0, mn, 1.0)
        k = jnp.where((fm < 0) & (mm > 0), k, 0.0)
        us = [(as_weight(g, f) * (widen(f) - as_weight(k, f) * widen(m)) + as_weight(a, f) * widen(r)).astype(f.dtype)
              for f, r, m in zip(fs, rs, ms)]
        stats = [with_update(p, u, r) for p, u, r in zip(pairs, us, rs)]
        new = GRUMemory(jax.tree.unflatten(jax.tree.structure(memory.retain_ema), ms) if remember else None)
        return us, stats, new

    return make_combiner("gru", combine, alpha, gamma, diagnostics, init_memory=init_memory)


# ----------------------------------------------------------------------------- NGDiff


@_doc
def ngdiff(alpha: float = 1.0, gamma: float = 1.0, diagnostics: bool = True) -> optax.GradientTransformation:
    """NGDiff (normalized gradient difference): the sum of the two unit gradients.

    Jin, Bu et al., NAACL 2025, "Unlearning as multi-task optimization: a normalized gradient
    difference approach with an adaptive learning rate" (arXiv 2410.22086):
    ``g = g_R/|g_R| - g_F/|g_F|`` with ``g_F`` the gradient of the forget loss to maximise, i.e.
    here ``u = gamma*g_f/|g_f| + alpha*g_r/|g_r|`` (global norms; a zero gradient contributes 0).
    Guarantee (``alpha = gamma``): ``<u, g_f> >= 0`` and ``<u, g_r> >= 0`` (the paper's Fig. 2:
    NGDiff stays in the region that lowers both losses), and ``|u| <= alpha + gamma``.

    Deviation: the paper pairs NGDiff with an automatic learning rate (GeN, Bu & Xu 2024) fitted
    from loss values at ``theta +- eta*u``: extra forward passes that only the step can run (a
    combiner sees gradients, not the model). It is not part of this combiner; the learning rate is
    the optimizer's that follows in the chain. No public reference code was found (searched the
    stored code and issue corpora); the formula is the paper's.

    Args:
      alpha: weight of the unit retain gradient (>= 0).
      gamma: weight of the unit forget gradient (>= 0).
      {diagnostics}

    {returns}
    """

    def combine(fs, rs, a, g, stacks):
        del stacks
        pairs, tot = global_pairs(fs, rs)
        dtype = tot.ff.dtype
        aw, gw = jnp.asarray(a).astype(dtype), jnp.asarray(g).astype(dtype)
        fn, rn = jnp.sqrt(tot.ff), jnp.sqrt(tot.rr)
        cf = jnp.where(fn > 0, gw / jnp.where(fn > 0, fn, 1.0), 0.0)
        cr = jnp.where(rn > 0, aw / jnp.where(rn > 0, rn, 1.0), 0.0)
        return combine_global(fs, rs, pairs, cf, cr)

    return make_combiner("ngdiff", combine, alpha, gamma, diagnostics)

