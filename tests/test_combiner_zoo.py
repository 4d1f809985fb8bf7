"""The combiner zoo of issue 23: BLUR, GRU, NGDiff and the multi-task aggregators.

1. Parity: each aggregator equals ``torchjd.aggregation`` (torchjd 0.18.0, live) on the same
   2-row Jacobians (rows [forget, retain]), in float32 and in float64; BLUR, GRU and NGDiff equal
   float64 restatements of their reference code (tests/zoo_reference.py, lines cited there).
2. The papers' guarantees as hypothesis properties.
3. What every registered combiner must do: finite on zero gradients, jit and vmap, the same
   update on 1 device and sharded over 8 (fsdp=8, fsdp=4 x tensor=2) with no gathers, each
   leaf's dtype kept, schedules through ``optax.inject_hyperparams``, diagnostics by name.

Tolerances (`tolerance`): a float32 result may differ from a float64 or float32 oracle by
``1e-5`` relative (~80 float32 ulps: sums over the leaves in another order, a square root and a
few divisions) and a float64 result by ``1e-9`` (torchjd's quadprog, eigh, SVD and pinv paths
agree with the closed forms to ~1e-11 on these inputs), widened to ``10 eps kappa`` where
``kappa = (1 + |cos|)/(1 - |cos|)``, the condition number of the unit rows' Gramian: nearly
parallel or opposite rows (cos = +-(1 - 5e-5), kappa ~ 4e4..4e5) make every Gramian method
amplify rounding, ours and torchjd's alike. An absolute ``1e-6`` (float32) / ``1e-12`` (float64)
times ``|J|`` covers results that are cancellations of O(|J|) terms (exactly opposite rows).
Where torchjd solves with an iterative solver (CAGrad: CLARABEL; Nash-MTL: ECOS) its own
accuracy sets the tolerance; the tests say how.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from combiner_strategies import ref_diagnostics
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from zoo_reference import (
    CASES,
    N,
    RefGRU,
    cagrad_cost,
    condition,
    ref_blur,
    ref_cagrad,
    ref_ngdiff,
    torchjd_nash_residual,
    torchjd_output,
    torchjd_sequence,
)

import jax_unlearn as ju
from jax_unlearn import sharding as sh
from jax_unlearn.combiners import weightings

pytest.importorskip("torchjd")

EPS = {"float32": 2.0**-23, "float64": 2.0**-52}
RTOL = {"float32": 1e-5, "float64": 1e-9}
ATOL = {"float32": 1e-6, "float64": 1e-12}
DTYPES = ("float32", "float64")
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tree(row, dtype) -> dict:
    """A length-N row as a two-leaf tree (so that sums run over leaves)."""
    row = np.asarray(row)
    return {"a": jnp.asarray(row[:3], dtype), "b": jnp.asarray(row[3:].reshape(2, 2), dtype)}


def flat(u) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(u)])


@functools.cache
def jitted(name: str, settings: tuple = ()):
    """``(tx, jit(tx.update))`` for ``COMBINERS[name](**settings)``, shared by the tests."""
    tx = ju.COMBINERS.get(name)(**dict(settings))
    return tx, jax.jit(tx.update)


def run(name: str, settings: tuple, rows: list, dtype: str) -> list[np.ndarray]:
    """Our combiner on successive Jacobians ``rows`` (state threaded), in ``dtype`` (float64 under
    ``jax.enable_x64``), each update checked to be in that dtype."""
    tx, update = jitted(name, settings)
    out = []
    with jax.enable_x64(dtype == "float64"):
        state = None
        for J in rows:
            g = ju.TwoTaskGrads(tree(J[0], dtype), tree(J[1], dtype))
            state = tx.init(g.forget) if state is None else state
            u, state = update(g, state)
            assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(u)), "not computed in " + dtype
            out.append(flat(u))
    return out


def tolerance(J: np.ndarray, ref: np.ndarray, dtype: str, rtol: float | None = None, atol: float | None = None) -> float:
    """See the module docstring."""
    kappa = condition(J)
    kappa = 1.0 if not kappa < 1 / EPS[dtype] else kappa  # exactly opposite rows: the absolute term
    rt = max(rtol or RTOL[dtype], 10 * EPS[dtype] * kappa)
    return rt * float(np.linalg.norm(ref)) + max(atol or 0.0, ATOL[dtype]) * float(np.linalg.norm(J))


def rounded(J: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(J, dtype).astype(np.float64)


# ----------------------------------------------------------------------------- 1. parity with torchjd

# (our name, our settings, torchjd settings): our defaults and the torchjd settings they map to.
PARITY = [
    ("mgda", (), ()),
    ("upgrad", (), ()),
    ("dual_proj", (), ()),
    ("imtl_g", (), ()),
    ("aligned_mtl", (), ()),
    ("aligned_mtl", (("scale_mode", "rmse"),), (("scale_mode", "rmse"),)),
    ("grad_vac", (), ()),
    ("con_fig", (), ()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, ours_settings, torchjd_settings", PARITY, ids=lambda x: str(x))
def test_aggregator_equals_torchjd_on_every_case(name, ours_settings, torchjd_settings, dtype):
    """torchjd runs in the same dtype on the same (rounded) rows: its rank decisions (IMTL-G's and
    ConFIG's pinv, Aligned-MTL's eigenvalue cut) are relative to ``eps(dtype)``, so the float32
    oracle is torchjd in float32 (e.g. rows of norms 1e3 and 1e-3 have a Gramian of rank 1 in
    float32 and of rank 2 in float64)."""
    failures = []
    for case, J in CASES.items():
        if name == "con_fig" and case == "opposite" and dtype == "float64":
            continue  # torchjd returns pinv's rounding noise there: test_con_fig_opposite_rows_give_zero
        (got,) = run(name, ours_settings, [rounded(J, dtype)], dtype)
        want = torchjd_output(name, case, torchjd_settings, dtype)
        err, tol = float(np.linalg.norm(got - want)), tolerance(J, want, dtype)
        if not err <= tol:
            failures.append(f"{case}: |ours - torchjd| = {err:.3g} > {tol:.3g} (|torchjd| = {np.linalg.norm(want):.3g})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.4, 1.0])
def test_cagrad_equals_torchjd_and_its_exact_optimum(c, dtype):
    """CAGrad: torchjd's CLARABEL stops at its default tolerances; its weights then differ from
    the exact optimum by up to ~5e-5 (measured on these cases), an error of the weights, so of
    the rows' size: the parity tolerance is 2e-4 relative plus 1e-4 |J|. Against the float64
    restatement solved to the cost's flatness (ternary search, tests/zoo_reference.py) ours
    agrees to 1e-6, and its cost is never above that of torchjd's weights (moved onto the
    simplex: recovering them from torchjd's output by least squares is itself rounded)."""
    settings = () if c == 0.4 else (("c", c),)  # 0.4 is our default
    failures = []
    for case, J in CASES.items():
        Jd = rounded(J, dtype)
        (got,) = run("cagrad", settings, [Jd], dtype)
        want = torchjd_output("cagrad", case, (("c", c),), dtype)
        if not np.linalg.norm(got - want) <= tolerance(J, want, dtype, rtol=2e-4, atol=1e-4):
            failures.append(f"{case}: torchjd {np.linalg.norm(got - want):.3g}")
        exact = ref_cagrad(Jd, c)
        if not np.linalg.norm(got - exact) <= tolerance(J, exact, dtype, rtol=max(1e-6, RTOL[dtype])):
            failures.append(f"{case}: exact {np.linalg.norm(got - exact):.3g}")
        if np.any(got) and np.any(want) and np.linalg.matrix_rank(Jd) == 2:  # compare the solvers' costs
            with jax.enable_x64(True):
                ours_w = np.asarray(weightings.cagrad(*_gram(Jd), c), np.float64) - 0.5
            torch_w = np.linalg.lstsq(Jd.T, want, rcond=None)[0] - 0.5  # 1/2 + lambda w*, w* on the simplex
            ours_w, torch_w = ours_w / ours_w.sum(), np.clip(torch_w / torch_w.sum(), 0.0, 1.0)
            torch_w = torch_w / torch_w.sum()
            if cagrad_cost(Jd, ours_w, c) > cagrad_cost(Jd, torch_w, c) + 1e-12:
                failures.append(f"{case}: our cost is above torchjd's")
    assert not failures, "\n".join(failures)


