"""Multiple-choice accuracy by per-choice log-likelihood, in the lm-evaluation-harness formats.

Two styles, each the layout of a harness task family:

* ``"letters"`` (MMLU/WMDP): a question with choices ``c_0..c_{C-1}`` is shown as::

      {question.strip()}
      A. {c_0}
      B. {c_1}
      ...
      Answer:

  and choice ``c`` is scored by the continuation ``" " + letter_c`` (``" A"``, ``" B"``, ...).
* ``"cloze"`` (``mmlu_continuation``, ARC, and other tasks whose choices are the answer texts):
  the prompt is ``"Question: {question.strip()}\\nAnswer:"`` and choice ``c`` is scored by its
  own text, ``" " + c_c``.

``score_c = log p(continuation_c | prompt)`` (summed over its tokens); the prediction is
``argmax_c score_c`` (first on ties) and ``accuracy`` the fraction equal to the gold
``answer`` (the harness's ``acc``). ``accuracy_norm`` is the harness's ``acc_norm``: the
argmax of ``score_c / len(c_c)``, the choice text's length in characters (the delimiting space
not counted; a letter has length 1, so with letters it equals ``accuracy``).

With a subject, the prompt starts with the harness's description
``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``
(letters) or ``"The following are questions (with answers) about {subject}.\\n\\n"`` (cloze);
k-shot prompts put the first k examples of the few-shot set (of the same subject when the
examples carry subjects; the question itself excluded) before the question, each as
``prompt + " " + answer`` (its letter, or its answer's text), separated by ``"\\n\\n"`` -- the
harness's ``first_n`` few-shot layout.

When every choice's continuation is one token (letters with LLaMA, Mistral, GPT-2 style
tokenizers), one forward pass per question scores all choices from the last position;
otherwise each choice is a row scored over its continuation tokens. Both run batched with
fixed padded shapes (`jax_unlearn.eval.scoring`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_unlearn.data import MultipleChoice, as_multiple_choice, nonempty

from . import scoring
from .tokens import encode_pairs

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"
CLOZE_DESCRIPTION = "The following are questions (with answers) about {}.\n\n"
STYLES = ("letters", "cloze")


@dataclasses.dataclass(frozen=True)
class MultipleChoiceResult:
    """``accuracy``; per question ``predictions [n]`` (chosen index), ``answers [n]``,
    ``loglikelihoods [n, max_choices]`` (``-inf`` past a question's choices) and ``prompts``;
    ``by_subject`` accuracy when questions carry a subject; ``accuracy_norm`` and
    ``predictions_norm [n]`` by length-normalised log-likelihood (see the module docstring)."""

    accuracy: float
    predictions: np.ndarray
    answers: np.ndarray
    loglikelihoods: np.ndarray
    prompts: tuple[str, ...]
    by_subject: dict[str, float]
    accuracy_norm: float
    predictions_norm: np.ndarray
    style: str = "letters"

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.answers


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
    return style


def format_question(question: str, choices: Sequence[str], style: str = "letters") -> str:
    """The prompt of one question: ``"{question.strip()}\\nA. {choices[0]}\\n...\\nAnswer:"`` (letters,
    the harness's MMLU/WMDP ``doc_to_text``) or ``"Question: {question.strip()}\\nAnswer:"`` (cloze)."""
    if _check_style(style) == "cloze":
        return f"Question: {question.strip()}\nAnswer:"
    return question.strip() + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"


def format_description(subject: str | None, style: str = "letters") -> str:
    """The harness's header for ``subject`` (underscores read as spaces); ``""`` without a subject."""
    template = CLOZE_DESCRIPTION if _check_style(style) == "cloze" else DESCRIPTION
    return "" if not subject else template.format(subject.replace("_", " "))


def answer_text(item: MultipleChoice, index: int, style: str = "letters") -> str:
    """What choice ``index`` is scored as, without the delimiting space: its letter or its text."""
    return item.choices[index] if _check_style(style) == "cloze" else LETTERS[index]


def format_prompt(item: Any, shots: Sequence[Any] = (), subject: str | None = None, style: str = "letters") -> str:
    """Description (for ``item.subject``, else ``subject``), the solved ``shots``, then the question."""
    item = as_multiple_choice(item, "question 0")
    shots = [as_multiple_choice(s, f"few-shot example {i}") for i, s in enumerate(shots)]
    solved = "".join(format_question(s.question, s.choices, style) + " " + answer_text(s, s.answer, style) + "\n\n"
                     for s in shots)
    return (format_description(item.subject or subject, style) + solved
            + format_question(item.question, item.choices, style))


def select_shots(item: MultipleChoice, pool: Sequence[MultipleChoice], k: int) -> list[MultipleChoice]:
    """The first ``k`` examples of ``pool`` (same subject as ``item`` when the pool has subjects),
    skipping one identical to ``item``."""
    if k == 0:
        return []
    same = [p for p in pool if p.subject == item.subject] if item.subject and any(p.subject for p in pool) else list(pool)
    shots = [p for p in same if (p.question, p.choices) != (item.question, item.choices)][:k]
    if len(shots) < k:
        where = f" of subject {item.subject!r}" if item.subject and any(p.subject for p in pool) else ""
        raise ValueError(f"num_fewshot={k} but the few-shot set has only {len(shots)} usable examples{where}")
    return shots


def build_prompts(items: Sequence[Any], *, num_fewshot: int = 0, fewshot: Sequence[Any] | None = None,
                  subject: str | None = None, style: str = "letters") -> tuple[list[MultipleChoice], list[str]]:
    """Validated items and their prompts (see the module docstring)."""
    _check_style(style)
    items = [as_multiple_choice(it, f"question {i}") for i, it in enumerate(nonempty(items, "multiple-choice questions"))]
    if style == "cloze":
        for i, it in enumerate(items):
            if not all(it.choices):
                raise ValueError(f"question {i}: an empty choice cannot be scored as a cloze continuation")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if num_fewshot and fewshot is None:
        raise ValueError(f"num_fewshot={num_fewshot} needs few-shot examples: pass fewshot=[...] (e.g. the dev split)")
    pool = [as_multiple_choice(it, f"few-shot example {i}") for i, it in enumerate(fewshot or [])]
    prompts = []
    for it in items:
        shots = select_shots(it, pool, num_fewshot)
        prompts.append(format_prompt(it, shots, subject, style))
    return items, prompts


def evaluate_multiple_choice(model: Any, tokenizer: Any, items: Sequence[Any], *, num_fewshot: int = 0,
                             fewshot: Sequence[Any] | None = None, subject: str | None = None,
                             batch_size: int = 32, max_length: int | None = None,
                             add_special_tokens: bool | None = None, single_pass: bool | None = None,
                             style: str = "letters") -> MultipleChoiceResult:
    """Zero- or k-shot multiple-choice accuracy of ``model`` (a `CausalLM`) with ``tokenizer``.

    Args:
      items: records with ``question``, ``choices``, integer ``answer`` and optional ``subject``.
      style: ``"letters"`` scores " A", " B", ... after the lettered MMLU layout; ``"cloze"``
        scores each choice's text after ``Question: ...\\nAnswer:`` (see the module docstring).
      num_fewshot, fewshot: k solved examples from ``fewshot`` precede each question.
      subject: description subject for questions that carry none (e.g. ``"biology"`` for WMDP-Bio).
      batch_size: rows per jitted forward pass (fixed; the last batch is filled).
      max_length: model context (default ``max_position_embeddings``); longer prompts are
        left-truncated as in the harness.
      add_special_tokens: ``None`` keeps the tokenizer's default (BOS for LLaMA tokenizers).
      single_pass: ``None`` scores all choices in one pass when every continuation is one
        token; ``False`` always scores one row per choice; ``True`` requires the single pass.
    """
    items, prompts = build_prompts(items, num_fewshot=num_fewshot, fewshot=fewshot, subject=subject, style=style)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    flat_pairs = [(p, " " + answer_text(it, c, style)) for it, p in zip(items, prompts) for c in range(len(it.choices))]
    flat_ids = iter(encode_pairs(tokenizer, flat_pairs, add_special_tokens))
    encoded = [[next(flat_ids) for _ in it.choices] for it in items]
    one_pass = all(len(cont) == 1 and ctx == pairs[0][0] for pairs in encoded for ctx, cont in pairs)
    if single_pass and not one_pass:
        raise ValueError("single_pass=True but some choice continuation is not exactly one token after its "
                         "prompt with this tokenizer; use single_pass=None")
    width = max(len(it.choices) for it in items)
    ll = np.full((len(items), width), -np.inf)
    if one_pass and single_pass is not False:
        contexts = [pairs[0][0] for pairs in encoded]
        cands = np.zeros((len(items), width), np.int32)
        for i, pairs in enumerate(encoded):
            cands[i, :len(pairs)] = [cont[0] for _, cont in pairs]
            cands[i, len(pairs):] = cands[i, 0]
        scores = scoring.next_token_logprobs(model, contexts, cands, batch_size=batch_size, max_length=max_length,
                                             pad_id=pad_id)
        for i, it in enumerate(items):
            ll[i, :len(it.choices)] = scores[i, :len(it.choices)]
    else:
        flat = [pair for pairs in encoded for pair in pairs]
        scores, _ = scoring.continuation_logprobs(model, flat, batch_size=batch_size, max_length=max_length,
                                                  pad_id=pad_id)
        start = 0
        for i, it in enumerate(items):
            ll[i, :len(it.choices)] = scores[start:start + len(it.choices)]
            start += len(it.choices)
    predictions = np.argmax(ll, axis=1)
    lengths = np.ones_like(ll)  # -inf / 1 stays -inf past a question's choices
    for i, it in enumerate(items):
        lengths[i, :len(it.choices)] = [len(answer_text(it, c, style)) for c in range(len(it.choices))]
    predictions_norm = np.argmax(ll / lengths, axis=1)
    answers = np.array([it.answer for it in items])
    correct = predictions == answers
    by_subject: dict[str, float] = {}
    for s in sorted({it.subject for it in items if it.subject}):
        sel = np.array([it.subject == s for it in items])
        by_subject[s] = float(correct[sel].mean())
    return MultipleChoiceResult(float(correct.mean()), predictions, answers, ll, tuple(prompts), by_subject,
                                float(np.mean(predictions_norm == answers)), predictions_norm, style)
