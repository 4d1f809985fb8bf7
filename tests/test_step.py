"""The jitted two-gradient step: objectives x combiners, accumulation, naive mode, meshes."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from step_fixtures import COMBINERS, OBJECTIVES, assert_moves_close, chain, make_batch, tiny_model

import jax_unlearn as ju
from jax_unlearn import objectives as obj
from jax_unlearn import sharding as sh
from jax_unlearn import step as st

FORGET, RETAIN = make_batch(1), make_batch(2)


def run_steps(objective, tx, n, config=st.StepConfig(), model=None, fb=FORGET, rb=RETAIN):
    model = model or tiny_model()
    defs, state = st.init_state(model, tx, objective)
    step = st.make_two_grad_step(defs, objective, tx, config)
    history = []
    for _ in range(n):
        state, metrics = step(state, fb, rb)
        history.append(jax.device_get(metrics))
    return defs, state, history


# every objective with the paper's three combiners, and the two variants (global PCGrad, SAGO's
# "sum" agreement) with the objectives whose gradients conflict the most
GRID = ([(o, c) for o in sorted(OBJECTIVES) for c in ("weighted_sum", "pcgrad", "sago")]
        + [(o, c) for o in ("grad_diff", "npo") for c in ("pcgrad_global", "sago_sum")])


@pytest.mark.parametrize("objective, combiner", GRID)
def test_objective_and_combiner_unlearn_forget_and_keep_retain(objective, combiner):
    o = OBJECTIVES[objective]()
    lr = 5e-2 if objective == "rmu" else 1e-2
    model = tiny_model()
    f0, r0 = float(obj.nll(model, FORGET)[0]), float(obj.nll(model, RETAIN)[0])
    defs, state, hist = run_steps(o, chain(COMBINERS[combiner](), lr), 6, model=model)
    trained = st.merge_model(defs, state)
    f1, r1 = float(obj.nll(trained, FORGET)[0]), float(obj.nll(trained, RETAIN)[0])
    assert f1 > f0, "forget NLL must rise"
    if objective in ("grad_diff", "npo", "simnpo"):  # retain loss is the retain NLL
        assert hist[-1]["retain_loss"] < hist[0]["retain_loss"] and r1 < r0
    elif objective == "grad_diff_kl":  # KL to the start model starts at 0 and must stay small
        assert hist[-1]["retain_loss"] < 0.05 and r1 - r0 < f1 - f0
    elif objective == "rmu":  # forget activations move to c; retain activations stay put
        assert hist[-1]["forget_loss"] < hist[0]["forget_loss"]
        assert hist[-1]["retain_loss"] < hist[0]["forget_loss"] - hist[-1]["forget_loss"]
    for i, m in enumerate(hist):  # real gradients of a random model: some coordinates conflict, not all
        if objective == "grad_ascent":  # no retain loss: g_r = 0, and a zero never conflicts
            assert m["conflict_fraction"] == 0.0
        elif i == 0 and objective in ("rmu", "grad_diff_kl"):
            # the model is its own reference at step 0: the retain loss is at its minimum, 0, and its
            # gradient is 0 in exact arithmetic (what remains is rounding, which may be exactly 0 too)
            assert 0.0 <= m["conflict_fraction"] < 1.0
        else:
            assert 0.0 < m["conflict_fraction"] < 1.0
        assert np.isfinite(m["forget_loss"]) and np.isfinite(m["retain_loss"])
        if combiner.startswith("sago") and objective != "grad_ascent":  # grad_ascent has g_r = 0
            zero_retain = i == 0 and objective in ("rmu", "grad_diff_kl")  # see above: cosine 0 with g_r = 0
            assert m["cos_update_retain"] >= 0 if zero_retain else m["cos_update_retain"] > 0  # never opposes


@pytest.mark.parametrize("objective", ["grad_diff", "npo", "rmu"])
def test_k_micro_batches_equal_one_batch_token_weighted(objective):
    o = OBJECTIVES[objective]()
    # plain SGD: parameters move linearly in the gradient (Adam would magnify float noise
    # in near-zero gradient coordinates)
    tx = optax.chain(ju.pcgrad(scope="global"), optax.sgd(0.5))
    _, one, h1 = run_steps(o, tx, 2, st.StepConfig(micro_batches=1))
    _, four, h4 = run_steps(o, tx, 2, st.StepConfig(micro_batches=4))
    # rows carry different numbers of label tokens, so an unweighted mean would differ
    chex.assert_trees_all_close(four.params, one.params, rtol=1e-5, atol=1e-6)
    for a, b in zip(h1, h4):
        for key in ("forget_loss", "retain_loss", "forget_weight", "retain_weight", "conflict_fraction"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_unweighted_micro_batch_mean_would_differ():
    """Guards the test above: the ragged batches do weigh micro-batches unequally."""
    weights = [float(obj.nll(tiny_model(), jax.tree.map(lambda x, j=j: x[j::4], FORGET))[1]["weight"]) for j in range(4)]
    assert len(set(weights)) > 1


def test_naive_mode_equals_weighted_sum_combiner():
    """One backward pass of ``gamma*L_f + alpha*L_r`` equals ``gamma*g_f + alpha*g_r``.

    Plain SGD moves the parameters linearly in the gradient, so the first move is ``-lr`` times
    the combined gradient (compared tightly) and three steps stay within float32 rounding. With
    Adam, ``m/(sqrt(v)+eps)`` turns the rounding noise of a near-zero gradient coordinate into
    a full-size update whose sign differs between CPUs (Xeon vs EPYC)."""
    o = OBJECTIVES["grad_diff"]()
    alpha, gamma, opt = 0.7, 1.3, optax.sgd(0.5)
    start = jax.device_get(nnx.state(tiny_model(), nnx.Param))
    for n in (1, 3):
        _, combined, hc = run_steps(o, optax.chain(ju.weighted_sum(alpha, gamma), opt), n)
        _, naive, hn = run_steps(o, opt, n, st.StepConfig(mode="naive", alpha=alpha, gamma=gamma))
        assert_moves_close(jax.device_get(naive.params), jax.device_get(combined.params), start)
        np.testing.assert_allclose(hn[-1]["retain_loss"], hc[-1]["retain_loss"], rtol=1e-5)
    assert "grad_norm" in hn[0] and "conflict_fraction" not in hn[0]


def test_only_trainable_parameters_train_and_carry_optimizer_state():
    o = OBJECTIVES["rmu"]()  # trains layers 0-1 mlp.down_proj only
    tx = chain(ju.sago(), 5e-2)
    model = tiny_model()
    defs, state, _ = run_steps(o, tx, 2, model=model)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert paths == {"['layers'][0]['mlp']['down_proj'].value", "['layers'][1]['mlp']['down_proj'].value"}
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_opt == 2 * n_train  # adam mu and nu for the trainable parameters only
    trained = st.merge_model(defs, state)
    np.testing.assert_array_equal(trained.layers[2].mlp.down_proj[...], model.layers[2].mlp.down_proj[...])
    np.testing.assert_array_equal(trained.embed_tokens[...], model.embed_tokens[...])
    assert not np.array_equal(trained.layers[1].mlp.down_proj[...], model.layers[1].mlp.down_proj[...])


def test_step_donates_state_and_keeps_the_model_usable():
    model = tiny_model()
    o, tx = OBJECTIVES["grad_diff"](), chain(ju.sago())
    defs, state = st.init_state(model, tx, o)
    step = st.make_two_grad_step(defs, o, tx)
    old = state
    state, _ = step(state, FORGET, RETAIN)
    assert jax.tree.leaves(old.params)[0].is_deleted()
    assert np.isfinite(float(obj.nll(model, FORGET)[0]))  # the model kept its own buffers


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="micro_batches=1 only"):
        st.StepConfig(mode="naive", micro_batches=2)
    with pytest.raises(ValueError, match="mode='fast'"):
        st.StepConfig(mode="fast")
    bad = obj.rmu(16, trainable=r"layers\.99\.mlp\.down_proj")
    with pytest.raises(ValueError, match="matches no parameter"):
        st.init_state(tiny_model(), chain(ju.sago()), bad)
    with pytest.raises(ValueError, match="scan_layers=False"):
        st.init_state(tiny_model(scan_layers=True), chain(ju.sago()), OBJECTIVES["rmu"]())
    o, tx = OBJECTIVES["grad_diff"](), chain(ju.sago())
    defs, state = st.init_state(tiny_model(), tx, o)
    step = st.make_two_grad_step(defs, o, tx, st.StepConfig(micro_batches=3))
    with pytest.raises(ValueError, match="not divisible by micro_batches=3"):
        step(state, FORGET, RETAIN)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_step_equals_single_device_step(mesh_shape):
    o, tx = OBJECTIVES["npo"](), optax.chain(ju.pcgrad(), optax.sgd(0.5))
    _, want, want_hist = run_steps(o, tx, 2, st.StepConfig(micro_batches=2))

    mesh = sh.make_mesh(sh.MeshConfig(*mesh_shape))
    defs, state = st.init_state(tiny_model(), tx, o)
    shardings = sh.train_state_shardings(state, mesh, tx)
    state = jax.device_put(state, shardings)
    bs = sh.batch_sharding(mesh)
    step = st.make_two_grad_step(defs, o, tx, st.StepConfig(micro_batches=2), shardings, bs)
    fb, rb = jax.device_put(FORGET, bs), jax.device_put(RETAIN, bs)
    for expected in want_hist:
        state, metrics = step(state, fb, rb)
        np.testing.assert_allclose(float(metrics["retain_loss"]), expected["retain_loss"], rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(want.params), rtol=1e-5, atol=1e-6)
    # parameters really are spread over the mesh
    emb = state.params["embed_tokens"][...]
    assert len(emb.sharding.device_set) == 8
    if mesh_shape[1] * mesh_shape[2] > 1:
        assert emb.addressable_shards[0].data.size < emb.size


# ----------------------------------------------------------------------------- single-task step, weighting, donation


def _interleave(a: dict, b: dict) -> dict:
    """Rows a0, b0, a1, b1, ...: the strided micro-batches of 2 are exactly ``a`` and ``b``."""
    return jax.tree.map(lambda x, y: np.stack([x, y], 1).reshape(-1, *x.shape[1:]), a, b)


A, B = make_batch(3, rows=4), make_batch(7, rows=4)  # 20 and 17 label tokens


@pytest.mark.parametrize("weighting", ["tokens", "uniform"])
def test_single_task_step_averages_micro_batches_as_weighted(weighting):
    """make_step with 2 micro-batches moves SGD parameters by -lr times the weighted mean of the two
    micro-batch gradients, each taken by a 1-micro-batch make_step from the same start."""
    lr, start = 0.5, jax.device_get(nnx.state(tiny_model(), nnx.Param))
    moves, weights = [], []
    for batch in (A, B):
        defs, state = st.init_state(tiny_model(), optax.sgd(lr))
        state, metrics = st.make_step(defs, obj.nll, optax.sgd(lr))(state, batch)
        moves.append(jax.tree.map(lambda p, s: np.asarray(p, np.float64) - s, jax.device_get(state.params), start))
        weights.append(float(metrics["weight"]))
    w = np.asarray(weights) if weighting == "tokens" else np.ones(2)
    assert weights[0] != weights[1]  # the two micro-batches carry different numbers of label tokens
    want = jax.tree.map(lambda m0, m1, s: s + (w[0] * m0 + w[1] * m1) / w.sum(), *moves, start)
    defs, state = st.init_state(tiny_model(), optax.sgd(lr))
    step = st.make_step(defs, obj.nll, optax.sgd(lr), st.StepConfig(micro_batches=2, weighting=weighting))
    state, metrics = step(state, _interleave(A, B))
    assert_moves_close(jax.device_get(state.params), want, start)
    assert float(metrics["weight"]) == sum(weights) and "grad_norm" in metrics and "nll" in metrics


@pytest.mark.parametrize("weighting", ["tokens", "uniform"])
def test_two_task_multi_steps_in_the_step_equals_micro_batching(weighting):
    """Two donated steps of two_task_multi_steps(k=2) == one step over both micro-batches
    (the same accumulation code, same weighting); the combiner state's fields are distinct
    buffers, so donating it works (it used to fail with 'donate the same buffer twice')."""
    o = OBJECTIVES["grad_diff"]()
    start = jax.device_get(nnx.state(tiny_model(), nnx.Param))
    inner = optax.chain(ju.sago(), optax.sgd(0.5))
    tx = ju.two_task_multi_steps(inner, every_k=2, weighting=weighting)
    defs, state = st.init_state(tiny_model(), tx, o)
    step = st.make_two_grad_step(defs, o, tx)
    state, _ = step(state, A, make_batch(5, rows=4))
    state, _ = step(state, B, make_batch(6, rows=4))
    cfg = st.StepConfig(micro_batches=2, weighting=weighting)
    _, one, _ = run_steps(o, inner, 1, cfg, fb=_interleave(A, B), rb=_interleave(make_batch(5, rows=4),
                                                                                  make_batch(6, rows=4)))
    assert_moves_close(jax.device_get(state.params), jax.device_get(one.params), start)


def test_merge_model_survives_the_next_donating_step_unless_shared():
    o, tx = OBJECTIVES["grad_diff"](), chain(ju.sago())
    defs, state = st.init_state(tiny_model(), tx, o)
    step = st.make_two_grad_step(defs, o, tx)
    state, _ = step(state, FORGET, RETAIN)
    kept, shared = st.merge_model(defs, state), st.merge_model(defs, state, copy=False)
    before = float(obj.nll(kept, FORGET)[0])
    state, _ = step(state, FORGET, RETAIN)
    assert float(obj.nll(kept, FORGET)[0]) == before  # its own buffers, unchanged by training
    with pytest.raises(RuntimeError, match="deleted"):
        obj.nll(shared, FORGET)


def test_make_step_refuses_naive_mode():
    defs, _ = st.init_state(tiny_model(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="make_two_grad_step"):
        st.make_step(defs, obj.nll, optax.sgd(0.1), st.StepConfig(mode="naive"))


def test_optimizer_state_shardings_follow_every_copy_of_the_parameters():
    """tree_map_params finds Adam's moments inside inject_hyperparams and the two accumulators of
    two_task_multi_steps; counts, hyperparameters and the combiner state are replicated."""
    mesh = sh.make_mesh(sh.MeshConfig(1, 4, 2))
    from jax_unlearn import config

    tx = ju.two_task_multi_steps(optax.chain(ju.sago(), config.build_optimizer(config.OptimConfig(), 10)), every_k=2,
                                 weighting="uniform")
    defs, state = st.init_state(tiny_model(), tx, OBJECTIVES["grad_diff"]())
    shardings = sh.train_state_shardings(state, mesh, tx)
    params = jax.tree.leaves(shardings.params, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    acc = shardings.opt_state.acc
    get = lambda key: optax.tree_utils.tree_get(shardings.opt_state, key)
    for copy in (acc.forget.total, acc.retain.total, get("mu"), get("nu")):
        leaves = jax.tree.leaves(copy, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        assert [x.spec for x in leaves] == [x.spec for x in params]
    assert any(x.spec != jax.sharding.PartitionSpec() for x in params)  # the parameters really are sharded
    others = [acc.forget.weight, get("learning_rate"), shardings.opt_state.mini_step,
              *jax.tree.leaves(shardings.opt_state.inner_state[0])]
    assert all(x.spec == jax.sharding.PartitionSpec() for x in others)