def _gram(J):
    G = np.asarray(J, np.float64) @ np.asarray(J, np.float64).T
    return jnp.asarray(G[0, 0]), jnp.asarray(G[0, 1]), jnp.asarray(G[1, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_nash_mtl_equals_torchjd_where_torchjd_converges(max_norm, dtype):
    """torchjd's Nash-MTL runs ECOS on the float64 Gramian (its float32 path rounds the problem's
    data and fails more often), so the oracle is torchjd in float64 on the rows as rounded to
    ``dtype``. ECOS fails on some inputs (extreme scales, strong conflict): its weights then miss
    the fixed point ``w_i (G w)_i = const`` by far more than its stopping rule ``1e-3``. Where its
    residual is below 1e-3 ours must agree to 1e-5 + 10x that residual; elsewhere ours must sit on
    the fixed point itself. A zero row or opposite rows have no solution: torchjd's solver fails
    and it keeps its previous weights (ones), and so do we. At least 5 cases must be real
    comparisons."""
    settings = () if max_norm == 1.0 else (("max_norm", 0.0),)
    compared, failures = 0, []
    for case, J in CASES.items():
        if case == "both_zero":
            continue  # torchjd raises (0/0 in its normalization); ours is 0 (test_finite_on_zero_gradients)
        Jd = rounded(J, dtype)
        (got,) = run("nash_mtl", settings, [Jd], dtype)
        if case in ("forget_zero", "retain_zero", "opposite"):  # no solution: the previous weights
            want = torchjd_sequence("nash_mtl", [Jd], max_norm=max_norm)[0]
            ok = np.linalg.norm(got - want) <= tolerance(J, want, dtype)
            failures += [] if ok else [f"{case}: previous weights {got} vs {want}"]
            continue
        residual = torchjd_nash_residual(Jd, max_norm=max_norm)
        G = Jd @ Jd.T
        w = np.linalg.lstsq(Jd.T, got, rcond=None)[0]
        k = w * (G @ w)
        if abs(k[0] - k[1]) > 1e-4 * abs(k.mean()) * max(1.0, 10 * EPS[dtype] * condition(J) / 1e-4):
            failures.append(f"{case}: ours is not the fixed point: w_i (G w)_i = {k}")
        if residual <= 1e-3:
            compared += 1
            want = torchjd_sequence("nash_mtl", [Jd], max_norm=max_norm)[0]
            if not np.linalg.norm(got - want) <= tolerance(J, want, dtype, rtol=1e-5 + 10 * residual):
                failures.append(f"{case}: |ours - torchjd| = {np.linalg.norm(got - want):.3g}, residual {residual:.1e}")
    assert compared >= 5 and not failures, (compared, "\n".join(failures))


def test_nash_mtl_state_reuses_the_weights_between_solves_as_torchjd():
    """``update_weights_every=2``: the second update reuses the first weights (torchjd's
    ``prvs_alpha``), the third solves again; a zero-row update keeps the last weights."""
    Js = [CASES["random0"], CASES["random1"], CASES["random1"], CASES["retain_zero"], 3.0 * CASES["random1"]]
    want = torchjd_sequence("nash_mtl", Js, max_norm=0.0, update_weights_every=2)
    got = run("nash_mtl", (("max_norm", 0.0), ("update_weights_every", 2)), Js, "float64")
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-9, err_msg=f"update {i}")
    assert not np.allclose(got[1], run("nash_mtl", (("max_norm", 0.0),), [Js[1]], "float64")[0])  # reused


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_grad_vac_sequence_equals_torchjd(beta):
    """GradVac keeps its EMA targets across updates: five updates (conflicting and aligned rows)
    equal torchjd's stateful GradVac's. With two rows torchjd's random visiting order has one
    outcome, so the match is exact up to rounding."""
    Js = [CASES["random2"], CASES["nearly_opposite"], CASES["random0"], CASES["nearly_parallel"], CASES["random1"]]
    want = torchjd_sequence("grad_vac", Js, beta=beta)
    got = run("grad_vac", (("beta", beta),), Js, "float64")
    for i, (g, w, J) in enumerate(zip(got, want, Js)):
        assert np.linalg.norm(g - w) <= tolerance(J, w, "float64"), f"update {i}"
    fresh = [run("grad_vac", (("beta", beta),), [J], "float64")[0] for J in Js[1:]]
    assert any(not np.allclose(a, b) for a, b in zip(got[1:], fresh))  # the targets in the state matter


def test_con_fig_opposite_rows_give_zero():
    """Exactly opposite rows: ``u_f + u_r = 0`` and ConFIG's direction is undefined. Ours is 0 up
    to the rounding of ``g_f/|g_f| + g_r/|g_r|``; torchjd's pinv keeps a singular value of rounding
    size and returns noise of norm ~1e-9 |J| (float64)."""
    J = CASES["opposite"]
    for dtype in DTYPES:
        (got,) = run("con_fig", (), [rounded(J, dtype)], dtype)
        assert np.linalg.norm(got) <= 4 * EPS[dtype] * np.linalg.norm(J), dtype
    assert np.linalg.norm(torchjd_output("con_fig", "opposite")) < 1e-6 * np.linalg.norm(J)


def test_con_fig_rank_rtol_of_torch_pinv_reproduces_torchjd():
    """``rank_rtol = max(2, n) eps`` is torch.linalg.pinv's default; on 7 coordinates it decides as
    our default ``2 eps`` does, except at exactly parallel rows, where both keep the bisector."""
    J = np.stack([CASES["random0"][0], 2.0 * CASES["random0"][0]])
    for rtol in (None, N * EPS["float32"]):
        (got,) = run("con_fig", (("rank_rtol", rtol),), [J], "float32")
        np.testing.assert_allclose(got, 3.0 * J[0], rtol=1e-6, atol=1e-6)  # (|g1| + |g2|)/2 * 2 u


# ----------------------------------------------------------------------------- alpha and gamma


ALPHA, GAMMA = 0.5, 2.0


@pytest.mark.parametrize("name, settings, torchjd_settings", [
    ("mgda", (), ()), ("imtl_g", (), ()), ("aligned_mtl", (), ()), ("cagrad", (), (("c", 0.4),)),
    ("grad_vac", (), ()),
])
def test_row_scaled_aggregators_aggregate_gamma_forget_and_alpha_retain(name, settings, torchjd_settings):
    """``alpha``/``gamma`` scale the rows before aggregating: torchjd on ``[gamma g_f, alpha g_r]``."""
    rtol, atol = (2e-4, 1e-4) if name == "cagrad" else (None, None)  # CLARABEL's accuracy, as above
    # (CAGrad returns 0 on rows of norms 1e3 and 1e-3: |g_w| < norm_eps |J|, its Pareto shortcut)
    for case in ("random0", "random1", "nearly_opposite") + (("mixed_scales",) if name != "cagrad" else ()):
        J = CASES[case]
        (got,) = run(name, (("alpha", ALPHA), ("gamma", GAMMA)) + settings, [J], "float64")
        want = torchjd_sequence(name, [np.diag([GAMMA, ALPHA]) @ J], **dict(torchjd_settings))[0]
        assert np.linalg.norm(got - want) <= tolerance(J, want, "float64", rtol, atol), case
        (plain,) = run(name, settings, [J], "float64")
        assert not np.allclose(got, plain), case  # the weights change the update


@pytest.mark.parametrize("name", ["upgrad", "dual_proj"])
def test_upgrad_and_dual_proj_weights_are_torchjd_preferences(name):
    """Scaling rows = torchjd's ``pref_vector = (gamma, alpha)/2`` (the dual cone is the same),
    exactly so without the regularization and the trace threshold (``norm_eps = reg_eps = 0``)."""
    from torchjd.linalg import QuadprogProjector

    for case in ("random0", "random1", "random2", "nearly_opposite"):
        J = CASES[case]
        got = run(name, (("alpha", ALPHA), ("gamma", GAMMA), ("norm_eps", 0.0), ("reg_eps", 0.0)), [J], "float64")[0]
        want = torchjd_sequence(name, [J], pref_vector=(GAMMA / 2, ALPHA / 2),
                                projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))[0]
        assert np.linalg.norm(got - want) <= tolerance(J, want, "float64", rtol=1e-7), case


