"""The run fingerprint: what it compares, and a weights checksum that is exact and sharding-blind."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from step_fixtures import CFG, make_batch, tiny_model

from jax_unlearn import config, sharding
from jax_unlearn import fingerprint as fpr
from jax_unlearn.models import ModelOptions


def _data():
    return ({k: np.asarray(v) for k, v in make_batch(1).items()}, {k: np.asarray(v) for k, v in make_batch(2).items()})


def test_differences_name_the_keys_that_define_a_run_and_nothing_else():
    forget, retain = _data()
    base = config.TrainConfig(output_dir="a")
    fp = lambda cfg, **kw: fpr.run_fingerprint(cfg, CFG, None, forget, retain, **kw)
    same_run = config.TrainConfig(output_dir="elsewhere", max_steps=99, save_every=3, keep=9, log_every=5,
                                  progress=False, mesh=sharding.MeshConfig(data=2),
                                  objective=config.ObjectiveConfig(logit_chunk=64),
                                  combiner=config.CombinerConfig(diagnostics=False))
    assert fpr.differences(fp(base), fp(same_run)) == []
    other = config.TrainConfig(output_dir="a", batch_size=4, optim=config.OptimConfig(lr=2e-5),
                               combiner=config.CombinerConfig(name="pcgrad"))
    assert fpr.differences(fp(base), fp(other)) == [
        "batch_size: 8 -> 4", "combiner.name: 'sago' -> 'pcgrad'", "optim.lr: 1e-05 -> 2e-05"]
    wider = CFG.__class__(**{**{f: getattr(CFG, f) for f in CFG.__dataclass_fields__}, "hidden_size": 32})
    assert fpr.differences(fp(base), fpr.run_fingerprint(base, wider, None, forget, retain)) == [
        "model.config.hidden_size: 16 -> 32"]
    bf16 = fpr.run_fingerprint(base, CFG, ModelOptions(param_dtype=jnp.bfloat16), forget, retain)
    assert fpr.differences(fp(base), bf16) == ["model.dtype: 'float32' -> 'bfloat16'"]
    changed = dict(forget, input_ids=forget["input_ids"].copy())
    changed["input_ids"][0, -1] += 1
    assert fpr.differences(fp(base), fpr.run_fingerprint(base, CFG, None, changed, retain)) == [
        f"data.forget.tokens: {fpr.array_digest(forget)!r} -> {fpr.array_digest(changed)!r}"]
    # a check before loading (partial: no weights yet) skips the recorded weights; a full check does not
    assert fpr.differences(fp(base, weights="bits:1"), fp(base), partial=True) == []
    assert fpr.differences(fp(base, weights="bits:1"), fp(base)) == ["model.weights: 'bits:1' -> (not in this run)"]
    assert fpr.differences(fp(base, weights="bits:1"), fp(base, weights="bits:2")) == [
        "model.weights: 'bits:1' -> 'bits:2'"]


def test_a_record_of_an_older_version_is_checked_on_the_keys_it_lacks():
    """Keys added after a run was recorded (lora.*, objective.compat, the weighting) are compared
    with what that version ran with: their defaults."""
    forget, retain = _data()
    base = config.TrainConfig(output_dir="a")
    old = {k: v for k, v in fpr.run_fingerprint(base, CFG, None, forget, retain).items()
           if not k.startswith("lora.") and k not in ("objective.compat", "micro_batch_weighting")}
    same = fpr.run_fingerprint(base, CFG, None, forget, retain)
    assert fpr.differences(old, same) == []  # the defaults are what the old version ran
    lora = config.TrainConfig(output_dir="a", lora=config.LoraConfig(rank=8), micro_batch_weighting="uniform",
                              objective=config.ObjectiveConfig(compat="open_unlearning"))
    assert fpr.differences(old, fpr.run_fingerprint(lora, CFG, None, forget, retain)) == [
        "lora.rank: not recorded (the recording version ran with None) -> 8",
        "micro_batch_weighting: not recorded (the recording version ran with 'tokens') -> 'uniform'",
        "objective.compat: not recorded (the recording version ran with None) -> 'open_unlearning'"]
    # a new data key from the CLI's identity, and a new model option, the same way
    assert fpr.differences({k: v for k, v in same.items()}, {**same, "data.chunk_bos": True}) == [
        "data.chunk_bos: not recorded (the recording version ran with False) -> True"]


def test_params_checksum_sees_one_bit_and_not_the_sharding():
    model = tiny_model()
    plain = fpr.params_checksum(model)
    assert fpr.params_checksum(tiny_model()) == plain  # the same weights
    assert fpr.params_checksum(tiny_model(seed=1)) != plain
    # the same weights sharded over 8 devices (fsdp) give the same checksum
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, sharding.param_shardings(state, mesh)))
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(nnx.state(sharded, nnx.Param)))
    assert fpr.params_checksum(sharded) == plain
    # flip the lowest mantissa bit of one element of one tensor
    flipped = tiny_model()
    kernel = flipped.layers[1].mlp.down_proj  # an nnx.Param [D, F]
    bits = np.asarray(kernel[...]).view(np.uint32).copy()
    bits[3, 5] ^= 1
    kernel[...] = jnp.asarray(bits.view(np.float32))
    assert fpr.params_checksum(flipped) != plain
    # swapping two elements keeps the plain sum but not the position-weighted one
    swapped = tiny_model()
    kernel = swapped.layers[0].self_attn.q_proj  # [heads, head_dim, D]
    values = np.asarray(kernel[...]).copy()
    assert values[0, 0, 0] != values[0, 0, 1]
    values[0, 0, 0], values[0, 0, 1] = values[0, 0, 1], values[0, 0, 0]
    kernel[...] = jnp.asarray(values)
    assert fpr.params_checksum(swapped) != plain
