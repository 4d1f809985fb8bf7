"""Evaluation of unlearning: multiple choice, RWKU-style QA, membership inference, perplexity,
TOFU and MUSE as open-unlearning computes them, and an lm-evaluation-harness adapter.

>>> from jax_unlearn.eval import evaluate_multiple_choice, evaluate_qa, mia_auroc, perplexity
>>> r = evaluate_multiple_choice(model, tok, questions, num_fewshot=5, fewshot=dev)  # doctest: +SKIP
>>> r.accuracy, r.predictions                                                      # doctest: +SKIP
>>> evaluate_qa(model, tok, probes).by_level                                       # doctest: +SKIP
>>> mia_auroc(model, tok, forget_texts, holdout_texts)["min_k_plus_plus"]          # doctest: +SKIP
>>> answer_accuracy(model, contexts, answer_ids).accuracy                            # doctest: +SKIP
>>> evaluate_tofu(model, tok, "data/tofu", forget_split="forget10")["summary"]     # doctest: +SKIP
>>> evaluate_muse(model, tok, "data/muse/news")["summary"]                          # doctest: +SKIP

`JaxLM` (the lm-eval ``LM``) is imported on first use, so lm-eval stays optional.
"""

from .answers import AnswerAccuracy, answer_accuracy
from .generation import generate_text
from .mia import ATTACKS, MIAScores, auroc, mia_auroc, mia_scores, scores_from_token_stats
from .multiple_choice import (
    MultipleChoiceResult,
    build_prompts,
    evaluate_multiple_choice,
    format_description,
    format_prompt,
    format_question,
)
from .muse import (
    MuseData,
    evaluate_muse,
    format_muse_table,
    load_muse,
    read_muse_qa,
    read_muse_texts,
    read_muse_verbmem,
)
from .ou_scoring import PromptTemplate
from .perplexity import PerplexityResult, perplexity, rolling_windows
from .qa import QAResult, evaluate_qa, qa_prompt, rouge_l_recall
from .scoring import continuation_logprobs, next_token_logprobs, token_statistics
from .tofu import TofuData, TofuItem, evaluate_tofu, format_tofu_table, load_tofu, read_idk, read_tofu_split
from .tokens import encode, encode_many, encode_pair, encode_pairs, newline_token_ids

__all__ = [
    "ATTACKS",
    "AnswerAccuracy",
    "JaxLM",
    "MIAScores",
    "MultipleChoiceResult",
    "MuseData",
    "PerplexityResult",
    "PromptTemplate",
    "QAResult",
    "TofuData",
    "TofuItem",
    "answer_accuracy",
    "auroc",
    "build_prompts",
    "continuation_logprobs",
    "encode",
    "encode_many",
    "encode_pair",
    "encode_pairs",
    "evaluate_multiple_choice",
    "evaluate_muse",
    "evaluate_qa",
    "evaluate_tofu",
    "format_description",
    "format_muse_table",
    "format_prompt",
    "format_question",
    "format_tofu_table",
    "generate_text",
    "load_muse",
    "load_tofu",
    "mia_auroc",
    "mia_scores",
    "newline_token_ids",
    "next_token_logprobs",
    "perplexity",
    "qa_prompt",
    "read_idk",
    "read_muse_qa",
    "read_muse_texts",
    "read_muse_verbmem",
    "read_tofu_split",
    "rolling_windows",
    "rouge_l_recall",
    "scores_from_token_stats",
    "token_statistics",
]


def __getattr__(name: str):
    if name == "JaxLM":
        from .lm_eval_adapter import JaxLM

        return JaxLM
    raise AttributeError(f"module 'jax_unlearn.eval' has no attribute {name!r}")