def test_con_fig_weights_are_torchjd_preference_vector():
    for case in ("random0", "random1", "nearly_opposite", "forget_zero"):
        J = CASES[case]
        (got,) = run("con_fig", (("alpha", ALPHA), ("gamma", GAMMA)), [J], "float64")
        want = torchjd_sequence("con_fig", [J], pref_vector=(GAMMA, ALPHA))[0]
        assert np.linalg.norm(got - want) <= tolerance(J, want, "float64"), case


def test_nash_mtl_weights_are_bargaining_powers():
    """``w_f <u, g_f> = gamma`` and ``w_r <u, g_r> = alpha`` (no clipping): the weighted Nash
    bargaining solution, which row scaling could not give (it leaves the solution unchanged)."""
    for case in ("random0", "random1", "nearly_parallel", "mixed_scales"):
        J = CASES[case]
        (got,) = run("nash_mtl", (("alpha", ALPHA), ("gamma", GAMMA), ("max_norm", 0.0)), [J], "float64")
        w = np.linalg.lstsq(J.T, got, rcond=None)[0]
        np.testing.assert_allclose(w * (J @ got), [GAMMA, ALPHA], rtol=1e-9, err_msg=case)
        np.testing.assert_allclose(np.linalg.norm(got), math.sqrt(GAMMA + ALPHA), rtol=1e-9)
        scaled = run("nash_mtl", (("max_norm", 0.0),), [np.diag([GAMMA, ALPHA]) @ J], "float64")[0]
        np.testing.assert_allclose(scaled, run("nash_mtl", (("max_norm", 0.0),), [J], "float64")[0], rtol=1e-9)


