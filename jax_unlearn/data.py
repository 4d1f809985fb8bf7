"""Data for unlearning: read records, tokenise them into fixed-shape rows, pair forget/retain.

A tokenised set is a ``Dataset``: a mapping of ``input_ids``, ``attention_mask`` and
``labels`` (``-100`` = no loss; aligned with ``input_ids``, position ``t`` predicts
``labels[t + 1]``), each an int32 NumPy array ``[N, seq]`` with one fixed ``seq`` so every
batch has the same shape under jit.

Reading (local files need nothing beyond the standard library)::

    .jsonl    one JSON object per line (blank lines are skipped)
    .json     one JSON list of objects (RWKU passages and probes)
    .txt      plain text: documents separated by one or more blank lines (``split="line"``:
              one document per non-blank line)
    .parquet  through the optional ``datasets`` package (imported only then)
    HubSource(name, config, split): a Hugging Face hub data set, through ``datasets``

Record formats: text corpora ``{"text": str}`` (WMDP corpora, RWKU passages), QA pairs
``{"question": str, "answer": str, "level"?: str}`` (loss on the answer only), multiple
choice ``{"question": str, "choices": [str, ...], "answer": int, "subject"?: str}`` (WMDP,
MMLU). These are the library's one record model: `as_text`, `as_qa_pair` and
`as_multiple_choice` validate a record (a mapping or an object with those attributes; RWKU's
``query`` is read as the question) for the file readers and for the evaluation alike. A
malformed record raises `DataError` naming where it is (file and line, element, row, or
``question 3``) and what was expected; an empty set raises `DataError` naming the set.

Tokenising (a Hugging Face fast tokenizer, e.g. ``load_tokenizer(folder)``):

* `pack_texts`: texts joined by ``"\\n\\n"``, tokenised once without special tokens and cut
  into ``max_length`` chunks; loss on every token. With ``TokenizeOptions(chunk_bos=True)``
  each chunk is rebuilt as the paper's reference builds it: decoded, re-encoded with the
  tokenizer's special tokens (a BOS), its first token(s) masked.
* `tokenize_texts`: one row per text, right-padded; loss on every real token.
* `tokenize_qa`: one row per pair, ``prompt + answer``, right-padded; loss on the answer
  tokens only.

A row longer than ``max_length`` is cut at its end and counted in a warning, or refused with
``TokenizeOptions(truncation="error")``.

Order: `ShuffledIndices` (seeded epoch permutations, resumable from a saved position),
`EpochBatches` (one set's batches, a function of the step alone) and `PairedBatches` (the
unlearning loop's forget-anchored forget/retain pairing, also a function of the step alone).
`pad_rows` is the one padding routine (right for training rows, left for scoring).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jax_unlearn.token_math import ALT, IGNORE  # label of a position without loss (-100)

Dataset = Mapping[str, np.ndarray]  # input_ids / attention_mask / labels, each [N, seq]
log = logging.getLogger("jax_unlearn.data")


class DataError(ValueError):
    """A data file or set that cannot be used: malformed record, empty set, unknown type."""


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, slots=True)
class QAPair:
    """A question with its gold answer; ``level`` tags RWKU-style probes ("forget_1", "neighbor_2")."""

    question: str
    answer: str
    level: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MultipleChoice:
    """A multiple-choice question (WMDP, MMLU): ``choices[answer]`` is the correct one."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class HubSource:
    """A data set on the Hugging Face hub, read with ``datasets.load_dataset(name, config, split=split)``.

    Needs the optional ``datasets`` package and network access (streamed, not cached whole).
    """

    name: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return f"hub:{self.name}" + (f"[{self.config}]" if self.config else "") + f"/{self.split}"


_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


def _need_datasets(what: str):
    try:
        import datasets  # noqa: PLC0415 - optional extra, imported only for parquet / hub
    except ImportError as err:
        raise ImportError(f"reading {what} needs the optional 'datasets' package "
                          "(pip install 'jax-unlearn[datasets]'); local .jsonl/.json/.txt files do not") from err
    return datasets


