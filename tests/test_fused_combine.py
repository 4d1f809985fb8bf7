"""StepConfig(fuse_combine=True): the update formed inside the retain backward pass equals the
two-tree step's, for every per-tensor combiner, scanned and unscanned, sharded; the others fall back."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from step_fixtures import CFG, OBJECTIVES, make_batch, tiny_model

import jax_unlearn as ju
from jax_unlearn import head_grad
from jax_unlearn import objectives as obj
from jax_unlearn import sharding as sh
from jax_unlearn import step as st
from jax_unlearn.models import CausalLM, ModelOptions
from jax_unlearn.models.lora import add_lora

FORGET, RETAIN = make_batch(1), make_batch(2)
DIAGNOSTICS = ("conflict_fraction", "cos_forget_retain", "cos_update_retain", "forget_norm", "retain_norm",
               "update_norm", "forget_loss", "retain_loss", "forget_weight", "retain_weight")
PER_TENSOR = {
    "weighted_sum": lambda: ju.weighted_sum(alpha=1.0, gamma=0.5),
    "pcgrad": lambda: ju.pcgrad(),
    "sago": lambda: ju.sago(),
    "sago_sum": lambda: ju.sago(agree="sum", alpha=0.7),
}
GLOBAL = {"pcgrad_global": lambda: ju.pcgrad(scope="global"), "blur": lambda: ju.blur(), "mgda": lambda: ju.mgda()}


def one_step(combiner, fuse: bool, scan: bool, mesh_shape=None, objective="grad_diff", tied: bool = False, lora=None,
             chunk_head: bool = False, sequence: bool = False, hlo: list | None = None):
    """``(update, metrics, jaxpr text)`` of one step; ``sgd(1)`` after the combiner, so the update is
    the parameters' move and ``u`` itself, the combiner's output, is compared. ``objective``: a
    name of `OBJECTIVES` or an `Objective` factory; ``tied``: the tiny model with a tied head;
    ``lora``: ``(rank, alpha)`` of adapters on q/v (the base, head included, frozen);
    ``sequence``: ``StepConfig(sequence_tasks=...)``; ``hlo``: a list the lowered step's text is appended to."""
    o = (OBJECTIVES[objective] if isinstance(objective, str) else objective)()
    tx = optax.chain(combiner, optax.sgd(1.0))
    model = CausalLM(dataclasses.replace(CFG, tie_word_embeddings=tied), ModelOptions(scan_layers=scan),
                     rngs=nnx.Rngs(0))
    if lora is not None:
        model = add_lora(model, *lora)
    defs, state = st.init_state(model, tx, o, train=nnx.LoRAParam if lora is not None else None)
    start = jax.device_get(state.params)
    shardings = bs = None
    fb, rb = FORGET, RETAIN
    if mesh_shape is not None:
        mesh = sh.make_mesh(sh.MeshConfig(*mesh_shape))
        shardings = sh.train_state_shardings(state, mesh, tx)
        state, bs = jax.device_put(state, shardings), sh.batch_sharding(mesh)
        fb, rb = jax.device_put(FORGET, bs), jax.device_put(RETAIN, bs)
    config = st.StepConfig(fuse_combine=fuse, chunk_head=chunk_head, sequence_tasks=sequence)
    step = st.make_two_grad_step(defs, o, tx, config, shardings, bs, donate=False)
    calls.clear()
    if hlo is not None:
        hlo.append(step.lower(state, fb, rb).as_text())
    new, metrics = step(state, fb, rb)
    # the move, and the float32 spacing of the parameter it is read off
    move = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                      np.spacing(np.abs(np.asarray(a, np.float32))).astype(np.float64)),
                        start, jax.device_get(new.params))
    return move, jax.device_get(metrics), list(calls)


calls: list[str] = []  # which way each traced step took the retain gradient


