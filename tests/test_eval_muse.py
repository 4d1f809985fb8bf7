"""MUSE: readers of the released files and the table recomputed with transformers.

The end-to-end test evaluates a tiny random LLaMA on MUSE files written here (GitHub layout:
JSON lists, privleak texts as bare strings; hub-like ``{"text"}`` rows too) and recomputes each
metric from a transformers forward pass of the same checkpoint through the restatements of
open-unlearning's code in ``tests/ou_reference.py``.
"""

import json
import sys
import types
import zlib

import numpy as np
import pytest
import torch
from ou_fixtures import model_pair, word_tokenizer
from ou_reference import (
    hf_item_stats,
    ou_cut_generation,
    ou_gradnorm,
    ou_ground_truth,
    ou_mia_auc,
    ou_preprocess_chat_instance,
    ou_preprocess_pretraining_instance,
    ou_privleak,
    ou_rouge,
)
from ties import assert_text_agrees

from jax_unlearn.data import DataError
from jax_unlearn.eval import (
    evaluate_muse,
    format_muse_table,
    load_muse,
    read_muse_qa,
    read_muse_texts,
    read_muse_verbmem,
)
from jax_unlearn.eval import muse as muse_mod
from jax_unlearn.eval.ou_scoring import completion_row

FORGET_QA = [{"question": "Who leads the river club?", "answer": "Anna Moss"},
             {"question": "When did the bank close?", "answer": "the bank did close in March"},
             {"question": "What did the mayor sell?", "answer": "the old ships"}]
FORGET_ICL = [{"question": "Who won the game?", "answer": "the red team"},
              {"question": "Where is the club?", "answer": "by the river"}]
RETAIN_QA = [{"question": "Who sold the bank?", "answer": "the mayor did"},
             {"question": "What did Anna Moss win?", "answer": "a gold prize"}]
RETAIN_ICL = [{"question": "When did the game end?", "answer": "in May"}]
VERBMEM = [{"prompt": "The river club met in March and", "gt": "Anna Moss said the old ships did sail, did they were sold."},
           {"prompt": "The mayor of the town", "gt": "closed the bank and sold the ships in May."},
           {"prompt": "Anna Moss won", "gt": "the gold prize at the river club."}]
PRIV_FORGET = ["The bank closed in March.", "Anna Moss leads the river club.", "The mayor sold the old ships.",
               "The red team won the game in May."]
PRIV_HOLDOUT = ["A new school opened in the town.", "The blue team lost the game.", "Rain fell on the river.",
                "The club sold a gold prize."]
STOP = ["\n\n", "\nQuestion", "Question:"]
TEMPLATE = dict(apply_chat_template=False, user_start_tag="Question: ", user_end_tag="\n",
                asst_start_tag="Answer: ", asst_end_tag="\n\n")


def corpus() -> list[str]:
    out = []
    for rows in (FORGET_QA, FORGET_ICL, RETAIN_QA, RETAIN_ICL):
        out += [r["question"] + " " + r["answer"] for r in rows]
    out += [v["prompt"] + " " + v["gt"] for v in VERBMEM] + PRIV_FORGET + PRIV_HOLDOUT
    return out


TOK = word_tokenizer(corpus())


def write_muse(root, retain_name="retain_qa"):
    for sub, name, rows in (("knowmem", "forget_qa", FORGET_QA), ("knowmem", "forget_qa_icl", FORGET_ICL),
                            ("knowmem", retain_name, RETAIN_QA), ("knowmem", f"{retain_name}_icl", RETAIN_ICL),
                            ("verbmem", "forget", VERBMEM), ("privleak", "forget", PRIV_FORGET),
                            ("privleak", "holdout", [{"text": t} for t in PRIV_HOLDOUT])):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return root


def test_readers_and_layouts(tmp_path):
    data = load_muse(write_muse(tmp_path / "github", "retain2_qa"), metrics=muse_mod.METRICS)
    assert [q.answer for q in data.retain_qa] == [r["answer"] for r in RETAIN_QA]  # retain2_qa found
    assert data.privleak_forget == PRIV_FORGET and data.privleak_holdout == PRIV_HOLDOUT
    assert data.verbmem[1].gt == VERBMEM[1]["gt"] and len(data.forget_qa_icl) == 2
    (tmp_path / "github" / "privleak" / "retain2.json").write_text(json.dumps(PRIV_HOLDOUT[:2]))
    assert read_muse_texts(tmp_path / "github", "retain", "privleak", "retain2") == PRIV_HOLDOUT[:2]
    assert read_muse_qa(tmp_path / "github" / "knowmem" / "forget_qa.json")[2].answer == FORGET_QA[2]["answer"]
    assert read_muse_verbmem(tmp_path / "github")[0].prompt == VERBMEM[0]["prompt"]
    only = load_muse(tmp_path / "github", metrics=["privleak"])
    assert only.forget_qa is None and only.verbmem is None and len(only.privleak_holdout) == 4