def _json_element_lines(text: str) -> list[int]:
    """1-based line of each element of a JSON list (only called to report an error)."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    lines, i = [], ws.match(text, 0).end() + 1  # past '['
    while True:
        i = ws.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return lines
        lines.append(text.count("\n", 0, i) + 1)
        _, i = decoder.raw_decode(text, i)


def _records(source, *, text_field: str = "text", split: str = "blank_line") -> Iterator[tuple[str, Any]]:
    """Yields ``(location, record)``; ``location`` is ``file:line`` (or ``file: element [i]``, ``row [i]``).

    A ``.txt`` document is yielded as ``{text_field: document}``; every other type yields the
    decoded JSON values or data set rows, validated by the caller.
    """
    if isinstance(source, HubSource):
        datasets = _need_datasets(f"the hub data set {source.name!r}")
        rows = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
        for i, row in enumerate(rows):
            yield f"{source}: row [{i}]", row
        return
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix or '(no extension)'!r}; expected one of "
                        f"{', '.join(_SUFFIXES)} (or a HubSource)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if suffix == ".parquet":
        datasets = _need_datasets(f"the parquet file {path}")
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        for i, row in enumerate(rows):
            yield f"{path}: row [{i}]", row
        return
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:  # a leading byte-order mark is tolerated
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{lineno}: expected one JSON value per line, got invalid JSON "
                                        f"({err.msg} at column {err.colno})") from None
                    yield f"{path}:{lineno}", value
            return
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if suffix == ".txt":
        if split not in ("blank_line", "line"):
            raise DataError(f"split={split!r}: expected 'blank_line' or 'line'")
        docs = re.split(r"\n[ \t]*\n" if split == "blank_line" else r"\n", text)
        for doc in docs:
            if doc.strip():
                yield str(path), {text_field: doc.strip()}
        return
    try:  # .json
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {_kind(value)}")
    for i, item in enumerate(value):
        yield _JsonLocation(path, i, text), item  # the element's line is looked up only for an error


class _JsonLocation(str):
    """``file: element [i]``, resolved to ``file:line: element [i]`` when an error is reported."""

    def __new__(cls, path, index, text):
        self = super().__new__(cls, f"{path}: element [{index}]")
        self.path, self.index, self.text = path, index, text
        return self

    def resolve(self) -> str:
        line = _json_element_lines(self.text)[self.index]
        return f"{self.path}:{line}: element [{self.index}]"


def _refuse_txt(source, what: str) -> None:
    if not isinstance(source, HubSource) and Path(source).suffix.lower() == ".txt":
        raise DataError(f"{source}: a .txt file holds plain text; {what} need .jsonl, .json or .parquet")


def _where(loc: str) -> str:
    return loc.resolve() if isinstance(loc, _JsonLocation) else loc


def _kind(value: Any) -> str:
    """``"an object"``, ``"a list"``, ... for an error message."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


_MISSING = object()


def _get(record: Any, key: str) -> Any:
    """``record[key]`` of a mapping or ``record.key`` of an object (``_MISSING`` when absent)."""
    if isinstance(record, Mapping):
        return record.get(key, _MISSING)
    return getattr(record, key, _MISSING) if not isinstance(record, (str, bytes, list, tuple)) else _MISSING


def _field(loc, record, key, expected: str, problem: str | None = None):
    """Raises the `DataError` for ``record`` at ``loc``."""
    if problem is None:
        value = _get(record, key)
        if isinstance(record, (str, bytes, list, tuple, int, float, type(None))):
            problem = f"got {_kind(record)}"
        elif value is _MISSING:
            problem = f"field {key!r} is missing"
        else:
            problem = f"field {key!r} is {_kind(value)}"
    raise DataError(f"{_where(loc)}: expected {expected} ({problem})")


def nonempty(items: Any, what: str) -> list:
    """``items`` as a list; `DataError` ``"the set of {what} is empty"`` (or for a lone string)."""
    if isinstance(items, (str, bytes)):
        raise DataError(f"expected a list of {what}, got a single string")
    items = list(items)
    if not items:
        raise DataError(f"the set of {what} is empty")
    return items


def _nonempty(items: list, source, name: str | None):
    if not items:
        raise DataError(f"the {name or _source_name(source)} set is empty ({source} holds no records)")
    return items


def _source_name(source) -> str:
    return str(source) if isinstance(source, HubSource) else Path(source).name


def as_text(record: Any, where: str = "text", field: str = "text") -> str:
    """A text: a string, or a record (mapping or object) with a string ``field``."""
    if isinstance(record, str):
        return record
    if not isinstance(_get(record, field), str):
        _field(where, record, field, f"a string or a record with a string field {field!r}")
    return _get(record, field)


def read_texts(source, *, field: str = "text", split: Literal["blank_line", "line"] = "blank_line",
               name: str | None = None) -> list[str]:
    """Texts of a corpus: ``{"text": ...}`` records (``field`` names another key) or a ``.txt`` file.

    ``.txt`` documents are separated by blank lines (``split="line"``: one per line) and stripped.
    Raises `DataError` for a malformed record or an empty set (named ``name``, default the file name).
    """
    return _texts(_records(source, text_field=field, split=split), source, field, name)


