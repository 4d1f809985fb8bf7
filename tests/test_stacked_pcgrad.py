"""PCGrad per parameter tensor when a model stacks its layers (``scan_layers=True``).

A stacked leaf ``[layers, ...]`` (NNX logical axes ``("layers", ...)``) holds one tensor per
layer: ``pcgrad(scope="module")`` and `per_leaf_diagnostics` treat each slice as its own
tensor, so a scanned model takes exactly the step of the same model unscanned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from step_fixtures import CFG, COMBINERS, assert_moves_close, make_batch, tiny_model

import jax_unlearn as ju
from jax_unlearn import objectives as obj
from jax_unlearn import step as st
from jax_unlearn.combiners import CombinerState, stacked_axes

L = 3


def _param(x, axes):
    return nnx.Param(jnp.asarray(x, jnp.float32), out_sharding=axes, eager_sharding=False)


def _grads(seed: int):
    """Per-layer forget/retain gradients where layer 0 conflicts strongly, the others agree, so
    that the projection over the whole stack differs from the per-layer one."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(L, 4, 5))
    f = np.stack([-3.0 * r[0] + 0.1 * rng.normal(size=(4, 5))] + [r[i] + rng.normal(size=(4, 5)) for i in range(1, L)])
    bias_f, bias_r = rng.normal(size=(L, 5)), rng.normal(size=(L, 5))
    return f, r, bias_f, bias_r


def _stacked(f, r, bf, br):
    tree = lambda w, b: {"embed": _param(w[0, 0], ("embed",)),  # noqa: E731
                         "layers": {"w": _param(w, ("layers", "embed", "mlp")), "b": _param(b, ("layers", "mlp"))}}
    return ju.TwoTaskGrads(tree(f, bf), tree(r, br))


def _unstacked(f, r, bf, br):
    tree = lambda w, b: {"embed": jnp.asarray(w[0, 0], jnp.float32),  # noqa: E731
                         "layers": [{"w": jnp.asarray(w[i], jnp.float32), "b": jnp.asarray(b[i], jnp.float32)}
                                    for i in range(L)]}
    return ju.TwoTaskGrads(tree(f, bf), tree(r, br))