@pytest.fixture(autouse=True)
def spy(monkeypatch):
    calls.clear()
    for name in ("combine", "gradient"):
        original = getattr(st.RetainPass, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(st.RetainPass, name, wrapped)


def assert_same_update(a, b, metrics_a, metrics_b):
    """Float32 parameters: the two steps run the same operations, fused (and, on a mesh, reduced over
    devices) in another order, so a coordinate of ``u`` -- a sum of 64 token contributions through 3
    layers, each as large as a few times the leaf's largest entry -- may differ by the rounding of
    that sum: 64 tokens x 4 float32 ulps of the leaf's largest entry. Diagnostics are ratios of
    sums over ~10^4 such coordinates (relative 1e-4). The move is read off float32 parameters
    (``start - new``), which adds up to one spacing of the parameter (e.g. 1.2e-7 at a norm
    weight of 1.0) on each side."""
    eps = np.finfo(np.float32).eps

    def check(x, y):
        (dx, _), (dy, ulp) = x, y
        bound = 256 * eps * (np.abs(dy).max() + 1e-30) + 2 * ulp
        assert np.all(np.abs(dx - dy) <= bound), float(np.max(np.abs(dx - dy) - bound))

    jax.tree.map(check, a, b, is_leaf=lambda t: isinstance(t, tuple))
    for k in DIAGNOSTICS:
        np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=1e-4, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- the combiners on a toy loss


def toy_params():
    """A stacked leaf (3 "layers", NNX metadata naming the stacking axis) and a plain one."""
    rng = np.random.default_rng(0)
    w = nnx.Param(jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32), out_sharding=("layers", "embed", "mlp"),
                  eager_sharding=False)
    return nnx.State({"layers": w, "head": nnx.Param(jnp.asarray(rng.normal(size=(4,)), jnp.float32))})


def toy_loss(params, batch):
    """A layer scan over the stacked leaf (as the model's), then the head: ``(loss, aux)``."""
    def layer(x, w):
        return jnp.tanh(x @ w), None

    x, _ = jax.lax.scan(layer, batch, params["layers"][...])
    loss = jnp.mean(jnp.square(x @ params["head"][...] - 1.0))
    return loss, {"weight": jnp.float32(batch.shape[0])}


@pytest.mark.parametrize("name", sorted(PER_TENSOR) + sorted(GLOBAL))
def test_combiner_in_the_backward_equals_combiner_of_two_gradients(name):
    params = toy_params()
    fb, rb = (jnp.asarray(np.random.default_rng(s).normal(size=(5, 4)), jnp.float32) for s in (1, 2))
    gf = jax.grad(lambda p: toy_loss(p, fb)[0])(params)
    tx = (PER_TENSOR | GLOBAL)[name]()
    state = tx.init(params)

    @jax.jit
    def both(params, gf):
        gr = jax.grad(lambda p: toy_loss(p, rb)[0])(params)
        want = tx.update(ju.TwoTaskGrads(gf, gr), state, params)
        retain = st.RetainPass(toy_loss, params, rb)
        got = tx.update(ju.TwoTaskGrads(gf, retain), state, params)
        return want, got, retain.result[0]

    want, got, loss = both(params, gf)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)  # float32, the same operations
    np.testing.assert_allclose(loss, toy_loss(params, rb)[0], rtol=1e-6)
    assert calls == (["combine"] if name in PER_TENSOR else ["gradient"])  # which way each took
    assert float(want[1].conflict_fraction if hasattr(want[1], "conflict_fraction")
                 else want[1].diagnostics.conflict_fraction) > 0.05  # there were conflicts to resolve


# ----------------------------------------------------------------------------- the step


@pytest.mark.parametrize("name, scan, mesh_shape", [("sago", True, (1, 8, 1)), ("pcgrad", False, (1, 4, 2))],
                         ids=["sago-scanned-fsdp", "pcgrad-unscanned-fsdp_x_tensor"])