def _texts(records, source, field: str, name: str | None) -> list[str]:
    out = []
    for loc, rec in records:
        if not isinstance(_get(rec, field), str):
            _field(loc, rec, field, f"a JSON object with a string field {field!r}")
        out.append(_get(rec, field))
    return _nonempty(out, source, name)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_qa_pair(record: Any, where: str = "QA pair", question: str = "question", answer: str = "answer") -> QAPair:
    """A `QAPair` from a record (mapping or object) with a non-empty string ``question`` (or
    RWKU's ``query``), a string ``answer`` and an optional string or integer ``level``."""
    expected = (f"a record with a non-empty string {question!r} and a string {answer!r} "
                "(and an optional string or integer 'level')")
    q_key = question
    if question == "question" and _get(record, "question") is _MISSING and _get(record, "query") is not _MISSING:
        q_key = "query"  # RWKU's name for the question
    q = _get(record, q_key)
    if not isinstance(q, str):
        _field(where, record, q_key, expected)
    if not q.strip():
        _field(where, record, q_key, expected, f"{q_key!r} is empty")
    if not isinstance(_get(record, answer), str):
        _field(where, record, answer, expected)
    level = _get(record, "level")
    level = None if level is _MISSING else level
    if level is not None and not (isinstance(level, str) or _is_int(level)):
        _field(where, record, "level", expected)
    return QAPair(q, _get(record, answer), None if level is None else str(level))


def read_qa(source, *, question: str = "question", answer: str = "answer", name: str | None = None) -> list[QAPair]:
    """QA pairs (``{"question", "answer", "level"?}``; ``question``/``answer`` rename the keys).

    An integer ``level`` is kept as its string. Raises `DataError` as `read_texts`.
    """
    _refuse_txt(source, "QA pairs")
    return _nonempty([as_qa_pair(rec, loc, question, answer) for loc, rec in _records(source)], source, name)


MAX_CHOICES = 26  # lettered A-Z


def as_multiple_choice(record: Any, where: str = "question") -> MultipleChoice:
    """A `MultipleChoice` from a record (mapping or object) with a string ``question``, a list
    ``choices`` of 2 to 26 strings, an integer ``answer`` indexing them and an optional string
    ``subject``."""
    expected = ("a record with a string 'question', a list 'choices' of 2 to 26 strings and an "
                "integer 'answer' indexing them (and an optional string 'subject')")
    if not isinstance(_get(record, "question"), str):
        _field(where, record, "question", expected)
    choices = _get(record, "choices")
    if not isinstance(choices, (list, tuple)):
        _field(where, record, "choices", expected)
    if not 2 <= len(choices) <= MAX_CHOICES:
        _field(where, record, "choices", expected, f"'choices' has {len(choices)} item" + "s" * (len(choices) != 1))
    for j, choice in enumerate(choices):
        if not isinstance(choice, str):
            _field(where, record, "choices", expected, f"choices[{j}] is {_kind(choice)}")
    answer = _get(record, "answer")
    if not _is_int(answer):
        _field(where, record, "answer", expected)
    if not 0 <= answer < len(choices):
        _field(where, record, "answer", expected, f"'answer' is {answer} but there are {len(choices)} choices")
    subject = _get(record, "subject")
    subject = None if subject is _MISSING else subject
    if subject is not None and not isinstance(subject, str):
        _field(where, record, "subject", expected)
    return MultipleChoice(_get(record, "question"), tuple(choices), int(answer), subject or None)


def read_multiple_choice(source, *, name: str | None = None) -> list[MultipleChoice]:
    """Multiple-choice questions ``{"question", "choices", "answer": int, "subject"?}`` (WMDP, MMLU).

    Raises `DataError` as `read_texts` (also for an ``answer`` outside ``choices``).
    """
    _refuse_txt(source, "multiple-choice questions")
    return _nonempty([as_multiple_choice(rec, loc) for loc, rec in _records(source)], source, name)