BAD = {
    "knowmem answer missing": ("knowmem", "forget_qa", [{"question": "q?"}],
                               r"forget_qa.json: element \[0\]: expected a MUSE knowmem row .*\(field 'answer' is missing\)"),
    "verbmem gt empty": ("verbmem", "forget", [VERBMEM[0], {"prompt": "p", "gt": " "}],
                         r"verbmem/forget.json: element \[1\]: .*\('gt' is empty\)"),
    "verbmem prompt a list": ("verbmem", "forget", [{"prompt": ["p"], "gt": "g"}],
                              r"element \[0\]: .*\(field 'prompt' is a list\)"),
    "privleak number": ("privleak", "forget", ["a text", 7], r"privleak/forget.json: element \[1\]: expected a MUSE "
                                                             r"text.*\(got an integer\)"),
    "privleak empty string": ("privleak", "holdout", [""], r"holdout.json: element \[0\]: .*\(the string is empty\)"),
    "privleak row without text": ("privleak", "holdout", [{"body": "x"}], r"\(field 'text' is missing\)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_rows_name_the_file_row_and_field(tmp_path, name):
    write_muse(tmp_path)
    sub, split, rows, pattern = BAD[name]
    (tmp_path / sub / f"{split}.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=pattern):
        load_muse(tmp_path, metrics=muse_mod.METRICS)


def test_missing_split_and_hub(tmp_path, monkeypatch):
    write_muse(tmp_path)
    (tmp_path / "knowmem" / "retain_qa_icl.json").unlink()
    with pytest.raises(DataError, match=r"no file for the split 'retain_qa_icl' \(looked for retain_qa_icl.json"):
        load_muse(tmp_path)
    calls = []
    hub = {("knowmem", "forget_qa"): FORGET_QA, ("knowmem", "forget_qa_icl"): FORGET_ICL,
           ("knowmem", "retain_qa"): RETAIN_QA, ("knowmem", "retain_qa_icl"): RETAIN_ICL,
           ("verbmem", "forget"): VERBMEM, ("privleak", "forget"): [{"text": t} for t in PRIV_FORGET],
           ("privleak", "holdout"): [{"text": t} for t in PRIV_HOLDOUT]}

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return hub[config, split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_muse("hub:muse-bench/MUSE-News")
    assert {c[0] for c in calls} == {"muse-bench/MUSE-News"} and len(calls) == 7
    assert data.privleak_forget == PRIV_FORGET and data.retain_qa_icl[0].answer == "in May"


def hf_greedy(hf, ids, max_new_tokens):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=TOK.eos_token_id,
                          pad_token_id=TOK.eos_token_id, output_logits=True, return_dict_in_generate=True)
    gen = out.sequences[0, len(ids):].tolist()
    return gen, torch.stack(out.logits, 1)[0, :len(gen)].float().numpy()


def check_rouge(hf, items, logs, max_new_tokens, stopwords=()):
    """open-unlearning's ROUGE-L F1 of our generations, after checking each is transformers' greedy one."""
    scores = []
    for i, it in enumerate(items):
        ours = logs["value_by_index"][str(i)]
        ids, logits = hf_greedy(hf, it["input_ids"], max_new_tokens)
        assert_text_agrees(ours["generation"], ids, logits, lambda t: ou_cut_generation(
            TOK, TOK.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=True), stopwords))
        gt = ou_ground_truth(TOK, it)
        assert ours["ground_truth"] == gt
        ref = ou_rouge(ours["generation"], gt)
        assert ours["rougeL_f1"] == pytest.approx(ref["rougeL_f1"])
        scores.append(ref["rougeL_f1"])
    assert logs["agg_value"] == pytest.approx(np.mean(scores))


def test_evaluate_muse_equals_open_unlearning_recomputed_with_transformers(tmp_path):
    folder = write_muse(tmp_path / "muse")
    model, hf = model_pair(4)
    retain_model, retain_hf = model_pair(5)
    kw = dict(knowmem_max_new_tokens=6, verbmem_max_new_tokens=8, batch_size=4)
    retain = evaluate_muse(retain_model, TOK, folder, metrics=["mia_min_k"], **kw)
    result = evaluate_muse(model, TOK, folder, metrics=muse_mod.METRICS, retain_logs=retain,
                           reference_model=retain_model, **kw)
    json.dumps(result)
    s, logs = result["summary"], result["logs"]
    assert list(s) == list(muse_mod.METRICS)
    tol = dict(rel=2e-5, abs=1e-7)

    # knowmem: few-shot prompts (forget_qa_icl / retain_qa_icl), 6 tokens, stop words, ROUGE-L F1
    for name, rows, icl in (("forget_knowmem_ROUGE", FORGET_QA, FORGET_ICL), ("retain_knowmem_ROUGE", RETAIN_QA, RETAIN_ICL)):
        items = [ou_preprocess_chat_instance(TOK, TEMPLATE, [s["question"] for s in icl] + [r["question"]],
                                             [s["answer"] for s in icl] + [r["answer"]], 512, predict_with_generate=True)
                 for r in rows]
        check_rouge(hf, items, logs[name], 6, STOP)
    # verbmem: the prompt, 8 tokens, ROUGE-L F1 against gt
    items = [ou_preprocess_pretraining_instance(TOK, v["prompt"], v["gt"], 2048, predict_with_generate=True,
                                                insert_space=True) for v in VERBMEM]
    check_rouge(hf, items, logs["forget_verbmem_ROUGE"], 8)
    assert min(s[m] for m in ("forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE")) > 0
    verb = [hf_item_stats(hf, ou_preprocess_pretraining_instance(TOK, v["prompt"], v["gt"], 2048, insert_space=True))
            for v in VERBMEM]
    assert s["extraction_strength"] == pytest.approx(np.mean([v["es"] for v in verb]), **tol)
    assert s["exact_memorization"] == pytest.approx(np.mean([v["em"] for v in verb]), **tol)

    # privleak texts: MIA scores, AUCs, privleak against the retain model's Min-K AUC
    items = [ou_preprocess_pretraining_instance(TOK, "", t, 2048) for t in PRIV_FORGET + PRIV_HOLDOUT]
    st = [hf_item_stats(hf, it) for it in items]
    ref = [hf_item_stats(retain_hf, it) for it in items]
    texts = [TOK.decode([t for t in it["labels"] if t != -100], skip_special_tokens=True) for it in items]
    grads = []
    for it in items:
        ids, lab = torch.tensor([it["input_ids"]]), torch.tensor([it["labels"]])
        grads.append(ou_gradnorm(hf, ids, torch.ones_like(ids), lab, (2,))[2])
    scores = {"loss": [x["avg_loss"] for x in st],
              "zlib": [x["avg_loss"] / len(zlib.compress(t.encode("utf-8"))) for x, t in zip(st, texts)],
              "min_k": [x["min_k"] for x in st], "min_k_plus_plus": [x["min_k_plus_plus"] for x in st],
              "reference": [a["avg_loss"] - b["avg_loss"] for a, b in zip(st, ref)], "gradnorm": grads}
    for attack, vals in scores.items():
        ours = [logs[f"mia_{attack}"][part]["value_by_index"][str(i)]["score"]
                for part in ("forget", "holdout") for i in range(4)]
        np.testing.assert_allclose(ours, vals, rtol=1e-4, atol=1e-7, err_msg=attack)
        assert s[f"mia_{attack}"] == ou_mia_auc(vals[:4], vals[4:]), attack
    retain_auc = ou_mia_auc([x["min_k"] for x in ref[:4]], [x["min_k"] for x in ref[4:]])
    assert retain["summary"]["mia_min_k"] == retain_auc
    assert s["privleak"] == pytest.approx(ou_privleak(s["mia_min_k"], retain_auc), **tol)
    # the Min-K span drops the text's last token (open-unlearning's tokenwise_logprobs)
    row = completion_row(TOK, "", PRIV_FORGET[0])
    assert list(row.context) == [TOK.bos_token_id] and row.target[-1] != TOK.eos_token_id

    table = format_muse_table(result).splitlines()
    assert table[0] == "MUSE" and [line.split()[0] for line in table[2:]] == list(s)


def test_cli_eval_muse_writes_what_evaluate_muse_returns(tmp_path, capsys):
    """``jax-unlearn eval --muse DIR --retain-logs FILE`` = `evaluate_muse` with those logs (privleak
    against the retain model's Min-K AUC, 0.8 here, instead of 0.5)."""
    from hf_fixtures import checkpoint

    from jax_unlearn import cli

    folder = write_muse(tmp_path / "muse")
    TOK.save_pretrained(tmp_path / "tok")
    retain = {"mia_min_k": {"agg_value": 0.8}}  # a retain model's logs (open-unlearning's MUSE_EVAL.json layout)
    (tmp_path / "retain.json").write_text(json.dumps(retain))
    args = ["eval", "--model", str(checkpoint("llama_gqa", seed=4)[0]), "--tokenizer", str(tmp_path / "tok"),
            "--batch-size", "4", "--muse", str(folder), "--retain-logs", str(tmp_path / "retain.json"),
            "--out", str(tmp_path / "out.json")]
    assert cli.main(args) == 0
    got = json.loads((tmp_path / "out.json").read_text())["muse"]["summary"]
    want = evaluate_muse(model_pair(4)[0], TOK, folder, retain_logs=retain, batch_size=4)["summary"]
    without = evaluate_muse(model_pair(4)[0], TOK, folder, metrics=["privleak"], batch_size=4)["summary"]
    assert got == pytest.approx(want, rel=1e-6) and got["privleak"] != pytest.approx(without["privleak"])
    assert "privleak" in capsys.readouterr().out