def _unstack(update):
    """A stacked update tree -> the unstacked layout (plain arrays)."""
    u = nnx.to_pure_dict(nnx.State(update)) if not isinstance(update, dict) else jax.tree.map(
        lambda v: v[...], update, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {"embed": u["embed"], "layers": [{"w": u["layers"]["w"][i], "b": u["layers"]["b"][i]} for i in range(L)]}


def test_stacked_axes_reads_the_layers_axis():
    g = _stacked(*_grads(0)).forget
    assert stacked_axes(g) == [0, 1, 1]  # embed, layers.b, layers.w
    assert stacked_axes(g, None) == [0, 0, 0]
    assert stacked_axes({"w": jnp.ones((3, 2))}) == [0]  # plain arrays carry no axis names


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_each_slice_of_a_stacked_leaf_is_its_own_tensor(name):
    stacked, flat = _stacked(*_grads(1)), _unstacked(*_grads(1))
    tx = COMBINERS[name]()
    u_s, s_s = tx.update(stacked, tx.init(stacked.forget))
    u_f, s_f = tx.update(flat, tx.init(flat.forget))
    for a, b in zip(jax.tree.leaves(_unstack(u_s)), jax.tree.leaves(u_f)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for field in CombinerState._fields:  # cosines and fractions lie in [-1, 1]: 1e-6 absolute
        np.testing.assert_allclose(getattr(s_s, field), getattr(s_f, field), rtol=1e-5, atol=1e-6)


def test_pcgrad_over_the_whole_stack_is_not_per_tensor():
    """The control: treating the stack as one tensor (stack_axis=None, the old behaviour)
    projects differently, so the test above can fail."""
    stacked, flat = _stacked(*_grads(1)), _unstacked(*_grads(1))
    tx = ju.pcgrad(stack_axis=None)
    u_s, _ = tx.update(stacked, tx.init(stacked.forget))
    u_f, _ = ju.pcgrad().update(flat, ju.pcgrad().init(flat.forget))
    w_s = np.stack([x["w"] for x in _unstack(u_s)["layers"]])
    w_f = np.stack([x["w"] for x in u_f["layers"]])
    assert np.abs(w_s - w_f).max() > 0.1 * np.abs(w_f).max()


def test_per_leaf_diagnostics_report_each_layer():
    stacked, flat = _stacked(*_grads(2)), _unstacked(*_grads(2))
    tx = ju.pcgrad()
    u_s, _ = tx.update(stacked, tx.init(stacked.forget))
    u_f, _ = tx.update(flat, tx.init(flat.forget))
    per_s = ju.per_leaf_diagnostics(stacked, u_s)
    per_f = ju.per_leaf_diagnostics(flat, u_f)
    for i in range(L):
        for field in CombinerState._fields:
            got = getattr(per_s["layers"]["w"], field)
            assert got.shape == (L,)
            np.testing.assert_allclose(got[i], getattr(per_f["layers"][i]["w"], field), rtol=1e-5, atol=1e-6)
    assert float(per_f["layers"][0]["w"].cos_forget_retain) < 0 < float(per_f["layers"][1]["w"].cos_forget_retain)
    # the projected update never opposes any layer's retain gradient
    assert np.all(np.asarray(per_s["layers"]["w"].cos_update_retain) >= -1e-6)


# ----------------------------------------------------------------------------- the step on a scanned model


def scanned_copy(model) -> nnx.Module:
    """The same weights in a ``scan_layers=True`` model (layer ``i`` = slice ``i``)."""
    scanned = tiny_model(0, scan_layers=True)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = [pure["layers"][i] for i in range(CFG.num_hidden_layers)]
    pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(scanned, state)
    return scanned


def unstacked_params(state) -> dict:
    pure = nnx.to_pure_dict(state)
    pure["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], pure["layers"]) for i in range(CFG.num_hidden_layers)}
    return pure


def _one_step(model, combiner):
    """One step of SGD after the combiner: the move is the combined update itself (an adaptive
    optimizer would magnify the rounding of near-zero coordinates)."""
    objective = obj.grad_diff()
    tx = optax.chain(combiner, optax.sgd(0.5))
    defs, state = st.init_state(model, tx, objective)
    start = nnx.to_pure_dict(jax.tree.map(jnp.copy, state.params))
    step = st.make_two_grad_step(defs, objective, tx, st.StepConfig(micro_batches=2))
    state, metrics = step(state, make_batch(3), make_batch(4))
    return start, state.params, metrics


@pytest.fixture(scope="module")
def models():
    model = tiny_model(0)
    scanned = scanned_copy(model)
    ids = make_batch(5)
    np.testing.assert_allclose(scanned(ids["input_ids"], ids["attention_mask"]),
                               model(ids["input_ids"], ids["attention_mask"]), rtol=1e-5, atol=1e-5)
    return model, scanned


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_scanned_step_equals_unscanned_step(models, name):
    model, scanned = models
    start, flat, m_flat = _one_step(model, COMBINERS[name]())
    _, stacked, m_stacked = _one_step(scanned, COMBINERS[name]())
    assert_moves_close(unstacked_params(stacked), nnx.to_pure_dict(flat), start, rtol=1e-5)
    for field in CombinerState._fields:
        np.testing.assert_allclose(m_stacked[field], m_flat[field], rtol=1e-4, atol=1e-6)


def test_scanned_step_without_per_slice_projection_differs(models):
    """The control on the real model: PCGrad over whole stacked leaves is another update."""
    model, scanned = models
    start, flat, _ = _one_step(model, ju.pcgrad())
    _, stacked, _ = _one_step(scanned, ju.pcgrad(stack_axis=None))
    with pytest.raises(AssertionError):
        assert_moves_close(unstacked_params(stacked), nnx.to_pure_dict(flat), start, rtol=1e-3)


def test_combiner_reads_the_axes_from_params_when_the_gradients_are_plain():
    """Plain-array gradients (e.g. after nnx.to_pure_dict) take the stacking from ``params``."""
    stacked = _stacked(*_grads(3))
    params = stacked.forget
    plain = jax.tree.map(lambda v: v[...], stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
    tx = ju.pcgrad()
    u_plain, _ = tx.update(plain, tx.init(params), params)
    u_meta, _ = tx.update(stacked, tx.init(params))
    for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_meta)):
        np.testing.assert_array_equal(a, b)
    u_none, _ = tx.update(plain, tx.init(params))  # nothing tells it: whole leaves
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(u_none), jax.tree.leaves(u_meta)))


def test_pcgrad_rejects_a_bad_stack_axis():
    with pytest.raises(TypeError, match="stack_axis must be a logical axis name or None"):
        ju.pcgrad(stack_axis=3)
    assert optax.tree_utils.tree_get(ju.pcgrad(stack_axis="layers").init({"w": jnp.ones(2)}), "update_norm") == 0
