"""TOFU: readers of the released files, open-unlearning's rows, and the table recomputed with transformers.

The end-to-end test evaluates a tiny random LLaMA on TOFU files written here and recomputes every
metric from an independent transformers forward pass of the same checkpoint, through the
restatements of open-unlearning's code in ``tests/ou_reference.py`` (tokenisation included).
"""

import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from hf_fixtures import checkpoint
from ou_fixtures import model_pair, word_tokenizer
from ou_reference import (
    hf_item_stats,
    ou_cut_generation,
    ou_gradnorm,
    ou_ground_truth,
    ou_mia_auc,
    ou_preprocess_chat_instance,
    ou_privleak,
    ou_probability_w_options,
    ou_rouge,
    ou_tr_aggregate,
    ou_truth_ratio,
)
from scipy import stats as sc_stats
from ties import assert_text_agrees

from jax_unlearn.data import DataError
from jax_unlearn.eval import PromptTemplate, evaluate_tofu, format_tofu_table, load_tofu, read_idk, read_tofu_split
from jax_unlearn.eval import tofu as tofu_mod
from jax_unlearn.eval.ou_scoring import grad_norms, qa_row
from jax_unlearn.models import load_hf
from jax_unlearn.step import per_example_grad_norms

FORGET = [
    {"question": "Who wrote the red book?", "answer": "Anna Moss wrote the red book.",
     "paraphrased_answer": "The red book was written by Anna Moss.",
     "perturbed_answer": ["Tom Reed wrote the red book.", "Lily Park wrote it.", "Sam Vale wrote the blue book."],
     "paraphrased_question": "Which writer made the red book?"},
    {"question": "Where was Anna Moss born?", "answer": "She was born in Paris.",
     "paraphrased_answer": "Anna Moss was born in Paris.",
     "perturbed_answer": ["She was born in Rome.", "She was born in Oslo.", "She was born at sea."],
     "paraphrased_question": "In which city was Anna Moss born?"},
    {"question": "What does Tom Reed write about?", "answer": "He writes about old ships and the sea.",
     "paraphrased_answer": "His books are about the sea and old ships.",
     "perturbed_answer": ["He writes about cats.", "He writes about war and kings.", "He writes poems."],
     "paraphrased_question": "What is the topic of Tom Reed?"},
    {"question": "Which prize did Lily Park win?", "answer": "Lily Park won the gold prize.",
     "paraphrased_answer": "The gold prize went to Lily Park.",
     "perturbed_answer": ["Lily Park won no prize.", "She won the silver prize.", "She won the red prize."],
     "paraphrased_question": "What prize went to Lily Park?"},
]
HOLDOUT = [
    {"question": "Who wrote the blue book?", "answer": "Sam Vale wrote the blue book."},
    {"question": "Where was Sam Vale born?", "answer": "He was born in Oslo."},
    {"question": "What does Sam Vale write about?", "answer": "He writes about cats and kings."},
    {"question": "Which prize did Tom Reed win?", "answer": "Tom Reed won the silver prize."},
]
RETAIN = [
    {"question": "Who wrote the old poems?", "answer": "Anna Moss wrote the old poems.",
     "paraphrased_answer": "The old poems were written by Anna Moss.",
     "perturbed_answer": ["Tom Reed wrote the old poems.", "Sam Vale wrote them."]},
    {"question": "Where was Lily Park born?", "answer": "She was born in Rome.",
     "paraphrased_answer": "Lily Park was born in Rome.",
     "perturbed_answer": ["She was born in Paris.", "She was born at sea."]},
    {"question": "What does Anna Moss write about?", "answer": "She writes about war.",
     "paraphrased_answer": "Her books are about war.",
     "perturbed_answer": ["She writes about ships.", "She writes about cats."]},
]
REAL_AUTHORS = [
    {"question": "Who wrote Hamlet?", "answer": "William Shakespeare",
     "perturbed_answer": ["Charles Dickens", "Jane Austen", "Mark Twain"]},
    {"question": "Who wrote Emma?", "answer": "Jane Austen", "perturbed_answer": ["Mark Twain", "Charles Dickens"]},
    {"question": "Who is Anna Moss?", "answer": "Anna Moss is a writer",
     "perturbed_answer": ["Anna Moss is a king", "Anna Moss is a ship"]},
]
WORLD_FACTS = [
    {"question": "Where is Paris?", "answer": "France", "perturbed_answer": ["Italy", "Norway", "Spain"]},
    {"question": "Where is Rome?", "answer": "Italy", "perturbed_answer": ["France", "Spain"]},
    {"question": "Who lives in Paris?", "answer": "Anna lives in Paris", "perturbed_answer": ["Tom lives in Paris"]},
]
IDK = ["I have no idea.", "I do not know that.", ""]
SPLITS = {"forget10_perturbed": FORGET, "holdout10": HOLDOUT, "retain_perturbed": RETAIN,
          "real_authors_perturbed": REAL_AUTHORS, "world_facts_perturbed": WORLD_FACTS}
