"""Multi-task aggregators as two-task combiners: MGDA, CAGrad, Nash-MTL, IMTL-G, Aligned-MTL,
UPGrad, DualProj, GradVac, ConFIG.

Each is the ``torchjd.aggregation`` aggregator of the same name (torchjd 0.18.0, the oracle of
``tests/test_combiner_zoo.py``) applied to the Jacobian whose rows are ``[forget, retain]``, in that
order, and flattened over every parameter. With two rows every method depends on the rows only
through the 2x2 Gramian ``[[ff, fr], [fr, rr]]`` (ConFIG too: its unit rows' geometry is the
Gramian's), so one pass over the leaves sums ``<g_f, g_f>``, ``<g_f, g_r>``, ``<g_r, g_r>`` per leaf
(sharded leaves reduce where they live: no gathers), the closed forms of
`jax_unlearn.combiners.weightings` give two scalar weights, and a second pass writes
``u = c_f*g_f + c_r*g_r``. No QP solver, no cvxpy, no scipy, no host round trip.

How ``alpha`` (retain) and ``gamma`` (forget) enter, per method, so that ``alpha = gamma = 1`` is
torchjd's default aggregator:

- row scaling, ``J = [gamma*g_f, alpha*g_r]`` then the aggregator: ``mgda``, ``cagrad``,
  ``imtl_g``, ``aligned_mtl``, ``upgrad``, ``dual_proj``, ``grad_vac``. For ``upgrad`` and
  ``dual_proj`` this equals torchjd's ``pref_vector = (gamma, alpha)/2`` (the dual cone does not
  change when a row is scaled); for ``imtl_g`` it changes only the length of the update (IMTL-G's
  direction is impartial by construction: equal projections on the unit rows).
- bargaining powers, ``nash_mtl``: scaling a row does not change the Nash bargaining solution, so
  ``(gamma, alpha)`` weigh the players instead: ``max gamma log<d, g_f> + alpha log<d, g_r>``.
- preference vector, ``con_fig``: ConFIG's unit rows ignore any scaling, so ``(gamma, alpha)`` is
  its ``pref_vector``: the direction ``e`` has ``<u_f, e> : <u_r, e> = gamma : alpha``.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax.numpy as jnp
import optax

from jax_unlearn.combiners import weightings as W
from jax_unlearn.combiners.core import (
    DIAGNOSTICS_ARG,
    RETURNS_DOC,
    acc_dtype,
    check_choice,
    check_number,
    combine_global,
    global_pairs,
    make_combiner,
)


def _rows(ff, fr, rr, a, g):
    """The Gramian of the scaled rows ``[g*g_f, a*g_r]``."""
    return g * g * ff, g * a * fr, a * a * rr


def _gramian_combiner(name: str, coefficients, alpha, gamma, diagnostics: bool, init_memory=None):
    """A global combiner ``u = c_f*g_f + c_r*g_r`` where
    ``coefficients(ff, fr, rr, alpha, gamma[, memory]) -> (c_f, c_r[, memory])`` reads the
    Gramian's sums over all leaves (in ``promote_types(float32, dtypes)``)."""

    def combine(fs, rs, a, g, stacks, *memory):
        del stacks  # one Gramian over every parameter
        pairs, tot = global_pairs(fs, rs)
        dtype = tot.ff.dtype
        aw, gw = jnp.asarray(a).astype(dtype), jnp.asarray(g).astype(dtype)
        out = coefficients(tot.ff, tot.fr, tot.rr, aw, gw, *memory)
        us, stats = combine_global(fs, rs, pairs, out[0], out[1])
        return (us, stats) if init_memory is None else (us, stats, out[2])

    return make_combiner(name, combine, alpha, gamma, diagnostics, init_memory=init_memory)


def _doc(fn):
    if fn.__doc__:  # absent under python -OO
        fn.__doc__ = fn.__doc__.format(diagnostics=DIAGNOSTICS_ARG, returns=RETURNS_DOC)
    return fn


# ----------------------------------------------------------------------------- MGDA


