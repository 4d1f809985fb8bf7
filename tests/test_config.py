"""One place per concept: combiners and objectives are known by name through their registries,
and the typed run config builds the optimizer chain and the step from them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_unlearn as ju
from jax_unlearn import cli, config
from jax_unlearn import step as st
from jax_unlearn.combiners import COMBINERS
from jax_unlearn.config import ConfigError, load_config
from jax_unlearn.objectives import OBJECTIVES

REQUIRED = ["output_dir=runs/x", "model.path=/m", "data.forget=f.jsonl", "data.retain=r.jsonl"]


def half_retain(alpha: float = 1.0, gamma: float = 1.0, diagnostics: bool = True) -> optax.GradientTransformation:
    """A toy combiner: ``u = gamma*g_f + alpha*g_r/2`` (no diagnostics)."""
    del diagnostics

    def update(grads, state, params=None):
        u = jax.tree.map(lambda f, r: gamma * f + 0.5 * alpha * r, grads.forget, grads.retain)
        return u, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@pytest.fixture
def toy_combiner():
    COMBINERS.register("half_retain", half_retain)
    yield "half_retain"
    COMBINERS.unregister("half_retain")


def test_a_combiner_registered_in_one_place_runs_through_config_and_step(toy_combiner, model, forget_batch,
                                                                        retain_batch, capsys):
    cfg = load_config(None, [*REQUIRED, f"combiner.name={toy_combiner}", "combiner.alpha=2.0", "optim.clip_norm=null",
                             "optim.lr=0.1"])
    tx = config.build_tx(cfg.train_config(), total_steps=2)
    objective = config.build_objective(cfg.objective, model.config.hidden_size)
    defs, state = st.init_state(model, tx, objective)
    step = st.make_two_grad_step(defs, objective, tx, config.step_config(cfg))
    state, metrics = step(state, forget_batch, retain_batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["forget_loss"]))
    assert np.isnan(float(metrics["conflict_fraction"]))  # the toy keeps no diagnostics
    with pytest.raises(SystemExit):
        cli.main(["unlearn", "--help"])
    assert toy_combiner in capsys.readouterr().out  # the CLI help lists it too
    COMBINERS.unregister(toy_combiner)
    with pytest.raises(ConfigError, match=r"combiner.name='half_retain' is not supported; expected one of "
                                          r"weighted_sum, pcgrad, sago"):
        load_config(None, [*REQUIRED, f"combiner.name={toy_combiner}"])


@pytest.mark.parametrize("override, message", [
    ("combiner.scope=global", r"'combiner.scope' does not apply to combiner 'sago' \(it takes combiner.alpha, "
                              r"combiner.gamma, combiner.agree, combiner.diagnostics\)"),
    ("objective.beta=0.5", r"'objective.beta' does not apply to objective 'grad_diff'"),
    ("objective.name=rmu", None),  # rmu takes layer/steering/trainable/seed: the defaults are fine
])
def test_a_key_the_chosen_factory_does_not_take_is_an_error(override, message):
    if message is None:
        assert load_config(None, [*REQUIRED, override]).objective.name == "rmu"
        with pytest.raises(ConfigError, match=r"'objective.retain' does not apply to objective 'rmu'"):
            load_config(None, [*REQUIRED, override, "objective.retain=kl"])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, override])


def test_registries_list_the_library_objects_and_refuse_duplicates():
    assert COMBINERS.names() == ("weighted_sum", "pcgrad", "sago", "blur", "gru", "ngdiff", "mgda", "cagrad",
                                 "nash_mtl", "imtl_g", "aligned_mtl", "upgrad", "dual_proj", "grad_vac", "con_fig")
    assert OBJECTIVES.names() == ("grad_ascent", "grad_diff", "npo", "simnpo", "rmu", "dpo", "idk_dpo", "undial",
                                  "wga", "satimp", "ce_u", "pdu")
    assert COMBINERS.get("sago") is ju.sago
    with pytest.raises(ValueError, match="combiner 'sago' is already registered"):
        COMBINERS.register("sago", half_retain)
    with pytest.raises(ValueError, match="unknown objective 'kto'; known: grad_ascent"):
        OBJECTIVES.get("kto")


def test_schedule_is_a_settable_number_when_constant_and_warmup_steps_override_the_ratio():
    assert config.build_schedule(config.OptimConfig(lr=3e-4), 100) == 3e-4
    s = config.build_schedule(config.OptimConfig(lr=1.0, schedule="linear", warmup_ratio=0.5, warmup_steps=2), 10)
    np.testing.assert_allclose([float(s(t)) for t in (0, 1, 2, 6, 10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    # the Hugging Face Trainer's ceil(ratio * steps), float rounding included: 0.07 * 100 = 7.000000000000001
    hf = config.build_schedule(config.OptimConfig(lr=1.0, schedule="constant", warmup_ratio=0.07), 100)
    assert float(hf(7)) < 1.0 == float(hf(8))


def test_set_hyperparams_keeps_the_state_types_and_reaches_the_update():
    tx = config.build_optimizer(config.OptimConfig(lr=0.0, clip_norm=None), 1)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    new = config.set_hyperparams(state, learning_rate=0.5)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert [x.dtype for x in jax.tree.leaves(new)] == [x.dtype for x in jax.tree.leaves(state)]
    u, _ = tx.update({"w": jnp.ones(3)}, new, params)
    np.testing.assert_allclose(u["w"], -0.5, rtol=1e-6)  # Adam's first step: -lr * sign(g)


@pytest.mark.parametrize("overrides, remat, want", [
    ([], None, True), ([], "full", False), (["sequence_tasks=false"], None, False),
    (["sequence_tasks=true"], "full", True), (["mode=naive"], None, False)])
def test_sequence_tasks_follows_the_model_remat_unless_set(overrides, remat, want):
    """``sequence_tasks: null`` (the default) is on exactly when the model has no remat policy;
    a bool overrides it; the one-backward (naive) step has no retain pass to sequence."""
    from jax_unlearn.models import ModelOptions

    cfg = load_config(None, [*REQUIRED, *overrides]).train_config()
    assert config.step_config(cfg, ModelOptions(remat_policy=remat)).sequence_tasks is want
    # without the model's options only an explicit true turns it on
    assert config.step_config(cfg).sequence_tasks is (cfg.sequence_tasks is True and cfg.mode == "combined")


def test_step_keys_that_need_one_micro_batch_are_config_errors():
    with pytest.raises(ConfigError, match=r"chunk_head=True .* micro_batches=1 only \(got 2\)"):
        load_config(None, [*REQUIRED, "chunk_head=true", "micro_batches=2", "batch_size=8"])
    with pytest.raises(ConfigError, match="sequence_tasks"):
        load_config(None, [*REQUIRED, "sequence_tasks=maybe"])
