"""Closed-form weightings of two Jacobian rows from their 2x2 Gramian (pure ``jnp`` on scalars).

Each function takes the Gramian ``[[g11, g12], [g12, g22]]`` of two rows ``g1, g2`` (scalar arrays
of one floating dtype, float32 or float64) and returns the weights ``(w1, w2)`` of the aggregate
``d = w1*g1 + w2*g2``, as the matching ``torchjd.aggregation`` weighting (torchjd 0.18.0) computes
them with its solvers: Frank-Wolfe (MGDA), quadprog (UPGrad, DualProj), CLARABEL (CAGrad), ECOS
(Nash-MTL), SVD/eigh/pinv (IMTL-G, Aligned-MTL, ConFIG). With two rows each problem is a
one-dimensional one and has a closed form, so nothing here iterates, branches in Python on a
value, or leaves the device: every function is jittable, vmappable and differentiable almost
everywhere. Divisions by zero are guarded with ``where`` so that no branch makes a NaN.

Quantities that would multiply two Gramian entries (determinants, eigenvalues) are formed on the
Gramian divided by its trace (entries in [-1, 1]), so that float32 neither overflows nor
underflows for gradients of norm 1e-8 to 1e8 over billions of coordinates.

`jax_unlearn.combiners.aggregators` turns these into combiners; docs/reference.md (last section)
cites the torchjd lines each restates.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

Array = chex.Array


def _safe(x: Array) -> Array:
    """``x`` with zeros replaced by ones (a denominator whose zero case a ``where`` discards)."""
    return jnp.where(x == 0, jnp.ones_like(x), x)


def _eps(x: Array) -> float:
    return float(jnp.finfo(jnp.result_type(x)).eps)


def _eig(n11: Array, n12: Array, n22: Array) -> tuple[Array, Array]:
    """Eigenvalues ``l1 >= l2`` of a symmetric 2x2 matrix with entries in [-1, 1] (``l2`` from the
    determinant, which is accurate when ``l1`` dominates)."""
    l1 = 0.5 * (n11 + n22) + jnp.hypot(0.5 * (n11 - n22), n12)
    l2 = jnp.where(l1 > 0, (n11 * n22 - n12 * n12) / _safe(l1), jnp.zeros_like(l1))
    return l1, l2


def _normalized(g11: Array, g12: Array, g22: Array) -> tuple[Array, Array, Array, Array]:
    """The Gramian divided by its trace (zeros for a zero Gramian) and the trace."""
    tr = g11 + g22
    inv = jnp.where(tr > 0, 1.0 / _safe(tr), jnp.zeros_like(tr))
    return g11 * inv, g12 * inv, g22 * inv, tr


def _cosine(g11: Array, g12: Array, g22: Array) -> tuple[Array, Array, Array]:
    """Row norms and their cosine (0 when a row is zero), without forming ``g11*g22``."""
    n1, n2 = jnp.sqrt(jnp.maximum(g11, 0)), jnp.sqrt(jnp.maximum(g22, 0))
    den = n1 * n2
    return n1, n2, jnp.clip(jnp.where(den > 0, g12 / _safe(den), jnp.zeros_like(den)), -1.0, 1.0)


# ----------------------------------------------------------------------------- MGDA


def mgda(g11: Array, g12: Array, g22: Array) -> tuple[Array, Array]:
    """The min-norm point of the segment ``[g1, g2]`` (MGDA-UB, Sener & Koltun 2018, Algorithm 2):
    ``w2 = clip(<g1, g1 - g2> / |g1 - g2|^2, 0, 1)``, ``w1 = 1 - w2``. torchjd's Frank-Wolfe
    (``_mgda.py``) reaches the same point in one exact line search from ``(1/2, 1/2)``. Each weight
    is computed from its own numerator (``1 - w2`` would lose ``w1`` when ``w2`` is near 1).
    Equal rows (``|g1 - g2| = 0``): any point is the same vector; ``(1/2, 1/2)``."""
    den = g11 - 2.0 * g12 + g22
    pos = den > 0
    w1 = jnp.where(pos, jnp.clip((g22 - g12) / _safe(den), 0.0, 1.0), 0.5)
    w2 = jnp.where(pos, jnp.clip((g11 - g12) / _safe(den), 0.0, 1.0), 0.5)
    return w1, w2


# ----------------------------------------------------------------------------- UPGrad, DualProj


def _regularized(g11, g12, g22, norm_eps, reg_eps):
    """torchjd's ``regularize(normalize(G, norm_eps), reg_eps)``: ``G / trace(G) + reg_eps*I``, with
    ``G / trace`` replaced by zeros when the trace is below ``norm_eps`` (an absolute threshold)."""
    n11, n12, n22, tr = _normalized(g11, g12, g22)
    small = tr < norm_eps
    zero = jnp.zeros_like(n11)
    return (jnp.where(small, zero, n11) + reg_eps, jnp.where(small, zero, n12),
            jnp.where(small, zero, n22) + reg_eps)


def _dual_cone_weight(p_i: Array, a_ij: Array, a_jj: Array) -> Array:
    """For ``u = p_i * e_i`` the ``j``-th weight of the projection onto the dual cone: the QP
    ``min v^T A v  s.t.  v >= u`` has ``v_i = p_i`` and ``v_j = max(0, -A_ij p_i / A_jj)``."""
    return jnp.where(a_jj > 0, p_i * jnp.maximum(-a_ij, 0.0) / _safe(a_jj), jnp.zeros_like(a_jj))


def upgrad(g11: Array, g12: Array, g22: Array, p1: Array = 0.5, p2: Array = 0.5, norm_eps: float = 1e-4,
           reg_eps: float = 1e-4) -> tuple[Array, Array]:
    """UPGrad (Quinton & Rey 2024): each row ``p_i * g_i`` projected onto the dual cone of the
    rows, summed (torchjd ``_upgrad.py``, the QP of ``_linalg/_dual_cone.py`` on the normalized,
    regularized Gramian ``A``). In two dimensions the QP's active set is explicit:
    ``w1 = p1 + p2 * max(0, -A12/A11)``, ``w2 = p2 + p1 * max(0, -A12/A22)``."""
    a11, a12, a22 = _regularized(g11, g12, g22, norm_eps, reg_eps)
    return p1 + _dual_cone_weight(p2, a12, a11), p2 + _dual_cone_weight(p1, a12, a22)


def dual_proj(g11: Array, g12: Array, g22: Array, p1: Array = 0.5, p2: Array = 0.5, norm_eps: float = 1e-4,
              reg_eps: float = 1e-4) -> tuple[Array, Array]:
    """DualProj (GEM's Eq. 11 as in torchjd ``_dualproj.py``): ``u = (p1, p2)`` projected onto the
    dual cone, ``min v^T A v  s.t.  v >= u``. If ``(A u)_2 < 0`` the retain constraint is active:
    ``v = (p1, -A12 p1 / A22)``; if ``(A u)_1 < 0``, ``v = (-A12 p2 / A11, p2)``; else ``v = u``
    (both cannot be negative for a positive semi-definite ``A``)."""
    a11, a12, a22 = _regularized(g11, g12, g22, norm_eps, reg_eps)
    p1, p2 = jnp.asarray(p1, a11.dtype), jnp.asarray(p2, a11.dtype)
    au1, au2 = a11 * p1 + a12 * p2, a12 * p1 + a22 * p2
    second = (au2 < 0) & (a22 > 0)
    first = (au1 < 0) & (a11 > 0) & ~second
    w1 = jnp.where(first, -a12 * p2 / _safe(a11), p1)
    w2 = jnp.where(second, -a12 * p1 / _safe(a22), p2)
    return w1, w2


# ----------------------------------------------------------------------------- IMTL-G


def imtl_g(g11: Array, g12: Array, g22: Array) -> tuple[Array, Array]:
    """IMTL-G (Liu et al. 2021) as generalized in torchjd ``_imtl_g.py``: ``v = pinv(G) sqrt(diag G)``,
    ``w = v / sum(v)``, or zeros when ``|sum(v)| < 1e-12``. ``pinv`` keeps the eigenvalues above
    ``2 * eps(dtype)`` times the largest (``torch.linalg.pinv``'s default ``rtol``): the inverse
    when both are kept, ``P1 / l1`` (``P1`` the top eigenprojector) when only one is."""
    n11, n12, n22, tr = _normalized(g11, g12, g22)
    l1, l2 = _eig(n11, n12, n22)
    d1, d2 = jnp.sqrt(jnp.maximum(n11, 0)), jnp.sqrt(jnp.maximum(n22, 0))
    full = jnp.abs(l2) > 2 * _eps(n11) * l1
    det = n11 * n22 - n12 * n12
    v1_full, v2_full = (n22 * d1 - n12 * d2) / _safe(det), (n11 * d2 - n12 * d1) / _safe(det)
    # rank one: pinv = P1 / l1 with P1 = (N - l2 I) / (l1 - l2)
    gap = _safe(l1 * (l1 - l2))
    v1_one, v2_one = ((n11 - l2) * d1 + n12 * d2) / gap, (n12 * d1 + (n22 - l2) * d2) / gap
    rank0 = ~(l1 > 0)
    v1 = jnp.where(rank0, 0.0, jnp.where(full, v1_full, v1_one))
    v2 = jnp.where(rank0, 0.0, jnp.where(full, v2_full, v2_one))
    # v of the normalized Gramian is sqrt(trace) times v of G: the threshold scales with it
    s = v1 + v2
    keep = jnp.abs(s) >= 1e-12 * jnp.sqrt(tr)
    return jnp.where(keep, v1 / _safe(s), 0.0), jnp.where(keep, v2 / _safe(s), 0.0)


# ----------------------------------------------------------------------------- Aligned-MTL


def aligned_mtl(g11: Array, g12: Array, g22: Array, p1: Array = 0.5, p2: Array = 0.5,
                scale_mode: str = "min") -> tuple[Array, Array]:
    """Aligned-MTL (Senushkin et al. 2023, Algorithm 1) as in torchjd ``_aligned_mtl.py``:
    ``w = B p`` with the balance transformation ``B = sqrt(s) V S^-1/2 V^T`` over the eigenpairs of
    ``G`` above ``2 * eps(dtype) * l1``, ``s`` the smallest kept eigenvalue (``"min"``; torch's
    median of two values is the lower one, so ``"median"`` is the same), or their mean
    (``"rmse"``). Written without eigenvectors: with ``P1 = (N - l2 I)/(l1 - l2)``,
    rank 2: ``B = sqrt(s/l2) I - k (N - l2 I)``, ``k = sqrt(s) / (sqrt(l1 l2) (sqrt(l1) + sqrt(l2)))``
    (finite as ``l1 -> l2``); rank 1: ``B = P1``; rank 0: ``B = I``. ``B`` does not change when
    ``G`` is scaled, so it is computed on ``N = G / trace``."""
    n11, n12, n22, _ = _normalized(g11, g12, g22)
    l1, l2 = _eig(n11, n12, n22)
    tol = 2 * _eps(n11) * l1
    rank2, rank1 = l2 > tol, (l1 > tol) & ~(l2 > tol)
    s1, s2 = jnp.sqrt(jnp.maximum(l1, 0)), jnp.sqrt(jnp.maximum(l2, 0))
    if scale_mode in ("min", "median"):
        c2, k = jnp.ones_like(l1), 1.0 / _safe(s1 * (s1 + s2))
    elif scale_mode == "rmse":
        root = jnp.sqrt(0.5 * (l1 + l2))
        c2, k = root / _safe(s2), root / _safe(s1 * s2 * (s1 + s2))
    else:
        raise ValueError(f"scale_mode={scale_mode!r} is not supported; expected 'min', 'median' or 'rmse'")
    # rank 2: B = c2 I - k (N - l2 I); rank 1: B = (N - l2 I) / (l1 - l2)
    b11_2, b12_2, b22_2 = c2 - k * (n11 - l2), -k * n12, c2 - k * (n22 - l2)
    gap = _safe(l1 - l2)
    b11_1, b12_1, b22_1 = (n11 - l2) / gap, n12 / gap, (n22 - l2) / gap
    one, zero = jnp.ones_like(l1), jnp.zeros_like(l1)
    b11 = jnp.where(rank2, b11_2, jnp.where(rank1, b11_1, one))
    b12 = jnp.where(rank2, b12_2, jnp.where(rank1, b12_1, zero))
    b22 = jnp.where(rank2, b22_2, jnp.where(rank1, b22_1, one))
    return b11 * p1 + b12 * p2, b12 * p1 + b22 * p2


# ----------------------------------------------------------------------------- CAGrad


def cagrad(g11: Array, g12: Array, g22: Array, c: Array = 0.4, norm_eps: float = 1e-4) -> tuple[Array, Array]:
    """CAGrad (Liu et al. 2021, Algorithm 1) as in torchjd ``_cagrad.py``, on ``N = G / trace(G)``
    (zeros below ``norm_eps``): ``w* = argmin_{w in simplex} <g_w, g0> + c |g0| |g_w|`` with
    ``g0 = (g1 + g2)/2``, ``g_w = w1 g1 + w2 g2``; then ``w = 1/2 + c |g0| / |g_w*| * w*``, or zeros
    when ``|g_w*| < norm_eps`` (torchjd: "approximately on the pareto front").

    With ``w* = (1 - t, t)``: ``q(t) = |g_w|^2 = A + 2Bt + Ct^2`` (``A = N11``, ``B = N12 - N11``,
    ``C = |g1 - g2|^2``) and the cost ``a0 + a1 t + s sqrt(q(t))`` (``a1 = (N22 - N11)/2``,
    ``s = c|g0|``) is convex in ``t``. Its stationary point has ``y = B + Ct`` with
    ``y / sqrt(q) = k := -a1/s``; since ``q = y^2/C + det(N)/C``, ``y = k sqrt(det N / (C - k^2))``
    when ``k^2 < C``, else the cost is monotone and ``t`` is the end ``k > 0 -> 1``, ``k < 0 -> 0``;
    clipped to [0, 1]. With ``s = 0`` (``c = 0`` or ``g0 = 0``) the cost is linear: ``t = [a1 < 0]``.
    """
    n11, n12, n22, _ = _normalized(g11, g12, g22)
    small = (g11 + g22) < norm_eps
    zero = jnp.zeros_like(n11)
    n11, n12, n22 = jnp.where(small, zero, n11), jnp.where(small, zero, n12), jnp.where(small, zero, n22)
    s = c * jnp.sqrt(jnp.maximum(0.25 * (n11 + 2.0 * n12 + n22), 0.0))
    a1 = 0.5 * (n22 - n11)
    b, cc = n12 - n11, n11 - 2.0 * n12 + n22
    det = jnp.maximum(n11 * n22 - n12 * n12, 0.0)
    k = -a1 / _safe(s)
    inside = (s > 0) & (k * k < cc)
    y = k * jnp.sqrt(det / _safe(cc - k * k))
    t_inside = jnp.clip((y - b) / _safe(cc), 0.0, 1.0)
    t_end = jnp.where(s > 0, (k > 0).astype(n11.dtype), (a1 < 0).astype(n11.dtype))
    t = jnp.where(inside, t_inside, t_end)
    u1, u2 = 1.0 - t, t
    gw = jnp.sqrt(jnp.maximum(u1 * u1 * n11 + 2.0 * u1 * u2 * n12 + u2 * u2 * n22, 0.0))
    keep = gw >= norm_eps
    lam = s / _safe(gw)
    return jnp.where(keep, 0.5 + lam * u1, 0.0), jnp.where(keep, 0.5 + lam * u2, 0.0)


# ----------------------------------------------------------------------------- Nash-MTL


def nash_mtl(g11: Array, g12: Array, g22: Array, p1: Array = 1.0, p2: Array = 1.0) -> tuple[Array, Array, Array]:
    """The (weighted) Nash bargaining solution of Navon et al. 2022: ``w > 0`` with
    ``w_i (G w)_i = p_i`` (Eq. 4 with bargaining powers ``p``; torchjd ``_nash_mtl.py`` solves the
    ``p = 1`` case by sequential convex programs with ECOS). With ``b_i = w_i |g_i|`` and the
    cosine ``c``: ``b1 (b1 + c b2) = p1``, ``b2 (b2 + c b1) = p2``, so ``rho = b2/b1`` solves
    ``p1 rho^2 + c (p1 - p2) rho - p2 = 0`` (positive root, written to avoid cancellation) and
    ``b1 = sqrt(p1 / (1 + c rho))``. Then ``|d|^2 = p1 + p2`` whatever the gradients' scale.

    Returns ``(w1, w2, ok)``. ``ok`` is False where no positive solution exists: a zero row, rows
    with ``1 + c rho`` at most ``16 eps (1 + rho)`` (0 within the rounding of ``c``: opposite
    rows), ``p1 = p2 = 0``. torchjd's solver then fails and it keeps its previous weights, which
    the caller does too. One zero bargaining power gives the one-task solution
    ``w_i = sqrt(p_i) / |g_i|``.
    """
    n1, n2, c = _cosine(g11, g12, g22)
    dtype = n1.dtype
    p1, p2 = jnp.asarray(p1, dtype), jnp.asarray(p2, dtype)
    q = c * (p1 - p2)
    root = jnp.sqrt(q * q + 4.0 * p1 * p2)
    rho = jnp.where(q >= 0, 2.0 * p2 / _safe(q + root), (root - q) / _safe(2.0 * p1))
    den = 1.0 + c * rho
    pos = (p1 > 0) & (p2 > 0) & (n1 > 0) & (n2 > 0)
    # 1 + c rho within rounding of 0 (c carries a few ulps): opposite rows, no solution
    both = pos & (den > 16 * _eps(den) * (1.0 + rho)) & (rho + c > 16 * _eps(den) * (1.0 + rho))
    b1 = jnp.sqrt(p1 / jnp.where(both, den, 1.0))
    b2 = rho * b1
    only1 = (p1 > 0) & (p2 == 0) & (n1 > 0)
    only2 = (p2 > 0) & (p1 == 0) & (n2 > 0)
    w1 = jnp.where(both, b1, jnp.where(only1, jnp.sqrt(p1), 0.0)) / _safe(n1)
    w2 = jnp.where(both, b2, jnp.where(only2, jnp.sqrt(p2), 0.0)) / _safe(n2)
    return w1, w2, both | only1 | only2


# ----------------------------------------------------------------------------- GradVac


def _vaccine(n_i: Array, n_j: Array, phi: Array, target: Array, eps: float) -> Array:
    """GradVac's correction weight of ``g_j`` in ``g_i`` (Wang et al. 2021, Eq. 4, torchjd
    ``_gradvac.py``): ``n_i (t sqrt(1-phi^2) - phi sqrt(1-t^2)) / (n_j sqrt(1-t^2) + eps)`` where the
    cosine ``phi`` is below its target ``t``, else 0."""
    root_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
    root_t = jnp.sqrt(jnp.maximum(1.0 - target * target, 0.0))
    w = n_i * (target * root_phi - phi * root_t) / (n_j * root_t + eps)
    return jnp.where(phi < target, w, jnp.zeros_like(w))


def grad_vac(g11: Array, g12: Array, g22: Array, targets: Array, beta: Array = 0.5,
             eps: float = 1e-8) -> tuple[Array, Array, Array]:
    """GradVac for two rows: each row ``i`` gets ``w_ij g_j`` added where the cosine ``phi`` is below
    the EMA target ``targets[i]``; the weights are the column sums ``(1 + w21, 1 + w12)`` and the
    targets move to ``(1 - beta) targets + beta phi``. With two rows torchjd's random visiting order
    (``torch.randperm``) has one choice, and row ``i``'s cosine with ``g_j`` is the same
    ``phi = g12 / (|g1| |g2| + eps)`` for both rows.

    Returns ``(w1, w2, new_targets)``; ``targets`` is ``[target of row 1 w.r.t. row 2, target of row
    2 w.r.t. row 1]`` (torchjd's ``phi_t[0, 1]``, ``phi_t[1, 0]``).
    """
    n1, n2 = jnp.sqrt(jnp.maximum(g11, 0.0)), jnp.sqrt(jnp.maximum(g22, 0.0))
    phi = g12 / (n1 * n2 + eps)
    targets = targets.astype(n1.dtype)
    w12 = _vaccine(n1, n2, phi, targets[0], eps)  # g1 += w12 * g2
    w21 = _vaccine(n2, n1, phi, targets[1], eps)  # g2 += w21 * g1
    new = (1.0 - beta) * targets + beta * jnp.stack([phi, phi])
    return 1.0 + w21, 1.0 + w12, new


# ----------------------------------------------------------------------------- ConFIG


def con_fig(g11: Array, g12: Array, g22: Array, p1: Array = 1.0, p2: Array = 1.0,
            rtol: float | None = None) -> tuple[Array, Array]:
    """ConFIG (Liu et al. 2024, Eq. 2) as in torchjd ``_config.py``: the unit rows ``u_i = g_i/|g_i|``
    (a zero row stays zero), ``x = pinv(U) p``, ``e = x / |x|``, ``d = (sum_i <g_i, e>) e``.

    For two unit rows with cosine ``c`` and full rank, ``U x = p`` gives ``<g_i, x> = |g_i| p_i``
    and ``x = (a u1 + b u2) / (1 - c^2)`` with ``a = p1 - c p2``, ``b = p2 - c p1``, ``|x|^2 =
    Q / (1 - c^2)``, ``Q = (p1 - p2)^2 + 2 p1 p2 (1 - c)``; so
    ``d = (|g1| p1 + |g2| p2) / Q * (a u1 + b u2)``, free of ``1/(1 - c^2)`` (equal preferences:
    ``d = (|g1| + |g2|)/2 (u1 + u2)``). ``pinv`` drops the smaller singular value ``sqrt(1 - |c|)``
    of ``U`` when it is at most ``rtol`` times the larger ``sqrt(1 + |c|)``: then ``x`` lies along
    ``u1 + u2`` (``c >= 0``: ``d = (|g1| + |g2|)/2 (u1 + u2)``) or along ``u1 - u2`` (``c < 0``:
    ``d = (|g1| - |g2|)/2 (u1 - u2)``, and 0 when ``p1 = p2``). One zero row: ``d = g_i`` if
    ``p_i > 0``. ``rtol`` defaults to ``2 * eps(dtype)``; ``torch.linalg.pinv`` (torchjd) uses
    ``max(2, n) * eps`` for ``n`` coordinates, see `jax_unlearn.combiners.aggregators.con_fig`.

    Returns the weights of ``g1`` and ``g2``.
    """
    n1, n2, c = _cosine(g11, g12, g22)
    dtype = n1.dtype
    p1, p2 = jnp.asarray(p1, dtype), jnp.asarray(p2, dtype)
    rtol = 2 * _eps(n1) if rtol is None else rtol
    both, only1, only2 = (n1 > 0) & (n2 > 0), (n1 > 0) & ~(n2 > 0), (n2 > 0) & ~(n1 > 0)
    one_minus = 1.0 - c
    deficient = jnp.maximum(1.0 - jnp.abs(c), 0.0) <= rtol * rtol * (1.0 + jnp.abs(c))
    # full rank: coefficients of u1, u2
    q = (p1 - p2) ** 2 + 2.0 * p1 * p2 * one_minus
    k = jnp.where(q > 0, (n1 * p1 + n2 * p2) / _safe(q), 0.0)
    full1, full2 = k * ((p1 - p2) + p2 * one_minus), k * ((p2 - p1) + p1 * one_minus)
    # rank one
    half_sum = jnp.where(p1 + p2 > 0, 0.5 * (n1 + n2), 0.0)
    half_diff = jnp.where(p1 != p2, 0.5 * (n1 - n2), 0.0)
    def1 = jnp.where(c >= 0, half_sum, half_diff)
    def2 = jnp.where(c >= 0, half_sum, -half_diff)
    coef1 = jnp.where(both, jnp.where(deficient, def1, full1), jnp.where(only1 & (p1 > 0), n1, 0.0))
    coef2 = jnp.where(both, jnp.where(deficient, def2, full2), jnp.where(only2 & (p2 > 0), n2, 0.0))
    return coef1 / _safe(n1), coef2 / _safe(n2)