# ----------------------------------------------------------------------------- golden values


# torchjd's own pinned outputs on J_base (TorchJD/torchjd v0.8.1 tests/unit/aggregation/test_values.py:34-102;
# GradVac: SimplexLab/TorchJD tests/unit/aggregation/test_values.py:72), atol 1e-4 as there.
J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
GOLDEN = {
    ("aligned_mtl", ()): [0.2133, 0.9673, 0.9673], ("con_fig", ()): [0.1588, 2.0706, 2.0706],
    ("dual_proj", ()): [0.5563, 1.1109, 1.1109], ("imtl_g", ()): [0.0767, 1.0, 1.0], ("mgda", ()): [0.0, 1.0, 1.0],
    ("upgrad", ()): [0.2929, 1.9004, 1.9004], ("cagrad", (("c", 0.5),)): [0.1835, 1.2041, 1.2041],
    ("nash_mtl", ()): [0.0542, 0.7061, 0.7061], ("grad_vac", ()): [0.5848, 3.8012, 3.8012],
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: k[0])
def test_golden_values_of_torchjd(key):
    name, settings = key
    tx = ju.COMBINERS.get(name)(**dict(settings))
    g = ju.TwoTaskGrads({"w": jnp.asarray(J_BASE[0], jnp.float32)}, {"w": jnp.asarray(J_BASE[1], jnp.float32)})
    u, _ = tx.update(g, tx.init(g.forget))
    np.testing.assert_allclose(u["w"], GOLDEN[key], rtol=0, atol=1e-4)
    live = torchjd_sequence(name, [J_BASE], **dict(settings))[0]  # torchjd 0.18.0 still pins them
    np.testing.assert_allclose(live, GOLDEN[key], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- BLUR, GRU, NGDiff


def _unlearning_rows(seed: int, n_steps: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        f = rng.standard_normal(N)
        r = -0.7 * f + 0.5 * rng.standard_normal(N) if rng.random() < 0.7 else rng.standard_normal(N)
        out.append(np.stack([f, r]))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_blur_equals_the_sago_reference(dtype):
    for seed in range(4):
        (J,) = _unlearning_rows(seed)
        J = rounded(J, dtype)
        (got,) = run("blur", (("alpha", ALPHA), ("gamma", GAMMA)), [J], dtype)
        want = np.concatenate(ref_blur([J[0][:3], J[0][3:]], [J[1][:3], J[1][3:]], ALPHA, GAMMA))
        assert np.linalg.norm(got - want) <= tolerance(J, want, dtype), seed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("moving_avg, cos_clip", [(0.8, None), (0.8, -0.5), (0.3, None), (1.0, None)])
def test_gru_sequence_equals_the_reference(moving_avg, cos_clip, dtype):
    """Five updates with the retain memory in the state, as the reference trainer's pipeline."""
    Js = [rounded(J, dtype) for J in _unlearning_rows(7, 5)]
    ref = RefGRU(moving_avg, cos_clip)
    want = [ref(J[0], J[1], ALPHA, GAMMA) for J in Js]
    got = run("gru", (("alpha", ALPHA), ("gamma", GAMMA), ("moving_avg", moving_avg), ("cos_clip", cos_clip)), Js, dtype)
    for i, (g, w, J) in enumerate(zip(got, want, Js)):
        # the memory is stored in the leaves' dtype; its rounding enters later projections
        assert np.linalg.norm(g - w) <= tolerance(J, w, dtype, rtol=4 * RTOL[dtype]), i
    assert sum(float(J[0] @ J[1]) < 0 for J in Js) >= 2  # the projections were exercised


def test_gru_without_memory_is_global_pcgrad():
    for J in _unlearning_rows(3, 4):
        (got,) = run("gru", (("moving_avg", 1.0),), [J], "float64")
        (want,) = run("pcgrad", (("scope", "global"),), [J], "float64")
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    tx = ju.gru(moving_avg=1.0)
    assert tx.init({"w": jnp.zeros(3)}).memory.retain_ema is None  # nothing stored


@pytest.mark.parametrize("dtype", DTYPES)
def test_ngdiff_equals_the_paper_formula(dtype):
    for J in [rounded(J, dtype) for J in _unlearning_rows(11, 3)] + [CASES["forget_zero"], CASES["both_zero"]]:
        (got,) = run("ngdiff", (("alpha", ALPHA), ("gamma", GAMMA)), [J], dtype)
        want = ref_ngdiff(J[0], J[1], ALPHA, GAMMA)
        assert np.linalg.norm(got - want) <= tolerance(J, want, dtype)


# ----------------------------------------------------------------------------- 2. guarantees


M = 12  # coordinates of the property tests' Jacobians: leaves (4,) and (2, 4)


@st.composite
def jacobians(draw):
    """float32 rows [forget, retain]: norms 1e-3..1e3 each, independent, nearly (anti-)aligned or
    with sparse zeros."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    f, r = rng.standard_normal(M), rng.standard_normal(M)
    relation = draw(st.sampled_from(["independent", "conflict", "aligned", "sparse"]))
    if relation == "conflict":
        r = -draw(st.floats(0.1, 3.0)) * f + draw(st.floats(0.05, 1.0)) * r
    elif relation == "aligned":
        r = draw(st.floats(0.1, 3.0)) * f + draw(st.floats(0.05, 1.0)) * r
    elif relation == "sparse":
        f, r = f * (rng.random(M) < 0.5), r * (rng.random(M) < 0.5)
    f, r = f * 10.0 ** draw(st.floats(-3, 3)), r * 10.0 ** draw(st.floats(-3, 3))
    return np.stack([f, r]).astype(np.float32).astype(np.float64)


def ptree(row, dtype=jnp.float32):
    row = np.asarray(row)
    return {"a": jnp.asarray(row[:4], dtype), "b": jnp.asarray(row[4:].reshape(2, 4), dtype)}


def prop_update(name: str, settings: tuple, J: np.ndarray) -> np.ndarray:
    tx, update = jitted(name, settings)
    g = ju.TwoTaskGrads(ptree(J[0]), ptree(J[1]))
    u, _ = update(g, tx.init(g.forget))
    return flat(u)


def slack(J: np.ndarray, d: np.ndarray, i: int) -> float:
    """Rounding bound of ``<d, g_i>`` for a float32 ``d`` computed from the Gramian."""
    kappa = min(condition(J), 1 / EPS["float32"])
    return (1e-5 + 10 * EPS["float32"] * kappa) * float(np.linalg.norm(d) * np.linalg.norm(J[i]))


@PROPERTY
@given(J=jacobians())
def test_mgda_is_the_min_norm_point_and_lowers_both_losses(J):
    """Sener & Koltun 2018: ``d`` minimizes |d| over the hull, so ``<d, g_i> >= |d|^2 >= 0``."""
    d = prop_update("mgda", (), J)
    for i in range(2):
        assert float(d @ J[i]) >= float(d @ d) - slack(J, d, i)
    for t in np.linspace(0, 1, 11):
        assert np.linalg.norm(d) <= np.linalg.norm((1 - t) * J[0] + t * J[1]) * (1 + 1e-5) + 1e-30


# rows of norm 54 and 0.012 (kappa ~ 5e3), where the regularized bound is active: found by CI on an EPYC
ILL_CONDITIONED = np.array([
    [2.32771349e+00, 6.49748373e+00, 8.42795277e+00, 2.10392361e+01, -1.70626724e+00, -2.93161316e+01,
     -1.15359888e+01, 3.31192160e+00, -3.85244310e-01, -1.34627600e+01, 2.63972034e+01, 2.24207096e+01],
    [2.98444156e-05, -3.15688294e-03, -6.60607708e-04, -6.09053206e-03, 2.09037354e-03, 4.57672263e-03,
     -1.86259116e-04, -1.32737798e-03, 1.37679710e-03, 2.95031746e-03, -4.37697070e-03, -5.28996810e-03]])


@PROPERTY
@given(J=jacobians(), name=st.sampled_from(["upgrad", "dual_proj"]))
@example(J=ILL_CONDITIONED, name="dual_proj")
def test_upgrad_and_dual_proj_never_conflict_with_either_row(J, name):
    """Quinton & Rey 2024 (UPGrad) / GEM (DualProj): the update lies in the dual cone,
    ``<d, g_i> >= 0``; with torchjd's ``reg_eps`` regularization up to ``reg_eps tr(G) w_i``
    (where that bound is active it holds with equality, so the weight ``w_i`` recovered from the
    float32 ``d`` needs its own rounding bound: with rows of very different norms it is ill-posed)."""
    exact = prop_update(name, (("norm_eps", 0.0), ("reg_eps", 0.0)), J)
    for i in range(2):
        assert float(exact @ J[i]) >= -slack(J, exact, i)
    d = prop_update(name, (), J)
    G = J @ J.T
    if np.trace(G) < 1e-4 or np.linalg.matrix_rank(J) < 2:
        return  # below torchjd's absolute norm_eps the rows are only averaged (documented)
    w = np.linalg.lstsq(J.T, d, rcond=None)[0]
    # w read back from the float32 d: its error is d's rounding through pinv(J), |pinv(J)| = 1/sigma_min
    dw = 10 * EPS["float32"] * np.sqrt(J.shape[1]) * np.linalg.norm(d) / np.linalg.svd(J, compute_uv=False)[-1]
    for i in range(2):
        assert float(d @ J[i]) >= -1e-4 * np.trace(G) * (abs(w[i]) + dw) - slack(J, d, i)


@PROPERTY
@given(J=jacobians(), c=st.sampled_from([0.2, 0.4, 0.8]))
def test_cagrad_stays_within_c_of_the_mean_and_maximizes_the_worse_task(J, c):
    """Liu et al. 2021: ``|d - g0| <= c|g0|`` and ``min_i <d, g_i>`` is the largest over that ball
    (checked against 64 other points of it); or ``d = 0`` on torchjd's Pareto branch."""
    d = prop_update("cagrad", (("c", c),), J)
    g0 = J.mean(axis=0)
    if not np.any(d):
        return  # |g_w| < norm_eps |J|: the Pareto shortcut (also tested in the parity cases)
    r = c * np.linalg.norm(g0)
    assert np.linalg.norm(d - g0) <= r * (1 + 1e-4) + 1e-6 * np.linalg.norm(J)
    best = min(float(d @ J[0]), float(d @ J[1]))
    rng = np.random.default_rng(0)
    for _ in range(64):
        z = rng.standard_normal(M)
        other = g0 + r * z / np.linalg.norm(z)
        assert min(float(other @ J[0]), float(other @ J[1])) <= best + 1e-4 * np.linalg.norm(J) ** 2 * c + 1e-30


@PROPERTY
@given(J=jacobians())
def test_nash_mtl_is_the_bargaining_fixed_point(J):
    d = prop_update("nash_mtl", (("max_norm", 0.0),), J)
    n = np.linalg.norm(J, axis=1)
    if not np.all(n > 0) or float(J[0] @ J[1]) / float(n[0] * n[1]) < -1 + 1e-3:
        return  # a zero row (previous weights) or nearly opposite rows (beyond float32's reach)
    w = np.linalg.lstsq(J.T, d, rcond=None)[0]
    np.testing.assert_allclose(w * (J @ d), [1.0, 1.0], rtol=1e-3)  # float32, kappa up to ~1e3
    np.testing.assert_allclose(np.linalg.norm(d), math.sqrt(2.0), rtol=1e-4)


@PROPERTY
@given(J=jacobians(), name=st.sampled_from(["con_fig", "ngdiff"]))
def test_con_fig_and_ngdiff_lower_both_losses(J, name):
    d = prop_update(name, (), J)
    for i in range(2):
        assert float(d @ J[i]) >= -slack(J, d, i)


@PROPERTY
@given(J=jacobians())
def test_blur_keeps_the_whole_forget_step_and_gru_never_opposes_retain(J):
    """BLUR's retain part is orthogonal to ``g_f``; GRU without memory: ``<u, g_r> >= alpha |g_r|^2``."""
    u = prop_update("blur", (("alpha", ALPHA), ("gamma", GAMMA)), J)
    ff, fr = float(J[0] @ J[0]), float(J[0] @ J[1])
    assert abs(float((u - GAMMA * J[0]) @ J[0])) <= slack(J, u, 0) + ALPHA * abs(fr) * 1e-10 / (ff + 1e-10)
    u = prop_update("gru", (("alpha", ALPHA), ("gamma", GAMMA), ("moving_avg", 1.0)), J)
    assert float(u @ J[1]) >= ALPHA * float(J[1] @ J[1]) - slack(J, u, 1)


@PROPERTY
@given(J=jacobians())
def test_imtl_g_projects_equally_on_both_unit_rows(J):
    d = prop_update("imtl_g", (), J)
    n = np.linalg.norm(J, axis=1)
    lam = np.linalg.eigvalsh(J @ J.T)
    if not lam[0] > 1e-3 * lam[1]:
        return  # IMTL-G inverts the Gramian: only well-conditioned float32 rows are checked (below
        # 2 eps(float32) lam_max the smaller eigenvalue is dropped, as torch's pinv does)
    p = J @ d / n
    np.testing.assert_allclose(p[0], p[1], rtol=1e-3, atol=1e-6 * np.linalg.norm(d))


# ----------------------------------------------------------------------------- 3. every combiner


ALL = ju.COMBINERS.names()


def _grads(seed: int, shapes=(("a", (16, 8)), ("c", (4, 16))), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    make = lambda: {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes}  # noqa: E731
    f, r = make(), make()
    r = jax.tree.map(lambda x, y: (-0.5 * x + y).astype(dtype), f, r)  # conflicting on average
    return ju.TwoTaskGrads(f, r)


@functools.cache
def on_zeros() -> tuple:
    """Every combiner's updates and states along: a normal update, both gradients zero, forget
    zero, retain zero, both zero again (one jitted program)."""
    txs = _all(lambda f: f())
    step = _step(txs)
    g = _grads(0)
    zero = jax.tree.map(jnp.zeros_like, g.forget)
    states = jax.device_put({n: tx.init(g.forget) for n, tx in txs.items()}, jax.devices()[0])
    seq = [g, ju.TwoTaskGrads(zero, zero), ju.TwoTaskGrads(zero, g.retain), ju.TwoTaskGrads(g.forget, zero),
           ju.TwoTaskGrads(zero, zero)]
    out = []
    for grads in seq:
        u, states = step(grads, states)
        out.append((u, states))
    return out


@pytest.mark.parametrize("name", ALL)
def test_finite_on_zero_gradients(name):
    """Finite updates and state (memory included) whichever gradient is zero, and no update when
    both are."""
    out = on_zeros()
    for i, (u, states) in enumerate(out):
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((u[name], states[name]))), i
    for i in (1, 4):
        assert not any(np.any(x) for x in jax.tree.leaves(out[i][0][name])), i


# The remaining tests run every combiner inside one jitted program per placement (one compilation
# instead of fifteen), then check each combiner's part.

SHAPES = (("a", (16, 8)), ("b", (8,)))
MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tensor2": (1, 4, 2)}
SPECS = {"a": ("fsdp", "tensor"), "c": ("tensor", "fsdp")}


def _all(make=lambda f: f(alpha=0.7, gamma=1.3)) -> dict:
    return {name: make(ju.COMBINERS.get(name)) for name in ALL}


def _step(txs: dict, jit: bool = True):
    """(``jit`` of) every combiner's update: ``(grads, states) -> (updates, states)`` by name."""
    def step(grads, states):
        out = {n: tx.update(grads, states[n]) for n, tx in txs.items()}
        return {n: o[0] for n, o in out.items()}, {n: o[1] for n, o in out.items()}
    return jax.jit(step) if jit else step


@functools.cache
def placements() -> dict:
    """Two updates of every combiner on one device, and the second update again on each mesh from
    the first update's state placed by `jax_unlearn.sharding.optimizer_shardings` (a parameter-
    shaped memory is sharded like the parameters); with the collectives of each mesh's program."""
    txs = _all()
    step = _step(txs)
    g = _grads(1)
    states0 = jax.device_put({n: tx.init(g.forget) for n, tx in txs.items()}, jax.devices()[0])
    u1, states1 = step(g, states0)
    u2, states2 = step(g, states1)
    out = {"one": (g, u1, states1, u2, states2)}
    for mesh_name, shape in MESHES.items():
        mesh = sh.make_mesh(sh.MeshConfig(*shape))
        shard = {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)) for k, s in SPECS.items()}
        gs = ju.TwoTaskGrads(*(jax.tree.map(jax.device_put, t, shard) for t in g))
        placed = {n: jax.device_put(states1[n], sh.optimizer_shardings(txs[n], states1[n], shard, mesh)) for n in ALL}
        u, states = step(gs, placed)
        kinds = {c.kind for c in sh.collectives(step.lower(gs, placed).compile().as_text())}
        out[mesh_name] = (gs, u, states, kinds)
    return out


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", ALL)
def test_sharded_update_equals_one_device_without_gathers(name, mesh_name):
    """Over 8 fake CPU devices: the same second update (and state) as on one device, each leaf
    keeping its sharding, and the only collectives are all-reduces of scalar sums (no gathers)."""
    _, _, _, want, want_state = placements()["one"]
    gs, got, state, kinds = placements()[mesh_name]
    chex.assert_trees_all_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state[name], want_state[name], rtol=1e-5, atol=1e-6)
    for k in SPECS:
        assert got[name][k].sharding.is_equivalent_to(gs.forget[k].sharding, got[name][k].ndim), k
    if name == "gru":  # the retain average lives where the parameters do
        assert state[name].memory.retain_ema["a"].sharding.is_equivalent_to(gs.forget["a"].sharding, 2)
    assert kinds <= {"all-reduce"}, kinds


