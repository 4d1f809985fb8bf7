"""The benchmark's tokenizer (word level, trained with `tokenizers`) and its token rows.

Every word and punctuation mark of the world is one token, so every answer is one token and
accuracy is the greedy next-token prediction over the whole vocabulary. The tokenizer is a
``transformers`` fast tokenizer (saved beside the model), so training rows come from the
library's own `jax_unlearn.data.tokenize_texts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_unlearn.data import TokenizeOptions, tokenize_texts

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS = 0, 1
SEQ = 16  # tokens per row: every benchmark sentence fits


def train_tokenizer(texts: Sequence[str]) -> Any:
    """A word-level (whitespace split) ``transformers.PreTrainedTokenizerFast`` over ``texts``
    whose encodings start with ``<s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(sorted(set(texts)), trainers.WordLevelTrainer(special_tokens=list(SPECIALS)))
    assert tok.token_to_id("<pad>") == PAD and tok.token_to_id("<s>") == BOS
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def text_rows(tok, texts: Sequence[str], length: int = SEQ, name: str = "benchmark") -> dict[str, np.ndarray]:
    """Right-padded LM rows ``[n, length]`` (`jax_unlearn.data.tokenize_texts`; a text longer
    than ``length`` tokens is an error)."""
    return tokenize_texts(texts, tok, length, TokenizeOptions(truncation="error"), name=name)


@dataclasses.dataclass(frozen=True)
class ProbeRows:
    """Probes as token ids: ``contexts[i]`` is ``<s> prompt``, whose next token should be ``answer[i]``."""

    contexts: list[list[int]]
    answer: np.ndarray  # [n] int32
    group: np.ndarray  # [n] str
    subject: np.ndarray  # [n] str


def probe_rows(tok, probes) -> ProbeRows:
    answers = [tok.convert_tokens_to_ids(p.answer) for p in probes]
    bad = [p.answer for p, a in zip(probes, answers) if a is None or a == tok.unk_token_id]
    if bad:
        raise ValueError(f"probe answer {bad[0]!r} is not one token of the benchmark tokenizer")
    contexts = [list(ids) for ids in tok([p.prompt for p in probes])["input_ids"]]
    return ProbeRows(contexts, np.array(answers, np.int32), np.array([p.group for p in probes]),
                     np.array([p.subject for p in probes]))