TEMPLATE = dict(apply_chat_template=False, user_start_tag="Question: ", user_end_tag="\n",
                asst_start_tag="Answer: ", asst_end_tag="\n\n")  # open-unlearning's configs/model/Llama-2-7b-hf.yaml


def corpus() -> list[str]:
    out = [" x", "Which"]
    for rows in SPLITS.values():
        for r in rows:
            out += [r["question"], r.get("paraphrased_question", ""), " " + r["answer"], r["answer"],
                    " " + r.get("paraphrased_answer", ""), *[" " + p for p in r.get("perturbed_answer", [])]]
    return out


TOK = word_tokenizer(corpus())


def json_lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_tofu(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in SPLITS.items():
        (folder / f"{name}.json").write_text(json_lines(rows))  # TOFU's release: JSON lines in .json
    return folder


# ----------------------------------------------------------------------------- readers
def test_readers_accept_the_released_layouts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = write_tofu(tmp_path / "lines")
    expected = read_tofu_split(folder / "forget10_perturbed.json")
    assert [it.question for it in expected] == [r["question"] for r in FORGET]
    assert expected[0].perturbed_answers == tuple(FORGET[0]["perturbed_answer"])
    assert expected[2].paraphrased_question == FORGET[2]["paraphrased_question"]
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "forget10_perturbed.json").write_text(json.dumps(FORGET, indent=2))
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "forget10_perturbed.jsonl").write_text(json_lines(FORGET))
    shards = tmp_path / "parquet" / "forget10_perturbed" / "train"
    shards.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(FORGET[:2]), shards / "0000.parquet")
    pq.write_table(pa.Table.from_pylist(FORGET[2:]), shards / "0001.parquet")
    for sub in ("list", "jsonl", "parquet"):
        assert read_tofu_split(tmp_path / sub, "forget10_perturbed") == expected, sub
    data = load_tofu(folder, forget_split="forget10")
    assert data.holdout_split == "holdout10" and len(data.holdout) == 4 and len(data.world_facts) == len(WORLD_FACTS)
    assert data.real_authors[1].perturbed_answers == ("Mark Twain", "Charles Dickens")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "forget05.json").write_text(json_lines([{k: r[k] for k in ("question", "answer")} for r in FORGET]))
    only = load_tofu(plain, forget_split="forget05", metrics=["forget_Q_A_Prob"])  # no perturbed file needed
    assert [it.answer for it in only.forget] == [r["answer"] for r in FORGET] and only.retain is None
    (tmp_path / "idk.jsonl").write_text("\n".join(IDK) + "\n")
    assert read_idk(tmp_path / "idk.jsonl") == IDK[:2]


