"""Every file under configs/ loads and validates; the paper's hyperparameters are what issue 6 lists."""

import re
from pathlib import Path

import pytest

from jax_unlearn import run_config as rc

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "demo.yaml")  # run configs; demo.yaml: test_bench
USER = ["model.path=/models/m", "data.forget=forget.jsonl", "data.retain=retain.jsonl"]


def load(rel: str) -> rc.RunConfig:
    return rc.load_config(CONFIGS / rel, USER)


def test_the_paper_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL}
    wmdp = {f"wmdp/{o}_{c}_{d}.yaml" for o in ("graddiff", "npo", "simnpo")
            for c in ("sum", "pcgrad", "pcgrad_global", "sago") for d in ("bio", "cyber")}
    wmdp |= {"wmdp/rmu_bio.yaml", "wmdp/rmu_cyber.yaml"}
    assert wmdp <= names
    assert {n for n in names if n.startswith("rwku/")} == {
        f"rwku/{n}_batch50.yaml" for n in ("graddiff_sago", "graddiff_pcgrad", "npo_sago", "simnpo_sago")}


@pytest.mark.parametrize("path", ALL, ids=[p.relative_to(CONFIGS).as_posix() for p in ALL])
def test_every_config_loads_and_validates(path):
    cfg = rc.load_config(path, USER)
    train = cfg.train_config()
    assert train.batch_size == 32 and train.batch_size % train.micro_batches == 0
    assert cfg.optim.weight_decay == 0.0 and cfg.data.max_length == 512 and cfg.model.dtype == "bfloat16"
    assert cfg.optim.warmup_ratio == (0.0 if cfg.objective.name == "rmu" else 0.1)
    assert cfg.output_dir.endswith(path.stem)
    # the model and data are the user's: without them the error names the keys to set
    with pytest.raises(rc.ConfigError, match=r"data\.forget, data\.retain, model\.path"):
        rc.load_config(path)


@pytest.mark.parametrize("rel, expect", [
    ("wmdp/graddiff_sum_bio.yaml", dict(lr=3e-6, steps=100, comb="weighted_sum", alpha=1.0, gamma=1.0)),
    ("wmdp/graddiff_sum_cyber.yaml", dict(lr=5e-6, steps=100, comb="weighted_sum", alpha=1.0, gamma=1.0)),
    ("wmdp/graddiff_sago_bio.yaml", dict(lr=1e-5, steps=500, comb="sago", alpha=0.5)),
    ("wmdp/graddiff_sago_cyber.yaml", dict(lr=1e-5, steps=500, comb="sago", alpha=1.0)),
    ("wmdp/graddiff_pcgrad_bio.yaml", dict(lr=1e-5, steps=100, comb="pcgrad", scope="module")),
    ("wmdp/graddiff_pcgrad_global_cyber.yaml", dict(lr=1e-5, steps=100, comb="pcgrad", scope="global")),
    ("wmdp/npo_sum_bio.yaml", dict(lr=1e-5, steps=100, obj="npo", beta=0.01, alpha=0.1)),
    ("wmdp/npo_sago_bio.yaml", dict(steps=150, obj="npo", beta=1e-4, gamma=0.1, alpha=1.0)),
    ("wmdp/npo_sago_cyber.yaml", dict(steps=300, obj="npo", beta=1e-3, gamma=1.0, alpha=0.1)),
    ("wmdp/simnpo_sum_bio.yaml", dict(steps=100, obj="simnpo", beta=0.7, delta=0.1, alpha=0.1)),
    ("wmdp/simnpo_sum_cyber.yaml", dict(steps=100, obj="simnpo", beta=0.75, delta=0.1, alpha=0.1)),
    ("wmdp/simnpo_sago_bio.yaml", dict(steps=150, comb="sago", beta=0.02, delta=0.1, alpha=0.1)),
    ("wmdp/simnpo_sago_cyber.yaml", dict(steps=200, comb="sago", beta=0.1, delta=0.1, alpha=0.1)),
    ("wmdp/simnpo_pcgrad_cyber.yaml", dict(steps=100, comb="pcgrad", beta=1.0)),
    ("wmdp/rmu_bio.yaml", dict(lr=5e-5, steps=80, obj="rmu", alpha=2.5, schedule="constant")),
    ("wmdp/rmu_cyber.yaml", dict(lr=5e-5, steps=80, obj="rmu", alpha=1.0)),
    ("rwku/graddiff_sago_batch50.yaml", dict(lr=1e-5, epochs=2, comb="sago", obj="grad_diff")),
    ("rwku/graddiff_pcgrad_batch50.yaml", dict(lr=3e-6, epochs=2, comb="pcgrad", obj="grad_diff")),
    ("rwku/npo_sago_batch50.yaml", dict(lr=1e-5, epochs=2, obj="npo", beta=1e-3)),
    ("rwku/simnpo_sago_batch50.yaml", dict(lr=1e-5, epochs=2, obj="simnpo", beta=0.1, delta=0.1, alpha=0.1)),
])
def test_paper_hyperparameters(rel, expect):
    cfg = load(rel)
    got = dict(lr=cfg.optim.lr, steps=cfg.max_steps, epochs=cfg.epochs, comb=cfg.combiner.name,
               scope=cfg.combiner.scope, alpha=cfg.combiner.alpha, gamma=cfg.combiner.gamma, obj=cfg.objective.name,
               beta=cfg.objective.beta, delta=cfg.objective.delta, schedule=cfg.optim.schedule)
    for key, value in expect.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    if "epochs" in expect:
        assert cfg.max_steps is None


def test_rmu_trains_layers_5_to_7_down_proj_at_layer_7():
    cfg = load("wmdp/rmu_bio.yaml").objective
    assert cfg.layer == 7 and cfg.steering == 2.0
    pattern = re.compile(cfg.trainable)
    assert all(pattern.search(f"layers.{i}.mlp.down_proj") for i in (5, 6, 7))
    assert not pattern.search("layers.4.mlp.down_proj") and not pattern.search("layers.6.mlp.up_proj")


def test_overrides_apply_on_top_of_a_paper_config():
    cfg = rc.load_config(CONFIGS / "wmdp/graddiff_sago_bio.yaml", USER + ["optim.lr=2e-5", "combiner.name=pcgrad"])
    assert cfg.optim.lr == 2e-5 and cfg.combiner.name == "pcgrad" and cfg.max_steps == 500
    assert rc.load_config(CONFIGS / "wmdp/graddiff_sago_bio.yaml", USER) == load("wmdp/graddiff_sago_bio.yaml")