def test_fused_step_equals_the_two_tree_step(name, scan, mesh_shape):
    want, m_want, plain = one_step(PER_TENSOR[name](), False, scan)
    got, m_got, fused = one_step(PER_TENSOR[name](), True, scan, mesh_shape)
    assert_same_update(got, want, m_got, m_want)
    # control: the fused step really formed the update in the retain backward, the other one did not
    assert fused == ["combine"] and plain == []
    assert m_got["conflict_fraction"] > 0.05  # the combiners had conflicts to resolve


def test_fused_step_under_two_task_multi_steps_takes_the_retain_gradient():
    """A chain wrapped in two_task_multi_steps accumulates g_r, so it takes the plain gradient and
    reads the retain weight for its token weighting; the update is the two-tree step's."""
    tx = lambda: ju.two_task_multi_steps(optax.chain(ju.sago(), optax.sgd(1.0)), every_k=1)  # noqa: E731
    o = OBJECTIVES["grad_diff"]()
    out = []
    for fuse in (False, True):
        defs, state = st.init_state(tiny_model(), tx(), o)
        step = st.make_two_grad_step(defs, o, tx(), st.StepConfig(fuse_combine=fuse), donate=False)
        calls.clear()
        new, metrics = step(state, FORGET, RETAIN)
        out.append((jax.device_get(new.params), jax.device_get(metrics), list(calls)))
    chex.assert_trees_all_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-7)
    assert out[1][2] == ["gradient"] and out[1][1]["retain_weight"] == out[0][1]["retain_weight"]


def test_fuse_combine_errors():
    with pytest.raises(ValueError, match="micro_batches=1 only"):
        st.StepConfig(fuse_combine=True, micro_batches=2)
    with pytest.raises(TypeError, match="fuse_combine must be True or False"):
        st.StepConfig(fuse_combine=1)
    o, tx = OBJECTIVES["grad_diff"](), optax.sgd(1.0)  # no combiner at the head
    defs, state = st.init_state(tiny_model(), tx, o)
    step = st.make_two_grad_step(defs, o, tx, st.StepConfig(fuse_combine=True), donate=False)
    with pytest.raises((ValueError, TypeError)):
        step(state, FORGET, RETAIN)


# ----------------------------------------------------------------------------- the head, a vocabulary chunk at a time


def chunked_grad_diff():
    return obj.grad_diff(logit_chunk=3)  # the retain NLL through chunked_label_logprobs


@pytest.fixture
def rebuilt(monkeypatch):
    """Small chunks (vocab 64 = 6 x 10 + 4: the loop and the rest both run); the shapes of the
    leaves `head_grad.combine_leaf` rebuilt."""
    monkeypatch.setattr(head_grad, "CHUNK", 10)
    shapes: list[tuple] = []
    original = head_grad.combine_leaf

    def spy(w, *args, **kwargs):
        shapes.append(tuple(w.shape))
        return original(w, *args, **kwargs)

    monkeypatch.setattr(head_grad, "combine_leaf", spy)
    return shapes


@pytest.mark.parametrize("name, fuse, tied, scan, mesh_shape", [
    ("sago", False, True, True, None), ("sago", True, False, False, None), ("sago", False, True, False, (1, 8, 1)),
    ("sago", False, False, True, (1, 4, 2)), ("weighted_sum", True, True, False, None),
    ("pcgrad", False, True, True, None), ("pcgrad", True, False, False, (1, 8, 1))],
    ids=["sago-tied-scanned", "sago-taps-untied-unscanned", "sago-tied-fsdp", "sago-untied-scanned-fsdp_x_tensor",
         "weighted_sum-taps-tied-unscanned", "pcgrad-tied-scanned", "pcgrad-taps-untied-unscanned-fsdp"])