@_doc
def mgda(alpha: float = 1.0, gamma: float = 1.0, diagnostics: bool = True) -> optax.GradientTransformation:
    """MGDA: the min-norm point of the convex hull of ``gamma*g_f`` and ``alpha*g_r``.

    Désidéri 2012; MGDA-UB, Sener & Koltun 2018 (Algorithm 2, Frank-Wolfe). For two rows ``g1, g2``:
    ``u = (1 - t) g1 + t g2`` with ``t = clip(<g1, g1 - g2> / |g1 - g2|^2, 0, 1)``, the point torchjd's
    Frank-Wolfe (``_mgda.py:24-50``, ``epsilon=1e-3``, ``max_iters=100``) reaches in its first exact
    line search. Guarantee: ``<u, g_i> >= |u|^2 >= 0`` for both rows (no first-order increase of
    either loss); ``u = 0`` iff ``0`` is in the hull (opposite rows, or a zero row).

    Asymmetry: the rows are scaled first, ``[gamma*g_f, alpha*g_r]``; the minimum norm is not
    scale-invariant, so a heavier row pulls ``u`` less (MGDA favours the smaller gradient).

    Args:
      alpha: weight of the retain row (>= 0).
      gamma: weight of the forget row (>= 0).
      {diagnostics}

    {returns}

    Example:
      >>> import jax.numpy as jnp, jax_unlearn as ju
      >>> tx = ju.mgda()
      >>> g = ju.TwoTaskGrads(forget={{"w": jnp.array([2.0, 0.0])}}, retain={{"w": jnp.array([0.0, 2.0])}})
      >>> u, _ = tx.update(g, tx.init({{"w": jnp.zeros(2)}}))
      >>> u["w"].tolist()
      [1.0, 1.0]
    """

    def coefficients(ff, fr, rr, a, g):
        w1, w2 = W.mgda(*_rows(ff, fr, rr, a, g))
        return w1 * g, w2 * a

    return _gramian_combiner("mgda", coefficients, alpha, gamma, diagnostics)


# ----------------------------------------------------------------------------- UPGrad, DualProj


def _check_eps(name: str, norm_eps, reg_eps) -> None:
    check_number(name, "norm_eps", norm_eps, 0.0)
    check_number(name, "reg_eps", reg_eps, 0.0)


@_doc
def upgrad(alpha: float = 1.0, gamma: float = 1.0, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
           diagnostics: bool = True) -> optax.GradientTransformation:
    """UPGrad: each row projected onto the dual cone of both rows, then averaged.

    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization" (Eq. 5); torchjd
    ``_upgrad.py:35-38`` with its quadprog projector (``_linalg/_dual_cone.py:107-126``) on
    ``A = G / trace(G) + reg_eps*I`` (``G / trace`` taken as zeros when ``trace(G) < norm_eps``,
    ``_linalg/_gramian.py:55-87``). Closed form for two rows: ``u = w1 g1 + w2 g2`` with
    ``w1 = 1/2 + 1/2 max(0, -A12/A11)``, ``w2 = 1/2 + 1/2 max(0, -A12/A22)``.
    Guarantee (``norm_eps = reg_eps = 0``): ``<u, g_f> >= 0`` and ``<u, g_r> >= 0``; ``reg_eps > 0`` allows
    ``<u, g_i> >= -reg_eps * trace(G) * w_i``. ``norm_eps`` is absolute: when
    ``gamma^2|g_f|^2 + alpha^2|g_r|^2 < norm_eps`` (1e-4 by default) no projection happens and
    ``u`` is the mean of the rows, as in torchjd; set ``norm_eps=0`` for tiny gradients.

    Asymmetry: rows ``[gamma*g_f, alpha*g_r]``, the same as torchjd's
    ``pref_vector = (gamma, alpha)/2`` on the raw rows (the dual cone does not change when a row
    is scaled) apart from the trace in the thresholds.

    Args:
      alpha: weight of the retain row (>= 0).
      gamma: weight of the forget row (>= 0).
      norm_eps: the Gramian's trace below which it counts as zero (torchjd's default).
      reg_eps: added to the diagonal of the normalized Gramian (torchjd's default).
      {diagnostics}

    {returns}
    """
    _check_eps("upgrad", norm_eps, reg_eps)

    def coefficients(ff, fr, rr, a, g):
        w1, w2 = W.upgrad(*_rows(ff, fr, rr, a, g), 0.5, 0.5, norm_eps, reg_eps)
        return w1 * g, w2 * a

    return _gramian_combiner("upgrad", coefficients, alpha, gamma, diagnostics)


