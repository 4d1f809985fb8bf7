"""RWKU-style QA probes: batched greedy answers, scored by ROUGE-L recall against the gold answer.

Prompts (RWKU's base-model wording; ``chat_template=True`` wraps the instruction in the
tokenizer's chat template and appends ``"Answer:"`` after it, as RWKU does for chat models):

* ``fill_blank`` (RWKU level 1, forget and neighbor):
  ``"Please complete the blank in the following question.\\nQuestion: {q}\\nAnswer:"``
* ``question`` (levels 2-3):
  ``"Please briefly answer the following question.\\nQuestion: {q}\\nAnswer:"``

``style="auto"`` uses ``fill_blank`` for level ``"1"`` and ``question`` otherwise. Each prompt
gets at most ``max_new_tokens`` (32) greedy tokens, stopping at EOS or at any token whose text
contains a newline; the answer is the decoded text up to the first newline, stripped.
Score: ``R_LCS = LCS(prediction, gold) / len(gold)`` over rouge-score's tokens (lower-cased
alphanumeric words), averaged over probes, overall and per ``level``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_unlearn.data import as_qa_pair, nonempty

from .generation import generate_text

INSTRUCTIONS = {
    "fill_blank": "Please complete the blank in the following question.\nQuestion: {question}\n",
    "question": "Please briefly answer the following question.\nQuestion: {question}\n",
}
STYLES = ("auto", *INSTRUCTIONS)


@dataclasses.dataclass(frozen=True)
class QAResult:
    """``rouge_l_recall`` (mean over probes), ``by_level`` means, and per probe ``scores [n]``,
    ``predictions`` and ``prompts``."""

    rouge_l_recall: float
    by_level: dict[str, float]
    scores: np.ndarray
    predictions: tuple[str, ...]
    prompts: tuple[str, ...]


def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l_recall(prediction: str, reference: str, *, use_stemmer: bool = False) -> float:
    """ROUGE-L recall ``LCS / len(reference tokens)`` of ``prediction`` against ``reference`` (rouge-score)."""
    return float(_scorer(use_stemmer).score(reference, prediction)["rougeL"].recall)


def resolve_style(style: str, level: str | None) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown QA prompt style {style!r}; expected one of {STYLES}")
    if style == "auto":
        return "fill_blank" if level == "1" else "question"
    return style


def qa_prompt(question: str, style: str = "question", *, tokenizer: Any = None, chat_template: bool = False) -> str:
    """The RWKU prompt for ``question`` in ``style`` (``fill_blank`` or ``question``)."""
    if style not in INSTRUCTIONS:
        raise ValueError(f"unknown QA prompt style {style!r}; expected one of {tuple(INSTRUCTIONS)}")
    text = INSTRUCTIONS[style].format(question=question)
    if chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True needs a tokenizer that has a chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "Answer:"


def evaluate_qa(model: Any, tokenizer: Any, items: Sequence[Any], *, style: str = "auto", max_new_tokens: int = 32,
                batch_size: int = 16, max_length: int | None = None, use_stemmer: bool = False,
                chat_template: bool = False, add_special_tokens: bool | None = None) -> QAResult:
    """Greedy answers to QA probes and their ROUGE-L recall, overall and per level.

    Args:
      items: records with ``question`` (or ``query``), ``answer`` and optional ``level``.
      style: ``"auto"`` (by level), ``"fill_blank"`` or ``"question"``.
      max_new_tokens: generation budget per probe (RWKU: 32).
      max_length: model context (default ``max_position_embeddings``); prompts are
        left-truncated to ``max_length - max_new_tokens`` tokens.
    """
    items = [as_qa_pair(it, f"QA item {i}") for i, it in enumerate(nonempty(items, "QA items"))]
    prompts = [qa_prompt(it.question, resolve_style(style, it.level), tokenizer=tokenizer, chat_template=chat_template)
               for it in items]
    texts = generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=("\n",),
                          batch_size=batch_size, max_length=max_length, add_special_tokens=add_special_tokens)
    predictions = [t.strip() for t in texts]
    scorer = _scorer(use_stemmer)
    scores = np.array([scorer.score(it.answer, p)["rougeL"].recall for it, p in zip(items, predictions)])
    levels = sorted({it.level for it in items if it.level is not None})
    by_level = {lv: float(scores[[it.level == lv for it in items]].mean()) for lv in levels}
    return QAResult(float(scores.mean()), by_level, scores, tuple(predictions), tuple(prompts))
