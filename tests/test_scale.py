"""Large-model readiness on 8 fake CPU devices: what the sharded step moves and holds.

The step is compiled ahead of time (nothing runs) for a 2-layer LLaMA whose sizes are all
distinct (vocab 2048, hidden 128, MLP 384, 4 heads of 32, 2 key/value heads; batches of 8 rows
of 12 tokens), so that an activation is never shaped like a weight and
`jax_unlearn.sharding.collective_bytes` can tell the two apart.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from step_fixtures import assert_moves_close, make_batch, tiny_model

import jax_unlearn as ju
from jax_unlearn import config
from jax_unlearn import objectives as obj
from jax_unlearn import sharding as sh
from jax_unlearn import step as st
from jax_unlearn.models import CausalLM, ModelConfig, ModelOptions, load_hf, save_hf

CFG = ModelConfig(model_type="llama", vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32)
ROWS, SEQ = 8, 12


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


REMAT = "Involuntary full rematerialization"  # what XLA's SPMD partitioner logs (stderr) when it gives up


def test_the_rematerialisation_check_sees_xla_give_up(capfd):
    """The control of the check below: a reshape across shard boundaries into another layout is a
    case XLA cannot partition; its warning reaches this process's stderr, where the check reads it."""
    mesh = sh.make_mesh(sh.MeshConfig(1, 8, 1))
    spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
    across = lambda a: jax.lax.with_sharding_constraint(a.reshape(10, 12), spec(None, "fsdp"))
    jax.jit(across).lower(jax.ShapeDtypeStruct((8, 15), jnp.float32, sharding=spec("fsdp", None))).compile()
    assert REMAT in capfd.readouterr().err


def compile_step(mesh_shape, objective, tx, micro_batches=1, rows=ROWS, **options):
    """``(compiled step, abstract state, mesh)`` on an abstract model: nothing is allocated."""
    model = nnx.eval_shape(lambda: CausalLM(CFG, ModelOptions(**options), rngs=nnx.Rngs(0)))
    defs, state = st.abstract_state(model, tx, objective)
    mesh = sh.make_mesh(sh.MeshConfig(*mesh_shape))
    shardings = sh.train_state_shardings(state, mesh, tx)
    bs = sh.batch_sharding(mesh)
    step = st.make_two_grad_step(defs, objective, tx, st.StepConfig(micro_batches=micro_batches), shardings, bs)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    batch = {k: jax.ShapeDtypeStruct((rows, SEQ), jnp.int32, sharding=bs) for k in ("input_ids", "attention_mask", "labels")}
    return step.lower(state, batch, batch).compile(), state, mesh