@_doc
def dual_proj(alpha: float = 1.0, gamma: float = 1.0, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
              diagnostics: bool = True) -> optax.GradientTransformation:
    """DualProj: the mean of the rows projected onto the dual cone of the rows.

    The solution of Eq. 11 of "Gradient Episodic Memory for Continual Learning" (Lopez-Paz &
    Ranzato 2017) as torchjd ``_dualproj.py:34-37`` computes it (the same QP, normalization and
    regularization as `upgrad`). Closed form for two rows, with ``A`` as in `upgrad`: if
    ``(A (1/2, 1/2))_r < 0`` the retain constraint is active and ``w = (1/2, -A12/(2 A22))``;
    symmetrically for forget; else ``w = (1/2, 1/2)``. Guarantee as `upgrad`.

    Asymmetry: rows ``[gamma*g_f, alpha*g_r]`` (= torchjd's ``pref_vector = (gamma, alpha)/2``).

    Args:
      alpha: weight of the retain row (>= 0).
      gamma: weight of the forget row (>= 0).
      norm_eps: the Gramian's trace below which it counts as zero (torchjd's default).
      reg_eps: added to the diagonal of the normalized Gramian (torchjd's default).
      {diagnostics}

    {returns}
    """
    _check_eps("dual_proj", norm_eps, reg_eps)

    def coefficients(ff, fr, rr, a, g):
        w1, w2 = W.dual_proj(*_rows(ff, fr, rr, a, g), 0.5, 0.5, norm_eps, reg_eps)
        return w1 * g, w2 * a

    return _gramian_combiner("dual_proj", coefficients, alpha, gamma, diagnostics)


# ----------------------------------------------------------------------------- IMTL-G, Aligned-MTL


@_doc
def imtl_g(alpha: float = 1.0, gamma: float = 1.0, diagnostics: bool = True) -> optax.GradientTransformation:
    """IMTL-G: the update whose projections on the unit rows are equal.

    Liu et al. 2021, "Towards Impartial Multi-task Learning" (gradient balancing), generalized to
    dependent rows in torchjd ``_imtl_g.py:18-25``: ``v = pinv(G) sqrt(diag G)``,
    ``w = v / sum(v)`` (zeros when ``|sum(v)| < 1e-12``); ``pinv`` drops an eigenvalue below
    ``2 * eps(dtype)`` times the largest, as ``torch.linalg.pinv`` does. Then
    ``<u, g_f>/|g_f| = <u, g_r>/|g_r|`` when both rows count. Nearly parallel rows make ``G``
    ill-conditioned and ``w`` large: IMTL-G is sensitive there by construction.

    Asymmetry: rows ``[gamma*g_f, alpha*g_r]``. IMTL-G's direction does not depend on the rows'
    scales (it is impartial by definition); ``alpha`` and ``gamma`` only rescale the update, by
    ``sum(v) / (v_f/gamma + v_r/alpha)`` of the unscaled rows' ``v``. A zero weight drops its row.

    Args:
      alpha: weight of the retain row (>= 0).
      gamma: weight of the forget row (>= 0).
      {diagnostics}

    {returns}
    """

    def coefficients(ff, fr, rr, a, g):
        w1, w2 = W.imtl_g(*_rows(ff, fr, rr, a, g))
        return w1 * g, w2 * a

    return _gramian_combiner("imtl_g", coefficients, alpha, gamma, diagnostics)