# ----------------------------------------------------------------------------- tokenising


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizeOptions:
    """How records become token rows (the row length ``max_length`` is passed separately).

    Attributes:
      separator: `pack_texts` joins texts with it before tokenising (the reference's ``"\\n\\n"``).
      drop_remainder: `pack_texts` drops the last, shorter chunk instead of padding it.
      chunk_bos: `pack_texts` rebuilds every chunk as the reference (open-unlearning's
        ``PretrainingDataset``) does: decode it (``skip_special_tokens=True``), encode the
        text again with the tokenizer's special tokens (BOS + text for LLaMA/Mistral) and keep
        at most ``len(prefix) + max_length`` tokens, ``prefix`` being what the tokenizer makes
        of ``""`` (``[BOS]``); the first ``max(len(prefix), 1)`` tokens get no loss. Rows are
        then ``len(prefix) + max_length`` wide (513 for 512-token chunks). Only for packed
        text sets.
      add_special_tokens: `tokenize_texts` / `tokenize_qa` let the tokenizer add its special
        tokens (a LLaMA tokenizer's BOS); packing adds them only with ``chunk_bos``.
      qa_prompt: the prompt of a QA pair, formatted with ``question``; no loss on it.
      qa_answer: the answer part, formatted with ``answer``; the loss is on its tokens.
      append_eos: `tokenize_qa` ends each answer with the tokenizer's EOS (with loss).
      truncation: what `tokenize_texts` / `tokenize_qa` do with a row longer than ``max_length``
        tokens: ``"right"`` cuts its end (and logs how many rows of the set were cut),
        ``"error"`` raises `DataError` naming the set, the row and its length.
      qa_encoder: ``(question, answer) -> (prompt ids, answer ids)``; when given, `tokenize_qa`
        takes a QA pair's tokens from it (loss on the answer ids, nothing appended) instead of
        ``qa_prompt``/``qa_answer`` -- e.g. open-unlearning's chat-template rows
        (`jax_unlearn.eval.ou_scoring.qa_row`, which the run's ``data.template`` selects).
    """

    separator: str = "\n\n"
    drop_remainder: bool = False
    chunk_bos: bool = False
    add_special_tokens: bool = True
    qa_prompt: str = "Question: {question}\nAnswer:"
    qa_answer: str = " {answer}"
    append_eos: bool = True
    truncation: Literal["right", "error"] = "right"
    qa_encoder: Callable[[str, str], tuple[Sequence[int], Sequence[int]]] | None = None

    def __post_init__(self):
        if self.truncation not in ("right", "error"):
            raise DataError(f"truncation={self.truncation!r}: expected 'right' or 'error'")
        try:
            self.qa_prompt.format(question="")
            self.qa_answer.format(answer="")
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"qa_prompt may use only {{question}} and qa_answer only {{answer}} ({err!r})") from None
        if "{answer}" not in self.qa_answer:
            raise DataError(f"qa_answer={self.qa_answer!r} must contain {{answer}}")


def load_tokenizer(folder: str | os.PathLike):
    """``transformers.AutoTokenizer.from_pretrained(folder)`` for a local Hugging Face folder.

    Code shipped with a folder is never run (``trust_remote_code=False``: a tokenizer that
    needs it is refused rather than prompted for). Raises FileNotFoundError for a missing
    folder and `DataError` naming the folder when no tokenizer can be built from it.
    """
    import transformers  # noqa: PLC0415 - the optional 'hf' extra

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such tokenizer folder")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as err:
        first = " ".join(str(err).split())[:240] or type(err).__name__
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise DataError(f"{folder}: the tokenizer needs custom code ('auto_map' in its tokenizer_config.json "
                            "or config.json), which this library never runs; use a folder with a tokenizer.json "
                            "(set model.tokenizer=FOLDER)") from None
        raise DataError(f"{folder}: no usable tokenizer ({first}); expected a Hugging Face tokenizer folder with "
                        "tokenizer.json (or tokenizer.model and sentencepiece); set model.tokenizer=FOLDER "
                        "if it lives elsewhere") from None


def _check_length(max_length: int) -> None:
    if not _is_int(max_length) or max_length < 2:
        raise DataError(f"max_length={max_length!r}: expected an integer >= 2 (a row needs a token to predict from)")


def _pad_id(tokenizer) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, labels: Sequence[Sequence[int]] | None = None,
             side: Literal["right", "left"] = "right") -> tuple[np.ndarray, ...]:
    """Pads token rows to ``[len(rows), length]`` on the ``side`` given: ``(ids int32, mask int32)``
    and, with ``labels`` (one per row, as long as it), labels padded with ``IGNORE``."""
    b = len(rows)
    ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    lab = np.full((b, length), IGNORE, np.int32) if labels is not None else None
    for i, r in enumerate(rows):
        n = len(r)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than the padded length {length}")
        if n:
            span = slice(0, n) if side == "right" else slice(length - n, length)
            ids[i, span], mask[i, span] = r, 1
            if lab is not None:
                lab[i, span] = labels[i]
    return (ids, mask) if lab is None else (ids, mask, lab)