@pytest.mark.parametrize("name", ALL)
def test_diagnostics_are_read_by_name_and_match_float64(name):
    g, u, state, _, _ = placements()["one"]
    want = ref_diagnostics(jax.tree.leaves(g.forget), jax.tree.leaves(g.retain), jax.tree.leaves(u[name]))
    for key, value in want.items():
        got = float(optax.tree_utils.tree_get(state[name], key))
        np.testing.assert_allclose(got, value, rtol=1e-4, atol=2e-4 if not key.endswith("norm") else 0, err_msg=key)
    assert 0 < want["conflict_fraction"] < 1


@functools.cache
def vmapped() -> tuple:
    txs = _all(lambda f: f())
    gs = [_grads(s, SHAPES) for s in range(3)]
    batch = jax.tree.map(lambda *x: jnp.stack(x), *gs)
    states = {n: jax.vmap(tx.init)(batch.forget) for n, tx in txs.items()}
    u, new = jax.jit(jax.vmap(_step(txs, jit=False)))(batch, states)
    return txs, gs, u, new


@pytest.mark.parametrize("name", ALL)
def test_jit_and_vmap_agree_with_one_by_one(name):
    txs, gs, u, new = vmapped()
    tx = txs[name]
    for i, g in enumerate(gs):
        want, want_state = tx.update(g, tx.init(g.forget))  # eager, one example
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], u[name]), want, rtol=2e-5, atol=1e-6)
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], new[name]), want_state, rtol=2e-5, atol=1e-6)


