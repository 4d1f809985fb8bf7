"""The lightweight variant: the forget gradient taken every k steps and reused in between
(`StepConfig(forget_every=k)`, `step.reuse_forget`): equal to a hand-written schedule of the
same gradients, one forget pass per k steps, sharded like the parameters, resumed bit-identically."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from step_fixtures import assert_moves_close, chain, make_batch, tiny_model

import jax_unlearn as ju
from jax_unlearn import config, train
from jax_unlearn import objectives as obj
from jax_unlearn import sharding as sh
from jax_unlearn import step as st

BATCHES = [(make_batch(i), make_batch(100 + i)) for i in range(5)]


def _grads(defs, loss, state, batch, salt):
    """The plain gradient of one task at ``state`` (the step's own `_mean_grads`, one micro-batch)."""
    return st._mean_grads(st._bind(defs, loss, state, salt), state.params, batch, st.StepConfig())


def test_reused_forget_gradient_equals_the_hand_written_schedule():
    """k=2 over 5 steps: step t combines the forget gradient of step 2*floor(t/2) (its parameters
    and its batch) with the retain gradient of step t; the metrics say which steps took it. (A
    linear combiner and SGD: the comparison is not at the mercy of sign gates or Adam's division
    on near-zero coordinates, where jit and eager rounding differ.)"""
    o, tx = obj.grad_diff(), optax.chain(ju.weighted_sum(), optax.sgd(0.5))
    defs, state = st.init_state(tiny_model(), st.reuse_forget(tx), o)
    start = jax.device_get(state.params)
    step = st.make_two_grad_step(defs, o, st.reuse_forget(tx), st.StepConfig(forget_every=2), donate=False)
    fresh, losses = [], []
    for fb, rb in BATCHES:
        state, m = step(state, fb, rb)
        fresh.append(float(m["forget_fresh"]))
        losses.append(float(m["forget_loss"]))
    assert fresh == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert losses[1] == losses[0] and losses[3] == losses[2] and losses[2] != losses[0]

    _, ref = st.init_state(tiny_model(), tx, o)
    forget_grad = jax.jit(lambda s, b: _grads(defs, o.forget, s, b, 0))
    retain_grad = jax.jit(lambda s, b: _grads(defs, o.retain, s, b, 1)[2])

    @jax.jit
    def apply(s, gf, gr):
        u, opt = tx.update(ju.TwoTaskGrads(gf, gr), s.opt_state, s.params)
        return s._replace(params=optax.apply_updates(s.params, u), opt_state=opt, step=s.step + 1)

    for t, (fb, rb) in enumerate(BATCHES):
        if t % 2 == 0:
            lf, _, gf = forget_grad(ref, fb)
            assert np.isclose(lf, losses[t], rtol=1e-5)
        ref = apply(ref, gf, retain_grad(ref, rb))
    assert_moves_close(jax.device_get(state.params), jax.device_get(ref.params), start)
    # and not what taking the forget gradient at every step gives
    _, every = st.init_state(tiny_model(), tx, o)
    plain = st.make_two_grad_step(defs, o, tx)
    for fb, rb in BATCHES:
        every, _ = plain(every, fb, rb)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(every.params), jax.tree.leaves(state.params)))
    assert diff > 1e-4


def test_the_forget_pass_runs_once_every_k_steps():
    """Counted on the device: the forget loss's forward pass executes at steps 0, 3 of 6 with k=3
    (``lax.cond`` runs one branch), the retain loss's at every step."""
    calls = {"forget": 0, "retain": 0}

    def counted(loss, name):
        def fn(model, batch, ref):
            jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
            return loss(model, batch, ref)
        return fn

    base = obj.grad_diff()
    o = dataclasses.replace(base, forget=counted(base.forget, "forget"), retain=counted(base.retain, "retain"))
    tx = st.reuse_forget(chain(ju.sago()))
    defs, state = st.init_state(tiny_model(), tx, o)
    step = st.make_two_grad_step(defs, o, tx, st.StepConfig(forget_every=3))
    for t in range(6):
        state, m = step(state, *BATCHES[t % len(BATCHES)])
    jax.effects_barrier()
    assert calls == {"forget": 2, "retain": 6}


