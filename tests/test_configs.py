"""Every file under configs/ loads and validates, and each paper config carries the effective
hyperparameters of the reference experiment it mirrors (sustech-nlp/SAGO @2363ee7).

`TABLE` is written out by hand from the reference (docs/reference.md explains each column):
the experiment YAML and its ``defaults:`` chain (configs/experiment/unlearn/..., configs/trainer/...),
the HF TrainingArguments defaults (linear schedule, warmup 0, max_grad_norm 1.0) and the launch
scripts (per-device batch x accumulation x GPUs = 32; DDP clips at 1.0, DeepSpeed ZeRO-3 does not).
"""

import re
from pathlib import Path

import pytest

from jax_unlearn import config
from jax_unlearn import config as rc

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
ALL = sorted(p for d in ("wmdp", "rwku", "extra") for p in (CONFIGS / d).rglob("*.yaml"))  # the paper configs
# (configs/tofu, configs/muse: test_configs_benchmarks.py; objectives/: test_objectives_cli; demo.yaml: test_bench)
USER = ["model.path=/models/m", "data.forget=forget.jsonl", "data.retain=retain.jsonl"]

# The reference's experiments: configs/experiment/unlearn/{wmdp,rwku}/*.yaml except wmdp/default.yaml
# (a base the GradDiff surgery runs inherit), each launched by one of its scripts/*.sh.
REFERENCE_EXPERIMENTS = {
    *(f"wmdp/{n}_{d}" for d in ("bio", "cyber") for n in (
        "GradAscent", "NPOForget", "SimNPOForget", "GradDiff", "NPO", "SimNPO", "RMU",  # wmdp_baselines.sh
        "GradDiff_pcgrad", "GradDiff_pcgrad_global", "GradDiff_sago", "NPO_pcgrad", "NPO_sago",  # wmdp_unlearn.sh
        "SimNPO_pcgrad", "SimNPO_sago")),
    *(f"rwku/Batch50_{n}" for n in (
        "GradAscent", "NPOForget", "SimNPOForget", "GradDiff", "NPO", "SimNPO",  # rwku_baselines.sh
        "PCGrad_global", "PCGrad", "PCGrad_NPO", "PCGrad_SimNPO", "SAGO", "SAGO_NPO", "SAGO_SimNPO")),  # rwku_unlearn.sh
}

# Combiner column: "sum" = weighted_sum (the reference's loss-summing trainers, one backward of
# gamma*L_f + alpha*L_r), "pcgrad" = pcgrad(scope="module") (surgery_strategy "pcgrad", per parameter
# tensor), "pcgrad_global" = pcgrad(scope="global"), "sago" = sago(agree="forget").
# Forget-only trainers (GradAscent, NPOForget, SimNPOForget): "sum" with alpha 0.
# micro = micro-batches per step of batch 32: 16 (2 rows per GPU, scripts/wmdp_unlearn.sh) or 8 (4 rows,
# the other scripts); clip = 1.0 under DDP (wmdp_unlearn.sh), None under DeepSpeed ZeRO-3 (the others).
# compat / weighting / chunk_bos: the reference's code paths that every experiment takes
# (docs/reference.md sections 4, 5, 8): open-unlearning losses, uniform mean of micro-batch means,
# PretrainingDataset's chunks with a masked BOS.
COLUMNS = ("path", "ref", "objective", "combiner", "alpha", "gamma", "beta", "delta", "lr", "steps", "epochs",
           "micro", "clip", "warmup", "schedule", "compat", "weighting", "chunk_bos")
