"""`JaxLM` and our evaluators against lm-eval's own ``hf`` backend on local tasks: the
``jax-unlearn lm-eval`` command, ``add_bos_token`` for log-likelihood and perplexity, the
harness's generation options, and cloze-style multiple choice with ``acc_norm``.

The ``hf`` backend runs transformers/PyTorch (float32) on the folder `save_hf` exported
(tests/test_eval_fixtures.exported); every task reads jsonl files written into a tmp dir.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_eval_fixtures import (
    MC_TEST,
    QA,
    SUBJECT,
    TEXTS,
    exported,
    torch_greedy,
    write_jsonl,
)
from test_eval_lm_eval import TASK as LETTERS_TASK
from test_eval_lm_eval import write_task as write_letters_task
from ties import assert_choices_agree, assert_text_agrees, tied

from jax_unlearn.cli import main
from jax_unlearn.eval import evaluate_multiple_choice, perplexity, qa_prompt
from jax_unlearn.eval.lm_eval_adapter import JaxLM

LL_ATOL = 1e-4  # float32 log-likelihoods of two implementations, sums over a few tokens

# cloze questions: the choices are the answers' texts, of 1 to 3 words (" the heart" is two tokens)
CLOZE_TEST = [
    ("Which organ pumps blood?", ["the heart", "lung", "two eyes", "skin"], 0),
    ("Which organ is used to breathe?", ["bone", "the lung", "heart", "the brain is inside"], 1),
    ("What covers the body?", ["the lung", "eye", "skin", "our foot"], 2),
    ("What do we see with?", ["heart", "the bone", "skin", "two eyes"], 3),
    ("Which part holds the body up?", ["bone", "the eye", "lung", "the skin"], 0),
    ("Where is the brain?", ["foot", "the head", "hand", "one arm"], 1),
    ("What do we walk on?", ["head", "the arm", "our foot", "hand"], 2),
    ("What do we write with?", ["foot", "the head", "one arm", "hand"], 3),
    ("Which organ filters blood?", ["the kidney", "skin", "eye", "two hands"], 0),
    ("What carries air to the lung?", ["bone", "blood", "the throat", "foot"], 2),
]
CLOZE_DEV = [
    ("What is blood pumped by?", ["the lung", "the heart", "eye", "foot"], 1),
    ("How many hands does a person have?", ["one", "two", "three", "four"], 1),
    ("What is the brain inside?", ["the head", "foot", "hand", "lung"], 0),
]


def records(rows):
    return [{"question": q, "choices": c, "answer": a, "subject": SUBJECT} for q, c, a in rows]


def write_task(folder: Path, name: str, splits: dict, **config) -> TaskManager:
    """A harness task reading local jsonl splits (JSON is YAML); only ``folder``'s tasks are indexed."""
    files = {split: str(write_jsonl(folder / f"{name}_{split}.jsonl", rows)) for split, rows in splits.items()}
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": files, "cache_dir": str(folder / "hf_cache")},
            "test_split": "test", "metadata": {"version": 1.0}, **config}
    (folder / f"{name}.yaml").write_text(json.dumps(task, indent=1))
    return TaskManager(include_path=str(folder), include_defaults=False)


def copy_folder(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def hf_lm(**kwargs) -> HFLM:
    folder = exported()[0]
    return HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4, **kwargs)


def run(lm, task, manager, **kwargs) -> list[dict]:
    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=True,
                          **kwargs)
    return out, sorted(out["samples"][task], key=lambda s: s["doc_id"])


