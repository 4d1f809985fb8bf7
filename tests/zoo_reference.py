"""Oracles of the combiner zoo's tests: the 2-row Jacobians, torchjd's aggregators on them, and
float64 NumPy restatements of the reference code of BLUR, GRU and NGDiff (file:line cited).

Nothing here imports jax_unlearn's combiners: these are the answers the combiners must give.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

N = 7  # coordinates of the test Jacobians: leaves of shape (3,) and (2, 2)


def _rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, N))


def _cases() -> dict[str, np.ndarray]:
    """2 x N Jacobians, rows [forget, retain], defined in float64. The exact relations (a zero
    row, g_r = -2 g_f) survive the rounding to float32 (multiplying by 2 is exact)."""
    v, w = _rows(10)
    out = {f"random{i}": _rows(i) for i in range(3)}
    out["nearly_parallel"] = np.stack([v, 2.0 * v + 1e-2 * np.linalg.norm(v) * w / np.linalg.norm(w)])
    out["nearly_opposite"] = np.stack([v, -3.0 * v + 1e-2 * np.linalg.norm(v) * w / np.linalg.norm(w)])
    out["opposite"] = np.stack([v, -2.0 * v])
    out["forget_zero"] = np.stack([np.zeros(N), w])
    out["retain_zero"] = np.stack([v, np.zeros(N)])
    out["both_zero"] = np.zeros((2, N))
    for s in ("1e-8", "1e-4", "1e4", "1e8"):
        out[f"scale{s}"] = float(s) * _rows(20)
    out["mixed_scales"] = _rows(30) * np.array([[1e3], [1e-3]])
    return out


CASES = _cases()


def condition(J: np.ndarray) -> float:
    """The condition number ``(1 + |c|)/(1 - |c|)`` of the unit rows' Gramian (``c`` their cosine;
    1 for a zero row): how much a closed form on the Gramian can magnify rounding."""
    n = np.linalg.norm(J, axis=1)
    if not np.all(n > 0):
        return 1.0
    c = abs(float(J[0] @ J[1]) / (n[0] * n[1]))
    return (1 + c) / max(1 - c, 1e-300)


# ----------------------------------------------------------------------------- torchjd


def torchjd_aggregator(name: str, **kw):
    import torch
    from torchjd import aggregation as A

    pref = kw.pop("pref_vector", None)
    if pref is not None:
        kw["pref_vector"] = torch.tensor(pref, dtype=torch.float64)
    if name == "nash_mtl":
        return A.NashMTL(n_tasks=2, **kw)
    cls = {"mgda": A.MGDA, "upgrad": A.UPGrad, "dual_proj": A.DualProj, "imtl_g": A.IMTLG,
           "aligned_mtl": A.AlignedMTL, "cagrad": A.CAGrad, "grad_vac": A.GradVac, "con_fig": A.ConFIG}[name]
    return cls(**kw)


def torchjd_sequence(name: str, Js: list[np.ndarray], dtype=np.float64, **kw) -> list[np.ndarray]:
    """One stateful torchjd aggregator applied to ``Js`` in turn (each rounded to ``dtype``, and
    aggregated in that dtype); returned in float64."""
    import torch

    agg = torchjd_aggregator(name, **dict(kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy/ECOS deprecation and solver warnings
        return [agg(torch.tensor(np.asarray(J, dtype))).double().numpy() for J in Js]


@functools.cache
def torchjd_output(name: str, case: str, settings: tuple = (), dtype: str = "float64") -> np.ndarray:
    """torchjd's aggregation of ``CASES[case]`` rounded to ``dtype``, by a fresh aggregator, in
    ``dtype``."""
    return torchjd_sequence(name, [CASES[case]], np.dtype(dtype), **dict(settings))[0]


def torchjd_nash_residual(J: np.ndarray, **kw) -> float:
    """How far torchjd's Nash-MTL weights ``w`` (float64) are from its own fixed point: the spread
    of ``w_i (G w)_i``, which the solution makes equal (to 1 before the norm clipping), relative to
    their mean. torchjd stops its iterations at ``|G w - 1/w| < 1e-3``."""
    import torch

    agg = torchjd_aggregator("nash_mtl", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = agg.weighting(torch.tensor(np.asarray(J, np.float64))).numpy()
    k = w * (J @ J.T @ w)
    return float(abs(k[0] - k[1]) / max(abs(k.mean()), 1e-300))


# ----------------------------------------------------------------------------- BLUR, GRU, NGDiff


def ref_blur(fs: list, rs: list, alpha: float, gamma: float) -> list:
    """``SAGO:src/trainer/unlearn/grad_surgery.py:164-187`` (with ``_dot_product``, :214-220):
    ``coeff = <r, f>/(<f, f> + 1e-10)`` over all tensors, ``r' = r - coeff*f``,
    ``gamma*f + alpha*r'`` per tensor."""
    fs, rs = [np.asarray(f, np.float64) for f in fs], [np.asarray(r, np.float64) for r in rs]
    dot = sum(float((r * f).sum()) for f, r in zip(fs, rs))
    ff = sum(float((f * f).sum()) for f in fs)
    coeff = dot / (ff + 1e-10)
    return [gamma * f + alpha * (r - coeff * f) for f, r in zip(fs, rs)]