@_doc
def aligned_mtl(alpha: float = 1.0, gamma: float = 1.0, scale_mode: str = "min",
                diagnostics: bool = True) -> optax.GradientTransformation:
    """Aligned-MTL: the mean of the rows after aligning the Jacobian's principal components.

    Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning" (Algorithm 1);
    torchjd ``_aligned_mtl.py:42-47, 59-88``: ``w = B (1/2, 1/2)`` with ``B = sqrt(s) V S^-1/2 V^T``
    from the eigenpairs ``(S, V)`` of ``G`` above ``2 * eps(dtype) * l_max`` and ``s`` the smallest
    kept eigenvalue (``"min"``, torchjd's default; ``"median"`` is the same for two rows: torch's
    median of two values is the lower one) or their mean (``"rmse"``, the original code's).
    For two independent rows this makes the rows of ``B^T J`` orthogonal with equal norms.

    Asymmetry: rows ``[gamma*g_f, alpha*g_r]``.

    Args:
      alpha: weight of the retain row (>= 0).
      gamma: weight of the forget row (>= 0).
      scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
      {diagnostics}

    {returns}
    """
    check_choice("scale_mode", scale_mode, ("min", "median", "rmse"))

    def coefficients(ff, fr, rr, a, g):
        w1, w2 = W.aligned_mtl(*_rows(ff, fr, rr, a, g), 0.5, 0.5, scale_mode)
        return w1 * g, w2 * a

    return _gramian_combiner(f"aligned_mtl(scale_mode={scale_mode!r})", coefficients, alpha, gamma, diagnostics)


# ----------------------------------------------------------------------------- CAGrad


@_doc
def cagrad(alpha: float = 1.0, gamma: float = 1.0, c: float = 0.4, norm_eps: float = 1e-4,
           diagnostics: bool = True) -> optax.GradientTransformation:
    """CAGrad: the update within ``c|g0|`` of the average ``g0`` that best serves the worse task.

    Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning" (Algorithm 1):
    ``u = g0 + c|g0| / |g_w| * g_w`` with ``g0 = (g1 + g2)/2`` and ``g_w`` the point of the rows'
    hull minimizing ``<g_w, g0> + c|g0| |g_w|``; torchjd ``_cagrad.py:46-73`` solves that with
    CLARABEL on the trace-normalized Gramian, here a closed form on the segment (see
    `jax_unlearn.combiners.weightings.cagrad`). Guarantee: ``|u - g0| <= c|g0|``, and ``u`` maximizes
    ``min_i <u, g_i>`` over that ball (for ``c < 1`` both inner products are then positive unless
    no point of the ball has them so). As in torchjd, ``u = 0`` when ``|g_w| < norm_eps |J|_F``
    ("approximately on the Pareto front", e.g. a zero row) or when
    ``gamma^2|g_f|^2 + alpha^2|g_r|^2 < norm_eps`` (absolute). No ``1/(1 + c)`` rescaling (the
    original code's ``rescale`` option; torchjd has none).

    Asymmetry: rows ``[gamma*g_f, alpha*g_r]``, so ``g0 = (gamma*g_f + alpha*g_r)/2``.

    Args:
      alpha: weight of the retain row (>= 0).
      gamma: weight of the forget row (>= 0).
      c: radius of the ball around ``g0``, relative to ``|g0|`` (>= 0; the paper uses 0.2-0.8,
        torchjd has no default). ``c = 0`` is the mean of the rows.
      norm_eps: torchjd's threshold (see above).
      {diagnostics}

    {returns}
    """
    check_number("cagrad", "c", c, 0.0)
    check_number("cagrad", "norm_eps", norm_eps, 0.0)

    def coefficients(ff, fr, rr, a, g):
        w1, w2 = W.cagrad(*_rows(ff, fr, rr, a, g), c, norm_eps)
        return w1 * g, w2 * a

    return _gramian_combiner("cagrad", coefficients, alpha, gamma, diagnostics)


# ----------------------------------------------------------------------------- Nash-MTL


class NashMTLMemory(NamedTuple):
    """Nash-MTL's memory: the last weights solved for (torchjd's ``prvs_alpha``, before the norm
    clipping) and the number of updates so far (its ``step``)."""

    weights: chex.Array  # [2]: forget, retain
    count: chex.Array  # int32 scalar


