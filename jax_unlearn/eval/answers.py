"""Greedy next-token accuracy of single-token answers (fact probes), jitted and batched.

A probe is a context (token ids) whose next token should be its answer. It is correct when the
answer is the argmax over the whole vocabulary at the context's last position; its
log-probability ``log p(answer | context)`` feeds membership-inference scores. One forward
pass per context, batched with fixed padded shapes (`jax_unlearn.eval.scoring`); only the
``[batch]`` results leave the device, never the ``[batch, vocab]`` distribution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import scoring


@dataclasses.dataclass(frozen=True)
class AnswerAccuracy:
    """``accuracy`` (mean of ``correct``), per probe ``correct [n]`` (bool) and ``logprob [n]``
    (float64, ``log p(answer | context)``)."""

    accuracy: float
    correct: np.ndarray
    logprob: np.ndarray


@partial(jax.jit, static_argnames=("graphdef",))
def _answer_kernel(graphdef, state, ids, mask, answers):
    model = nnx.merge(graphdef, state)
    logits = model.logits(model.final_hidden(ids, mask)[:, -1:])[:, 0]  # [b, vocab]; left-padded rows
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, answers[:, None], axis=-1)[:, 0]  # [b]
    return jnp.argmax(logits, axis=-1) == answers, picked


def answer_accuracy(model: Any, contexts: Sequence[Sequence[int]], answers: Sequence[int], *,
                    batch_size: int = 64, max_length: int | None = None, pad_id: int = 0) -> AnswerAccuracy:
    """Greedy next-token accuracy of ``answers [n]`` (token ids) after ``contexts`` (token lists,
    left-truncated to ``max_length``, default the model's ``max_position_embeddings``).

    >>> from flax import nnx
    >>> from jax_unlearn.models import CausalLM, ModelConfig
    >>> cfg = ModelConfig(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=16,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> r = answer_accuracy(CausalLM(cfg, rngs=nnx.Rngs(0)), [[1, 7, 9], [1, 4]], [12, 5])
    >>> r.correct.shape, r.logprob.shape, bool((r.logprob < 0).all())
    ((2,), (2,), True)
    """
    max_length = scoring.default_max_length(model, max_length)
    answers = np.asarray(answers, np.int32)
    if answers.ndim != 1 or len(answers) != len(contexts):
        raise ValueError(f"answers must be one token id per context ([{len(contexts)}]), got shape {answers.shape}")
    rows = [list(c)[-max_length:] for c in contexts]
    if not rows or any(not r for r in rows):
        raise ValueError("answer_accuracy needs at least one context, and every context at least one token")
    scoring.check_token_ids(rows + [answers.tolist()], model)
    graphdef, state = nnx.split(model)
    out = scoring.run_batched(rows, None, batch_size, pad_id, lambda i, m, a: _answer_kernel(graphdef, state, i, m, a),
                       extra=lambda idx: (answers[idx],))
    correct, logprob = np.zeros(len(rows), bool), np.zeros(len(rows))
    for i, (c, lp) in out:
        correct[i], logprob[i] = bool(c), float(lp)
    return AnswerAccuracy(float(correct.mean()), correct, logprob)
