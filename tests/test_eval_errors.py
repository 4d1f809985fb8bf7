"""Every bad input to the evaluation suite fails with an error that says what was expected."""

import types

import numpy as np
import pytest
from test_eval_fixtures import MC_TEST, exported, make_tokenizer, mc_records, qa_records

from jax_unlearn.data import pad_rows
from jax_unlearn.eval import (
    answer_accuracy,
    auroc,
    build_prompts,
    continuation_logprobs,
    encode,
    evaluate_multiple_choice,
    evaluate_qa,
    generate_text,
    mia_scores,
    next_token_logprobs,
    perplexity,
    qa_prompt,
    rolling_windows,
    scores_from_token_stats,
)
from jax_unlearn.eval.lm_eval_adapter import JaxLM
from jax_unlearn.eval.scoring import default_max_length, plan_batches
from jax_unlearn.eval.tokens import prefix_token_id

GOOD = {"question": "Which organ pumps blood?", "choices": ["heart", "lung"], "answer": 0}


def m():
    return exported()[1]


def t():
    return exported()[2]


def mc(**change):
    return [{**GOOD, **change}]


CASES = {
    # records
    "empty question set": (lambda: build_prompts([]), "the set of multiple-choice questions is empty"),
    "a string instead of a list": (lambda: build_prompts("question"), "expected a list of multiple-choice"),
    "missing choices": (lambda: build_prompts([{"question": "q?", "answer": 0}]),
                        r"question 0: expected a record with .* \(field 'choices' is missing\)"),
    "question not a string": (lambda: build_prompts(mc(question=3)), r"question 0: .* \(field 'question' is an integer\)"),
    "choices a string": (lambda: build_prompts(mc(choices="AB")), r"list 'choices' of 2 to 26 strings .*\(field 'choices' is a string\)"),
    "one choice": (lambda: build_prompts(mc(choices=["x"])), r"2 to 26 strings .*\('choices' has 1 item\)"),
    "answer a letter": (lambda: build_prompts(mc(answer="A")), r"integer 'answer' indexing them .*\(field 'answer' is a string\)"),
    "answer out of range": (lambda: build_prompts(mc(answer=2)), r"\('answer' is 2 but there are 2 choices\)"),
    "subject not a string": (lambda: build_prompts(mc(subject=1)), r"optional string 'subject'.*\(field 'subject' is an integer\)"),
    "few-shot example malformed": (lambda: build_prompts(mc(), num_fewshot=1, fewshot=[{"question": "q?"}]),
                                   r"few-shot example 0: .*\(field 'choices' is missing\)"),
    "negative num_fewshot": (lambda: build_prompts(mc(), num_fewshot=-1), "num_fewshot must be a non-negative"),
    "num_fewshot without examples": (lambda: build_prompts(mc(), num_fewshot=1), "needs few-shot examples"),
    "too few few-shot examples": (lambda: build_prompts(mc(), num_fewshot=2, fewshot=mc(question="x?")),
                                  "num_fewshot=2 but the few-shot set has only 1 usable examples"),
    "QA without answer": (lambda: evaluate_qa(m(), t(), [{"question": "q?"}]),
                          r"QA item 0: expected a record with .* \(field 'answer' is missing\)"),
    "QA empty question": (lambda: evaluate_qa(m(), t(), [{"question": " ", "answer": "a"}]),
                          r"QA item 0: .*\('question' is empty\)"),
    "QA answer not a string": (lambda: evaluate_qa(m(), t(), [{"question": "q?", "answer": 3}]),
                               r"QA item 0: .*\(field 'answer' is an integer\)"),
    "empty QA set": (lambda: evaluate_qa(m(), t(), []), "the set of QA items is empty"),
    "record without text": (lambda: perplexity(m(), t(), [{"body": "x"}]), r"text 0: .*\(field 'text' is missing\)"),
    "text not a string": (lambda: perplexity(m(), t(), [{"text": 5}]), r"text 0: .*\(field 'text' is an integer\)"),
    "empty text set": (lambda: perplexity(m(), t(), []), "the set of texts for perplexity is empty"),
    "texts without tokens": (lambda: perplexity(m(), t(), ["", ""]), "contain no tokens"),
    # tokenizer / model
    "tokenizer without bos and eos": (lambda: prefix_token_id(types.SimpleNamespace(bos_token_id=None, eos_token_id=None)),
                                      "neither bos_token_id nor eos_token_id"),
    "tokenizer/model vocabulary mismatch": (
        lambda: evaluate_multiple_choice(m(), make_tokenizer(extra={" zebra": 300}), mc(question="A zebra?")),
        r"token id 300, outside the model's vocabulary \[0, 256\)"),
    "max_length below 2": (lambda: default_max_length(m(), 1), "max_length must be >= 2"),
    "batch_size 0": (lambda: list(plan_batches([3, 4], 0)), "batch_size must be >= 1"),
    "row longer than padding": (lambda: pad_rows([[1, 2, 3]], 2, 0, side="left"),
                                "row 0 has 3 tokens, more than the padded length 2"),
    "continuation longer than max_length": (lambda: continuation_logprobs(m(), [([1], [5] * 9)], max_length=8),
                                            "continuation 0 has 9 tokens, more than max_length=8"),
    "empty context": (lambda: continuation_logprobs(m(), [([], [5])]), "pair 0 has an empty context"),
    "candidates of the wrong shape": (lambda: next_token_logprobs(m(), [[1, 2]], np.zeros((2, 4), int)),
                                      r"candidates must be \[n_contexts=1, n_choices\]"),
    "next-token context empty": (lambda: next_token_logprobs(m(), [[]], np.zeros((1, 2), int)),
                                 "every context needs at least one token"),
    "answers of the wrong shape": (lambda: answer_accuracy(m(), [[1, 2]], [3, 4]),
                                   r"answers must be one token id per context \(\[1\]\), got shape \(2,\)"),
    "answer outside the vocabulary": (lambda: answer_accuracy(m(), [[1, 2]], [999]),
                                      r"token id 999, outside the model's vocabulary"),
    # QA and generation
    "unknown QA style": (lambda: evaluate_qa(m(), t(), qa_records(), style="cloze"), "unknown QA prompt style 'cloze'"),
    "unknown prompt style": (lambda: qa_prompt("q?", "auto"), "unknown QA prompt style 'auto'"),
    "chat template missing": (lambda: qa_prompt("q?", "question", tokenizer=t(), chat_template=True),
                              "needs a tokenizer that has a chat template"),
    "max_new_tokens 0": (lambda: evaluate_qa(m(), t(), qa_records(), max_new_tokens=0),
                         "max_new_tokens must be a positive integer"),
    "stop strings as one string": (lambda: generate_text(m(), t(), ["q"], max_new_tokens=2, stop_strings="\n"),
                                   "stop_strings must be a list of strings"),
    "no room for the prompt": (lambda: generate_text(m(), t(), ["q"], max_new_tokens=8, max_length=8),
                               "max_length=8 leaves no room for a prompt before 8 new tokens"),
    "prompt without tokens": (lambda: generate_text(m(), t(), [""], max_new_tokens=2, add_special_tokens=False),
                              "prompt 0 has no tokens"),
    # MIA
    "k out of range": (lambda: mia_scores(m(), t(), ["the heart"], k=1.5), r"k must be a fraction in \(0, 1\]"),
    "text without tokens": (lambda: mia_scores(m(), t(), ["the heart", ""]), "text 1 has no tokens to score"),
    "no scored tokens": (lambda: scores_from_token_stats([], [], [], "x"), "at least one scored token"),
    "AUROC of an empty set": (lambda: auroc([], [1.0]), "the forget set of scores is empty"),
    "AUROC of NaN scores": (lambda: auroc([1.0], [np.nan]), "the holdout scores contain NaN"),
    # perplexity
    "rolling window of 0": (lambda: rolling_windows([1, 2], 0, 0), "max_length must be >= 1"),
    # lm-eval adapter
    "adapter without model": (lambda: JaxLM(), "JaxLM needs a model"),
    "adapter on a folder without config": (lambda: JaxLM(pretrained="/nonexistent"), "not a local Hugging Face model folder"),
    "adapter without tokenizer": (lambda: JaxLM(m()), r"JaxLM needs the model's tokenizer"),
    "adapter on a non-model": (lambda: JaxLM(object(), t()), "model must be a jax_unlearn.models.CausalLM"),
    "adapter batch_size 0": (lambda: JaxLM(m(), t(), batch_size=0), "batch_size must be >= 1"),
    "adapter add_bos_token not a bool": (lambda: JaxLM(m(), t(), add_bos_token="maybe"), "expected true/false"),
    "unsupported generation argument": (lambda: JaxLM(m(), t())._generation_settings({"repetition_penalty": 1.1}),
                                        r"unsupported generation arguments \['repetition_penalty'\]"),
    "until not strings": (lambda: JaxLM(m(), t())._generation_settings({"until": [1]}),
                          "'until' must be a string or a list of strings"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    fn, message = CASES[name]
    with pytest.raises(ValueError, match=message):
        fn()


def test_non_string_text_is_a_type_error():
    with pytest.raises(TypeError, match="expected a string to tokenize, got int"):
        encode(t(), 5)


def test_records_are_the_data_modules_with_its_error_type():
    """Evaluation reads the same record types as the data files, with the same DataError (a ValueError)."""
    from jax_unlearn.data import DataError, MultipleChoice, QAPair

    items, _ = build_prompts([MultipleChoice("q?", ("a", "b"), 1, "bio")])  # records as objects work too
    assert items == [MultipleChoice("q?", ("a", "b"), 1, "bio")]
    with pytest.raises(DataError):
        build_prompts([{"question": "q?", "choices": ["a"], "answer": 0}])
    rwku = evaluate_qa(m(), t(), [{"query": "Which organ pumps blood?", "answer": "heart"}], max_new_tokens=2)
    assert rwku.prompts[0].endswith("Question: Which organ pumps blood?\nAnswer:")  # RWKU's 'query' key
    assert isinstance(QAPair("q", "a"), QAPair)


def test_valid_inputs_pass_the_same_checks():
    """The checks above reject only bad inputs: the good record goes through every reader."""
    items, prompts = build_prompts(mc() + mc_records(MC_TEST[:1]))
    assert len(items) == 2 and prompts[0].endswith("B. lung\nAnswer:")
    assert auroc([1.0], [2.0]) == 1.0 and rolling_windows([1, 2], 0, 1) == [([0], [1]), ([1], [2])]