@pytest.mark.parametrize("mesh_shape, chunk, k, options", [
    ((1, 8, 1), None, 1, {}), ((2, 4, 1), None, 1, {}), ((1, 4, 2), None, 1, {}),
    ((2, 4, 1), 8, 2, {"scan_layers": True, "remat_policy": "full"}),  # 16 rows: micro-batches of 8
], ids=["fsdp8", "data2_fsdp4", "fsdp4_tensor2", "data2_fsdp4_scan_remat_chunked_k2"])
def test_sharded_step_moves_weights_not_activations(mesh_shape, chunk, k, options, capfd):
    """SAGO + AdamW, NPO (a resident reference, too): no involuntary rematerialisation, 1/8 of the
    state per device, and the collectives carry weights (FSDP gathers, gradient reductions);
    activations move only where tensor parallelism must reduce them. Without the model's
    activation constraints and weight gathers, this step moved 3.5x more activation than weight
    bytes at fsdp=8, and XLA fell back to involuntary full rematerialisation on every mesh."""
    tx = optax.chain(ju.sago(), optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    compiled, state, mesh = compile_step(mesh_shape, obj.npo(logit_chunk=chunk), tx, k, ROWS * k, **options)
    assert REMAT not in capfd.readouterr().err  # test_the_rematerialisation_check_sees_xla_give_up: it can fire
    # every device holds its share of parameters, optimizer state and reference
    arg = compiled.memory_analysis().argument_size_in_bytes
    assert arg <= 1.25 * nbytes(state) / 8, (arg, nbytes(state) / 8)
    moved = sh.collective_bytes(compiled.as_text(), state.params, mesh)
    assert moved["weights"] > 0
    assert moved["activations"] <= 0.25 * moved["weights"], moved


def per_device(tree) -> dict:
    """Bytes each device holds of the arrays of ``tree``."""
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def test_start_up_never_holds_more_than_a_shard(tmp_path):
    """Load sharded, then build the state (copies, optimizer state, NPO's reference) under jit
    with out_shardings: no device holds more than its share at any point, temporaries included."""
    save_hf(CausalLM(CFG, rngs=nnx.Rngs(0)), tmp_path / "m")
    mesh = sh.make_mesh(sh.MeshConfig(1, 8, 1))
    model = load_hf(tmp_path / "m", shardings=mesh)
    model_bytes = nbytes(nnx.state(model))
    assert max(per_device(nnx.state(model)).values()) <= 1.25 * model_bytes / 8

    tx = optax.chain(ju.sago(), optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    o = obj.npo()
    shardings = functools.partial(sh.train_state_shardings, mesh=mesh, tx=tx)
    _, abstract = st.abstract_state(model, tx, o)
    target = shardings(abstract)
    # the jitted builder's own peak: arguments (the model's shards), outputs and temporaries
    _, params, frozen = nnx.split(model, nnx.Param, ...)  # what init_state hands the builder for NPO
    build = jax.jit(st.state_builder(tx, reference=True), out_shardings=target)
    memory = build.lower(params, frozen).compile().memory_analysis()
    handled = model_bytes + nbytes(abstract)  # the model and the state
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    assert peak <= 1.25 * handled / 8, (peak, handled / 8)

    defs, state = st.init_state(model, tx, o, shardings=shardings)
    assert jax.tree.map(lambda x: x.sharding, state) == target
    state_bytes = nbytes(state)
    assert state_bytes == nbytes(abstract) and state_bytes > 3.9 * model_bytes  # params, mu, nu, reference
    assert max(per_device(state).values()) <= 1.25 * state_bytes / 8
    # the model stays usable and the state is a copy of it
    np.testing.assert_array_equal(np.asarray(state.ref["embed_tokens"][...]), np.asarray(model.embed_tokens[...]))
    pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    assert pointer(state.params["embed_tokens"][...]) != pointer(model.embed_tokens[...])


# ----------------------------------------------------------------------------- NPO without a resident reference


def test_npo_with_precomputed_reference_equals_the_resident_reference():
    """``ref_logp`` computed once (in batches of 3, the last one padded) gives the NPO losses and
    the parameter updates of the resident reference model, with one model held."""
    model = tiny_model()
    forget = {k: np.asarray(v) for k, v in make_batch(1).items()}
    retain = make_batch(2)
    data = st.add_reference_logprobs(model, forget, batch_size=3)
    assert set(data) == {*forget, obj.REF_LOGP} and data[obj.REF_LOGP].shape == (8,)
    np.testing.assert_allclose(data[obj.REF_LOGP], np.asarray(obj.sequence_logprob(model, forget)), rtol=1e-6)

    tx = optax.chain(ju.sago(), optax.sgd(0.5))
    runs = {}
    for reference, fb in [("resident", forget), ("precompute", data)]:
        o = obj.npo(beta=0.5, reference=reference)
        defs, state = st.init_state(model, tx, o)
        assert (state.ref is None) == (reference == "precompute") and o.needs_reference == (reference == "resident")
        step = st.make_two_grad_step(defs, o, tx)
        start = jax.device_get(state.params)
        losses = []
        for _ in range(3):  # after the first step the model differs from the reference
            state, metrics = step(state, jax.tree.map(jnp.asarray, fb), retain)
            losses.append(float(metrics["forget_loss"]))
        runs[reference] = losses, jax.device_get(state.params)
    np.testing.assert_allclose(runs["precompute"][0], runs["resident"][0], rtol=1e-5, atol=1e-6)
    assert_moves_close(runs["precompute"][1], runs["resident"][1], start, rtol=1e-4)


def test_reference_logprobs_sharded_over_the_mesh_equal_one_device():
    model = tiny_model()
    data = {k: np.asarray(v) for k, v in make_batch(3, rows=12).items()}
    want = st.add_reference_logprobs(model, data, batch_size=4)[obj.REF_LOGP]
    mesh = sh.make_mesh(sh.MeshConfig(2, 4, 1))
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, sh.param_shardings(state, mesh)))
    got = st.add_reference_logprobs(sharded, data, batch_size=8, sharding=sh.batch_sharding(mesh))[obj.REF_LOGP]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reference_setting_is_checked():
    assert not config.build_objective(config.ObjectiveConfig(name="npo", reference="precompute"), 16).needs_reference
    with pytest.raises(ValueError, match="retain='kl' needs the resident one"):
        obj.npo(retain="kl", reference="precompute")
    with pytest.raises(ValueError, match="'objective.reference' does not apply to objective 'simnpo'"):
        config.build_objective(config.ObjectiveConfig(name="simnpo", reference="precompute"), 16)
    o = obj.npo(reference="precompute")
    with pytest.raises(ValueError, match="a 'ref_logp' batch column"):
        o.forget(tiny_model(), make_batch(1), None)


