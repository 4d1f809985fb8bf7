"""The named parts of the training loop, each on its own: metrics read one step late (the device
stays ahead), the non-finite guard's lagged record, the selection rules, restoring without
touching the caller's model, and hyperparameters that cannot be set."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_unlearn import config, train


class Value:
    """A metric of step ``t`` that records when the host reads it."""

    def __init__(self, events: list, t: int):
        self.events, self.t = events, t

    def __float__(self) -> float:
        self.events.append(("read", self.t))
        return float(self.t)


class State:
    """A stand-in train state: an optimizer state with an injected learning rate."""

    def __init__(self, lr: float):
        self.opt_state = optax.inject_hyperparams(optax.sgd)(learning_rate=lr).init({"w": jnp.zeros(1)})


@pytest.mark.parametrize("log_every", [1, 3])
def test_metrics_are_read_only_after_the_next_step_was_dispatched(tmp_path, log_every):
    events: list = []

    def step(state, batch):
        t = batch
        events.append(("dispatch", t))
        return state, {"forget_loss": Value(events, t), "retain_loss": Value(events, t)}

    log = train.MetricsLog(tmp_path / "metrics.jsonl", schedule=0.5, skip_nonfinite=False,
                           fetch=lambda tree: tree)  # the values are read by float(), which records it
    state, done, _ = train.run_steps(step, State(0.5), lambda t: (t + 1,), 0, 7, [train.Every(log_every, log.log)])
    log.flush()
    assert done == 7
    logged = [t for t in range(1, 8) if t % log_every == 0 or t == 7]
    for t in logged:
        read = events.index(("read", t))
        if t < 7:  # the last step's row is written at the end, once nothing follows it
            assert events.index(("dispatch", t + 1)) < read, (t, events)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == logged
    assert all(r["forget_loss"] == r["step"] and r["lr"] == 0.5 for r in rows)


def test_flush_writes_queued_rows_before_an_evaluation_row(tmp_path):
    events: list = []
    log = train.MetricsLog(tmp_path / "m.jsonl", schedule=1e-5, skip_nonfinite=False, fetch=lambda tree: tree)
    log.log(1, State(1e-5), {"forget_loss": Value(events, 1), "retain_loss": Value(events, 1)})
    assert events == []  # queued, not read
    log.write({"step": 1, "eval/x": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["forget_loss", "lr", "retain_loss", "step", "tokens_per_s"],
                                         ["eval/x", "step"]]
    assert rows[0]["lr"] == 1e-5  # the float32 hyperparameter written as the value that was set


def test_the_guard_reads_one_step_late_and_in_full_before_a_checkpoint():
    cfg = config.TrainConfig(output_dir="x", combiner=config.CombinerConfig(diagnostics=False))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    guard = train.NonFiniteGuard(cfg, mesh)

    class S:
        def __init__(self, step):
            self.step, self.opt_state, self.params = jnp.int32(step), None, {"w": jnp.ones(2)}

    guard.after_step(S(1), {"forget_loss": jnp.float32(1.0), "retain_loss": jnp.float32(2.0)})
    guard.after_step(S(2), {"forget_loss": jnp.float32(jnp.nan), "retain_loss": jnp.float32(2.0)})
    assert not guard.failed(lagged=True)  # the record as of step 1: the newest step is not waited for
    assert guard.failed()  # in full: step 2 was not finite
    assert guard.failure["step"] == 2 and np.isnan(guard.failure["values"]["forget_loss"])
    assert not guard.state_finite(2, S(2))
    err = guard.error(__import__("pathlib").Path("/nonexistent"))
    assert err.step == 2 and "step 2: non-finite loss or update" in str(err) and "no checkpoint was written" in str(err)


def test_selection_keeps_strict_improvements_and_stops_at_the_bound():
    cfg = config.TrainConfig(output_dir="x", select=config.SelectConfig(metric="acc", mode="min"),
                             stop_when=config.StopConfig(metric="acc", below=0.2))
    sel = train.Selection(cfg, recorded={"metric": "acc", "mode": "min", "step": 4, "value": 0.5})
    assert sel.best["step"] == 4  # a recorded best of the same metric and mode is kept
    assert not sel.improves({"acc": 0.5})  # a tie keeps the earlier step
    assert sel.improves({"acc": 0.4}) and not sel.stops({"acc": 0.4}) and sel.stops({"acc": 0.2})
    assert train.Selection(cfg, recorded={"metric": "acc", "mode": "max", "step": 4, "value": 0.5}).best is None
    with pytest.raises(config.ConfigError, match="'select.metric' is 'acc', which the evaluation does not produce"):
        sel.check({"loss": 1.0})


def test_restore_latest_leaves_the_callers_model_usable(tmp_path):
    """The caller's model on the run's mesh is neither donated nor changed by restoring."""
    from step_fixtures import make_batch, tiny_model

    from jax_unlearn import sharding

    forget = {k: np.asarray(v) for k, v in make_batch(1, rows=16).items()}
    retain = {k: np.asarray(v) for k, v in make_batch(2, rows=16).items()}
    cfg = config.TrainConfig(output_dir=str(tmp_path), batch_size=8, max_steps=2, save_every=2, progress=False,
                             export=False, optim=config.OptimConfig(lr=0.05))
    trained = train.unlearn(tiny_model(), forget, retain, cfg).model
    start = tiny_model()  # placed on the run's mesh, as a loaded run model is
    graphdef, state = __import__("flax").nnx.split(start)
    mesh = sharding.make_mesh(cfg.mesh)
    start = __import__("flax").nnx.merge(graphdef, jax.device_put(state, sharding.param_shardings(state, mesh)))
    before = jax.tree.map(np.asarray, __import__("flax").nnx.state(start))
    restored, step = train.restore_latest(start, cfg)
    assert step == 2
    after = jax.tree.map(np.asarray, __import__("flax").nnx.state(start))  # raises if a buffer was donated
    jax.tree.map(np.testing.assert_array_equal, after, before)
    ids = jnp.asarray(forget["input_ids"][:2])
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(trained(ids)))


def test_set_hyperparams_refuses_a_scheduled_hyperparameter():
    params = {"w": jnp.zeros(3)}
    constant = config.build_optimizer(config.OptimConfig(lr=1e-3), total_steps=10).init(params)
    set_ = config.set_hyperparams(constant, learning_rate=5e-3)
    assert float(optax.tree_utils.tree_get(set_, "learning_rate")) == pytest.approx(5e-3)
    for optim in (config.OptimConfig(lr=1e-3, schedule="cosine"), config.OptimConfig(lr=1e-3, warmup_steps=2)):
        state = config.build_optimizer(optim, total_steps=10).init(params)
        with pytest.raises(ValueError, match="cannot set learning_rate: it follows a schedule"):
            config.set_hyperparams(state, learning_rate=5e-3)
        config.set_hyperparams(state, b1=0.5)  # a constant hyperparameter of the same optimizer still can be


def test_record_file_names_are_the_callers_own(tmp_path):
    from step_fixtures import make_batch, tiny_model

    data = {k: np.asarray(v) for k, v in make_batch(1, rows=8).items()}
    cfg = config.TrainConfig(output_dir=str(tmp_path / "r"), batch_size=8, max_steps=1, progress=False)
    for name in ("fingerprint.json", "metrics.jsonl", "best.json", "../x.yaml"):
        with pytest.raises(ValueError, match="plain file name of the caller's own"):
            train.unlearn(tiny_model(), data, data, cfg, record={name: "x"})
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_a_donating_run_holds_each_weight_once(tmp_path, donate, lora):
    """During the run the live arrays shaped like a layer's down-projection are its parameter and
    Adam's two moments per layer (LoRA: the frozen base weight alone); without ``donate_model`` the
    caller's model adds its own copy."""
    from flax import nnx
    from step_fixtures import make_batch, tiny_model

    from jax_unlearn import sharding

    data = {k: np.asarray(v) for k, v in make_batch(1, rows=16).items()}
    graphdef, state = nnx.split(tiny_model())  # on the run's mesh, as `jax-unlearn unlearn` loads it
    mesh = sharding.make_mesh(sharding.MeshConfig())
    model = nnx.merge(graphdef, jax.device_put(state, sharding.param_shardings(state, mesh)))
    del state  # the unsharded originals
    shape = tuple(model.layers[0].mlp.down_proj[...].shape)
    layers = len(model.layers)
    assert sum(1 for x in jax.tree.leaves(nnx.state(model)) if tuple(x.shape) == shape) == layers  # one per layer
    seen = []

    def evaluate(m):
        seen.append(sum(1 for a in jax.live_arrays() if tuple(a.shape) == shape and not a.is_deleted()))
        return {"x": 0.0}

    cfg = config.TrainConfig(output_dir=str(tmp_path), batch_size=8, max_steps=2, save_every=2, progress=False,
                             export=False, objective=config.ObjectiveConfig(name="grad_diff"),
                             lora=config.LoraConfig(rank=2 if lora else None, targets=["q_proj"]))
    train.unlearn(model, data, data, cfg, evaluate=evaluate, eval_every=1, donate_model=donate)
    held = 1 if lora else 3  # the weight (+ Adam's mu and nu when it trains)
    assert seen and set(seen) == {layers * (held if donate else held + 1)}, seen  # (+ the caller's copy)
    if donate:
        with pytest.raises(RuntimeError, match="deleted"):
            np.asarray(model.layers[0].mlp.down_proj[...])
    else:
        np.asarray(model.layers[0].mlp.down_proj[...])  # the caller's model is intact