# ----------------------------------------------------------------------------- the lm-eval command
def test_lm_eval_command_runs_the_harness_cli_on_a_local_task(tmp_path, capsys):
    folder, _, _, _ = exported()
    manager = write_letters_task(tmp_path)
    out = tmp_path / "out"
    rc = main(["lm-eval", "--model-path", str(folder), "--tasks", LETTERS_TASK, "--include_path", str(tmp_path),
               "--num_fewshot", "2", "--batch_size", "8", "--output_path", str(out), "--log_samples",
               "--model_args", "add_bos_token=false,max_length=64"])  # merged with our pretrained=
    assert rc == 0
    printed = capsys.readouterr().out
    assert "jax_unlearn" in printed and LETTERS_TASK in printed  # the harness's own summary table
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "jax_unlearn"
    assert results["config"]["model_args"] == {"pretrained": str(folder), "add_bos_token": False, "max_length": 64}
    [samples_file] = list(out.rglob(f"samples_{LETTERS_TASK}_*.jsonl"))
    ours = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    # the same task through the hf backend
    _, ref = run(hf_lm(add_bos_token=False, max_length=64), LETTERS_TASK, manager, num_fewshot=2)
    assert ref[0]["arguments"][0][0].startswith("The following")
    assert [[(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] for s in ours] == [
        [tuple(a) for a in s["arguments"]] for s in ref]  # the same requests (ours as the harness wrote them)
    ll = np.array([[r[0] for r in s["filtered_resps"]] for s in ours], dtype=float)
    ref_ll = np.array([[r[0] for r in s["filtered_resps"]] for s in ref], dtype=float)
    assert ll.shape == (len(MC_TEST), 4)
    np.testing.assert_allclose(ll, ref_ll, atol=LL_ATOL)
    ties = assert_choices_agree(ll.argmax(1), ref_ll)
    ref_acc = float(np.mean(ref_ll.argmax(1) == [a for *_, a in MC_TEST]))
    assert abs(results["results"][LETTERS_TASK]["acc,none"] - ref_acc) <= ties / len(MC_TEST) + 1e-12


def test_lm_eval_command_errors_and_help(tmp_path, capsys):
    folder, _, _, _ = exported()
    assert main(["lm-eval", "--model-path", str(folder), "--model", "hf", "--tasks", "x"]) == 2
    assert "runs the harness on the 'jax_unlearn' model" in capsys.readouterr().err
    assert main(["lm-eval", "--tasks", "x"]) == 2
    assert "give the model folder with --model-path DIR" in capsys.readouterr().err
    assert main(["lm-eval", "--model-path", str(tmp_path), "--tasks", "x"]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err
    assert main(["lm-eval", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--model-path DIR" in printed and "--num_fewshot" in printed  # ours, then the harness's options


# ----------------------------------------------------------------------------- add_bos_token
@pytest.mark.parametrize("bos,prefix", [(None, None), (True, None), (False, None), (False, 2)])
def test_add_bos_token_matches_the_hf_backend_for_perplexity_and_loglikelihood(tmp_path, bos, prefix):
    folder, model, tok, _ = exported()
    manager = write_task(tmp_path, "ju_rolling", {"test": [{"text": t} for t in TEXTS]},
                         output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                         metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
    write_letters_task(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    # max_length=8: every text spans several rolling windows
    ours = JaxLM(pretrained=str(folder), add_bos_token=bos, max_length=8, batch_size=4, prefix_token_id=prefix)
    ref = hf_lm(add_bos_token=bos, max_length=8, prefix_token_id=prefix)
    got = {}
    for name, lm in (("ours", ours), ("hf", ref)):
        out = simple_evaluate(model=lm, tasks=["ju_rolling", LETTERS_TASK], task_manager=manager, bootstrap_iters=0,
                              log_samples=True, num_fewshot=0)
        got[name] = {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in out["samples"]}
        got[name]["bpb"] = out["results"]["ju_rolling"]["bits_per_byte,none"]
    rolling = {k: np.array([s["filtered_resps"][0] for s in v["ju_rolling"]], dtype=float) for k, v in got.items()}
    np.testing.assert_allclose(rolling["ours"], rolling["hf"], rtol=1e-5, atol=LL_ATOL)
    assert got["ours"]["bpb"] == pytest.approx(got["hf"]["bpb"], rel=1e-5)
    mc = {k: np.array([[r[0] for r in s["filtered_resps"]] for s in v[LETTERS_TASK]], dtype=float)
          for k, v in got.items()}
    np.testing.assert_allclose(mc["ours"], mc["hf"], atol=LL_ATOL)
    assert_choices_agree(mc["ours"].argmax(1), mc["hf"])
    if prefix is not None:  # rolling texts are conditioned on EOS instead of BOS
        assert ours.prefix_token_id == prefix == tok.eos_token_id
        return
    # our own perplexity() with the same tokenisation gives the same per-text sums
    ppl = perplexity(model, tok, TEXTS, max_length=8, add_special_tokens=bos)
    np.testing.assert_allclose(-ppl.text_nll, rolling["hf"], rtol=1e-5, atol=LL_ATOL)
    words = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert list(ppl.text_tokens) == [n + (bos is not False) for n in words]  # BOS is scored and counted
    # and BOS changes the numbers: with it, the text is scored after "<s> <s>", and BOS itself too
    if bos is not False:
        plain = perplexity(model, tok, TEXTS, max_length=8)
        assert np.all(np.abs(plain.text_nll - ppl.text_nll) > 1e-3)


def test_tokenizer_folder_dtype_auto_and_truncation_follow_the_hf_backend(tmp_path):
    folder, _, _, _ = exported()
    copy = copy_folder(folder, tmp_path / "bf16")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(JaxLM(pretrained=str(copy), dtype="auto").model,
                                                             nnx.Param))} == {"bfloat16"}  # the config's
    lm = JaxLM(pretrained=str(folder), tokenizer=str(folder), add_bos_token=False, truncation=True)
    ref = hf_lm(add_bos_token=False, truncation=True)
    prompts = [qa_prompt(q, "question") for q, *_ in QA[:3]]
    assert lm.tok_encode(prompts[0]) == ref.tok_encode(prompts[0])  # loaded with add_bos_token=False: no BOS
    assert lm.tok_encode(prompts[0])[0] != lm.tokenizer.bos_token_id
    for t in (lm.tokenizer, ref.tokenizer):
        t.model_max_length = 5
    ids, mask = ref.tok_batch_encode(prompts, truncation=True)  # right-truncated by the tokenizer
    assert lm._prompt_ids(prompts) == [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert all(len(r) == 5 for r in lm._prompt_ids(prompts))


# ----------------------------------------------------------------------------- generation
GEN_TASK = "ju_local_gen"


def write_gen_task(folder, generation_kwargs):
    prompts = [{"prompt": qa_prompt(q, "question"), "answer": a} for q, a, _ in QA]
    return write_task(folder, GEN_TASK, {"test": prompts}, output_type="generate_until",
                      doc_to_text="{{prompt}}", doc_to_target="{{answer}}", generation_kwargs=generation_kwargs,
                      metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])


@pytest.mark.parametrize("gen", [
    {"until": ["\n"], "max_new_tokens": 12, "do_sample": False},  # the alias installed tasks use
    {"until": [" blood", "."], "max_gen_toks": 10, "do_sample": False, "temperature": 0.0, "top_p": 1.0,
     "top_k": 0, "num_beams": 1},
])
def test_generation_options_match_the_hf_backend_greedy(tmp_path, gen):
    folder, _, tok, hf = exported()
    manager = write_gen_task(tmp_path, gen)
    _, ours = run(JaxLM(pretrained=str(folder), batch_size=4), GEN_TASK, manager, predict_only=True)
    _, ref = run(hf_lm(), GEN_TASK, manager, predict_only=True)
    until, budget = gen["until"], gen.get("max_new_tokens", gen.get("max_gen_toks"))

    def render(ids):  # the harness's answer: decoded, cut at the first `until` string
        full = tok.decode(ids, skip_special_tokens=True)
        return full[:min([full.find(u) for u in until if u in full] + [len(full)])]

    for a, b in zip(ours, ref):
        prompt = a["arguments"][0][0]
        ids, logits = torch_greedy(hf, tok, prompt, budget, tok.eos_token_id)
        assert len(ids) <= budget
        assert_text_agrees(a["filtered_resps"][0], ids, logits, render)  # ours, up to near-ties
        assert_text_agrees(b["filtered_resps"][0], ids, logits, render)  # the hf backend's, likewise
    assert any(s["filtered_resps"][0] for s in ours)


def test_sampling_options_and_refusals():
    _, model, tok, hf = exported()
    lm = JaxLM(model, tok, batch_size=4)
    from lm_eval.api.instance import Instance

    prompts = [qa_prompt(q, "question") for q, *_ in QA[:4]]

    def gen(**kw):
        return lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8, **kw}), i)
                                  for i, p in enumerate(prompts)])

    greedy = gen(do_sample=False)
    assert gen(do_sample=True, temperature=0.9, top_k=1) == greedy  # top_k=1 is greedy
    tiny = gen(do_sample=True, temperature=1.0, top_p=1e-6, seed=3)  # a nucleus of the top token
    for p, text in zip(prompts, tiny):
        assert_text_agrees(text, *torch_greedy(hf, tok, p, 8, tok.eos_token_id),
                           lambda ids: tok.decode(ids, skip_special_tokens=True).split("\n")[0])
    sampled = gen(do_sample=True, temperature=1.5, top_p=0.95, seed=1)
    assert sampled == gen(do_sample=True, temperature=1.5, top_p=0.95, seed=1)  # seeded
    assert sampled != greedy
    assert gen(do_sample="true", temperature=1.5, top_p=0.95, seed=2) != sampled  # another seed
    with pytest.raises(ValueError, match="beam search is not implemented"):
        gen(num_beams=2)
    with pytest.raises(ValueError, match="do_sample=True needs temperature > 0"):
        gen(do_sample=True)
    with pytest.raises(ValueError, match=r"unsupported generation arguments \['repetition_penalty'\]"):
        gen(repetition_penalty=1.1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        gen(do_sample=True, temperature=1.0, top_p=0.0)


def test_sampling_defaults_come_from_generation_config(tmp_path):
    folder, _, _, _ = exported()
    assert JaxLM(pretrained=str(folder)).sampling_defaults == {"top_k": 50, "top_p": 1.0}  # transformers'
    copy = copy_folder(folder, tmp_path / "model")
    (copy / "generation_config.json").write_text(json.dumps({"top_p": 0.9, "temperature": 0.6}))
    lm = JaxLM(pretrained=str(copy))
    assert lm.sampling_defaults == {"top_k": 50, "top_p": 0.9}
    _, opts = lm._generation_settings({"do_sample": True, "temperature": 0.7, "max_new_tokens": 5})
    assert (opts["top_k"], opts["top_p"], opts["temperature"], opts["max_new_tokens"]) == (50, 0.9, 0.7, 5)
    _, opts = lm._generation_settings({"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0})
    assert (opts["top_k"], opts["top_p"], opts["max_new_tokens"]) == (None, None, 256)


# ----------------------------------------------------------------------------- cloze multiple choice
CLOZE_TASK = "ju_local_cloze"


def write_cloze_task(folder):
    return write_task(folder, CLOZE_TASK, {"test": records(CLOZE_TEST), "dev": records(CLOZE_DEV)},
                      output_type="multiple_choice", fewshot_split="dev", fewshot_config={"sampler": "first_n"},
                      doc_to_text="Question: {{question.strip()}}\nAnswer:", doc_to_choice="{{choices}}",
                      doc_to_target="{{answer}}",
                      description=f"The following are questions (with answers) about {SUBJECT}.\n\n",
                      metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                   {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_cloze_multiple_choice_matches_the_hf_backend(tmp_path, num_fewshot):
    _, model, tok, _ = exported()
    out, ref = run(hf_lm(), CLOZE_TASK, write_cloze_task(tmp_path), num_fewshot=num_fewshot)
    ours = evaluate_multiple_choice(model, tok, records(CLOZE_TEST), num_fewshot=num_fewshot,
                                    fewshot=records(CLOZE_DEV), style="cloze", batch_size=8)
    # the same prompts and continuations, byte for byte
    assert [s["arguments"][0][0] for s in ref] == list(ours.prompts)
    assert [[a[1] for a in s["arguments"]] for s in ref] == [[" " + c for c in cs] for _, cs, _ in CLOZE_TEST]
    ref_ll = np.array([[r[0] for r in s["filtered_resps"]] for s in ref], dtype=float)
    np.testing.assert_allclose(ours.loglikelihoods, ref_ll, atol=LL_ATOL)
    lengths = np.array([[len(c) for c in cs] for _, cs, _ in CLOZE_TEST], dtype=float)
    ties = assert_choices_agree(ours.predictions, ref_ll)
    ties_norm = assert_choices_agree(ours.predictions_norm, ref_ll / lengths)
    n = len(CLOZE_TEST)
    assert abs(ours.accuracy - out["results"][CLOZE_TASK]["acc,none"]) <= ties / n + 1e-12
    assert abs(ours.accuracy_norm - out["results"][CLOZE_TASK]["acc_norm,none"]) <= ties_norm / n + 1e-12
    # acc_norm is a different criterion here: it changes some choice (the texts differ in length)
    clear = (tied(ref_ll).sum(1) == 1) & (tied(ref_ll / lengths).sum(1) == 1)
    assert np.any((ref_ll.argmax(1) != (ref_ll / lengths).argmax(1)) & clear)
    if num_fewshot:
        assert ours.prompts[0].count("\nAnswer: ") == 2 and "Answer: the heart\n\n" in ours.prompts[0]


def test_cloze_style_prompt_and_letters_norm():
    _, model, tok, _ = exported()
    q = {"question": " Which organ pumps blood? ", "choices": ["the heart", "lung"], "answer": 0, "subject": "anatomy"}
    from jax_unlearn.eval import format_prompt

    assert format_prompt(q, style="cloze") == ("The following are questions (with answers) about anatomy.\n\n"
                                                "Question: Which organ pumps blood?\nAnswer:")
    letters = evaluate_multiple_choice(model, tok, records(MC_TEST), batch_size=8)
    np.testing.assert_array_equal(letters.predictions_norm, letters.predictions)  # a letter's length is 1
    assert letters.accuracy_norm == letters.accuracy and letters.style == "letters"
    with pytest.raises(ValueError, match=r"style must be one of \['letters', 'cloze'\], got 'words'"):
        evaluate_multiple_choice(model, tok, records(MC_TEST), style="words")
    with pytest.raises(ValueError, match="question 0: an empty choice cannot be scored"):
        evaluate_multiple_choice(model, tok, [{"question": "q?", "choices": ["", "x"], "answer": 0}], style="cloze")
