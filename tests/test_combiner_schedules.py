"""Combiner weights that change during a run (`jax_unlearn.combiners.adaptive`): optax schedules
of alpha/gamma, and gamma driven by the measured conflict fraction, against restatements; from a
run config; the combiner's guarantee at every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_unlearn as ju
from jax_unlearn import config
from jax_unlearn.combiners import ConflictAdaptiveState, TwoTaskGrads


def _grads(seed: int, conflict: float = 0.3, shapes=(("a", (40,)), ("b", (4, 6)))) -> TwoTaskGrads:
    """Random forget/retain gradients where about ``conflict`` of the signs disagree."""
    rng = np.random.default_rng(seed)
    f, r = {}, {}
    for k, shape in shapes:
        r[k] = rng.normal(size=shape).astype(np.float32)
        flip = np.where(rng.random(shape) < conflict, -1, 1)
        f[k] = jnp.asarray(np.abs(rng.normal(size=shape)).astype(np.float32) * np.sign(r[k]) * flip)
        r[k] = jnp.asarray(r[k])
    return TwoTaskGrads(f, r)


def _conflicts(g: TwoTaskGrads) -> float:
    """Share of coordinates with opposite non-zero signs, in numpy."""
    f = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g.forget)])
    r = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g.retain)])
    return float(np.mean(np.sign(f) * np.sign(r) < 0))


PARAMS = {"a": jnp.zeros(40), "b": jnp.zeros((4, 6))}
SEQUENCE = [_grads(i, conflict=c) for i, c in enumerate([0.2, 0.4, 0.5, 0.1, 0.6, 0.3])]


def _close(a, b, rtol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("factory", [ju.sago, ju.pcgrad, ju.mgda])
def test_scheduled_weights_equal_the_combiner_at_each_steps_values(factory):
    gamma = optax.linear_schedule(1.0, 0.2, 4)
    alpha = optax.cosine_decay_schedule(2.0, 4, alpha=0.5)
    tx = ju.scheduled(factory, alpha=alpha, gamma=gamma)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for t, g in enumerate(SEQUENCE):
        u, state = update(g, state, PARAMS)
        want, inner = factory(alpha=float(alpha(t)), gamma=float(gamma(t))).update(g, factory().init(PARAMS), PARAMS)
        _close(u, want)
        # the diagnostics are still found by name, as for the combiner alone
        np.testing.assert_allclose(optax.tree_utils.tree_get(state, "cos_update_retain"),
                                   optax.tree_utils.tree_get(inner, "cos_update_retain"), rtol=1e-6)
    assert float(state.hyperparams["gamma"]) == pytest.approx(0.2)  # update 5 (t=4): the end value, held


def _restated_gammas(seq, gamma, power, ema, floor) -> list[float]:
    """The rule of `conflict_adaptive`, from the numpy conflict fractions of the gradients."""
    out, first, avg = [], None, None
    for g in seq:
        if first is None:
            out.append(gamma)
        else:
            ratio = max(1 - avg, 0.0) / (1 - first) if first < 1 else 1.0
            out.append(gamma * min(max(ratio ** power, floor), 1.0))
        c = _conflicts(g)
        first, avg = (c, c) if first is None else (first, ema * avg + (1 - ema) * c)
    return out


@pytest.mark.parametrize("power,ema,floor", [(2.0, 0.9, 0.1), (4.0, 0.0, 0.3), (0.0, 0.5, 0.1)])
def test_conflict_adaptive_gamma_follows_the_restated_rule(power, ema, floor):
    gamma = 1.5
    tx = ju.conflict_adaptive(ju.sago, alpha=0.7, gamma=gamma, power=power, ema=ema, floor=floor)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    want = _restated_gammas(SEQUENCE, gamma, power, ema, floor)
    for g, g_t in zip(SEQUENCE, want):
        assert float(state.gamma) == pytest.approx(g_t, rel=1e-5)
        u, state = update(g, state, PARAMS)
        _close(u, ju.sago(alpha=0.7, gamma=g_t).update(g, ju.sago().init(PARAMS))[0], rtol=1e-5)
        assert float(optax.tree_utils.tree_get(state, "conflict_fraction")) == pytest.approx(_conflicts(g), abs=1e-7)
        # SAGO's guarantee at every step: the update never works against the retain gradient
        assert float(optax.tree_utils.tree_get(state, "cos_update_retain")) >= 0.0
    assert isinstance(state, ConflictAdaptiveState) and int(state.count) == len(SEQUENCE)
    assert all(floor * gamma - 1e-6 <= g <= gamma for g in want)
    if power == 0.0:
        assert want == [gamma] * len(SEQUENCE)
    else:  # more conflicts than at the start (0.4, 0.5 after 0.2) lower the weight
        assert want[2] < gamma


def test_conflict_adaptive_checks_its_settings():
    with pytest.raises(ValueError, match="diagnostics must stay on"):
        ju.conflict_adaptive(ju.sago, diagnostics=False)
    with pytest.raises(ValueError, match=r"ema must lie in \[0, 1\)"):
        ju.conflict_adaptive(ju.sago, ema=1.0)
    with pytest.raises(ValueError, match=r"floor must lie in \[0.0, 1.0\]"):
        ju.conflict_adaptive(ju.sago, floor=2.0)
    with pytest.raises(ValueError, match="combiner weight 'gamma' must be a finite number >= 0"):
        ju.conflict_adaptive(ju.sago, gamma=-1.0)


def _tx(combiner: config.CombinerConfig, steps: int = 4):
    return config.build_tx(config.TrainConfig(output_dir="o", combiner=combiner,
                                              optim=config.OptimConfig(lr=1.0, clip_norm=None)), steps)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_run_config_schedules_move_the_weights_over_the_run(shape):
    """``weight_schedule`` moves gamma from 1 to 0.25 and alpha up from 1 to 2 (a cosine either way)."""
    tx = _tx(config.CombinerConfig(name="sago", weight_schedule=shape, gamma_end=0.25, alpha_end=2.0), steps=4)
    state = tx.init(PARAMS)
    seen = []  # the weights of update t (the state holds the last update's)
    for g in SEQUENCE[:5]:
        _, state = tx.update(g, state, PARAMS)
        seen.append((float(state[0].hyperparams["alpha"]), float(state[0].hyperparams["gamma"])))
    assert seen[0] == (1.0, 1.0) and seen[4] == (2.0, 0.25)
    if shape == "linear":
        assert seen[2] == pytest.approx((1.5, 0.625))
    else:  # half a cosine: the midpoint is the mean, the quarter points are not linear
        assert seen[2] == pytest.approx((1.5, 0.625)) and seen[1][1] == pytest.approx(0.25 + 0.75 * 0.5 * (1 + np.cos(np.pi / 4)))


def test_run_config_adapt_and_its_errors():
    tx = _tx(config.CombinerConfig(name="pcgrad", adapt="conflict", adapt_power=3.0, adapt_ema=0.5, gamma=0.8))
    state = tx.init(PARAMS)
    for g in SEQUENCE[:3]:
        _, state = tx.update(g, state, PARAMS)
    assert float(state[0].gamma) == pytest.approx(_restated_gammas(SEQUENCE[:4], 0.8, 3.0, 0.5, 0.1)[3], rel=1e-5)
    both = config.TrainConfig(output_dir="o", combiner=config.CombinerConfig(weight_schedule="linear", adapt="conflict"))
    with pytest.raises(config.ConfigError, match="set one of them"):
        config.check_ranges(both)
    blind = config.TrainConfig(output_dir="o", combiner=config.CombinerConfig(adapt="conflict", diagnostics=False))
    with pytest.raises(config.ConfigError, match="'combiner.diagnostics' must be true"):
        config.check_ranges(blind)
    with pytest.raises(config.ConfigError, match=r"'combiner.adapt_ema' is 1.0; expected a number in \[0, 1\)"):
        config.check_ranges(config.TrainConfig(output_dir="o", combiner=config.CombinerConfig(adapt_ema=1.0)))
    with pytest.raises(config.ConfigError, match=r"'combiner.gamma_end' is -1.0"):
        config.check_ranges(config.TrainConfig(output_dir="o", combiner=config.CombinerConfig(gamma_end=-1.0)))
    # a setting the combiner does not take is still refused by name
    with pytest.raises(ValueError, match="'combiner.c' does not apply to combiner 'sago'"):
        _tx(config.CombinerConfig(name="sago", adapt="conflict", c=0.9))


@pytest.mark.parametrize("factory", [ju.sago, ju.gru, ju.mgda])
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2)])
def test_conflict_adaptive_on_a_mesh_equals_one_device(factory, mesh_shape):
    """Three jitted updates over 8 fake devices (the state placed by
    `sharding.optimizer_shardings`: GRU's parameter-shaped memory like the parameters) equal
    one device's: the conflict fraction behind gamma is a global sum, not a shard's."""
    from jax_unlearn import sharding as sh

    spec = {"a": ("fsdp", "tensor"), "b": ("tensor", "fsdp")}
    seq = [_grads(i, c, (("a", (8, 4)), ("b", (2, 8)))) for i, c in enumerate([0.2, 0.5, 0.6])]
    tx = ju.conflict_adaptive(factory, alpha=0.7, gamma=1.3, power=3.0, ema=0.5)
    update = jax.jit(tx.update)
    state = tx.init(seq[0].forget)
    want = []
    for g in seq:
        u, state = update(g, state)
        want.append((u, state))
    mesh = sh.make_mesh(sh.MeshConfig(*mesh_shape))
    shard = {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)) for k, s in spec.items()}
    state = tx.init(seq[0].forget)
    state = jax.device_put(state, sh.optimizer_shardings(tx, state, shard, mesh))
    for g, (u_want, s_want) in zip(seq, want):
        u, state = update(TwoTaskGrads(*(jax.tree.map(jax.device_put, t, shard) for t in g)), state)
        _close(u, u_want, rtol=1e-5)
        _close(state, s_want, rtol=1e-5)
    assert float(state.gamma) < 1.3  # the weight did move