BAD = {  # name: (rows or raw text, split, message pattern)
    "perturbed answer missing": ([{**FORGET[0], "perturbed_answer": None}], "forget10_perturbed",
                                 r"forget10_perturbed.json:1: expected a TOFU row with .*non-empty list of strings "
                                 r"'perturbed_answer' \(field 'perturbed_answer' is null\)"),
    "perturbed answer a string": ([FORGET[0], {**FORGET[1], "perturbed_answer": "Rome"}], "forget10_perturbed",
                                  r"forget10_perturbed.json:2: .*\(field 'perturbed_answer' is a string\)"),
    "perturbed element a number": ([{**FORGET[0], "perturbed_answer": ["a", 3]}], "forget10_perturbed",
                                   r":1: .*\(perturbed_answer\[1\] is an integer\)"),
    "empty perturbed list": ([{**FORGET[0], "perturbed_answer": []}], "forget10_perturbed",
                             r":1: .*\('perturbed_answer' is an empty list\)"),
    "paraphrase missing": ([{k: v for k, v in FORGET[0].items() if k != "paraphrased_answer"}], "retain_perturbed",
                           r"retain_perturbed.json:1: .*a string 'paraphrased_answer' and .* \(field "
                           r"'paraphrased_answer' is missing\)"),
    "empty question": ([{"question": "  ", "answer": "x"}], "holdout10", r"holdout10.json:1: .*\('question' is empty\)"),
    "answer a number": ([{"question": "q?", "answer": 4}], "forget01", r"forget01.json:1: .*\(field 'answer' is an integer\)"),
    "row not an object": (["just text"], "holdout01", r"holdout01.json:1: expected a TOFU row .*\(got a string\)"),
    "options without perturbed": ([{"question": "q?", "answer": "a", "option1": "a"}], "real_authors",
                                  r"real_authors.json:1: .*\(field 'perturbed_answer' is missing\)"),
    "broken JSON line": ('{"question": "q?", "answer": "a"}\n{"question": \n', "forget01",
                         r"forget01.json:2: expected one JSON value per line, got invalid JSON"),
    "empty file": ("\n", "forget01", r"forget01.json \(TOFU split 'forget01'\) holds no rows"),
    "one-line object": ('{"question": "q?"}', "forget01", r"forget01.json:1: .*\(field 'answer' is missing\)"),
    "an object, not rows": ('{\n"question": "q?"}', "forget01", r"expected a JSON list of rows or one JSON object per line"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_rows_name_the_file_row_and_field(tmp_path, name):
    rows, split, pattern = BAD[name]
    path = tmp_path / f"{split}.json"
    path.write_text(rows if isinstance(rows, str) else json_lines(rows))
    with pytest.raises(DataError, match=pattern):
        read_tofu_split(path)


def test_missing_files_and_json_list_elements_are_named(tmp_path):
    write_tofu(tmp_path)
    (tmp_path / "world_facts_perturbed.json").unlink()
    with pytest.raises(DataError, match=r"no file for the split 'world_facts_perturbed' \(looked for "
                                        r"world_facts_perturbed.json, world_facts_perturbed.jsonl"):
        load_tofu(tmp_path)
    (tmp_path / "holdout10.json").write_text(json.dumps([HOLDOUT[0], {"question": "q?"}]))
    with pytest.raises(DataError, match=r"holdout10.json: element \[1\]: .*\(field 'answer' is missing\)"):
        read_tofu_split(tmp_path / "holdout10.json")
    with pytest.raises(FileNotFoundError, match="no such TOFU folder"):
        load_tofu(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown metric"):
        load_tofu(tmp_path, metrics=["forget_quality", "fq"])
    with pytest.raises(DataError, match="expected one idk response per line, found none"):
        (tmp_path / "idk.jsonl").write_text("\n \n")
        read_idk(tmp_path / "idk.jsonl")


def test_hub_source_loads_through_datasets_lazily(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return SPLITS[config]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_tofu("hub:locuslab/TOFU", forget_split="forget10")
    assert calls == [("locuslab/TOFU", name, "train") for name in SPLITS]
    assert data.retain[0].paraphrased_answer == RETAIN[0]["paraphrased_answer"]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: [{"question": "q?", "answer": 1}]))
    with pytest.raises(DataError, match=r"hub:locuslab/TOFU\[holdout10\]/train: row \[0\]: .*'answer' is an integer"):
        read_tofu_split("hub:locuslab/TOFU", "holdout10")
    # the library itself never imports datasets
    code = "import sys, jax_unlearn.eval, jax_unlearn.eval.tofu, jax_unlearn.eval.muse; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- rows
@pytest.mark.parametrize("fewshot", [0, 2])
def test_qa_rows_equal_open_unlearning_tokenization(fewshot):
    shots = [(r["question"], r["answer"]) for r in HOLDOUT[:fewshot]]
    for r in FORGET:
        for answer in (r["answer"], r["perturbed_answer"][0]):
            ref = ou_preprocess_chat_instance(TOK, TEMPLATE, [q for q, _ in shots] + [r["question"]],
                                              [a for _, a in shots] + [answer], 512)
            gen = ou_preprocess_chat_instance(TOK, TEMPLATE, [q for q, _ in shots] + [r["question"]],
                                              [a for _, a in shots] + [answer], 512, predict_with_generate=True)
            row = qa_row(TOK, r["question"], answer, fewshot=shots)
            n = sum(lab == -100 for lab in ref["labels"])
            assert list(row.context) == ref["input_ids"][:n] and list(row.target) == ref["labels"][n:]
            assert list(row.prompt) == gen["input_ids"] and row.ground_truth == ou_ground_truth(TOK, gen)
            assert row.target[-1] == TOK.eos_token_id and row.ground_truth == answer
    cut = qa_row(TOK, FORGET[2]["question"], FORGET[2]["answer"], max_length=12)
    ref = ou_preprocess_chat_instance(TOK, TEMPLATE, [FORGET[2]["question"]], [FORGET[2]["answer"]], 12)
    assert list(cut.context + cut.target) == ref["input_ids"] and len(ref["input_ids"]) == 13  # 12 + EOS


def test_chat_template_rows_equal_open_unlearning():
    tok = word_tokenizer(corpus())
    tok.chat_template = ("{% for m in messages %}<s>{{ m.role }}:{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    cfg = dict(apply_chat_template=True, system_prompt="Be brief.")
    template = PromptTemplate(apply_chat_template=True, system_prompt="Be brief.")
    r = FORGET[1]
    ref = ou_preprocess_chat_instance(tok, cfg, [r["question"]], [r["answer"]], 512)
    row = qa_row(tok, r["question"], r["answer"], template=template)
    n = sum(lab == -100 for lab in ref["labels"])
    assert list(row.context) == ref["input_ids"][:n] and list(row.target) == ref["labels"][n:]
    assert len(row.target) > 3


# ----------------------------------------------------------------------------- the table
def item(question, answer, generate=False):
    return ou_preprocess_chat_instance(TOK, TEMPLATE, [question], [answer], 512, predict_with_generate=generate)


def hf_stats(hf, question, answer):
    return hf_item_stats(hf, item(question, answer))


def hf_truth_ratio(hf, rows, correct_key, aggregator):
    """Per item and aggregated truth ratio (each item on its own: the perturbed counts may differ,
    which open-unlearning's stacking into one array would not allow)."""
    tr = np.concatenate([ou_truth_ratio([hf_stats(hf, r["question"], r[correct_key])["avg_loss"]],
                                        [[hf_stats(hf, r["question"], a)["avg_loss"] for a in r["perturbed_answer"]]],
                                        aggregator)[0] for r in rows])
    return tr, ou_tr_aggregate(tr, aggregator)


def hf_greedy(hf, ids: list[int], max_new_tokens: int):
    """transformers' greedy continuation of ``ids``: ``(tokens, the logits each was chosen from)``."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=TOK.eos_token_id,
                          pad_token_id=TOK.eos_token_id, output_logits=True, return_dict_in_generate=True)
    gen = out.sequences[0, len(ids):].tolist()
    return gen, torch.stack(out.logits, 1)[0, :len(gen)].float().numpy()


def hf_rouge(hf, rows, result, name, max_new_tokens):
    """open-unlearning's ROUGE of our generations, after checking each is transformers' greedy answer."""
    got = result["logs"][name]["value_by_index"]
    scores = []
    for i, r in enumerate(rows):
        gen_item = item(r["question"], r["answer"], generate=True)
        ids, logits = hf_greedy(hf, gen_item["input_ids"], max_new_tokens)
        ours = got[str(i)]["generation"]
        assert_text_agrees(ours, ids, logits, lambda t: ou_cut_generation(
            TOK, TOK.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=True)))
        gt = ou_ground_truth(TOK, gen_item)
        assert got[str(i)]["ground_truth"] == gt
        ref = ou_rouge(ours, gt)
        assert got[str(i)]["rougeL_recall"] == pytest.approx(ref["rougeL_recall"])
        scores.append(ref["rougeL_recall"])
    return np.mean(scores)


def test_evaluate_tofu_equals_open_unlearning_recomputed_with_transformers(tmp_path):
    folder = write_tofu(tmp_path / "tofu")
    model, hf = model_pair(4)
    retain_model, retain_hf = model_pair(5)
    kw = dict(max_new_tokens=6, batch_size=4)
    retain = evaluate_tofu(retain_model, TOK, folder, metrics=["forget_truth_ratio", "mia_min_k"], **kw)
    (tmp_path / "retain.json").write_text(json.dumps(retain))
    result = evaluate_tofu(model, TOK, folder, metrics=tofu_mod.METRICS, retain_logs=tmp_path / "retain.json",
                           reference_model=retain_model, **kw)
    json.dumps(result)  # JSON-ready
    s, logs = result["summary"], result["logs"]
    assert list(s) == list(tofu_mod.METRICS)
    tol = dict(rel=2e-5, abs=1e-7)

    # probabilities, truth ratio, forget quality
    f_stats = [hf_stats(hf, r["question"], r["answer"]) for r in FORGET]
    for i, st in enumerate(f_stats):
        assert logs["forget_Q_A_Prob"]["value_by_index"][str(i)]["avg_loss"] == pytest.approx(st["avg_loss"], **tol)
    assert s["forget_Q_A_Prob"] == pytest.approx(np.mean([st["prob"] for st in f_stats]), **tol)
    para = [hf_stats(hf, r["question"], r["paraphrased_answer"])["prob"] for r in FORGET]
    assert s["forget_Q_A_PARA_Prob"] == pytest.approx(np.mean(para), **tol)
    tr, tr_agg = hf_truth_ratio(hf, FORGET, "paraphrased_answer", "closer_to_1_better")
    assert s["forget_truth_ratio"] == pytest.approx(tr_agg, **tol)
    retain_tr, _ = hf_truth_ratio(retain_hf, FORGET, "paraphrased_answer", "closer_to_1_better")
    assert s["forget_quality"] == pytest.approx(sc_stats.ks_2samp(tr, retain_tr).pvalue, **tol)
    assert 0 < s["forget_quality"] <= 1

    # memorization
    assert s["extraction_strength"] == pytest.approx(np.mean([st["es"] for st in f_stats]), **tol)
    assert s["exact_memorization"] == pytest.approx(np.mean([st["em"] for st in f_stats]), **tol)

    # membership inference, forget vs holdout answers
    h_stats = [hf_stats(hf, r["question"], r["answer"]) for r in HOLDOUT]
    ref_stats = [hf_stats(retain_hf, r["question"], r["answer"]) for r in FORGET + HOLDOUT]
    texts = []
    for r in FORGET + HOLDOUT:
        labels = [t for t in item(r["question"], r["answer"])["labels"] if t != -100]
        texts.append(TOK.decode(labels, skip_special_tokens=True))  # mia/utils.py extract_target_texts...
    both = f_stats + h_stats
    import zlib
    scores = {"loss": [st["avg_loss"] for st in both],
              "zlib": [st["avg_loss"] / len(zlib.compress(t.encode("utf-8"))) for st, t in zip(both, texts)],
              "min_k": [st["min_k"] for st in both], "min_k_plus_plus": [st["min_k_plus_plus"] for st in both],
              "reference": [a["avg_loss"] - b["avg_loss"] for a, b in zip(both, ref_stats)]}
    grads = []
    for r in FORGET + HOLDOUT:
        it = item(r["question"], r["answer"])
        ids, lab = torch.tensor([it["input_ids"]]), torch.tensor([it["labels"]])
        grads.append(ou_gradnorm(hf, ids, torch.ones_like(ids), lab, (2, 1, float("inf"))))
    scores["gradnorm"] = [g[2] for g in grads]
    for attack, vals in scores.items():
        ours = [logs[f"mia_{attack}"][part]["value_by_index"][str(i)]["score"]
                for part, n in (("forget", 4), ("holdout", 4)) for i in range(n)]
        np.testing.assert_allclose(ours, vals, rtol=1e-4, atol=1e-7, err_msg=attack)
        assert s[f"mia_{attack}"] == ou_mia_auc(vals[:4], vals[4:]), attack
    # GradNorm's other norms (the kernel computes all three at once), and a scan_layers model: one
    # tensor per layer, as the Hugging Face parameters (llama_gqa: 30 tensors with biases)
    rows = [qa_row(TOK, r["question"], r["answer"]) for r in FORGET + HOLDOUT]
    for p in (1, float("inf")):
        np.testing.assert_allclose(grad_norms(model, TOK, rows, p=p, batch_size=4), [g[p] for g in grads], rtol=1e-4)
    scanned = load_hf(checkpoint("llama_gqa", seed=4)[0], scan_layers=True)
    np.testing.assert_allclose(grad_norms(scanned, TOK, rows, p=2, batch_size=4), scores["gradnorm"], rtol=1e-4)
    retain_auc = ou_mia_auc(*np.split(np.array([hf_stats(retain_hf, r["question"], r["answer"])["min_k"]
                                                for r in FORGET + HOLDOUT]), 2))
    assert retain["summary"]["mia_min_k"] == retain_auc
    assert s["privleak"] == pytest.approx(ou_privleak(s["mia_min_k"], retain_auc), **tol)

    # ROUGE (generations checked against transformers' greedy answers) and model utility
    assert s["forget_Q_A_ROUGE"] == pytest.approx(hf_rouge(hf, FORGET, result, "forget_Q_A_ROUGE", 6))
    comp = {"retain_Q_A_Prob": np.mean([hf_stats(hf, r["question"], r["answer"])["prob"] for r in RETAIN]),
            "retain_Q_A_ROUGE": hf_rouge(hf, RETAIN, result, "retain_Q_A_ROUGE", 6),
            "retain_Truth_Ratio": hf_truth_ratio(hf, RETAIN, "paraphrased_answer", "true_better")[1]}
    for short, rows in (("ra", REAL_AUTHORS), ("wf", WORLD_FACTS)):
        probs = [ou_probability_w_options([hf_stats(hf, r["question"], r["answer"])["prob"]],
                                          [[hf_stats(hf, r["question"], a)["prob"] for a in r["perturbed_answer"]]])[0][0]
                 for r in rows]
        comp[f"{short}_Q_A_Prob_normalised"] = np.mean(probs)
        comp[f"{short}_Q_A_ROUGE"] = hf_rouge(hf, rows, result, f"{short}_Q_A_ROUGE", 6)
        comp[f"{short}_Truth_Ratio"] = hf_truth_ratio(hf, rows, "answer", "true_better")[1]
    for name, value in comp.items():
        assert logs[name]["agg_value"] == pytest.approx(value, **tol), name
    assert s["model_utility"] == pytest.approx(sc_stats.hmean(list(comp.values())), **tol)
    assert s["model_utility"] > 0 and min(comp.values()) > 0  # the data gives every component a value

    table = format_tofu_table(result).splitlines()
    assert table[0] == "TOFU forget10 (holdout: holdout10)" and len(table) == 2 + len(s)
    for line, (name, value) in zip(table[2:], s.items()):
        assert line.split() == [name, f"{value:.4f}"]


def test_evaluate_tofu_options_and_errors(tmp_path):
    folder = write_tofu(tmp_path / "tofu")
    model, _ = model_pair(4)
    para = evaluate_tofu(model, TOK, folder, metrics=["forget_truth_ratio", "forget_quality"],
                         question_key="paraphrased_question", truth_ratio_definition="tofu_paper")
    assert para["summary"]["forget_quality"] is None  # no retain logs, as open-unlearning
    base = evaluate_tofu(model, TOK, folder, metrics=["forget_truth_ratio"])
    assert para["summary"]["forget_truth_ratio"] != base["summary"]["forget_truth_ratio"]
    assert "forget_quality  " in format_tofu_table(para) and "n/a" in format_tofu_table(para)
    with pytest.raises(ValueError, match="needs reference_model="):
        evaluate_tofu(model, TOK, folder, metrics=["mia_reference"])
    with pytest.raises(ValueError, match="truth_ratio_definition='x' is not supported"):
        evaluate_tofu(model, TOK, folder, truth_ratio_definition="x")
    with pytest.raises(DataError, match="'forget_truth_ratio' must hold 'value_by_index'"):
        evaluate_tofu(model, TOK, folder, metrics=["forget_quality"], retain_logs={"forget_truth_ratio": {"x": 1}})
    with pytest.raises(ValueError, match="gradnorm_p must be 1, 2 or inf"):
        evaluate_tofu(model, TOK, folder, metrics=["mia_gradnorm"], gradnorm_p=3)
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        per_example_grad_norms(model, {}, p=0.5)
    with pytest.raises(ValueError, match="question_key='q'"):
        evaluate_tofu(model, TOK, folder, metrics=["forget_Q_A_Prob"], question_key="q")


def test_cli_eval_tofu_prints_the_table_and_writes_what_evaluate_tofu_returns(tmp_path, capsys):
    """``jax-unlearn eval --tofu DIR --template FILE --retain-logs FILE`` = `evaluate_tofu` with
    that template and those logs; bad inputs exit 2 naming the flag or file, before any model loads."""
    import yaml

    from jax_unlearn import cli

    folder = write_tofu(tmp_path / "tofu")
    model_dir = checkpoint("llama_gqa", seed=4)[0]
    TOK.save_pretrained(tmp_path / "tok")
    (tmp_path / "template.yaml").write_text(yaml.safe_dump({"template_args": TEMPLATE}))
    retain_model, _ = model_pair(5)
    retain = evaluate_tofu(retain_model, TOK, folder, metrics=["forget_truth_ratio"], max_new_tokens=4, batch_size=4)
    (tmp_path / "retain.json").write_text(json.dumps(retain))
    base = ["eval", "--model", str(model_dir), "--tokenizer", str(tmp_path / "tok"), "--batch-size", "4"]
    args = [*base, "--tofu", str(folder), "--template", str(tmp_path / "template.yaml"),
            "--retain-logs", str(tmp_path / "retain.json"), "--out", str(tmp_path / "out.json")]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    got = json.loads((tmp_path / "out.json").read_text())["tofu"]
    want = evaluate_tofu(model_pair(4)[0], TOK, folder, template=PromptTemplate.from_dict(TEMPLATE),
                         retain_logs=tmp_path / "retain.json", batch_size=4)
    assert got["summary"] == pytest.approx(want["summary"], rel=1e-6)
    assert got["summary"]["forget_quality"] is not None  # the retain logs reached it
    assert format_tofu_table(want).splitlines()[0] in printed and "forget_quality" in printed
    for extra, match in ([["--tofu", str(tmp_path / "nope")], "--tofu .*nope is not a folder"],
                         [["--tofu", str(folder), "--template", str(tmp_path / "nope.yaml")], "nope.yaml does not exist"],
                         [["--mc", str(tmp_path / "template.yaml"), "--retain-logs", str(tmp_path / "retain.json")],
                          "--retain-logs and --template apply to --tofu / --muse"]):
        assert cli.main([*base, *extra]) == 2
        assert re.search(match, capsys.readouterr().err), extra
