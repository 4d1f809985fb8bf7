"""Token-weighted perplexity of a set of texts.

Each text ``x_1..x_n`` is scored after the prefix token (BOS, else EOS), every token exactly
once: ``PPL = exp(sum_texts sum_t -log p(x_t | x_<t) / sum_texts n)``.

Tokenisation (``add_special_tokens``): by default (``False``) ``x`` holds the text's own tokens
only, so no BOS is counted. ``None`` keeps the tokenizer's default and ``True`` asks for its
special tokens: with a LLaMA tokenizer ``x`` then starts with BOS, which is itself scored after
the prefix token and counted -- what lm-eval's ``hf`` backend computes for
``loglikelihood_rolling`` with ``add_bos_token`` unset (``None``) or ``True``; ``False`` is its
``add_bos_token=False``. A text that already starts with the BOS string gets no second one.

A text longer than
``max_length`` is cut into the harness's rolling windows (``loglikelihood_rolling`` with
context 1): the first window predicts ``x_1..x_L`` after the prefix, each later one predicts
the next ``<= L`` tokens with a full window of ``L`` tokens before them as context.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_unlearn.data import as_text, nonempty

from . import scoring
from .tokens import encode_many, prefix_token_id


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll / num_tokens)``; ``nll`` summed over all tokens; per text
    ``text_nll [n]`` (sums) and ``text_tokens [n]``."""

    perplexity: float
    nll: float
    num_tokens: int
    text_nll: np.ndarray
    text_tokens: np.ndarray


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, predicted)`` windows covering ``tokens`` once, each ``context +
    predicted`` at most ``max_length + 1`` tokens (lm-eval's ``get_rolling_token_windows`` with
    ``context_len=1`` followed by ``make_disjoint_window``)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([int(prefix)], tokens[:first])]
    done = first
    while done < len(tokens):
        m = min(len(tokens) - done, max_length)
        end = done + m
        windows.append((tokens[end - max_length - 1:end - m], tokens[end - m:end]))
        done = end
    return windows


def text_loglikelihoods(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8,
                        max_length: int | None = None, add_special_tokens: bool | None = False,
                        prefix: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_t log p(x_t | x_<t) [n], tokens [n])`` of each text over its rolling windows.

    ``add_special_tokens``: see the module docstring; ``prefix``: the token the first window is
    conditioned on (default BOS, else EOS)."""
    max_length = scoring.default_max_length(model, max_length)
    prefix = prefix_token_id(tokenizer) if prefix is None else int(prefix)
    pairs, owner = [], []
    counts = np.zeros(len(texts), np.int64)
    for i, ids in enumerate(encode_many(tokenizer, list(texts), add_special_tokens=add_special_tokens)):
        counts[i] = len(ids)
        for w in rolling_windows(ids, prefix, max_length):
            pairs.append(w)
            owner.append(i)
    logp = np.zeros(len(texts))
    if pairs:
        scores, _ = scoring.continuation_logprobs(model, pairs, batch_size=batch_size, max_length=max_length,
                                                  pad_id=getattr(tokenizer, "pad_token_id", None) or 0)
        np.add.at(logp, np.asarray(owner), scores)
    return logp, counts


def perplexity(model: Any, tokenizer: Any, texts: Sequence[Any], *, batch_size: int = 8,
               max_length: int | None = None, add_special_tokens: bool | None = False) -> PerplexityResult:
    """Token-weighted perplexity of ``texts`` (strings or records with ``text``); by default of
    the texts' own tokens, without BOS (``add_special_tokens``: see the module docstring)."""
    texts = [as_text(t, f"text {i}") for i, t in enumerate(nonempty(texts, "texts for perplexity"))]
    logp, counts = text_loglikelihoods(model, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                                       add_special_tokens=add_special_tokens)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("the texts for perplexity contain no tokens")
    nll = float(-logp.sum())
    return PerplexityResult(math.exp(nll / total), nll, total, -logp, counts)
