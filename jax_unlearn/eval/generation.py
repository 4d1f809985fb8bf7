"""Batched text generation for evaluation: prompts in, continuations cut at stop strings out.

Prompts (strings, tokenised with `tokens.encode`, or token-id lists) are left-truncated to
``max_length - max_new_tokens`` tokens, sorted longest first and run ``batch_size`` at a time,
left-padded to a bucketed length, through `jax_unlearn.models.generate` (greedy unless
``temperature > 0``; sampling optionally limited by ``top_k`` and ``top_p``). Generation
of a row ends at EOS or at a token whose decoded text contains a stop string (such a token
would be cut anyway); the decoded text is cut before the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jax_unlearn.data import pad_rows
from jax_unlearn.models import generate

from . import scoring
from .tokens import encode_many, eos_token_ids, stop_token_ids


def cut_at(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` before the earliest occurrence of any of ``stop_strings``."""
    end = len(text)
    for s in stop_strings:
        if s:
            j = text.find(s)
            if j != -1:
                end = min(end, j)
    return text[:end]


def generate_text(model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int,
                  stop_strings: Sequence[str] = (), batch_size: int = 16, max_length: int | None = None,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  add_special_tokens: bool | None = None,
                  clean_up_tokenization_spaces: bool | None = None) -> list[str]:
    """Continuations of ``prompts`` (decoded without special tokens, cut at ``stop_strings``, unstripped).

    A prompt is a string (encoded with ``add_special_tokens``) or a list of token ids (used as
    they are); ``temperature``, ``top_k`` and ``top_p`` are those of `jax_unlearn.models.generate`;
    ``clean_up_tokenization_spaces`` is passed to ``tokenizer.decode`` (``None``: the tokenizer's
    default)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(stop_strings, str):
        raise ValueError(f"stop_strings must be a list of strings, got the string {stop_strings!r}")
    max_length = scoring.default_max_length(model, max_length)
    keep = max_length - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt before {max_new_tokens} new tokens")
    prompts = list(prompts)
    strings = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    rows = [None if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    for i, ids in zip(strings, encode_many(tokenizer, [prompts[i] for i in strings], add_special_tokens)):
        rows[i] = ids
    rows = [r[-keep:] for r in rows]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} has no tokens")
    scoring.check_token_ids(rows, model)
    eos = eos_token_ids(tokenizer, model)
    stops = stop_token_ids(tokenizer, [s for s in stop_strings if s], eos)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = (eos[0] if eos else 0) if pad_id is None else int(pad_id)
    rng = jax.random.key(seed)
    decode_kw = {} if clean_up_tokenization_spaces is None else {
        "clean_up_tokenization_spaces": bool(clean_up_tokenization_spaces)}
    out: list[str] = [""] * len(rows)
    for idx, length in scoring.plan_batches([len(r) for r in rows], batch_size):
        fill = np.where(idx >= 0, idx, idx[0])  # filler rows repeat the batch's first (real) row
        ids, mask = pad_rows([rows[i] for i in fill], length, pad_id, side="left")
        rng, sub = jax.random.split(rng)
        gen = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, stop_ids=stops, pad_id=pad_id, rng=sub)
        tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
        for j, i in enumerate(idx):
            if i >= 0:
                text = tokenizer.decode(tokens[j, :lengths[j]].tolist(), skip_special_tokens=True, **decode_kw)
                out[i] = cut_at(text, stop_strings)
    return out
