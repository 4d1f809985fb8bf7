"""The benchmark scripts `scripts/device_bench.sh` runs on a lent accelerator: they must import
and run here, where no test otherwise reaches them (a stale import once broke all of them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def scripts_path(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    yield
    for name in ("bench_step", "bench_attention", "e2e_random_model"):
        sys.modules.pop(name, None)


def test_every_named_size_is_a_model_config(scripts_path):
    import bench_attention  # noqa: F401 - imports bench_step's sizes
    import bench_step
    import e2e_random_model  # noqa: F401

    from jax_unlearn.models import ModelConfig
    from jax_unlearn.plan import SHAPES

    assert set(SHAPES) <= set(bench_step.SIZES)
    for name, fields in bench_step.SIZES.items():
        cfg = ModelConfig(model_type="llama", max_position_embeddings=512, **fields)
        if name in SHAPES:
            assert cfg.hidden_size == SHAPES[name]["hidden_size"] and cfg.vocab_size == SHAPES[name]["vocab_size"]


def test_bench_step_measures_each_kind(scripts_path, capsys):
    import bench_step

    bench_step.main(["--size", "tiny", "--batch", "2", "--seq", "32", "--scan", "--logit-chunk", "16", "--chunk-head",
                     "--kinds", "naive,sago", "--steps", "2", "--warmup", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in rows] == ["naive", "sago"]
    for r in rows:
        assert r["loss_finite"] and r["step_s"] > 0 and r["tokens_per_step"] == 2 * 2 * 32
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"], rel=1e-3)
