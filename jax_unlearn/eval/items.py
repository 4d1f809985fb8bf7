"""Reading evaluation records by duck typing: an object with attributes or a mapping with keys.

Multiple choice: ``question`` (str), ``choices`` (2-26 strings), ``answer`` (int index),
optional ``subject``. QA: ``question`` (or ``query``, RWKU's name), ``answer`` (str), optional
``level``. Texts: a string, or a record with ``text``. Errors name the record and what was expected.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

_MISSING = object()


def get_field(item: Any, *names: str, default: Any = _MISSING, where: str = "record", expected: str = "") -> Any:
    """The first of ``names`` present on ``item`` (attribute or mapping key)."""
    for name in names:
        if isinstance(item, Mapping):
            if name in item:
                return item[name]
        elif hasattr(item, name):
            return getattr(item, name)
    if default is not _MISSING:
        return default
    raise ValueError(f"{where} has no field {names[0]!r}; expected {expected or 'fields ' + ', '.join(names)}")


@dataclasses.dataclass(frozen=True)
class MCItem:
    """A validated multiple-choice question."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None


@dataclasses.dataclass(frozen=True)
class QAItem:
    """A validated question/answer probe."""

    question: str
    answer: str
    level: str | None = None


MC_EXPECTED = "a multiple-choice record with question (str), choices (list of str) and answer (int index)"
QA_EXPECTED = "a QA record with question (str), answer (str) and optionally level"


def as_mc_item(item: Any, index: int, name: str = "question") -> MCItem:
    where = f"{name} {index}"
    question = get_field(item, "question", where=where, expected=MC_EXPECTED)
    choices = get_field(item, "choices", where=where, expected=MC_EXPECTED)
    answer = get_field(item, "answer", where=where, expected=MC_EXPECTED)
    subject = get_field(item, "subject", default=None)
    if not isinstance(question, str):
        raise ValueError(f"{where}: question must be a string, got {type(question).__name__}")
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not all(
            isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: choices must be a list of strings, got {choices!r}")
    if not 2 <= len(choices) <= 26:
        raise ValueError(f"{where}: expected between 2 and 26 choices (lettered A-Z), got {len(choices)}")
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
        raise ValueError(f"{where}: answer must be an integer index into choices (0..{len(choices) - 1}), "
                         f"got {answer!r}")
    if not 0 <= int(answer) < len(choices):
        raise ValueError(f"{where}: answer {int(answer)} is outside 0..{len(choices) - 1} "
                         f"({len(choices)} choices)")
    if subject is not None and not isinstance(subject, str):
        raise ValueError(f"{where}: subject must be a string or None, got {subject!r}")
    return MCItem(question, tuple(choices), int(answer), subject or None)


def as_qa_item(item: Any, index: int) -> QAItem:
    where = f"QA item {index}"
    question = get_field(item, "question", "query", where=where, expected=QA_EXPECTED)
    answer = get_field(item, "answer", where=where, expected=QA_EXPECTED)
    level = get_field(item, "level", default=None)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: question must be a non-empty string, got {question!r}")
    if not isinstance(answer, str):
        raise ValueError(f"{where}: answer must be a string, got {type(answer).__name__}")
    return QAItem(question, answer, None if level is None else str(level))


def as_text(item: Any, index: int, name: str = "text") -> str:
    text = item if isinstance(item, str) else get_field(item, "text", where=f"{name} {index}",
                                                       expected="a string or a record with a text field")
    if not isinstance(text, str):
        raise ValueError(f"{name} {index}: text must be a string, got {type(text).__name__}")
    return text


def require_nonempty(items: Any, what: str) -> list:
    if isinstance(items, (str, bytes)):
        raise ValueError(f"expected a list of {what}, got a single string")
    items = list(items)
    if not items:
        raise ValueError(f"the set of {what} is empty")
    return items
