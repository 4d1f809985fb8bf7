"""Evaluation during a run: rows in metrics.jsonl, the best evaluated step exported, early stop."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jax_unlearn import config, train
from jax_unlearn.config import ConfigError
from jax_unlearn.objectives import nll

EVAL_ROWS = 4


def _data():
    from step_fixtures import make_batch

    return ({k: np.asarray(v) for k, v in make_batch(11, rows=16).items()},
            {k: np.asarray(v) for k, v in make_batch(12, rows=24).items()})


def _cfg(out: Path, **kw) -> config.TrainConfig:
    base = dict(progress=False, batch_size=8, save_every=3, keep=2, max_steps=6,
                optim=config.OptimConfig(lr=0.02, clip_norm=None), combiner=config.CombinerConfig(name="weighted_sum"),
                objective=config.ObjectiveConfig(name="grad_ascent"))
    return config.TrainConfig(output_dir=str(out), **{**base, **kw})


def _forget_nll(forget):
    rows = {k: jnp.asarray(v[:EVAL_ROWS]) for k, v in forget.items()}
    return lambda model: {"forget/nll": float(nll(model, rows)[0])}


def _eval_rows(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/forget/nll"] for r in rows if "eval/forget/nll" in r}


def test_rows_every_n_steps_and_the_best_step_is_exported(tmp_path):
    from step_fixtures import tiny_model

    from jax_unlearn.models import load_hf

    forget, retain = _data()
    evaluate = _forget_nll(forget)
    cfg = _cfg(tmp_path, select=config.SelectConfig(metric="forget/nll", mode="min"))
    result = train.unlearn(tiny_model(), forget, retain, cfg, evaluate=evaluate, eval_every=2)
    rows = _eval_rows(tmp_path)
    assert sorted(rows) == [0, 2, 4, 6]
    assert rows[0] < rows[2] < rows[4] < rows[6]  # gradient ascent: the forget NLL only rises
    # "min" keeps the lowest evaluated step after the start: step 2, not the last one
    assert result.selected_step == 2 and result.steps_done == 6
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 2
    exported = load_hf(result.export_dir)
    assert evaluate(exported)["forget/nll"] == pytest.approx(rows[2], rel=1e-6)
    assert evaluate(result.model)["forget/nll"] == pytest.approx(rows[2], rel=1e-6)
    # a rerun of the finished run keeps everything as it is
    stamp = (result.export_dir / "model.safetensors").read_bytes()
    again = train.unlearn(tiny_model(), forget, retain, cfg, evaluate=evaluate, eval_every=2)
    assert again.steps_done == 6 and (result.export_dir / "model.safetensors").read_bytes() == stamp


def test_stop_when_ends_the_run_as_finished_and_a_rerun_does_not_continue(tmp_path):
    from step_fixtures import tiny_model

    forget, retain = _data()
    evaluate = _forget_nll(forget)
    probe = train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "probe", export=False),
                          evaluate=evaluate, eval_every=1)
    assert probe.steps_done == 6
    rows = _eval_rows(tmp_path / "probe")
    target = (rows[3] + rows[4]) / 2  # reached at step 4
    cfg = _cfg(tmp_path / "run", stop_when=config.StopConfig(metric="forget/nll", above=target))
    result = train.unlearn(tiny_model(), forget, retain, cfg, evaluate=evaluate, eval_every=1)
    assert result.stopped_early and not result.interrupted and result.steps_done == 4
    assert json.loads((tmp_path / "run" / "stopped.json").read_text())["step"] == 4
    assert 4 in train.checkpoint_steps(tmp_path / "run")
    same = load_file(tmp_path / "run" / "model" / "model.safetensors")
    again = train.unlearn(tiny_model(), forget, retain, cfg, evaluate=evaluate, eval_every=1)
    assert again.steps_done == 4 and again.stopped_early and not again.interrupted
    assert load_file(tmp_path / "run" / "model" / "model.safetensors").keys() == same.keys()
    assert max(_eval_rows(tmp_path / "run")) == 4  # nothing trained or evaluated after the stop


def test_select_and_stop_need_evaluations_and_a_known_metric(tmp_path):
    from step_fixtures import tiny_model

    forget, retain = _data()
    with pytest.raises(ConfigError, match="need evaluations during the run"):
        train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path, select=config.SelectConfig(metric="forget/nll")))
    assert not tmp_path.joinpath("metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"'stop_when' with metric 'x' needs one of 'stop_when.below'"):
        config.check(_cfg(tmp_path, stop_when=config.StopConfig(metric="x")))
    with pytest.raises(ConfigError, match=r"'select.metric' is 'retain/nll', which the evaluation does not produce; "
                                          r"it gives forget/nll"):
        train.unlearn(tiny_model(), forget, retain, _cfg(tmp_path / "x", select=config.SelectConfig(metric="retain/nll")),
                      evaluate=_forget_nll(forget), eval_every=2)
    assert not (tmp_path / "x").exists()  # found before anything was written