def test_forget_every_is_checked():
    with pytest.raises(ValueError, match="forget_every must be an integer >= 1"):
        st.StepConfig(forget_every=0)
    with pytest.raises(ValueError, match="needs mode='combined'"):
        st.StepConfig(mode="naive", forget_every=2)
    o, tx = obj.grad_diff(), chain(ju.sago())
    defs, state = st.init_state(tiny_model(), tx, o)
    step = st.make_two_grad_step(defs, o, tx, st.StepConfig(forget_every=2))
    with pytest.raises(ValueError, match=r"wrap the chain with jax_unlearn.step.reuse_forget"):
        step(state, *BATCHES[0])
    with pytest.raises(config.ConfigError, match=r"'forget_every' is 0; expected an integer > 0"):
        config.check_ranges(config.TrainConfig(output_dir="o", forget_every=0))
    with pytest.raises(config.ConfigError, match=r"'forget_every'=2 reuses the forget gradient"):
        config.check_ranges(config.TrainConfig(output_dir="o", forget_every=2, mode="naive"))


def test_the_cache_is_sharded_like_the_parameters_and_the_sharded_step_agrees():
    """fsdp=4 x tensor=2: the cached forget gradient gets the parameters' shardings
    (`sharding.train_state_shardings` through the optimizer state) and 3 steps equal one device's."""
    o, tx = obj.npo(beta=0.5), st.reuse_forget(optax.chain(ju.pcgrad(), optax.sgd(0.5)))
    cfg = st.StepConfig(forget_every=2)
    defs, want = st.init_state(tiny_model(), tx, o)
    start = jax.device_get(want.params)
    plain = st.make_two_grad_step(defs, o, tx, cfg)
    for fb, rb in BATCHES[:3]:
        want, _ = plain(want, fb, rb)

    mesh = sh.make_mesh(sh.MeshConfig(1, 4, 2))
    defs, state = st.init_state(tiny_model(), tx, o)
    shardings = sh.train_state_shardings(state, mesh, tx)
    cache, params = shardings.opt_state.grad, shardings.params
    chex.assert_trees_all_equal_structs(cache, params)
    assert jax.tree.leaves(cache) == jax.tree.leaves(params)
    state = jax.device_put(state, shardings)
    bs = sh.batch_sharding(mesh)
    step = st.make_two_grad_step(defs, o, tx, cfg, shardings, bs)
    for fb, rb in BATCHES[:3]:
        state, _ = step(state, jax.device_put(fb, bs), jax.device_put(rb, bs))
    emb = state.opt_state.grad["embed_tokens"][...]
    assert emb.addressable_shards[0].data.size < emb.size  # the cache really is split over the mesh
    assert_moves_close(jax.device_get(state.params), jax.device_get(want.params), start)


def _data():
    return ({k: np.asarray(v) for k, v in make_batch(21, rows=16).items()},
            {k: np.asarray(v) for k, v in make_batch(22, rows=16).items()})


def _cfg(out, steps: int) -> config.TrainConfig:
    return config.TrainConfig(output_dir=str(out), batch_size=8, max_steps=steps, save_every=2, progress=False,
                              export=False, forget_every=3, optim=config.OptimConfig(lr=0.05, clip_norm=None),
                              objective=config.ObjectiveConfig(name="grad_diff"),
                              combiner=config.CombinerConfig(name="sago"))


def test_a_run_resumed_inside_a_reuse_cycle_is_bit_identical(tmp_path):
    """k=3 and a checkpoint after step 2: the resumed run's next step reuses the saved gradient."""
    forget, retain = _data()
    straight = train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "a", 5)).model
    train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "b", 2))
    resumed = train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "b", 5))
    assert resumed.resumed_from == 2
    for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["forget_fresh"] for r in rows] == [1.0, 0.0, 0.0, 1.0, 0.0]