# ----------------------------------------------------------------------------- memory options


def adam_moments(opt_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


@pytest.mark.parametrize("param_dtype, compute_dtype, moment_dtype", [
    (jnp.float32, jnp.bfloat16, "bfloat16"),  # float32 master weights, bfloat16 compute and moments
    (jnp.bfloat16, None, "float32"),  # bfloat16 weights, exact moments
])
def test_moment_dtype_and_master_weights(param_dtype, compute_dtype, moment_dtype):
    """`OptimConfig.moment_dtype` stores both Adam moments in that dtype through the steps (half
    or twice the bytes), the parameters keep theirs, and training moves the parameters as with
    moments in the parameters' dtype. (bfloat16 parameters train at all: the optimizer's
    hyperparameters are float32; in bfloat16, b2=0.999 was 1.0 and the first step gave NaN.)"""
    model = tiny_model(param_dtype=param_dtype, compute_dtype=compute_dtype)
    o = obj.grad_diff()
    runs = {}
    for moments in (moment_dtype, None):
        tx = optax.chain(ju.sago(), config.build_optimizer(config.OptimConfig(lr=1e-2, moment_dtype=moments), 10))
        defs, state = st.init_state(model, tx, o)
        step = st.make_two_grad_step(defs, o, tx)
        for _ in range(3):
            state, metrics = step(state, make_batch(1), make_batch(2))
        (adam,) = adam_moments(state.opt_state)
        want = jnp.dtype(moments or param_dtype)
        assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {want}  # kept through the steps
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(param_dtype)}
        runs[moments] = jax.device_get(state.params), nbytes((adam.mu, adam.nu))
    (params, size), (base_params, base_size) = runs[moment_dtype], runs[None]
    assert size == base_size * jnp.dtype(moment_dtype).itemsize // jnp.dtype(param_dtype).itemsize
    # Adam's normalised steps barely feel the moments' rounding: the parameters move alike
    start = jax.device_get(nnx.state(model, nnx.Param))
    move = lambda p: np.concatenate([(np.asarray(x, np.float32) - np.asarray(s, np.float32)).ravel()
                                     for x, s in zip(jax.tree.leaves(p), jax.tree.leaves(start))])
    a, b = move(params), move(base_params)
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b)  # 1.2% measured in both cases
    if compute_dtype is not None:  # the matmuls of the step run in the compute dtype
        lowered = st.make_two_grad_step(defs, o, tx).lower(state, make_batch(1), make_batch(2)).as_text()
        assert "dot_general" in lowered and "bf16" in lowered


# ----------------------------------------------------------------------------- the memory plan


def load_plan_script():
    spec = importlib.util.spec_from_file_location("plan_memory", Path(__file__).parents[1] / "scripts" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_memory_splits_each_device_bytes():
    """scripts/plan_memory.py on the test shape (8 devices): the parts it reports are the
    shards of what the step holds; LoRA (adapters only, the reference sharing the frozen base)
    and a precomputed NPO reference shrink what they should."""
    pm = load_plan_script()
    kw = dict(mesh=(1, 8, 1), batch=ROWS, seq=SEQ, dtype="float32", logit_chunk=None)
    full = pm.plan(CFG, objective="npo", **kw)
    model = CausalLM(CFG, rngs=nnx.Rngs(0))
    weights = nbytes(nnx.state(model, nnx.Param))
    b = full["bytes"]
    assert full["trainable_params"] == full["model_params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert b["params"] == b["reference"] and weights / 8 <= b["params"] <= 1.02 * weights / 8  # norms replicated
    assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 1024  # mu, nu and a few scalars
    assert b["frozen"] == 0 and b["gradients"] == 2 * b["params"]
    assert b["peak"] >= b["arguments"] >= b["params"] + b["optimizer"] + b["reference"]

    lora = pm.plan(CFG, objective="npo", reference="precompute", lora_rank=4, lora_targets="q_proj,v_proj", **kw)
    lb = lora["bytes"]
    # A [in, r] and B [r, out] of rank 4 on q_proj (D -> N*H) and v_proj (D -> K*H) of every layer
    adapters = CFG.num_hidden_layers * 4 * (2 * CFG.hidden_size + (CFG.num_attention_heads
                                                                   + CFG.num_key_value_heads) * CFG.head_dim)
    assert lora["trainable_params"] == adapters
    assert lb["reference"] == 0 and lb["params"] <= 4 * adapters and lb["frozen"] >= weights / 8
    assert lb["optimizer"] <= 2 * lb["params"] + 1024 and lb["peak"] < b["peak"]
    row = pm.markdown([dict(lora, model="test")])
    assert "LoRA r=4 q_proj,v_proj" in row and "npo/precompute+sago" in row
