"""lm-evaluation-harness adapter: a task from local files agrees with our own multiple choice."""

import numpy as np
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from test_eval_fixtures import MC_DEV, MC_TEST, QA, SUBJECT, TEXTS, exported, mc_records, torch_greedy, write_jsonl
from ties import assert_choices_agree, assert_text_agrees

from jax_unlearn.eval import encode, encode_pairs, evaluate_multiple_choice, qa_prompt
from jax_unlearn.eval.lm_eval_adapter import JaxLM

TASK = "ju_local_mc"


def write_task(folder):
    """An MMLU-style task YAML reading local jsonl files (no hub access)."""
    test = write_jsonl(folder / "test.jsonl", mc_records(MC_TEST))
    dev = write_jsonl(folder / "dev.jsonl", mc_records(MC_DEV))
    (folder / f"{TASK}.yaml").write_text("\n".join([
        f"task: {TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {test}",
        f"    dev: {dev}",
        f"  cache_dir: {folder / 'hf_cache'}",
        "test_split: test",
        "fewshot_split: dev",
        "fewshot_config:",
        "  sampler: first_n",
        "output_type: multiple_choice",
        'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n'
        'D. {{choices[3]}}\\nAnswer:"',
        'doc_to_choice: ["A", "B", "C", "D"]',
        "doc_to_target: answer",
        f'description: "The following are multiple choice questions (with answers) about {SUBJECT}.\\n\\n"',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        ""]))
    return TaskManager(include_path=str(folder), include_defaults=False)  # skip indexing ~6 s of built-in tasks


def check_agreement(out, ours):
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_TEST)
    harness_ll = np.array([[r[0] for r in s["filtered_resps"]] for s in samples], dtype=float)
    np.testing.assert_allclose(harness_ll, ours.loglikelihoods, atol=1e-4)  # float32, other shapes
    ties = assert_choices_agree(ours.predictions, harness_ll)  # up to near-ties (tests/ties.py)
    assert [s["arguments"][0][0] for s in samples] == list(ours.prompts)  # the same prompts, byte for byte
    assert [a[1] for a in samples[0]["arguments"]] == [" A", " B", " C", " D"]
    assert abs(out["results"][TASK]["acc,none"] - ours.accuracy) <= ties / len(samples) + 1e-12


def test_local_task_zero_shot_agrees_with_our_multiple_choice(tmp_path):
    _, model, tok, _ = exported()
    out = simple_evaluate(model=JaxLM(model, tok, batch_size=8), tasks=[TASK], task_manager=write_task(tmp_path),
                          num_fewshot=0, bootstrap_iters=0, log_samples=True)
    check_agreement(out, evaluate_multiple_choice(model, tok, mc_records(MC_TEST), subject=SUBJECT))


def test_registered_name_two_shot_agrees_with_our_multiple_choice(tmp_path):
    folder, model, tok, _ = exported()
    out = simple_evaluate(model="jax_unlearn", model_args=f"pretrained={folder},batch_size=8", tasks=[TASK],
                          task_manager=write_task(tmp_path), num_fewshot=2, bootstrap_iters=0, log_samples=True)
    ours = evaluate_multiple_choice(model, tok, mc_records(MC_TEST), num_fewshot=2, fewshot=mc_records(MC_DEV))
    check_agreement(out, ours)


def test_rolling_loglikelihood_and_generate_until_equal_transformers():
    _, model, tok, hf = exported()
    lm = JaxLM(model, tok, batch_size=4, max_length=6, add_bos_token=False)  # BOS on/off: tests/test_eval_lm_eval_hf.py
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS[:3])])
    for text, got in zip(TEXTS, rolling):
        ids, expect = tok(text, add_special_tokens=False)["input_ids"], 0.0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_token_id, 6, 1)):
            row = list(ctx) + list(cont)
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([row])).logits[0].double(), -1)
            expect += float(sum(lp[t - 1, row[t]] for t in range(len(ctx), len(row))))
        assert got == pytest.approx(expect, rel=1e-5)

    lm = JaxLM(model, tok, batch_size=4)
    prompts = [qa_prompt(q, "question") for q, *_ in QA[:4]]
    until = ["\n", " blood"]
    reqs = [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 12, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs)
    def render(ids):  # the harness's answer: decoded, cut at the first `until` string
        full = tok.decode(ids, skip_special_tokens=True)
        return full[:min([full.find(u) for u in until if u in full] + [len(full)])]

    for p, text in zip(prompts, got):
        assert_text_agrees(text, *torch_greedy(hf, tok, p, 12, tok.eos_token_id), render)  # up to near-ties
    assert any(t != "" for t in got)


def test_our_pair_encoding_is_the_harness_encoding():
    """`encode_pairs` (used by our multiple choice) splits exactly as the harness's TemplateLM does."""
    _, model, tok, _ = exported()

    class Capture(JaxLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            self.seen = [(list(c), list(x)) for _, c, x in requests]
            return [(0.0, False)] * len(requests)

    pairs = [("Answer:", " A"), ("The heart pumps ", "blood."), ("", " blood"), ("<s>The brain", " is"),
             (qa_prompt(QA[0][0], "fill_blank"), " blood\n")]
    lm = Capture(model, tok, batch_size="auto:4")
    lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    assert encode_pairs(tok, pairs) == lm.seen
    assert lm.seen[1][1] == tok(" blood.", add_special_tokens=False)["input_ids"]  # the space moved over
    assert lm.seen[2][0] == [tok.bos_token_id] and lm.seen[3][0][0] == tok.bos_token_id != lm.seen[3][0][1]
    assert lm.batch_size == 16


def test_bos_is_added_once_and_add_bos_token_is_honoured():
    _, model, tok, _ = exported()
    once = encode(tok, "The brain")
    assert once[0] == tok.bos_token_id and once[1] != tok.bos_token_id
    assert encode(tok, "<s>The brain", True) == encode(tok, "<s>The brain") == once
    assert JaxLM(model, tok, add_bos_token="false").tok_encode("The brain") == once[1:]
    assert JaxLM(model, tok, add_bos_token=True).tok_encode("<s>The brain") == once
