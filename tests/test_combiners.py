"""Property-based tests of the two-task combiners (hypothesis + chex)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from combiner_strategies import (
    ROUNDOFF,
    f64,
    ref_diagnostics,
    ref_pcgrad,
    ref_sago,
    ref_weighted_sum,
    two_task_grads,
    weights,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_unlearn as ju

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(tx, grads):
    """One update of ``tx`` on ``grads`` (eager); returns (updates, state)."""
    return tx.update(grads, tx.init(grads.forget))


def leaves(tree):
    return jax.tree.leaves(tree)


def roundoff(x) -> float:
    return ROUNDOFF[jnp.dtype(x.dtype)]


# ----------------------------------------------------------------------------- SAGO


@PROPERTY
@given(grads=two_task_grads(), alpha=weights, gamma=weights, agree=st.sampled_from(["forget", "sum"]))
def test_sago_never_opposes_retain_on_any_coordinate(grads, alpha, gamma, agree):
    u, _ = run(ju.sago(alpha, gamma, agree=agree), grads)
    for ul, fl, rl in zip(leaves(u), leaves(grads.forget), leaves(grads.retain)):
        assert ul.dtype == rl.dtype and ul.shape == rl.shape
        assert np.all(f64(ul) * f64(rl) >= 0)
        np.testing.assert_allclose(f64(ul), ref_sago(fl, rl, alpha, gamma, agree), rtol=roundoff(ul), atol=0)


@PROPERTY
@given(grads=two_task_grads(relation="aligned"), alpha=weights, gamma=weights, agree=st.sampled_from(["forget", "sum"]))
def test_sago_without_conflicts_keeps_forget_or_sum(grads, alpha, gamma, agree):
    u, state = run(ju.sago(alpha, gamma, agree=agree), grads)
    assert float(state.conflict_fraction) == 0.0
    expected = ju.weighted_sum(alpha if agree == "sum" else 0.0, gamma)
    want, _ = run(expected, grads)
    chex.assert_trees_all_equal(u, want)


@PROPERTY
@given(grads=two_task_grads(), alpha=weights, gamma=weights, agree=st.sampled_from(["forget", "sum"]))
def test_sago_update_has_positive_cosine_with_retain(grads, alpha, gamma, agree):
    u, _ = run(ju.sago(alpha, gamma, agree=agree), grads)
    uf = np.concatenate([f64(x).ravel() for x in leaves(u)] + [np.zeros(0)])
    ff = np.concatenate([f64(x).ravel() for x in leaves(grads.forget)] + [np.zeros(0)])
    rf = np.concatenate([f64(x).ravel() for x in leaves(grads.retain)] + [np.zeros(0)])
    dot = float(np.dot(uf, rf))
    assert dot >= 0
    # agree="sum" adds alpha*g_r on every coordinate: strictly positive whenever g_r != 0.
    # agree="forget" keeps gamma*g_f where signs agree: strictly positive as soon as one
    # coordinate has g_f,i*g_r,i != 0 (conflicts take alpha*g_r, agreements gamma*g_f).
    if np.any(rf != 0) and (agree == "sum" or np.any(ff * rf != 0)):
        assert dot > 0


# ----------------------------------------------------------------------------- PCGrad


def pcgrad_tolerance(fs, rs, us, alpha, gamma, scope):
    """Bound on |u - u_ref| per leaf: roundoff of the stored update plus the float32 error of
    the projection coefficient, both scaled by the magnitudes that enter the formula."""
    fs64, rs64 = [f64(x) for x in fs], [f64(x) for x in rs]
    groups = [list(range(len(fs)))] if scope == "global" else [[i] for i in range(len(fs))]
    tol = [None] * len(fs)
    for g in groups:
        abs_dot = sum(float(np.abs(fs64[i] * rs64[i]).sum()) for i in g)
        nr = sum(float(np.vdot(rs64[i], rs64[i])) for i in g)
        coef = gamma * abs_dot / (nr + 1e-10)  # largest |projection coefficient| the float32 sums can give
        for i in g:
            scale = gamma * np.abs(fs64[i]) + (alpha + coef) * np.abs(rs64[i])
            tol[i] = (roundoff(us[i]) + 1e-5) * scale
    return tol


@PROPERTY
@given(grads=two_task_grads(), alpha=weights, gamma=weights, scope=st.sampled_from(["module", "global"]))
def test_pcgrad_matches_float64_formula_and_never_opposes_retain(grads, alpha, gamma, scope):
    u, _ = run(ju.pcgrad(alpha, gamma, scope=scope), grads)
    fs, rs, us = leaves(grads.forget), leaves(grads.retain), leaves(u)
    want = ref_pcgrad(fs, rs, alpha, gamma, scope)
    tol = pcgrad_tolerance(fs, rs, us, alpha, gamma, scope)
    for ul, w, t in zip(us, want, tol):
        assert ul.dtype == fs[0].dtype
        assert np.all(np.abs(f64(ul) - w) <= t)
    # <u, g_r> >= 0 per leaf (module) or overall (global), up to the formula's own 1e-10 term
    # (gamma*|d|*1e-10/(|g_r|^2+1e-10)) and the rounding bound of the stored update.
    groups = [list(range(len(us)))] if scope == "global" else [[i] for i in range(len(us))]
    for g in groups:
        dot = sum(float(np.vdot(f64(us[i]), f64(rs[i]))) for i in g)
        d = sum(float(np.vdot(f64(fs[i]), f64(rs[i]))) for i in g)
        n = sum(float(np.vdot(f64(rs[i]), f64(rs[i]))) for i in g)
        slack = gamma * abs(min(d, 0.0)) * 1e-10 / (n + 1e-10)
        slack += sum(float(np.vdot(tol[i], np.abs(f64(rs[i])))) for i in g)
        assert dot >= -slack


@PROPERTY
@given(grads=two_task_grads(relation="aligned"), alpha=weights, gamma=weights, scope=st.sampled_from(["module", "global"]))
def test_pcgrad_equals_weighted_sum_without_conflict(grads, alpha, gamma, scope):
    u, _ = run(ju.pcgrad(alpha, gamma, scope=scope), grads)
    want, _ = run(ju.weighted_sum(alpha, gamma), grads)
    chex.assert_trees_all_equal(u, want)


def test_pcgrad_module_and_global_differ_as_stated():
    # Leaf "a" conflicts strongly, leaf "b" agrees more strongly: globally <g_f,g_r> > 0, so the
    # global scope leaves g_f alone while the module scope projects leaf "a" only.
    f = {"a": jnp.array([-1.0, 0.0]), "b": jnp.array([3.0, 0.0])}
    r = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 0.0])}
    g = ju.TwoTaskGrads(f, r)
    u_mod, _ = run(ju.pcgrad(1.0, 1.0, "module"), g)
    u_glob, _ = run(ju.pcgrad(1.0, 1.0, "global"), g)
    np.testing.assert_allclose(u_mod["a"], [1.0, 0.0], atol=1e-6)  # (-1 + 1) + 1
    np.testing.assert_allclose(u_mod["b"], [4.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(u_glob["a"], [0.0, 0.0], atol=1e-6)  # no projection: -1 + 1
    np.testing.assert_allclose(u_glob["b"], [4.0, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------- weighted sum


@PROPERTY
@given(grads=two_task_grads(), alpha=weights, gamma=weights)
def test_weighted_sum_matches_float64_formula(grads, alpha, gamma):
    u, _ = run(ju.weighted_sum(alpha, gamma), grads)
    for ul, fl, rl in zip(leaves(u), leaves(grads.forget), leaves(grads.retain)):
        assert ul.dtype == fl.dtype
        scale = gamma * np.abs(f64(fl)) + alpha * np.abs(f64(rl))
        assert np.all(np.abs(f64(ul) - ref_weighted_sum(fl, rl, alpha, gamma)) <= (roundoff(ul) + 1e-6) * scale)


# ----------------------------------------------------------------------------- diagnostics


COMBINERS = {
    "weighted_sum": lambda a, g: ju.weighted_sum(a, g),
    "pcgrad_module": lambda a, g: ju.pcgrad(a, g, scope="module"),
    "pcgrad_global": lambda a, g: ju.pcgrad(a, g, scope="global"),
    "sago": lambda a, g: ju.sago(a, g),
    "sago_sum": lambda a, g: ju.sago(a, g, agree="sum"),
}


@PROPERTY
@given(grads=two_task_grads(dtypes=(jnp.float32,)), alpha=weights, gamma=weights, name=st.sampled_from(sorted(COMBINERS)))
def test_state_diagnostics_match_float64(grads, alpha, gamma, name):
    u, state = run(COMBINERS[name](alpha, gamma), grads)
    want = ref_diagnostics(leaves(grads.forget), leaves(grads.retain), leaves(u))
    for key, value in want.items():
        got = float(optax.tree_utils.tree_get(state, key))
        if key.endswith("norm"):
            np.testing.assert_allclose(got, value, rtol=1e-4, err_msg=key)
        else:  # cosines and fractions: absolute, since they may sit near 0
            np.testing.assert_allclose(got, value, atol=2e-4, err_msg=key)
    per_leaf = ju.per_leaf_diagnostics(grads, u)
    for d, fl, rl, ul in zip(
        jax.tree.leaves(per_leaf, is_leaf=lambda x: isinstance(x, ju.CombinerState)),
        leaves(grads.forget), leaves(grads.retain), leaves(u),
    ):
        ref = ref_diagnostics([fl], [rl], [ul])
        np.testing.assert_allclose(float(d.conflict_fraction), ref["conflict_fraction"], atol=1e-6)
        np.testing.assert_allclose(float(d.cos_update_retain), ref["cos_update_retain"], atol=2e-4)
        np.testing.assert_allclose(float(d.update_norm), ref["update_norm"], rtol=1e-4)


def test_diagnostics_accumulate_bfloat16_in_float32():
    # 2^20 bf16 values of 1: a bf16 running sum would stall at 256, float32 sums are exact.
    ones = jnp.ones((1024, 1024), jnp.bfloat16)
    grads = ju.TwoTaskGrads({"w": ones}, {"w": -ones})
    u, state = run(ju.sago(), grads)
    assert u["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(float(state.forget_norm), 1024.0, rtol=1e-6)
    np.testing.assert_allclose(float(state.cos_forget_retain), -1.0, rtol=1e-6)
    assert float(state.conflict_fraction) == 1.0
    np.testing.assert_allclose(float(state.cos_update_retain), 1.0, rtol=1e-6)


def test_diagnostics_can_be_turned_off():
    grads = ju.TwoTaskGrads({"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([-1.0, -1.0])})
    u_on, _ = run(ju.sago(), grads)
    u_off, state = run(ju.sago(diagnostics=False), grads)
    chex.assert_trees_all_equal(u_on, u_off)
    assert all(np.isnan(float(x)) for x in state)


# ----------------------------------------------------------------------------- jit, chains, schedules


class JitAgreementTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_each_combiner_jit_and_eager_agree(self):
        rng = np.random.default_rng(0)
        tree = lambda: {"a": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                        "b": [jnp.asarray(rng.standard_normal(5), jnp.bfloat16)]}
        grads = ju.TwoTaskGrads(tree(), tree())
        for make in COMBINERS.values():
            tx = make(0.7, 1.3)
            want, want_state = run(tx, grads)
            got, got_state = self.variant(tx.update)(grads, tx.init(grads.forget))
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
            chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-7)


def test_full_chain_step_under_jit_lowers_retain_loss_with_sago():
    # Quadratic retain loss |p - 1|^2 and a forget "loss" pulling the other way.
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    tx = optax.chain(ju.sago(alpha=1.0, gamma=1.0), optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.0))
    state = tx.init(params)
    retain_loss = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
    forget_loss = lambda p: -sum(jnp.sum((x - 3.0) ** 2) for x in jax.tree.leaves(p))

    @jax.jit
    def step(params, state):
        g = ju.TwoTaskGrads(jax.grad(forget_loss)(params), jax.grad(retain_loss)(params))
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    losses = [float(retain_loss(params))]
    for _ in range(10):
        params, state = step(params, state)
        losses.append(float(retain_loss(params)))
    assert all(b < a for a, b in zip(losses, losses[1:]))
    # every coordinate sits between the retain optimum 1 and the forget pole 3: all conflict
    assert float(optax.tree_utils.tree_get(state, "conflict_fraction")) == 1.0


def test_inject_hyperparams_schedule_changes_alpha_between_steps():
    sched = lambda count: jnp.where(count == 0, 1.0, 4.0)
    tx = optax.chain(optax.inject_hyperparams(ju.sago)(alpha=sched, gamma=0.5))
    g = ju.TwoTaskGrads({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([-1.0, 1.0])})
    state = tx.init(g.forget)
    update = jax.jit(tx.update)
    u0, state = update(g, state)
    u1, state = update(g, state)
    np.testing.assert_allclose(u0["w"], [-1.0, 1.0])  # conflict -> alpha*r, agree -> gamma*f
    np.testing.assert_allclose(u1["w"], [-4.0, 1.0])
    assert float(state[0].hyperparams["alpha"]) == 4.0
    np.testing.assert_allclose(float(optax.tree_utils.tree_get(state, "conflict_fraction")), 0.5)


def test_apply_if_finite_after_the_combiner_skips_non_finite_updates():
    params = {"w": jnp.ones(2)}
    tx = optax.chain(ju.sago(), optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3))
    state = tx.init(params)
    bad = ju.TwoTaskGrads({"w": jnp.array([jnp.nan, 1.0])}, {"w": jnp.array([1.0, 1.0])})
    good = ju.TwoTaskGrads({"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([1.0, 1.0])})
    u, state = tx.update(bad, state, params)
    np.testing.assert_array_equal(optax.apply_updates(params, u)["w"], [1.0, 1.0])
    assert int(optax.tree_utils.tree_get(state, "notfinite_count")) == 1
    u, state = tx.update(good, state, params)
    np.testing.assert_allclose(optax.apply_updates(params, u)["w"], [0.9, 0.9])


# ----------------------------------------------------------------------------- sharding


def test_sharded_leaves_give_unsharded_result_and_keep_sharding():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("fsdp",), devices=devices)
    rng = np.random.default_rng(1)
    tree = lambda: {"w": jnp.asarray(rng.standard_normal((16, 6)), jnp.float32),
                    "v": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)}
    grads = ju.TwoTaskGrads(tree(), tree())
    specs = {"w": jax.sharding.PartitionSpec("fsdp", None), "v": jax.sharding.PartitionSpec(None, "fsdp")}
    shard = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)), t, specs)
    sharded = ju.TwoTaskGrads(shard(grads.forget), shard(grads.retain))
    for name, make in COMBINERS.items():
        tx = make(0.5, 2.0)
        want, want_state = jax.jit(tx.update)(grads, tx.init(grads.forget))
        got, got_state = jax.jit(tx.update)(sharded, tx.init(sharded.forget))
        # Sums over shards add in another order: float32 reassociation only.
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)
        for key in specs:
            assert got[key].sharding.is_equivalent_to(sharded.forget[key].sharding, got[key].ndim), (name, key)


# ----------------------------------------------------------------------------- errors


def test_plain_tree_instead_of_two_task_grads_is_rejected():
    tx = optax.chain(ju.sago(), optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match="TwoTaskGrads"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    with pytest.raises(TypeError, match="TwoTaskGrads"):
        jax.jit(tx.update)((params, params), tx.init(params), params)
    with pytest.raises(TypeError, match=r"^sago\(agree='sum'\): update expects"):  # names the combiner
        ju.sago(agree="sum").update(params, ju.sago().init(params))


def test_mismatched_structures_are_rejected():
    tx = ju.pcgrad()
    g = ju.TwoTaskGrads({"w": jnp.ones(2)}, {"v": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"^pcgrad\(scope='module'\): forget and retain gradients have different tree structures"):
        jax.jit(tx.update)(g, tx.init(g.forget))


def test_mismatched_leaf_shape_names_the_leaf():
    tx = ju.sago()
    g = ju.TwoTaskGrads({"layer": {"w": jnp.ones(2)}}, {"layer": {"w": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*\(2,\).*\(3,\)"):
        tx.update(g, tx.init(g.forget))


@pytest.mark.parametrize("make, match", [
    (lambda: ju.pcgrad(scope="layer"), "scope='layer'.*'module', 'global'"),
    (lambda: ju.sago(agree="retain"), "agree='retain'.*'forget', 'sum'"),
    (lambda: ju.sago(alpha=-1.0), "alpha.*>= 0"),
    (lambda: ju.weighted_sum(gamma=-0.5), "gamma.*>= 0"),
    (lambda: ju.pcgrad(alpha=float("nan")), "alpha.*finite"),
])
def test_bad_arguments_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()