OU = "open_unlearning"
_ = None
TABLE = [
    # WMDP baselines: scripts/wmdp_baselines.sh (DeepSpeed ZeRO-3, 4 rows x 2 accumulation x 4 GPUs, no clipping)
    ("wmdp/gradascent_bio", "wmdp/GradAscent_bio", "grad_ascent", "sum", 0.0, 1.0, _, _, 5e-7, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/gradascent_cyber", "wmdp/GradAscent_cyber", "grad_ascent", "sum", 0.0, 1.0, _, _, 5e-7, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_forget_bio", "wmdp/NPOForget_bio", "npo", "sum", 0.0, 1.0, 0.05, _, 5e-6, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_forget_cyber", "wmdp/NPOForget_cyber", "npo", "sum", 0.0, 1.0, 0.05, _, 5e-6, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_forget_bio", "wmdp/SimNPOForget_bio", "simnpo", "sum", 0.0, 1.0, 5.0, 0.1, 5e-6, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_forget_cyber", "wmdp/SimNPOForget_cyber", "simnpo", "sum", 0.0, 1.0, 3.0, 0.1, 5e-6, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/graddiff_sum_bio", "wmdp/GradDiff_bio", "grad_diff", "sum", 1.0, 1.0, _, _, 3e-6, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/graddiff_sum_cyber", "wmdp/GradDiff_cyber", "grad_diff", "sum", 1.0, 1.0, _, _, 5e-6, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_sum_bio", "wmdp/NPO_bio", "npo", "sum", 0.1, 1.0, 0.01, _, 1e-5, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_sum_cyber", "wmdp/NPO_cyber", "npo", "sum", 0.1, 1.0, 0.01, _, 1e-5, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_sum_bio", "wmdp/SimNPO_bio", "simnpo", "sum", 0.1, 1.0, 0.7, 0.1, 1e-5, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_sum_cyber", "wmdp/SimNPO_cyber", "simnpo", "sum", 0.1, 1.0, 0.75, 0.1, 1e-5, 100, _, 8, _, 0.1, "linear", OU, "uniform", True),
    ("wmdp/rmu_bio", "wmdp/RMU_bio", "rmu", "sum", 2.5, 1.0, _, _, 5e-5, 80, _, 8, _, 0.0, "constant", OU, "uniform", True),
    ("wmdp/rmu_cyber", "wmdp/RMU_cyber", "rmu", "sum", 1.0, 1.0, _, _, 5e-5, 80, _, 8, _, 0.0, "constant", OU, "uniform", True),
    # WMDP combined runs: scripts/wmdp_unlearn.sh (DDP, 2 rows x 4 accumulation x 4 GPUs, clip 1.0)
    ("wmdp/graddiff_pcgrad_bio", "wmdp/GradDiff_pcgrad_bio", "grad_diff", "pcgrad", 1.0, 1.0, _, _, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/graddiff_pcgrad_cyber", "wmdp/GradDiff_pcgrad_cyber", "grad_diff", "pcgrad", 1.0, 1.0, _, _, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/graddiff_pcgrad_global_bio", "wmdp/GradDiff_pcgrad_global_bio", "grad_diff", "pcgrad_global", 1.0, 1.0, _, _, 1e-5, 300, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/graddiff_pcgrad_global_cyber", "wmdp/GradDiff_pcgrad_global_cyber", "grad_diff", "pcgrad_global", 1.0, 1.0, _, _, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/graddiff_sago_bio", "wmdp/GradDiff_sago_bio", "grad_diff", "sago", 0.5, 1.0, _, _, 1e-5, 500, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/graddiff_sago_cyber", "wmdp/GradDiff_sago_cyber", "grad_diff", "sago", 1.0, 1.0, _, _, 1e-5, 500, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_pcgrad_bio", "wmdp/NPO_pcgrad_bio", "npo", "pcgrad", 1.0, 0.1, 1e-4, _, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_pcgrad_cyber", "wmdp/NPO_pcgrad_cyber", "npo", "pcgrad", 0.1, 1.0, 0.005, _, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_sago_bio", "wmdp/NPO_sago_bio", "npo", "sago", 1.0, 0.1, 1e-4, _, 1e-5, 150, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/npo_sago_cyber", "wmdp/NPO_sago_cyber", "npo", "sago", 0.1, 1.0, 1e-3, _, 1e-5, 300, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_pcgrad_bio", "wmdp/SimNPO_pcgrad_bio", "simnpo", "pcgrad", 0.1, 1.0, 0.02, 0.1, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_pcgrad_cyber", "wmdp/SimNPO_pcgrad_cyber", "simnpo", "pcgrad", 0.1, 1.0, 1.0, 0.1, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_sago_bio", "wmdp/SimNPO_sago_bio", "simnpo", "sago", 0.1, 1.0, 0.02, 0.1, 1e-5, 150, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("wmdp/simnpo_sago_cyber", "wmdp/SimNPO_sago_cyber", "simnpo", "sago", 0.1, 1.0, 0.1, 0.1, 1e-5, 200, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    # No reference experiment: pcgrad_global analogues of NPO_pcgrad_* / SimNPO_pcgrad_* (same values and launch)
    ("extra/wmdp/npo_pcgrad_global_bio", _, "npo", "pcgrad_global", 1.0, 0.1, 1e-4, _, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("extra/wmdp/npo_pcgrad_global_cyber", _, "npo", "pcgrad_global", 0.1, 1.0, 0.005, _, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("extra/wmdp/simnpo_pcgrad_global_bio", _, "simnpo", "pcgrad_global", 0.1, 1.0, 0.02, 0.1, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    ("extra/wmdp/simnpo_pcgrad_global_cyber", _, "simnpo", "pcgrad_global", 0.1, 1.0, 1.0, 0.1, 1e-5, 100, _, 16, 1.0, 0.1, "linear", OU, "uniform", True),
    # RWKU baselines: scripts/rwku_baselines.sh (DeepSpeed ZeRO-3, 4 rows x 2 x 4 GPUs, no clipping), 2 epochs
    ("rwku/gradascent_batch50", "rwku/Batch50_GradAscent", "grad_ascent", "sum", 0.0, 1.0, _, _, 7e-7, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/npo_forget_batch50", "rwku/Batch50_NPOForget", "npo", "sum", 0.0, 1.0, 1e-3, _, 3e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/simnpo_forget_batch50", "rwku/Batch50_SimNPOForget", "simnpo", "sum", 0.0, 1.0, 0.5, 0.1, 3e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/graddiff_sum_batch50", "rwku/Batch50_GradDiff", "grad_diff", "sum", 1.0, 1.0, _, _, 8e-7, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/npo_sum_batch50", "rwku/Batch50_NPO", "npo", "sum", 1.0, 1.0, 1e-3, _, 3e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/simnpo_sum_batch50", "rwku/Batch50_SimNPO", "simnpo", "sum", 1.0, 1.0, 0.5, 0.1, 8e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    # RWKU combined runs: scripts/rwku_unlearn.sh (DeepSpeed ZeRO-3, same batch, no clipping), 2 epochs
    ("rwku/graddiff_pcgrad_global_batch50", "rwku/Batch50_PCGrad_global", "grad_diff", "pcgrad_global", 1.0, 1.0, _, _, 4e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/graddiff_pcgrad_batch50", "rwku/Batch50_PCGrad", "grad_diff", "pcgrad", 1.0, 1.0, _, _, 3e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/npo_pcgrad_batch50", "rwku/Batch50_PCGrad_NPO", "npo", "pcgrad", 1.0, 1.0, 1e-3, _, 8e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/simnpo_pcgrad_batch50", "rwku/Batch50_PCGrad_SimNPO", "simnpo", "pcgrad", 0.5, 1.0, 0.5, 0.1, 8e-6, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/graddiff_sago_batch50", "rwku/Batch50_SAGO", "grad_diff", "sago", 1.0, 1.0, _, _, 1e-5, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/npo_sago_batch50", "rwku/Batch50_SAGO_NPO", "npo", "sago", 1.0, 1.0, 1e-3, _, 1e-5, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
    ("rwku/simnpo_sago_batch50", "rwku/Batch50_SAGO_SimNPO", "simnpo", "sago", 0.1, 1.0, 0.1, 0.1, 1e-5, _, 2, 8, _, 0.1, "linear", OU, "uniform", True),
]
ROWS = [dict(zip(COLUMNS, row)) for row in TABLE]
COMBINERS = {"sum": ("weighted_sum", None, None), "pcgrad": ("pcgrad", "module", None),
             "pcgrad_global": ("pcgrad", "global", None), "sago": ("sago", None, "forget")}
REFERENCE_KEYS = ("objective.compat=open_unlearning", "micro_batch_weighting=uniform", "data.chunk_bos=true")


def load(rel: str) -> rc.RunConfig:
    return rc.load_config(CONFIGS / rel, USER)


def header(path: Path) -> str:
    """The comment block above the first key."""
    lines = path.read_text().splitlines()
    return "\n".join(lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def test_table_rows_are_well_formed():
    assert all(len(row) == len(COLUMNS) for row in TABLE)
    assert len({r["path"] for r in ROWS}) == len(ROWS)


def test_every_config_file_has_a_row_and_every_row_a_file():
    names = {p.relative_to(CONFIGS).with_suffix("").as_posix() for p in ALL}
    assert names == {r["path"] for r in ROWS}


def test_every_reference_experiment_has_exactly_one_config():
    refs = [r["ref"] for r in ROWS if r["ref"] is not None]
    assert len(REFERENCE_EXPERIMENTS) == 41
    assert sorted(refs) == sorted(REFERENCE_EXPERIMENTS)
    # configs without a reference experiment live under configs/extra/, and only they do
    assert all((r["ref"] is None) == r["path"].startswith("extra/") for r in ROWS)


@pytest.mark.parametrize("path", ALL, ids=[p.relative_to(CONFIGS).as_posix() for p in ALL])
def test_every_config_loads_and_validates(path):
    cfg = rc.load_config(path, USER)
    train = cfg.train_config()
    assert train.batch_size == 32 and train.batch_size % train.micro_batches == 0
    assert cfg.optim.weight_decay == 0.0 and cfg.data.max_length == 512 and cfg.model.dtype == "bfloat16"
    assert cfg.output_dir == f"runs/{path.relative_to(CONFIGS).with_suffix('').as_posix()}"
    # the model and data are the user's: without them the error names the keys to set
    with pytest.raises(rc.ConfigError, match=r"data\.forget, data\.retain, model\.path"):
        rc.load_config(path)


@pytest.mark.parametrize("row", ROWS, ids=[r["path"] for r in ROWS])
def test_effective_hyperparameters_match_the_reference(row):
    cfg = load(row["path"] + ".yaml")
    name, scope, agree = COMBINERS[row["combiner"]]
    got = dict(objective=cfg.objective.name, combiner=cfg.combiner.name, alpha=cfg.combiner.alpha,
               gamma=cfg.combiner.gamma, lr=cfg.optim.lr, steps=cfg.max_steps, micro=cfg.micro_batches,
               clip=cfg.optim.clip_norm, warmup=cfg.optim.warmup_ratio, schedule=cfg.optim.schedule,
               compat=cfg.objective.compat, weighting=cfg.micro_batch_weighting, chunk_bos=cfg.data.chunk_bos)
    want = {k: row[k] for k in got}
    want["combiner"] = name
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    if row["epochs"] is not None:
        assert cfg.max_steps is None and cfg.epochs == row["epochs"]
    if scope is not None:
        assert cfg.combiner.scope == scope
    if agree is not None:
        assert cfg.combiner.agree == agree
    if row["objective"] in ("npo", "simnpo"):
        assert cfg.objective.beta == pytest.approx(row["beta"], rel=1e-12)
    if row["objective"] == "simnpo":
        assert cfg.objective.delta == pytest.approx(row["delta"], rel=1e-12)
    if row["objective"] in ("grad_diff", "npo", "simnpo"):
        assert cfg.objective.retain == "nll"  # retain_loss_type NLL in every reference trainer config
    # 32 rows per step, micro-batches of the reference's per-GPU rows (2 under DDP, 4 under ZeRO-3)
    assert 32 // cfg.micro_batches == (2 if row["clip"] == 1.0 else 4)
    # the reference semantics reach what the run builds
    assert config.build_objective(cfg.objective, hidden_size=16).compat == row["compat"]
    assert config.step_config(cfg.train_config()).weighting == row["weighting"]
    # Adam's moments: fp32 beside the bf16 parameters under DDP (paged_adamw_32bit, no master copy);
    # ZeRO-3 runs keep the parameters' dtype (the headers name model.dtype=float32 for DeepSpeed's fp32 master)
    assert cfg.model.dtype == "bfloat16"
    assert cfg.optim.moment_dtype == ("float32" if row["clip"] == 1.0 else None)


@pytest.mark.parametrize("row", ROWS, ids=[r["path"] for r in ROWS])
def test_header_cites_the_reference_and_the_reference_semantics(row):
    text = header(CONFIGS / (row["path"] + ".yaml"))
    if row["ref"] is None:
        assert "NOT A PAPER RUN" in text and "no experiment for this combination" in text
    else:
        assert "Paper run. Mirrors sustech-nlp/SAGO" in text
        assert f"configs/experiment/unlearn/{row['ref']}.yaml: " in text
    script = ("scripts/wmdp_unlearn.sh" if row["clip"] == 1.0 else
              "scripts/wmdp_baselines.sh" if row["path"].startswith("wmdp/") else
              "scripts/rwku_unlearn.sh" if row["combiner"] != "sum" else "scripts/rwku_baselines.sh")
    assert script in text
    for key in REFERENCE_KEYS:
        assert key in text
    if row["clip"] == 1.0:  # DDP: the optimizer's fp32 moments have their key
        assert "optim.moment_dtype float32" in text and "no key" not in text


def test_reference_doc_lists_every_config():
    doc = (ROOT / "docs" / "reference.md").read_text()
    for row in ROWS:
        assert f"`configs/{row['path']}.yaml`" in doc, row["path"]
    for key in REFERENCE_KEYS:
        assert key.split("=")[0] in doc


@pytest.mark.parametrize("rel, alpha", [("wmdp/rmu_bio.yaml", 2.5), ("wmdp/rmu_cyber.yaml", 1.0)])
def test_rmu_trains_layers_5_to_7_down_proj_at_layer_7(rel, alpha):
    cfg = load(rel)
    assert cfg.objective.layer == 7 and cfg.objective.steering == 2.0  # module_regex model.layers.7, steering_coeff 2
    assert cfg.combiner.alpha == alpha and cfg.combiner.gamma == 1.0
    pattern = re.compile(cfg.objective.trainable)
    assert all(pattern.search(f"layers.{i}.mlp.down_proj") for i in (5, 6, 7))
    assert not pattern.search("layers.4.mlp.down_proj") and not pattern.search("layers.6.mlp.up_proj")


def test_overrides_apply_on_top_of_a_paper_config():
    cfg = rc.load_config(CONFIGS / "wmdp/graddiff_sago_bio.yaml", USER + ["optim.lr=2e-5", "combiner.name=pcgrad"])
    assert cfg.optim.lr == 2e-5 and cfg.combiner.name == "pcgrad" and cfg.max_steps == 500
    assert rc.load_config(CONFIGS / "wmdp/graddiff_sago_bio.yaml", USER) == load("wmdp/graddiff_sago_bio.yaml")