class RefGRU:
    """``tmlr-group/GRU`` ``dataloader_faster_refactor1.py`` restated on flat float64 vectors:
    the memory ``moving_avg*r + (1 - moving_avg)*old`` with ``old = 0`` at first (:178, :516-517),
    ``dotp = <f, m>`` (:518-519), the projection when ``dotp < 0`` (:443-451): exact
    (``orthogonal_component_precise``, :232-254) or cosine-clipped (``..._COSCLIP``, :257-281, with
    the clip value as an argument instead of the hard-coded -0.5), then ``f + ce_coeff*r``
    (``+ce``, :526-527). ``gamma`` scales the rectified forget gradient (1 in the reference)."""

    def __init__(self, moving_avg: float = 0.8, cos_clip: float | None = None):
        self.moving_avg, self.cos_clip, self.old = moving_avg, cos_clip, 0.0

    def __call__(self, f: np.ndarray, r: np.ndarray, alpha: float = 1.0, gamma: float = 1.0) -> np.ndarray:
        f, r = np.asarray(f, np.float64).ravel(), np.asarray(r, np.float64).ravel()
        m = self.moving_avg * r + (1 - self.moving_avg) * self.old
        self.old = m
        dotp = float(f @ m)
        if dotp < 0:
            if self.cos_clip is None:
                f = f - np.dot(f, m) / np.dot(m, m) * m
            else:
                rn, fn = np.linalg.norm(m), np.linalg.norm(f)
                cos = max(dotp / (fn * rn), self.cos_clip)
                f = f - (fn * cos) / rn * m
        return gamma * f + alpha * r


def ref_ngdiff(f: np.ndarray, r: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """arXiv 2410.22086: ``g_R/|g_R| - g_F/|g_F|`` with ``g_F = -g_f`` (the forget loss to maximise),
    weighted ``alpha``, ``gamma``; a zero gradient contributes nothing."""
    f, r = np.asarray(f, np.float64).ravel(), np.asarray(r, np.float64).ravel()
    unit = lambda x: x / np.linalg.norm(x) if np.linalg.norm(x) > 0 else 0 * x  # noqa: E731
    return gamma * unit(f) + alpha * unit(r)


def cagrad_cost(J: np.ndarray, w: np.ndarray, c: float) -> float:
    """CAGrad's objective ``<g_w, g0> + c|g0||g_w|`` on the trace-normalized rows (torchjd
    ``_cagrad.py:53-58``) at the simplex point ``w``."""
    Jn = np.asarray(J, np.float64) / np.sqrt(max(float((J * J).sum()), 1e-300))
    g0 = Jn.mean(axis=0)
    gw = w @ Jn
    return float(gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw))


def ref_cagrad(J: np.ndarray, c: float, norm_eps: float = 1e-4) -> np.ndarray:
    """torchjd's CAGrad (``_cagrad.py:46-73``) restated in float64 with its convex problem on the
    segment solved by ternary search (200 rounds: ``t`` to the flatness of the cost) instead of
    CLARABEL."""
    J = np.asarray(J, np.float64)
    if float((J * J).sum()) < norm_eps:
        return np.zeros(J.shape[1])
    lo, hi = 0.0, 1.0
    cost = lambda t: cagrad_cost(J, np.array([1 - t, t]), c)  # noqa: E731
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, m2) if cost(m1) < cost(m2) else (m1, hi)
    w = np.array([1 - (lo + hi) / 2, (lo + hi) / 2])
    Jn = J / np.sqrt(float((J * J).sum()))
    g0, gw = Jn.mean(axis=0), w @ Jn
    if np.linalg.norm(gw) < norm_eps:
        return np.zeros(J.shape[1])
    return (0.5 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * w) @ J
