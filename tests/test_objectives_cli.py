"""``jax-unlearn unlearn`` with a new objective: configs/objectives/idk_dpo_sago.yaml on a tiny
model, with its "I don't know" file; and the data errors (exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_fixtures import make_workspace

from jax_unlearn import cli, data

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "objectives" / "idk_dpo_sago.yaml"
IDK = ["I don't know.", "", "I have no idea about that.", "   ", "That is not something I can answer."]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("objcli"))
    qa = [{"question": "Where do anthrax spores survive?", "answer": "In soil, for decades."},
          {"question": "What is the capital of France?", "answer": "Paris"}] * 4
    (root / "forget_qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa) + "\n")
    (root / "idk.jsonl").write_text("\n".join(IDK) + "\n")  # TOFU's format: one response per line
    (root / "empty_idk.jsonl").write_text("\n  \n")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["unlearn", str(CONFIG), f"output_dir={out}", f"model.path={root / 'base'}", "model.dtype=float32",
            f"data.forget={root / 'forget_qa.jsonl'}", f"data.retain={root / 'retain.jsonl'}",
            f"data.idk={root / 'idk.jsonl'}", "data.max_length=48", "batch_size=8", "micro_batches=1",
            "max_steps=2", "save_every=2", "progress=false", "optim.lr=0.01", "optim.warmup_ratio=0", *extra]


def test_the_idk_dpo_config_runs_and_resumes_bit_identically(workspace, tmp_path, capsys):
    """The example config (IdkDPO + SAGO, reference log-probs of both answers precomputed) runs
    through the CLI; 2 steps straight equal 1 step, a restart and 1 more, bit for bit."""
    from flax import nnx

    from jax_unlearn.models import load_hf

    out, parts = tmp_path / "run", tmp_path / "parts"
    assert cli.main(_args(workspace, out)) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["forget_loss"]) and np.isfinite(r["retain_loss"]) for r in rows)
    assert rows[0]["forget_loss"] != rows[1]["forget_loss"]  # step 1 moved the model away from its reference
    saved = (out / "config.yaml").read_text()
    assert "name: idk_dpo" in saved and "reference: precompute" in saved
    fp = json.loads((out / "fingerprint.json").read_text())
    fp = fp.get("fingerprint", fp)
    assert fp["data.idk.file"].startswith("sha256:")  # a changed idk file is a different run
    assert cli.main(_args(workspace, parts, "max_steps=1", "save_every=1")) == 0
    assert cli.main(_args(workspace, parts, "save_every=1")) == 0
    assert "(resumed from step 1)" in capsys.readouterr().out
    straight, resumed, start = (nnx.state(load_hf(p), nnx.Param) for p in (out / "model", parts / "model",
                                                                          workspace / "base"))
    moved = False
    for a, b, s in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        moved |= not np.array_equal(np.asarray(a), np.asarray(s))
    assert moved  # control: the run trained


def test_idk_responses_are_read_and_drawn_per_row(workspace):
    responses = data.read_idk(workspace / "idk.jsonl")
    assert responses == [r for r in IDK if r.strip()]  # blank lines skipped, lines stripped
    a, b = data.idk_answers(50, responses, seed=0), data.idk_answers(50, responses, seed=1)
    assert a == data.idk_answers(50, responses, seed=0) and a != b and set(a) == set(responses)
    tok = data.load_tokenizer(workspace / "base")
    alt = data.load_alternates(workspace / "forget_qa.jsonl", tok, 48, idk=workspace / "idk.jsonl")
    forget = data.load_set(workspace / "forget_qa.jsonl", tok, 48)
    assert sorted(alt) == ["alt_attention_mask", "alt_input_ids", "alt_labels"]
    assert alt["alt_input_ids"].shape == forget["input_ids"].shape
    # the same prompt, another answer: the rows agree up to the answer, and the answers differ
    n_prompt = int(np.argmax(forget["labels"][0] != -100))
    np.testing.assert_array_equal(alt["alt_input_ids"][0, :n_prompt], forget["input_ids"][0, :n_prompt])
    assert not np.array_equal(alt["alt_labels"], forget["labels"])


@pytest.mark.parametrize("change, message", [
    (["data.idk={root}/nowhere.jsonl"], "nowhere.jsonl is not a file"),
    (["data.idk={root}/empty_idk.jsonl"], "empty_idk.jsonl holds no response"),
    (["data.idk=null"], "objective 'idk_dpo' needs 'data.idk'"),
    (["objective.name=npo"], "'data.idk' applies to objective 'idk_dpo' only, not 'npo'"),
    (["data.forget={root}/forget.jsonl"], "need a forget set of QA records"),
    (["objective.name=dpo", "data.idk=null"], "field 'alternate' is missing"),
])
def test_bad_idk_data_is_refused_before_anything_is_written(workspace, tmp_path, capsys, change, message):
    out = tmp_path / "run"
    assert cli.main(_args(workspace, out, *[c.format(root=workspace) for c in change])) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_dpo_without_alternates_is_refused_before_anything_is_written(tmp_path):
    from step_fixtures import make_batch, tiny_model

    from jax_unlearn import config, train

    rows = {k: np.asarray(v) for k, v in make_batch(1).items()}
    cfg = config.TrainConfig(output_dir=str(tmp_path / "run"), batch_size=8, max_steps=1, progress=False,
                             objective=config.ObjectiveConfig(name="idk_dpo"))
    with pytest.raises(config.ConfigError, match="'idk_dpo' needs the forget set's alternate answers.*data.idk"):
        train.unlearn(tiny_model(), rows, rows, cfg)
    assert not (tmp_path / "run").exists()
