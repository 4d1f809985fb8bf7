"""The combiner zoo as a run's combiner: built from the run config, a sharded step on 8 devices
with finite losses and updates, for each kind of combiner state (none: blur, mgda; scalar memory:
grad_vac, nash_mtl; a parameter-shaped memory: gru, which also saves it in the checkpoint and
resumes bit-identically). Each combiner's maths, sharded and not, is tests/test_combiner_zoo.py's."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from step_fixtures import make_batch, tiny_model

from jax_unlearn import config, train


def _data():
    return ({k: np.asarray(v) for k, v in make_batch(21, rows=16).items()},
            {k: np.asarray(v) for k, v in make_batch(22, rows=16).items()})


def _cfg(out, combiner: config.CombinerConfig, steps: int, **kw) -> config.TrainConfig:
    return config.TrainConfig(output_dir=str(out), batch_size=8, max_steps=steps, save_every=2, progress=False,
                              export=False, optim=config.OptimConfig(lr=0.05, clip_norm=None),
                              objective=config.ObjectiveConfig(name="grad_diff"), combiner=combiner, **kw)


@pytest.mark.parametrize("name", ["blur", "mgda", "grad_vac", "nash_mtl"])
def test_every_combiner_runs_as_the_runs_combiner(name, tmp_path):
    forget, retain = _data()
    start = tiny_model()
    result = train.unlearn(start, forget, retain, _cfg(tmp_path, config.CombinerConfig(name=name), 1))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert all(np.isfinite(row[k]) for k in ("forget_loss", "retain_loss", "update_norm", "cos_update_retain"))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(nnx.state(result.model, nnx.Param)), jax.tree.leaves(nnx.state(start, nnx.Param)))]
    assert any(moved)


def test_a_combiner_with_memory_resumes_bit_identically(tmp_path):
    forget, retain = _data()
    gru = config.CombinerConfig(name="gru", moving_avg=0.5)
    straight = train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "a", gru, 4)).model
    train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "b", gru, 2))
    resumed = train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "b", gru, 4))
    assert resumed.resumed_from == 2
    for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_combiner_keys_are_checked_and_recorded(tmp_path):
    with pytest.raises(config.ConfigError, match=r"'combiner.c' does not apply to combiner 'sago'"):
        config.check(_cfg(tmp_path, config.CombinerConfig(name="sago", c=0.9), 1))
    with pytest.raises(config.ConfigError, match=r"'combiner.beta' is 2"):
        config.check(_cfg(tmp_path, config.CombinerConfig(name="grad_vac", beta=2.0), 1))
    cfg = config.load_config(None, ["output_dir=o", "model.path=m", "data.forget=f", "data.retain=r",
                                    "combiner.name=cagrad", "combiner.c=0.6"])
    assert cfg.combiner.c == 0.6
    from jax_unlearn import fingerprint as fpr

    assert fpr.training_keys(cfg)["combiner.c"] == 0.6  # part of what defines a run
