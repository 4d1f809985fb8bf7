"""configs/tofu and configs/muse: open-unlearning's TOFU and MUSE experiments
(locuslab/open-unlearning @d3d7cf9) of GradDiff, NPO, SimNPO and RMU, each with the method's own sum,
PCGrad and SAGO. `EXPERIMENTS` and `METHODS` are written out by hand from its files (the headers
cite file and line): configs/experiment/unlearn/{tofu,muse}/default.yaml, configs/trainer/*.yaml,
scripts/{tofu,muse}_unlearn.sh (per-device batch x accumulation x 2 GPUs under DeepSpeed ZeRO-3)."""

from pathlib import Path

import pytest

from jax_unlearn import config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
USER = ["model.path=/models/m", "data.forget=forget.jsonl", "data.retain=retain.jsonl"]
EXPERIMENTS = {  # rows per step, micro-batches (per-GPU rows 4), lr, schedule, warmup, weight decay, epochs, length
    "tofu": dict(batch=32, micro=8, lr=1e-5, schedule="linear", warmup=0.1, wd=0.01, epochs=10, length=512,
                 chunk_bos=False, mode="truncate"),
    "muse": dict(batch=64, micro=16, lr=1e-5, schedule="constant", warmup=0.0, wd=0.0, epochs=10, length=2048,
                 chunk_bos=True, mode="pack"),
}
METHODS = {  # objective, alpha (retain), gamma (forget), objective settings
    "graddiff": ("grad_diff", 1.0, 1.0, {"retain": "nll"}),
    "npo": ("npo", 1.0, 1.0, {"retain": "nll", "beta": 0.1}),
    "simnpo": ("simnpo", 1.0, 0.125, {"retain": "nll", "beta": 4.5, "delta": 0.0}),
    "rmu": ("rmu", 1.0, 1.0, {"layer": 7, "steering": 2.0, "trainable": ".*"}),
}
COMBINERS = {"sum": ("weighted_sum", {}), "pcgrad": ("pcgrad", {"scope": "module"}), "sago": ("sago", {"agree": "forget"})}
ROWS = [(b, m, c) for b in EXPERIMENTS for m in METHODS for c in COMBINERS]


def test_the_files_are_exactly_the_grid():
    found = sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for b in EXPERIMENTS for p in (CONFIGS / b).glob("*"))
    assert found == sorted(f"{b}/{m}_{c}" for b, m, c in ROWS)


@pytest.mark.parametrize("bench, method, combiner", ROWS, ids=[f"{b}/{m}_{c}" for b, m, c in ROWS])
def test_values_are_open_unlearnings(bench, method, combiner):
    path = CONFIGS / bench / f"{method}_{combiner}.yaml"
    cfg = config.load_config(path, USER)
    e, (objective, alpha, gamma, settings), (name, extra) = EXPERIMENTS[bench], METHODS[method], COMBINERS[combiner]
    assert (cfg.batch_size, cfg.micro_batches, cfg.epochs, cfg.max_steps) == (e["batch"], e["micro"], e["epochs"], None)
    assert cfg.batch_size // cfg.micro_batches == 4  # per_device_train_batch_size 4 in both launch scripts
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay, cfg.optim.clip_norm) == (
        e["lr"], e["schedule"], e["warmup"], e["wd"], None)
    assert (cfg.data.max_length, cfg.data.chunk_bos, cfg.data.mode) == (e["length"], e["chunk_bos"], e["mode"])
    assert cfg.model.dtype == "bfloat16" and cfg.micro_batch_weighting == "uniform"
    assert cfg.objective.name == objective and cfg.objective.compat == "open_unlearning"
    for key, value in settings.items():
        assert getattr(cfg.objective, key) == value, key
    assert (cfg.combiner.name, cfg.combiner.alpha, cfg.combiner.gamma) == (name, alpha, gamma)
    for key, value in extra.items():
        assert getattr(cfg.combiner, key) == value, key
    assert cfg.output_dir == f"runs/{bench}/{method}_{combiner}"
    # TOFU's model is an instruct model: open-unlearning's chat template of Llama-3.2-1B-Instruct
    template = config.data_template(cfg)
    if bench == "tofu":
        assert template.apply_chat_template and template.system_prompt == "You are a helpful assistant."
        assert template.date_string == "10 Apr 2025"
    else:
        assert template is None  # MUSE trains on raw text (PretrainingDataset)
    with pytest.raises(config.ConfigError, match=r"data\.forget, data\.retain, model\.path"):
        config.load_config(path)  # the model and data are the user's


@pytest.mark.parametrize("bench, method, combiner", ROWS, ids=[f"{b}/{m}_{c}" for b, m, c in ROWS])
def test_headers_cite_open_unlearning(bench, method, combiner):
    text = (CONFIGS / bench / f"{method}_{combiner}.yaml").read_text()
    head = text[:text.index("output_dir:")]
    assert "locuslab/open-unlearning @d3d7cf9" in head
    assert f"configs/experiment/unlearn/{bench}/default.yaml: " in head
    assert f"scripts/{bench}_unlearn.sh: " in head
    assert f"configs/trainer/{dict(graddiff='GradDiff', npo='NPO', simnpo='SimNPO', rmu='RMU')[method]}.yaml: " in head
    assert ("NOT in open-unlearning" in head) == (combiner != "sum")


def test_reference_doc_lists_the_benchmark_configs():
    doc = (CONFIGS.parent / "docs" / "reference.md").read_text()
    assert "`configs/tofu/`" in doc and "`configs/muse/`" in doc
