"""Every objective with every combiner: finite losses, every trainable parameter moves, the
forget NLL rises under the paper's combiners.

The grid shares its compiled programs: one jitted two-gradient function per objective (the
forget and retain losses and their gradients, as `jax_unlearn.step` computes them) and one
jitted program updating side by side with a tuple of combiners (``combiner -> clip -> AdamW``
each), reused by every objective, so the grid costs about (objectives + combiner tuples)
compilations, not their product. CI runs every new
objective with ``weighted_sum``, ``pcgrad`` and ``sago``, and one new objective (WGA) with every
combiner; the full grid (every registered objective, old ones and their variants included, with
every combiner) is marked ``exhaustive`` (``pytest -m exhaustive tests/test_objectives_grid.py``).
The real jitted step (`jax_unlearn.step.make_two_grad_step`) runs IdkDPO with SAGO, and resumes
bit-identically, through ``jax-unlearn unlearn`` in tests/test_objectives_cli.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from step_fixtures import OBJECTIVES as OLD
from step_fixtures import chain, make_batch, tiny_model

import jax_unlearn as ju
from jax_unlearn import objectives as obj
from jax_unlearn import step as st
from jax_unlearn.combiners import CombinerState, TwoTaskGrads

NEW = {
    "dpo": lambda: obj.dpo(beta=0.5),
    "idk_dpo": lambda: obj.idk_dpo(beta=0.5),
    "undial": lambda: obj.undial(beta=3.0),
    "wga": lambda: obj.wga(beta=1.0),
    "satimp": lambda: obj.satimp(beta1=1.0, beta2=1.0),
    "ce_u": lambda: obj.ce_u(),
    "pdu": lambda: obj.pdu(),
}
ALL_OBJECTIVES = {**OLD, **NEW}
PAPER = ("weighted_sum", "pcgrad", "sago")
ALL_COMBINERS = ju.COMBINERS.names()
STEPS, LR = 4, 1e-2


def _with_alternate(batch: dict, seed: int) -> dict:
    return {**batch, **{obj.ALT + k: v for k, v in make_batch(seed, rows=len(batch["input_ids"])).items()}}


FORGET, RETAIN = _with_alternate(make_batch(1), 3), make_batch(2)


@functools.cache
def two_grads(name: str):
    """``(defs, params, frozen, ref, jitted f)``: ``f(params, frozen, ref, fb, rb) -> (lf, lr, wf, wr,
    g_f, g_r)``, objective ``name``'s two losses, their weights and gradients (one compilation)."""
    objective = ALL_OBJECTIVES[name]()
    defs, params, frozen, reference = st.split_model(tiny_model(), objective)
    ref = jax.tree.map(jnp.copy, params) if reference else None

    def task(params, frozen, ref, loss_fn, batch):
        model = nnx.merge(defs.graphdef, params, frozen, copy=True)
        ref_model = None if ref is None else nnx.merge(defs.graphdef, ref, frozen, copy=True)
        return loss_fn(model, batch, ref_model)

    @jax.jit
    def f(params, frozen, ref, fb, rb):
        (lf, mf), gf = jax.value_and_grad(task, has_aux=True)(params, frozen, ref, objective.forget, fb)
        (lr, mr), gr = jax.value_and_grad(task, has_aux=True)(params, frozen, ref, objective.retain, rb)
        return lf, lr, mf["weight"], mr["weight"], gf, gr

    return defs, params, frozen, ref, f


@functools.cache
def combiner_updates(names: tuple[str, ...]):
    """``(txs, jitted update)``: ``update(g_f, g_r, w_f, w_r, opt_states, params_each) -> [(params,
    opt_state, diagnostics)]``, one ``combiner -> clip -> AdamW`` chain per name in one program
    (one compilation for all of them; retraced per parameter tree)."""
    txs = tuple(chain(ju.COMBINERS.get(n)(), LR) for n in names)

    @jax.jit
    def update(gfs, grs, wfs, wrs, opt_states, params_each):
        out = []
        for tx, gf, gr, wf, wr, opt_state, params in zip(txs, gfs, grs, wfs, wrs, opt_states, params_each):
            extra = {"task_weights": (wf, wr)} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}
            updates, opt_state = tx.update(TwoTaskGrads(gf, gr), opt_state, params, **extra)
            diag = {k: optax.tree_utils.tree_get(opt_state, k, jnp.nan) for k in CombinerState._fields}
            out.append((optax.apply_updates(params, updates), opt_state, diag))
        return out

    return txs, update


