"""Tests of two-task gradient accumulation (accumulate both gradients, combine once)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_unlearn as ju


def micro_grads(k, seed=0):
    rng = np.random.default_rng(seed)
    tree = lambda: {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.asarray(rng.standard_normal(2), jnp.float32)}
    return [ju.TwoTaskGrads(tree(), tree()) for _ in range(k)]


@pytest.mark.parametrize("combiner", [ju.sago(alpha=0.5), ju.pcgrad(scope="global"), ju.weighted_sum()])
def test_k_micro_steps_equal_one_step_on_the_mean_gradients(combiner):
    k = 3
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    inner = optax.chain(combiner, optax.adamw(0.1, weight_decay=0.0))
    tx = ju.two_task_multi_steps(inner, every_k=k, weighting="uniform")
    update = jax.jit(tx.update)
    state = tx.init(params)
    for cycle in range(2):
        grads = micro_grads(k, seed=cycle)
        inner_before = state.inner_state
        for t, g in enumerate(grads):
            updates, state = update(g, state, params)
            if t < k - 1:  # accumulating: zero update, inner chain untouched
                chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
                chex.assert_trees_all_equal(state.inner_state, inner_before)
        mean = jax.tree.map(lambda *xs: sum(xs) / k, *grads)
        # Adam's first steps are ill-conditioned only where |g| ~ eps = 1e-8; these seeded means are far from it
        assert min(float(jnp.abs(x).min()) for x in jax.tree.leaves(mean)) > 1e-3
        want, want_inner = inner.update(mean, inner_before, params)
        chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(state.inner_state, want_inner, rtol=1e-5, atol=1e-7)
        assert int(state.gradient_step) == cycle + 1 and int(state.mini_step) == 0
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("dtype", [None, jnp.float32])
def test_float32_accumulator_for_bfloat16_grads(dtype):
    params = {"w": jnp.zeros(4, jnp.bfloat16)}
    tx = ju.two_task_multi_steps(ju.weighted_sum(), every_k=2, accumulator_dtype=dtype, weighting="uniform")
    state = tx.init(params)
    assert state.acc.forget.total["w"].dtype == jnp.float32  # the default accumulates bf16 in float32 too
    g = ju.TwoTaskGrads({"w": jnp.full(4, 1.0, jnp.bfloat16)}, {"w": jnp.full(4, 2.0, jnp.bfloat16)})
    _, state = tx.update(g, state)
    u, state = tx.update(g, state)
    assert u["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(u["w"], np.float32), 3.0)


def test_token_weighting_weighs_each_call_by_its_weights():
    params = {"w": jnp.zeros(2)}
    tx = ju.two_task_multi_steps(optax.chain(ju.weighted_sum(), optax.sgd(1.0)), every_k=2, weighting="tokens")
    state = tx.init(params)
    g = lambda f, r: ju.TwoTaskGrads({"w": jnp.full(2, f)}, {"w": jnp.full(2, r)})
    _, state = tx.update(g(1.0, 4.0), state, params, task_weights=(3.0, 1.0))
    u, state = tx.update(g(5.0, 0.0), state, params, task_weights=(1.0, 3.0))
    # forget (3*1 + 1*5)/4 = 2, retain (1*4 + 3*0)/4 = 1: sgd(1) returns -(2 + 1)
    np.testing.assert_allclose(u["w"], [-3.0, -3.0])
    with pytest.raises(ValueError, match="pass task_weights="):
        tx.update(g(1.0, 1.0), state, params)


def test_one_default_weighting_for_the_step_the_run_config_and_the_accumulator():
    """`two_task_multi_steps`, `StepConfig` and the run config weigh micro-batches the same way by default."""
    import dataclasses
    import inspect

    from jax_unlearn import config
    from jax_unlearn.step import StepConfig

    accumulator = inspect.signature(ju.two_task_multi_steps).parameters["weighting"].default
    step = {f.name: f.default for f in dataclasses.fields(StepConfig)}["weighting"]
    run = {f.name: f.default for f in dataclasses.fields(config.TrainConfig)}["micro_batch_weighting"]
    assert accumulator == step == run == "tokens"


def test_rejects_plain_trees_and_bad_k():
    tx = ju.two_task_multi_steps(ju.sago(), every_k=2)
    params = {"w": jnp.zeros(2)}
    with pytest.raises(TypeError, match="TwoTaskGrads"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="every_k"):
        ju.two_task_multi_steps(ju.sago(), every_k=0)