@functools.cache
def mixed_dtypes() -> tuple:
    """Every combiner on a tree with a bfloat16 leaf, and on the same values in float32. (GRU
    stores its retain average in each leaf's dtype, which rounds it: run without memory.)"""
    txs = _all(lambda f: f(moving_avg=1.0) if f is ju.gru else f())
    step = _step(txs)
    g32 = _grads(2, SHAPES)
    g16 = ju.TwoTaskGrads(*(dict(t, b=t["b"].astype(jnp.bfloat16)) for t in g32))
    g_ref = ju.TwoTaskGrads(*(dict(t, b=t["b"].astype(jnp.float32)) for t in g16))
    u16, _ = step(g16, {n: tx.init(g16.forget) for n, tx in txs.items()})
    u32, _ = step(g_ref, {n: tx.init(g_ref.forget) for n, tx in txs.items()})
    return g16, u16, u32


@pytest.mark.parametrize("name", ALL)
def test_leaves_keep_their_dtype_and_are_combined_in_float32(name):
    """A bfloat16 leaf gets the update computed in float32 from the same values, rounded once."""
    g16, u16, u32 = mixed_dtypes()
    assert u16[name]["a"].dtype == jnp.float32 and u16[name]["b"].dtype == jnp.bfloat16
    np.testing.assert_allclose(u16[name]["a"], u32[name]["a"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(u16[name]["b"], u32[name]["b"].astype(jnp.bfloat16))
    if name == "gru":
        memory = ju.gru().init(g16.forget).memory.retain_ema
        assert memory["a"].dtype == jnp.float32 and memory["b"].dtype == jnp.bfloat16


@functools.cache
def scheduled() -> tuple:
    """``alpha`` scheduled 1 -> 4 through ``optax.inject_hyperparams`` inside ``optax.chain``, two
    jitted steps of every combiner."""
    sched = lambda count: jnp.where(count == 0, 1.0, 4.0)  # noqa: E731
    chains = _all(lambda f: optax.chain(optax.inject_hyperparams(f)(alpha=sched, gamma=0.5), optax.scale(-1.0)))
    g = _grads(3, (("a", (6,)), ("b", (2, 3))))
    step = _step(chains)
    states = {n: tx.init(g.forget) for n, tx in chains.items()}
    got0, states = step(g, states)
    got1, states = step(g, states)
    return g, got0, got1, states


@pytest.mark.parametrize("name", ALL)
def test_inject_hyperparams_schedules_alpha_in_a_chain(name):
    """Step by step, the scheduled chain gives the updates of the factory called with those values
    (state carried), and the schedule changed the update."""
    g, got0, got1, states = scheduled()
    factory = ju.COMBINERS.get(name)
    ref0, ref_state = factory(alpha=1.0, gamma=0.5).update(g, factory(alpha=1.0, gamma=0.5).init(g.forget))
    ref1, _ = factory(alpha=4.0, gamma=0.5).update(g, ref_state)
    chex.assert_trees_all_close(got0[name], jax.tree.map(jnp.negative, ref0), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got1[name], jax.tree.map(jnp.negative, ref1), rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(ref1)))
    assert float(states[name][0].hyperparams["alpha"]) == 4.0


@pytest.mark.parametrize("name, key, value", [
    ("cagrad", "c", 0.8), ("grad_vac", "beta", 0.1), ("gru", "moving_avg", 0.3), ("gru", "cos_clip", -0.2),
    ("nash_mtl", "update_weights_every", 2),
])
def test_other_settings_are_injectable_hyperparameters(name, key, value):
    """A numeric setting given to ``optax.inject_hyperparams`` arrives traced: two jitted updates
    equal the factory's with the plain number."""
    factory = ju.COMBINERS.get(name)
    g = _grads(5, (("a", (6,)), ("b", (2, 3))))
    tx = optax.inject_hyperparams(factory)(**{key: value})
    state = tx.init(g.forget)
    plain = factory(**{key: value})
    ref_state = plain.init(g.forget)
    update = jax.jit(tx.update)
    for _ in range(2):
        got, state = update(g, state)
        want, ref_state = plain.update(g, ref_state)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    assert key in state.hyperparams


@pytest.mark.parametrize("make, match", [
    (lambda: ju.cagrad(c=-0.1), r"cagrad: c must lie in \[0.0, inf\]"),
    (lambda: ju.grad_vac(beta=1.5), r"grad_vac: beta must lie in \[0.0, 1.0\]"),
    (lambda: ju.gru(moving_avg=0.0), r"gru: moving_avg must lie in \(0.0, 1.0\]"),
    (lambda: ju.gru(cos_clip=0.5), r"gru: cos_clip must lie in \[-1.0, 0.0\]"),
    (lambda: ju.nash_mtl(update_weights_every=0), "update_weights_every must be an integer >= 1"),
    (lambda: ju.aligned_mtl(scale_mode="max"), "scale_mode='max'"),
    (lambda: ju.upgrad(reg_eps=-1.0), r"upgrad: reg_eps must lie in \[0.0, inf\]"),
    (lambda: ju.mgda(alpha=-1.0), "alpha.*>= 0"),
])
def test_bad_settings_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()