def _truncate(seqs: list, masks: list, max_length: int, options: TokenizeOptions, name: str) -> tuple[list, list]:
    """Cuts rows longer than ``max_length`` (``truncation="right"``, logging how many) or refuses them."""
    long = [i for i, seq in enumerate(seqs) if len(seq) > max_length]
    if long:
        first = long[0]
        if options.truncation == "error":
            raise DataError(f"the {name} set: {len(long)} of {len(seqs)} rows are longer than max_length={max_length} "
                            f"tokens (row [{first}] has {len(seqs[first])}); raise max_length or use "
                            "truncation='right' to cut them")
        log.warning("the %s set: %d of %d rows were longer than max_length=%d tokens and lost their end "
                    "(row [%d] had %d); TokenizeOptions(truncation='error') refuses such rows",
                    name, len(long), len(seqs), max_length, first, len(seqs[first]))
    return [seq[:max_length] for seq in seqs], [m[:max_length] for m in masks]


def _rows(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], max_length: int, pad_id: int,
          name: str) -> dict[str, np.ndarray]:
    """Right-pads ``seqs`` (each ``<= max_length``) to ``[N, max_length]``; labels where ``masks``."""
    if not len(seqs):
        raise DataError(f"the {name} set is empty (no rows to tokenise)")
    labels = [np.where(np.asarray(m, bool), np.asarray(seq, np.int64), IGNORE) for seq, m in zip(seqs, masks)]
    ids, am, labels = pad_rows(seqs, max_length, pad_id, labels)
    no_loss = np.flatnonzero(~(labels[:, 1:] != IGNORE).any(axis=1))
    if len(no_loss):
        raise DataError(f"the {name} set: row [{no_loss[0]}] (and {len(no_loss) - 1} more) has no token to take "
                        f"a loss on within max_length={max_length} (empty text, or the prompt fills the row)")
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def pack_texts(texts: Sequence[str], tokenizer, max_length: int, options: TokenizeOptions = TokenizeOptions(), *,
               name: str = "texts") -> dict[str, np.ndarray]:
    """Pretraining-style packing: ``separator.join(texts)``, tokenised once, cut into chunks.

    Returns a `Dataset` of ``[ceil(T / max_length), max_length]`` int32 arrays for ``T`` tokens
    (``floor`` with ``drop_remainder``); loss on every token; the last chunk is right-padded
    (no loss on padding) and dropped if it holds a single token (nothing to predict).
    With ``options.chunk_bos`` every chunk is decoded and re-encoded with a BOS (masked), and
    the rows are ``len(tokenizer("")) + max_length`` wide (see `TokenizeOptions`).
    """
    _check_length(max_length)
    if not texts:
        raise DataError(f"the {name} set is empty (no texts to pack)")
    tokens = tokenizer(options.separator.join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    chunks = [tokens[i:i + max_length] for i in range(0, len(tokens), max_length)]
    if chunks and (len(chunks[-1]) < 2 or (options.drop_remainder and len(chunks[-1]) < max_length)):
        chunks.pop()
    if not chunks:
        raise DataError(f"the {name} set is empty after packing: {len(tokens)} tokens make no chunk of "
                        f"max_length={max_length}" + (" (drop_remainder=True)" if options.drop_remainder else ""))
    if options.chunk_bos:
        return _bos_chunks(chunks, tokenizer, max_length, name)
    return _rows(chunks, [[True] * len(c) for c in chunks], max_length, _pad_id(tokenizer), name)


def _bos_chunks(chunks: list[list[int]], tokenizer, max_length: int, name: str) -> dict[str, np.ndarray]:
    """The reference's chunk rows (open-unlearning ``PretrainingDataset.__getitem__`` and
    ``preprocess_pretraining_instance`` with an empty prefix): ``decode`` without special
    tokens, encode with them, cut at ``len(prefix) + max_length``, no loss on the first
    ``max(len(prefix), 1)`` tokens; right-padded to ``len(prefix) + max_length``."""
    prefix = len(tokenizer("", add_special_tokens=True)["input_ids"])
    masked = max(prefix, 1)
    width = prefix + max_length
    texts = tokenizer.batch_decode(chunks, skip_special_tokens=True)
    seqs = [list(ids)[:width] for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
    return _rows(seqs, [[i >= masked for i in range(len(seq))] for seq in seqs], width, _pad_id(tokenizer), name)


def tokenize_texts(texts: Sequence[str], tokenizer, max_length: int, options: TokenizeOptions = TokenizeOptions(),
                   *, name: str = "texts") -> dict[str, np.ndarray]:
    """One row per text, right-padded: a `Dataset` ``[len(texts), max_length]``.

    Loss on every real token (including the tokenizer's special tokens), none on padding. A
    text longer than ``max_length`` tokens is cut or refused (``options.truncation``).
    """
    _check_length(max_length)
    if not texts:
        raise DataError(f"the {name} set is empty (no texts to tokenise)")
    enc = [list(r) for r in tokenizer(list(texts), add_special_tokens=options.add_special_tokens,
                                      verbose=False)["input_ids"]]
    enc, masks = _truncate(enc, [[True] * len(r) for r in enc], max_length, options, name)
    return _rows(enc, masks, max_length, _pad_id(tokenizer), name)


def tokenize_qa(pairs: Sequence[QAPair], tokenizer, max_length: int, options: TokenizeOptions = TokenizeOptions(),
                *, name: str = "qa") -> dict[str, np.ndarray]:
    """One row per pair: ``qa_prompt + qa_answer (+ EOS)``, truncated and right-padded.

    Returns a `Dataset` ``[len(pairs), max_length]``. The text is tokenised as one string and
    a token takes a loss when it ends inside the answer part (character offsets from a fast
    tokenizer), so prompt and special tokens have label ``-100``; the appended EOS has a loss.
    With ``options.qa_encoder`` a row is its ``prompt ids + answer ids`` (loss on the answer ids).
    """
    _check_length(max_length)
    if not pairs:
        raise DataError(f"the {name} set is empty (no QA pairs to tokenise)")
    if options.qa_encoder is not None:
        encoded = [options.qa_encoder(p.question, p.answer) for p in pairs]
        seqs = [[*prompt, *answer] for prompt, answer in encoded]
        masks = [[False] * len(prompt) + [True] * len(answer) for prompt, answer in encoded]
        seqs, masks = _truncate(seqs, masks, max_length, options, name)
        return _rows(seqs, masks, max_length, _pad_id(tokenizer), name)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("tokenize_qa needs a fast (Rust) tokenizer for character offsets; "
                        "save the tokenizer with a tokenizer.json")
    eos = tokenizer.eos_token_id
    if options.append_eos and eos is None:
        raise DataError("append_eos=True but the tokenizer has no eos_token; set TokenizeOptions(append_eos=False)")
    prompts = [options.qa_prompt.format(question=p.question) for p in pairs]
    fulls = [pr + options.qa_answer.format(answer=p.answer) for pr, p in zip(prompts, pairs)]
    enc = tokenizer(fulls, add_special_tokens=options.add_special_tokens, return_offsets_mapping=True,
                    return_special_tokens_mask=True, verbose=False)
    seqs, masks = [], []
    for prompt, ids, offsets, special in zip(prompts, enc["input_ids"], enc["offset_mapping"],
                                             enc["special_tokens_mask"]):
        boundary = len(prompt)
        mask = [not s and end > boundary for (_, end), s in zip(offsets, special)]
        ids = list(ids)
        if options.append_eos:
            ids, mask = ids + [eos], mask + [True]
        seqs.append(ids)
        masks.append(mask)
    seqs, masks = _truncate(seqs, masks, max_length, options, name)
    return _rows(seqs, masks, max_length, _pad_id(tokenizer), name)


# ----------------------------------------------------------------------------- sets for training


def _detect(records: list[tuple[str, Any]], source) -> str:
    first = records[0][1] if records else None
    if isinstance(first, Mapping):
        if "choices" in first:
            raise DataError(f"{source}: multiple-choice records are for evaluation (read_multiple_choice), "
                            "not an unlearning set")
        if "question" in first and "answer" in first:
            return "qa"
        if "text" in first:
            return "text"
    where = _where(records[0][0]) if records else str(source)
    raise DataError(f"{where}: cannot tell the format: expected a JSON object with a string field 'text' "
                    "or with 'question' and 'answer' (or pass format='text'/'qa')")


def load_set(source, tokenizer, max_length: int, *, mode: Literal["auto", "pack", "truncate"] = "auto",
             format: Literal["auto", "text", "qa"] = "auto", options: TokenizeOptions = TokenizeOptions(),
             name: str | None = None) -> dict[str, np.ndarray]:
    """Reads and tokenises one set: a `Dataset` ``[N, max_length]``.

    ``format="auto"`` looks at the first record (``.txt`` and ``{"text"}`` -> text,
    ``{"question", "answer"}`` -> qa). ``mode="auto"`` packs texts and truncates QA pairs
    (QA pairs cannot be packed). ``tokenizer`` is a tokenizer or a local folder.
    """
    name = name or _source_name(source)
    if mode not in ("auto", "pack", "truncate"):
        raise DataError(f"mode={mode!r}: expected 'auto', 'pack' or 'truncate'")
    if format not in ("auto", "text", "qa"):
        raise DataError(f"format={format!r}: expected 'auto', 'text' or 'qa'")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    records = _nonempty(list(_records(source)), source, name)
    if format == "auto":
        format = _detect(records, source)
    if options.chunk_bos and (format == "qa" or mode == "truncate"):
        why = "holds QA pairs" if format == "qa" else "is not packed (mode='truncate')"
        raise DataError(f"chunk_bos=True rebuilds packed chunks, but the {name} set {why}; "
                        "use mode='pack' (or 'auto') on text records, or chunk_bos=False")
    if format == "qa":
        if mode == "pack":
            raise DataError(f"the {name} set holds QA pairs, which cannot be packed: use mode='truncate'")
        _refuse_txt(source, "QA pairs")
        pairs = [as_qa_pair(rec, loc) for loc, rec in records]
        return tokenize_qa(pairs, tokenizer, max_length, options, name=name)
    texts = _texts(records, source, "text", name)
    tokenize = tokenize_texts if mode == "truncate" else pack_texts
    return tokenize(texts, tokenizer, max_length, options, name=name)


def load_unlearning_sets(forget_path, retain_path, tokenizer, max_length: int, *,
                         mode: Literal["auto", "pack", "truncate"] = "auto",
                         forget_format: Literal["auto", "text", "qa"] = "auto",
                         retain_format: Literal["auto", "text", "qa"] = "auto",
                         options: TokenizeOptions = TokenizeOptions()) -> tuple[dict, dict]:
    """``(forget, retain)`` Datasets, each ``[N, max_length]``, for ``train.unlearn(model, forget, retain, cfg)``.

    ``tokenizer`` is a tokenizer or a local Hugging Face folder; see `load_set` for the rest.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    forget = load_set(forget_path, tokenizer, max_length, mode=mode, format=forget_format, options=options,
                      name="forget")
    retain = load_set(retain_path, tokenizer, max_length, mode=mode, format=retain_format, options=options,
                      name="retain")
    return forget, retain


# ----------------------------------------------------------------------------- DPO's alternate answers

IDK_STREAM = 0x1D4  # the seed stream of the "I don't know" draws (apart from the data order's)


def read_idk(path: str | os.PathLike) -> list[str]:
    """"I don't know" responses: a text file with one response per line (TOFU's ``idk.jsonl``
    holds plain lines, despite its suffix, and open-unlearning reads it so); each line is
    stripped, blank lines are skipped. Raises `DataError` for a missing or empty file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.idk: {p} is not a file (expected one \"I don't know\" response per line)")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataError(f"data.idk: {p} holds no response (expected one non-blank line per response)")
    return lines


def idk_answers(n: int, responses: Sequence[str], seed: int) -> list[str]:
    """One response per row, drawn uniformly (with replacement) by a generator seeded with
    ``(seed, IDK_STREAM)``: fixed for a run, unlike open-unlearning's fresh draw at every visit."""
    picks = np.random.default_rng([seed, IDK_STREAM]).integers(0, len(responses), n)
    return [responses[i] for i in picks]


def alternate_rows(pairs: Sequence[QAPair], answers: Sequence[str], tokenizer, max_length: int,
                   options: TokenizeOptions = TokenizeOptions(), *, name: str = "forget") -> dict[str, np.ndarray]:
    """The ``alt_*`` columns (``token_math.ALT``) of a forget set of QA ``pairs``: each question
    with its alternate answer ``answers[i]``, tokenised as `tokenize_qa` (``[N, max_length]``)."""
    if len(pairs) != len(answers):
        raise DataError(f"the {name} set has {len(pairs)} QA pairs but {len(answers)} alternate answers")
    rows = tokenize_qa([QAPair(p.question, a) for p, a in zip(pairs, answers)], tokenizer, max_length, options,
                       name=f"{name} alternate")
    return {ALT + k: v for k, v in rows.items()}


def load_alternates(source, tokenizer, max_length: int, *, idk: str | os.PathLike | None = None, seed: int = 0,
                    options: TokenizeOptions = TokenizeOptions()) -> dict[str, np.ndarray]:
    """DPO's alternate answers for the forget QA file ``source`` (its rows as `load_set` makes
    them, one per pair): with ``idk``, a response of that file per row (`read_idk`,
    `idk_answers`); else each record's string field ``alternate`` (AltPO's answers)."""
    name = _source_name(source)
    records = _nonempty(list(_records(source)), source, name)
    if not isinstance(records[0][1], Mapping) or "question" not in records[0][1]:
        raise DataError(f"{_where(records[0][0])}: DPO's alternate answers need a forget set of QA records "
                        "({\"question\", \"answer\"}); text records have no question to answer otherwise")
    pairs = [as_qa_pair(rec, loc) for loc, rec in records]
    if idk is not None:
        answers = idk_answers(len(pairs), read_idk(idk), seed)
    else:
        answers = [as_qa_pair(rec, loc, answer="alternate").answer for loc, rec in records]
    return alternate_rows(pairs, answers, tokenizer, max_length, options, name="forget")


# ----------------------------------------------------------------------------- order


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded permutation ``[n]`` of epoch ``epoch`` (shared by `ShuffledIndices` and `EpochBatches`)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def take_rows(data: Dataset, idx) -> dict[str, np.ndarray]:
    """Rows ``idx`` (``[k]`` ints) of every array of ``data``: a `Dataset` ``[k, seq]``."""
    return {k: np.asarray(v)[idx] for k, v in data.items()}


class ShuffledIndices:
    """Endless seeded epochs over ``range(n)``: position ``p`` -> ``permutation(seed, p // n)[p % n]``.

    The order is a function of the position alone, so ``state()`` (a small JSON-able dict)
    saved at any point and given to ``from_state`` resumes the exact same sequence.
    """

    def __init__(self, n: int, seed: int, position: int = 0):
        if not _is_int(n) or n < 1:
            raise DataError(f"n={n!r}: cannot shuffle an empty set")
        if not _is_int(position) or position < 0:
            raise DataError(f"position={position!r}: expected an integer >= 0")
        self.n, self.seed, self.position = int(n), int(seed), int(position)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, _epoch_order(self.seed, epoch, self.n))
        return self._cached[1]

    def __iter__(self) -> ShuffledIndices:
        return self

    def __next__(self) -> int:
        epoch, i = divmod(self.position, self.n)
        self.position += 1
        return int(self._order(epoch)[i])

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` indices, ``[k]`` int64 (crossing epoch boundaries as needed)."""
        return np.fromiter((next(self) for _ in range(k)), np.int64, count=k)

    def state(self) -> dict:
        return {"n": self.n, "seed": self.seed, "position": self.position}

    @classmethod
    def from_state(cls, state: Mapping) -> ShuffledIndices:
        return cls(state["n"], state["seed"], state["position"])


def _check_set(data: Dataset, name: str) -> int:
    """Rows of a tokenised set (every array must have as many)."""
    if "input_ids" not in data:
        raise DataError(f"the {name} set has no 'input_ids'")
    n = len(data["input_ids"])
    if n == 0:
        raise DataError(f"the {name} set is empty")
    for key, arr in data.items():
        if len(arr) != n:
            raise DataError(f"{name} set: {key!r} has {len(arr)} rows but input_ids has {n}")
    return n


class EpochBatches:
    """Seeded epochs over one set: step ``t`` -> a batch of ``batch_size`` rows.

    Epoch ``e`` visits the set in the permutation ``_epoch_order(seed, e, N)`` (the order of
    ``ShuffledIndices(N, seed)``), ``batch_size`` rows per step, sorted within the batch; the
    last incomplete batch is dropped (fixed shapes), so an epoch is
    ``steps_per_epoch = N // batch_size`` steps. A batch is a function of ``t`` alone.
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int, name: str = "training"):
        n = _check_set(data, name)
        if not _is_int(batch_size) or batch_size < 1:
            raise DataError(f"batch_size={batch_size!r}: expected an integer >= 1")
        if n < batch_size:
            raise DataError(f"the {name} set has {n} rows, fewer than batch_size={batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.steps_per_epoch = n // batch_size

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of global step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, i = self.position(step)
        order = _epoch_order(self.seed, epoch, len(self.data["input_ids"]))
        return np.sort(order[i * self.batch_size:(i + 1) * self.batch_size])

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return take_rows(self.data, self.indices(step))


class PairedBatches:
    """Forget-anchored batches for unlearning: step ``t`` -> ``(forget rows, retain rows)``.

    The forget rows are `EpochBatches` of the forget set (an epoch is ``steps_per_epoch =
    N_f // batch_size`` steps); each step pairs them with ``batch_size`` retain rows drawn
    with replacement by a generator seeded with ``(seed, step)``. The batches are a function
    of ``t`` alone: a resumed run (a fresh instance) sees exactly the batches an uninterrupted
    one would. Each returned dict holds ``[batch_size, seq]`` arrays.
    """

    def __init__(self, forget: Dataset, retain: Dataset, batch_size: int, seed: int):
        self.forget_batches = EpochBatches(forget, batch_size, seed, "forget")
        self.n_retain = _check_set(retain, "retain")
        self.forget, self.retain, self.batch_size, self.seed = forget, retain, batch_size, seed
        self.steps_per_epoch = self.forget_batches.steps_per_epoch

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` of global step ``step``."""
        return self.forget_batches.position(step)

    def __call__(self, step: int) -> tuple[dict, dict]:
        r_idx = np.random.default_rng([self.seed, 1_000_003, step]).integers(0, self.n_retain, self.batch_size)
        return self.forget_batches(step), take_rows(self.retain, r_idx)