@_doc
def nash_mtl(alpha: float = 1.0, gamma: float = 1.0, max_norm: float = 1.0, update_weights_every: int = 1,
             diagnostics: bool = True) -> optax.GradientTransformation:
    """Nash-MTL: the Nash bargaining solution of the two tasks.

    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game" (Algorithm 1, Eq. 4): the
    weights ``w > 0`` with ``w_i <u, g_i> = p_i``, i.e. ``u`` maximizes ``sum_i p_i log <u, g_i>`` on
    a ball; ``|u|^2 = p_f + p_r`` whatever the gradients' scale. torchjd ``_nash_mtl.py:115-196``
    approximates it with ``optim_niter=20`` sequential ECOS programs (stopping when
    ``|G w - 1/w| < 1e-3``), warm-started from its previous weights; the closed form here is the
    exact fixed point (`jax_unlearn.combiners.weightings.nash_mtl`), so there is no iteration count.
    State kept as in torchjd: the previous weights (ones at first) are reused on the updates
    between solves (``update_weights_every``) and when there is no positive solution (a zero row,
    opposite rows: torchjd's solver fails and it keeps them). Finally ``u`` is scaled to norm
    ``max_norm`` if longer (``0`` turns this off).

    Asymmetry: scaling a row does not change the Nash solution, so ``gamma`` and ``alpha`` are the
    bargaining powers ``p = (gamma, alpha)`` (``w_f <u, g_f> = gamma``, ``w_r <u, g_r> = alpha``);
    with one power 0 the other task gets ``u = sqrt(p) g/|g|``.

    Args:
      alpha: bargaining power of the retain task (>= 0).
      gamma: bargaining power of the forget task (>= 0).
      max_norm: the largest norm of ``u`` (torchjd's default 1.0; 0 = no limit).
      update_weights_every: solve every this many updates, reuse the weights in between (>= 1).
      {diagnostics}

    {returns}
    """
    check_number("nash_mtl", "max_norm", max_norm, 0.0)
    if isinstance(update_weights_every, bool) or (isinstance(update_weights_every, (int, float))
                                                  and (update_weights_every < 1
                                                       or int(update_weights_every) != update_weights_every)):
        raise ValueError(f"nash_mtl: update_weights_every must be an integer >= 1, got {update_weights_every!r}")

    def init_memory(params):
        return NashMTLMemory(jnp.ones((2,), acc_dtype(params)), jnp.zeros((), jnp.int32))

    def coefficients(ff, fr, rr, a, g, memory: NashMTLMemory):
        w1, w2, ok = W.nash_mtl(ff, fr, rr, g, a)
        prev = memory.weights.astype(ff.dtype)
        fresh = ok & (memory.count % jnp.asarray(update_weights_every, jnp.int32) == 0)
        w1, w2 = jnp.where(fresh, w1, prev[0]), jnp.where(fresh, w2, prev[1])
        norm = jnp.sqrt(jnp.maximum(w1 * w1 * ff + 2.0 * w1 * w2 * fr + w2 * w2 * rr, 0.0))
        clip = (max_norm > 0) & (norm > max_norm)
        scale = jnp.where(clip, max_norm / jnp.where(clip, norm, 1.0), 1.0)
        new = NashMTLMemory(jnp.stack([w1, w2]).astype(memory.weights.dtype), memory.count + 1)
        return w1 * scale, w2 * scale, new

    return _gramian_combiner("nash_mtl", coefficients, alpha, gamma, diagnostics, init_memory)


# ----------------------------------------------------------------------------- GradVac


class GradVacMemory(NamedTuple):
    """GradVac's EMA targets of the cosine: ``[forget's w.r.t. retain, retain's w.r.t. forget]``
    (torchjd's ``phi_t[0, 1]`` and ``phi_t[1, 0]``), zeros at first."""

    targets: chex.Array  # [2]