def unlearn(objective: str, combiners: tuple[str, ...]):
    """``STEPS`` steps of ``objective`` with each of ``combiners`` (side by side):
    ``(defs, start, frozen, {combiner: (params, history)})``."""
    defs, start, frozen, ref, grads = two_grads(objective)
    txs, update = combiner_updates(combiners)
    params = [start] * len(combiners)
    states = [tx.init(start) for tx in txs]
    hists = [[] for _ in combiners]
    for _ in range(STEPS):
        got = [grads(p, frozen, ref, FORGET, RETAIN) for p in params]
        out = update(*zip(*[g[4:] for g in got]), *zip(*[g[2:4] for g in got]), states, params)
        params, states = [o[0] for o in out], [o[1] for o in out]
        for h, g, o in zip(hists, got, out):
            h.append(jax.device_get({"forget_loss": g[0], "retain_loss": g[1], "g_f": optax.tree.norm(g[4]),
                                     "g_r": optax.tree.norm(g[5]), **o[2]}))
    return defs, start, frozen, {c: (p, h) for c, p, h in zip(combiners, params, hists)}


# With a zero retain gradient (gradient ascent; KL or RMU at step 0, where the model is its own
# reference) MGDA's min-norm point of {g_f, 0} is 0 and CAGrad's conflict-averse direction is 0
# (its ``|g_w| < norm_eps`` guard, as torchjd's): those runs stay at the start model, step after step.
STALL_ON_ZERO_RETAIN = {"mgda", "cagrad"}


def check_runs(objective: str, combiners: tuple[str, ...]):
    defs, start, frozen, runs = unlearn(objective, combiners)
    for combiner, (params, hist) in runs.items():
        for m in hist:
            assert np.isfinite(m["forget_loss"]) and np.isfinite(m["retain_loss"]), (objective, combiner, m)
        if hist[-1]["forget_loss"] == hist[0]["forget_loss"] and combiner in STALL_ON_ZERO_RETAIN:
            assert hist[0]["g_r"] <= 1e-4 * hist[0]["g_f"], (objective, combiner, "stalled with a retain gradient")
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params)))
            continue
        assert hist[-1]["forget_loss"] != hist[0]["forget_loss"], (objective, combiner, "did not move")
        moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), start, params)
        still = [jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(moved) if not m]
        assert not still, f"{objective} x {combiner}: parameters that did not move: {still}"
        for leaf in jax.tree.leaves(params):
            assert np.all(np.isfinite(np.asarray(leaf))), (objective, combiner)
    return defs, start, frozen, runs


def forget_nll(defs, params, frozen) -> float:
    return float(obj.nll(nnx.merge(defs.graphdef, params, frozen), FORGET)[0])


@pytest.mark.parametrize("objective", sorted(NEW))
def test_each_new_objective_unlearns_with_the_paper_combiners(objective):
    defs, start, frozen, runs = check_runs(objective, PAPER)
    for combiner, (params, hist) in runs.items():
        # PDU pushes the logits towards uniform, where the random start model already is: its forget NLL
        # has nowhere to rise (its gradient is the reference's: tests/test_objectives_field.py)
        if objective != "pdu":
            assert forget_nll(defs, params, frozen) > forget_nll(defs, start, frozen), (combiner, "forget NLL")
        if combiner == "sago":  # the update never opposes the retain gradient (the retain NLL's: not 0)
            assert all(m["cos_update_retain"] > 0 for m in hist)
        assert any(0.0 < m["conflict_fraction"] < 1.0 for m in hist)  # real, partly conflicting gradients


def test_a_new_objective_runs_with_every_combiner():
    check_runs("wga", tuple(c for c in ALL_COMBINERS if c not in PAPER))


@pytest.mark.exhaustive
@pytest.mark.parametrize("objective", sorted(ALL_OBJECTIVES))
def test_every_objective_with_every_combiner(objective):
    check_runs(objective, ALL_COMBINERS)


def test_the_grid_covers_every_registered_objective_and_combiner():
    """Control: the exhaustive grid is not silently smaller than the registries."""
    names = {o.split("_kl")[0] for o in ALL_OBJECTIVES}
    assert set(obj.OBJECTIVES.names()) <= names
    assert len(ALL_COMBINERS) == 15


def test_precomputed_reference_covers_both_answers():
    """``alt_ref_logp`` is the alternate answers' ``ref_logp``: the same program on those rows."""
    model = tiny_model()
    data = {k: np.asarray(v) for k, v in _with_alternate(make_batch(5, rows=4), 6).items()}
    out = st.add_reference_logprobs(model, data, batch_size=4)
    alone = st.add_reference_logprobs(model, obj.alternate_batch(data), batch_size=4)
    np.testing.assert_array_equal(out["alt_ref_logp"], alone["ref_logp"])
    assert np.all(out["alt_ref_logp"] < 0) and not np.allclose(out["alt_ref_logp"], out["ref_logp"])  # control