def test_head_rebuilt_by_vocabulary_chunks_equals_the_two_tree_step(name, fuse, tied, scan, mesh_shape, rebuilt):
    """``chunk_head=True`` (with or without ``fuse_combine``'s taps on the other leaves): the
    embedding's and the output projection's retain gradient is rebuilt after the backward, 10
    vocabulary rows at a time, and combined chunk by chunk (PCGrad: a first pass for the
    tensor's dot products, then the update); the update and the diagnostics are the two-tree
    step's."""
    want, m_want, _ = one_step(PER_TENSOR[name](), False, scan, objective=chunked_grad_diff, tied=tied)
    assert rebuilt == []
    got, m_got, fused = one_step(PER_TENSOR[name](), fuse, scan, mesh_shape, objective=chunked_grad_diff, tied=tied,
                                 chunk_head=True)
    assert_same_update(got, want, m_got, m_want)
    vocab_rows = (CFG.vocab_size, CFG.hidden_size)
    assert rebuilt == ([vocab_rows] if tied else [vocab_rows, vocab_rows])  # tied: one leaf, head + lookup
    assert fused == ["combine"] and m_got["conflict_fraction"] > 0.05


@pytest.mark.parametrize("fuse, chunk_head, mesh_shape", [(False, False, None), (True, True, (1, 4, 2))],
                         ids=["two-tree", "taps-chunk_head-fsdp_x_tensor"])
def test_sequence_tasks_runs_the_retain_pass_in_a_conditional_with_the_same_update(fuse, chunk_head, mesh_shape,
                                                                                   rebuilt):
    """``sequence_tasks=True``: the retain pass (and, with ``fuse_combine``/``chunk_head``, the
    combine) is the taken branch of a conditional; the update and diagnostics are those of the
    flat step."""
    flat_hlo, seq_hlo = [], []
    want, m_want, _ = one_step(ju.sago(), False, True, objective=chunked_grad_diff, hlo=flat_hlo)
    got, m_got, way = one_step(ju.sago(), fuse, True, mesh_shape, objective=chunked_grad_diff, chunk_head=chunk_head,
                               sequence=True, hlo=seq_hlo)
    assert_same_update(got, want, m_got, m_want)
    assert "stablehlo.case" in seq_hlo[0] and "stablehlo.case" not in flat_hlo[0]  # control: the flat one has none
    assert way == (["combine"] if chunk_head else []) and len(rebuilt) == (2 if chunk_head else 0)
    assert m_got["conflict_fraction"] > 0.05


@pytest.mark.parametrize("case", ["unchunked_logits", "kl_retain", "pcgrad_global", "lora"])
def test_head_is_left_in_the_backward_where_it_cannot_be_rebuilt(case, rebuilt):
    """Full logits (no logit_chunk), a retain loss reading a second model (KL to the reference),
    a combiner that needs sums over every tensor first (global PCGrad: it takes the plain retain
    gradient) and a frozen head (LoRA) keep the head in the backward under ``chunk_head=True``,
    with the two-tree step's update."""
    objective = {"unchunked_logits": "grad_diff", "kl_retain": lambda: obj.grad_diff(retain="kl", logit_chunk=3)
                 }.get(case, chunked_grad_diff)
    combiner = (lambda: ju.pcgrad(scope="global")) if case == "pcgrad_global" else ju.sago
    lora = (4, 8.0) if case == "lora" else None
    want, m_want, _ = one_step(combiner(), False, True, objective=objective, tied=True, lora=lora)
    got, m_got, fused = one_step(combiner(), False, True, objective=objective, tied=True, lora=lora, chunk_head=True)
    assert_same_update(got, want, m_got, m_want)
    assert rebuilt == [] and fused == (["gradient"] if case == "pcgrad_global" else ["combine"])


def test_chunk_head_errors():
    with pytest.raises(ValueError, match="chunk_head=True .* micro_batches=1 only"):
        st.StepConfig(chunk_head=True, micro_batches=2)
    with pytest.raises(TypeError, match="chunk_head must be True or False"):
        st.StepConfig(chunk_head="yes")
    with pytest.raises(TypeError, match="sequence_tasks must be True or False"):
        st.StepConfig(sequence_tasks=None)