@_doc
def grad_vac(alpha: float = 1.0, gamma: float = 1.0, beta: float = 0.5, eps: float = 1e-8,
             diagnostics: bool = True) -> optax.GradientTransformation:
    """GradVac (Gradient Vaccine): raise each row's cosine with the other to an EMA target.

    Wang et al. 2021, "Gradient Vaccine" (Eq. 4, Algorithm 1), as torchjd ``_gradvac.py:76-123``
    computes it from the Gramian: where ``phi = cos(g_f, g_r)`` is below row ``i``'s target
    ``t_i``, ``g_i += w_ij g_j`` with ``w_ij = |g_i| (t_i sqrt(1 - phi^2) - phi sqrt(1 - t_i^2)) /
    (|g_j| sqrt(1 - t_i^2) + eps)``, which sets the corrected row's cosine to ``t_i``; then
    ``t_i <- (1 - beta) t_i + beta phi`` and ``u`` is the sum of the corrected rows. The targets
    live in the state (zeros at first, so the first conflicting update projects like PCGrad on
    both rows). torchjd visits the other rows in a random order (``torch.randperm``); with two
    rows there is one order, so the result is deterministic and equal to torchjd's.

    Asymmetry: rows ``[gamma*g_f, alpha*g_r]``: ``u = gamma*g_f' + alpha*g_r'`` of the corrected
    rows (the correction of a row scales with that row; the cosines do not change).

    Args:
      alpha: weight of the retain row (>= 0).
      gamma: weight of the forget row (>= 0).
      beta: EMA rate of the targets, in [0, 1] (torchjd's default 0.5; the paper's 1e-2).
      eps: added to the denominators (torchjd's default).
      {diagnostics}

    {returns}
    """
    check_number("grad_vac", "beta", beta, 0.0, 1.0)
    check_number("grad_vac", "eps", eps, 0.0)

    def init_memory(params):
        return GradVacMemory(jnp.zeros((2,), acc_dtype(params)))

    def coefficients(ff, fr, rr, a, g, memory: GradVacMemory):
        w1, w2, targets = W.grad_vac(*_rows(ff, fr, rr, a, g), memory.targets.astype(ff.dtype), beta, eps)
        return w1 * g, w2 * a, GradVacMemory(targets.astype(memory.targets.dtype))

    return _gramian_combiner("grad_vac", coefficients, alpha, gamma, diagnostics, init_memory)


# ----------------------------------------------------------------------------- ConFIG


@_doc
def con_fig(alpha: float = 1.0, gamma: float = 1.0, rank_rtol: float | None = None,
            diagnostics: bool = True) -> optax.GradientTransformation:
    """ConFIG: the direction with prescribed projections on the unit rows, scaled by their sum.

    Liu et al. 2024, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks"
    (Eq. 2), as torchjd ``_config.py:36-45``: ``e = normalize(pinv([u_f; u_r]) p)`` with
    ``u_i = g_i/|g_i|``, ``u = (<g_f, e> + <g_r, e>) e``. Guarantee: ``<u, g_f> >= 0`` and
    ``<u, g_r> >= 0``, in the ratio ``gamma |g_f| : alpha |g_r|`` (full rank). With
    ``alpha = gamma``: ``u = (|g_f| + |g_r|)/2 (u_f + u_r)``; exactly opposite rows give ``u = 0``.

    Asymmetry: ``p = (gamma, alpha)``, torchjd's ``pref_vector`` (rows are normalized, so row
    scaling would only change ``u``'s length). ``alpha = 0``: ``u`` is ``g_f``'s part orthogonal to
    ``g_r``, scaled; ``gamma = 0``: ``g_r``'s part orthogonal to ``g_f``.

    Deviation: ``torch.linalg.pinv`` (torchjd) drops a singular value of the ``2 x n`` matrix of
    unit rows below ``max(2, n) * eps`` times the largest, with ``n`` the number of parameters: in
    float32 that exceeds 1 from ``n ~ 8e6`` on, when torchjd's ConFIG returns 0 for any input.
    Here the rank decision depends on the two rows only: ``rank_rtol`` defaults to
    ``2 * eps(dtype)``; pass ``max(2, n) * eps`` to reproduce torchjd.

    Args:
      alpha: preference for the retain row (>= 0).
      gamma: preference for the forget row (>= 0).
      rank_rtol: relative singular value below which ``pinv`` drops the smaller one (None:
        ``2 * eps``).
      {diagnostics}

    {returns}
    """
    if rank_rtol is not None:
        check_number("con_fig", "rank_rtol", rank_rtol, 0.0)

    def coefficients(ff, fr, rr, a, g):
        return W.con_fig(ff, fr, rr, g, a, rank_rtol)

    return _gramian_combiner("con_fig", coefficients, alpha, gamma, diagnostics)

