"""The application layer (`jax_unlearn.run`): `prepare` loads and checks everything and writes
nothing; `execute` trains, evaluates (with few-shot examples), exports; `--restart` chooses a
new sub-folder; `export` writes the newest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jax_unlearn import config, run, train


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from cli_fixtures import make_workspace

    root = make_workspace(tmp_path_factory.mktemp("run"))
    write = lambda name, rows: (root / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write("dev.jsonl", [{"question": "Which is a colour?", "choices": ["red", "dog"], "answer": 0, "subject": "biology"},
                        {"question": "Which is a number?", "choices": ["cat", "two"], "answer": 1}])
    return root


def _cfg(ws: Path, out: Path, *more: str) -> config.RunConfig:
    return config.load_config(ws / "run.yaml", [f"output_dir={out}", *more])


FEWSHOT = lambda ws: [f"eval.mc=[{ws / 'mc.jsonl'}]", "eval.num_fewshot=1", f"eval.fewshot={ws / 'dev.jsonl'}",
                      "eval.every=2"]


@pytest.fixture(scope="module")
def finished(ws, tmp_path_factory):
    """``(prepared, result)`` of a run with few-shot evaluations every 2 steps; `prepare` wrote nothing."""
    out = tmp_path_factory.mktemp("finished") / "out"
    prepared = run.prepare(_cfg(ws, out, *FEWSHOT(ws)))
    assert not out.exists()  # validated and loaded: nothing written
    return prepared, run.execute(prepared)


def test_prepare_writes_nothing_and_execute_runs_evaluates_with_fewshot_and_exports(ws, finished):
    from jax_unlearn.eval import evaluate_multiple_choice
    from jax_unlearn.models import load_hf

    prepared, result = finished
    out = Path(prepared.cfg.output_dir)
    assert prepared.total_steps == 3 and prepared.resume.newest_step is None and prepared.restarted is None
    assert prepared.forget["input_ids"].shape[1] == 16 and prepared.suite.num_fewshot == 1  # packed 16-token rows
    assert result.steps_done == 3 and result.export_dir == out / "model"
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "fingerprint.json", "metrics.jsonl", "checkpoints",
                                               "model", "eval.json"}
    # the evaluation used the few-shot examples: the same accuracy as the evaluator given them
    tok = prepared.tokenizer
    items = [json.loads(line) for line in (ws / "mc.jsonl").read_text().splitlines()]
    shots = [json.loads(line) for line in (ws / "dev.jsonl").read_text().splitlines()]
    want = evaluate_multiple_choice(load_hf(out / "model"), tok, items, num_fewshot=1, fewshot=shots)
    key = str(ws / "mc.jsonl")
    assert result.evaluation["multiple_choice"][key]["accuracy"] == pytest.approx(float(want.accuracy))
    assert json.loads((out / "eval.json").read_text())["multiple_choice"][key] == result.evaluation["multiple_choice"][key]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/mc/mc/accuracy" in r] == [0, 2, 3]


def test_restart_chooses_a_new_sub_folder_and_prepare_still_writes_nothing(ws, finished):
    out = Path(finished[0].cfg.output_dir)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    other = _cfg(ws, out, *FEWSHOT(ws), "seed=1")
    with pytest.raises(train.ResumeError, match=r"(?s)seed: 0 -> 1.*--restart"):
        run.prepare(other)
    prepared = run.prepare(other, restart=True)
    assert prepared.restarted == out and Path(prepared.cfg.output_dir) == out / "restart-1"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written yet
    assert run.execute(prepared).steps_done == 3 and (out / "restart-1" / "model").is_dir()
    # the same run again resumes into the sub-folder that holds it
    assert Path(run.prepare(other, restart=True).cfg.output_dir) == out / "restart-1"


def test_export_writes_the_newest_checkpoint(finished, tmp_path):
    from jax_unlearn.models import load_hf

    out, result = Path(finished[0].cfg.output_dir), finished[1]
    done = run.export(out, tmp_path / "exported")
    assert done.step == 3 and done.model_dir == tmp_path / "exported" and not done.merged
    a, b = load_hf(tmp_path / "exported"), load_hf(result.export_dir)
    ids = np.arange(8)[None] % a.config.vocab_size
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
    with pytest.raises(config.ConfigError, match="is not empty; pass --overwrite"):
        run.export(out, tmp_path / "exported")


def test_data_template_makes_open_unlearnings_qa_rows(ws, tmp_path):
    """``data.template`` (open-unlearning's template_args) tokenises the QA set as its QADataset
    does (`preprocess_chat_instance`, restated in ou_reference.py), right-padded; without it the
    rows differ (control); an unknown template field is refused naming the key."""
    import yaml
    from ou_reference import ou_preprocess_chat_instance

    template = {"user_start_tag": "Q: ", "user_end_tag": "\n", "asst_start_tag": "A: ", "asst_end_tag": "\n\n",
                "system_prompt_with_special_tokens": "Answer briefly.\n"}
    spec = yaml.safe_load((ws / "run.yaml").read_text())
    spec["data"]["template"] = template
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    cfg = config.load_config(tmp_path / "t.yaml", [f"output_dir={tmp_path / 'out'}", "data.max_length=48", "batch_size=4", "mesh.tensor=2"])
    prepared = run.prepare(cfg)
    tok, L = prepared.tokenizer, cfg.data.max_length
    pairs = [json.loads(line) for line in (ws / "retain.jsonl").read_text().splitlines()]
    cfg_ou = {"apply_chat_template": False, **template}
    for i, p in enumerate(pairs):
        ref = ou_preprocess_chat_instance(tok, cfg_ou, [p["question"]], [p["answer"]], L)
        n = len(ref["input_ids"])
        assert n <= L and prepared.retain["input_ids"][i, :n].tolist() == ref["input_ids"]
        assert prepared.retain["labels"][i, :n].tolist() == ref["labels"]
        assert (prepared.retain["labels"][i, n:] == -100).all() and prepared.retain["attention_mask"][i].sum() == n
    plain = run.prepare(config.load_config(ws / "run.yaml", [f"output_dir={tmp_path / 'out'}", "data.max_length=48", "batch_size=4", "mesh.tensor=2"]))
    assert plain.retain["input_ids"].tolist() != prepared.retain["input_ids"].tolist()
    spec["data"]["template"] = {"user_start": "Q: "}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(config.ConfigError, match=r"'data\.template\.user_start' is not a template field"):
        config.load_config(tmp_path / "bad.yaml", [f"output_dir={tmp_path / 'out'}"])
