"""The benchmark's tokenizer (word level, trained with `tokenizers`) and its token arrays.

Every word and punctuation mark of the world is one token, so every answer is one token and
accuracy is the greedy next-token prediction over the whole vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jax_unlearn.data import IGNORE

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS = 0, 1


def train_tokenizer(texts: Sequence[str]):
    """A `tokenizers.Tokenizer` (word level, whitespace split) whose encodings start with ``<s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(sorted(set(texts)), trainers.WordLevelTrainer(special_tokens=list(SPECIALS)))
    assert tok.token_to_id("<pad>") == PAD and tok.token_to_id("<s>") == BOS
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


def hf_tokenizer(tok) -> Any:
    """The same tokenizer as a ``transformers`` fast tokenizer (saved beside the model)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def encode(tok, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(list(texts))]


def text_rows(tok, texts: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """Right-padded LM rows: ``input_ids``, ``attention_mask``, ``labels`` ``[n, length]``
    (labels = tokens, ``IGNORE`` on padding)."""
    ids = encode(tok, texts)
    too_long = [t for t, r in zip(texts, ids) if len(r) > length]
    if too_long:
        raise ValueError(f"benchmark text {too_long[0]!r} has more than {length} tokens")
    out = np.full((len(ids), length), PAD, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for i, r in enumerate(ids):
        out[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": out, "attention_mask": mask, "labels": np.where(mask == 1, out, IGNORE).astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class ProbeRows:
    """Probes as token ids: ``contexts[i]`` is ``<s> prompt``, whose next token should be ``answer[i]``."""

    contexts: list[list[int]]
    answer: np.ndarray  # [n] int32
    group: np.ndarray  # [n] str
    subject: np.ndarray  # [n] str


def probe_rows(tok, probes) -> ProbeRows:
    answers = [tok.token_to_id(p.answer) for p in probes]
    bad = [p.answer for p, a in zip(probes, answers) if a is None]
    if bad:
        raise ValueError(f"probe answer {bad[0]!r} is not one token of the benchmark tokenizer")
    return ProbeRows(encode(tok, [p.prompt for p in probes]), np.array(answers, np.int32),
                     np.array([p.group for p in probes]), np.array([p.subject for p in probes]))
