"""Jitted autoregressive generation with a fixed-size KV cache.

One compiled program per ``(batch, prompt length, max_new_tokens, top_k, greedy, stop ids)`` and
whether ``top_p`` is used (temperature and ``top_p`` themselves are traced):
the prompt is prefilled in one forward pass, then a ``lax.while_loop`` emits one token per
iteration into a cache of ``prompt_len + max_new_tokens`` slots, so nothing recompiles per
step. Prompts must be left-padded (``attention_mask`` 0 on the left); RoPE positions follow
the mask, so a padded row generates exactly what it would alone.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .llama import CausalLM


class Generation(NamedTuple):
    """``tokens [batch, max_new_tokens]`` (int32, ``pad_id`` after a row's stop token) and
    ``lengths [batch]``: tokens generated per row, the stop token included."""

    tokens: jax.Array
    lengths: jax.Array


def sampling_logits(logits, temperature, top_k: int | None = None, top_p=None):
    """``logits / temperature`` with ``-inf`` outside the ``top_k`` largest and then outside the
    nucleus: the fewest most likely tokens whose probability (renormalised after ``top_k``)
    reaches ``top_p`` -- transformers' temperature, top-k, top-p order. Tokens tied with the
    last one kept are kept too. ``[b, vocab]`` float32 in and out."""
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        desc = -jnp.sort(-logits, axis=-1)  # largest first
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _select(logits, rng, temperature, top_k: int | None, greedy: bool, top_p=None):
    """Next token ``[b]`` from float32 ``logits [b, vocab]``: argmax, or a sample of
    ``softmax(sampling_logits(...))``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = sampling_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy", "stop_ids", "pad_id"))
def _generate(graphdef, state, input_ids, attention_mask, rng, temperature, top_p=None, *,
              max_new_tokens: int, top_k: int | None, greedy: bool, stop_ids: tuple[int, ...], pad_id: int):
    model: CausalLM = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    slots = p + max_new_tokens
    mask = attention_mask.astype(bool)
    kv_valid = jnp.zeros((b, slots), bool).at[:, :p].set(mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    logits, cache = model.decode(input_ids, positions, kv_valid, model.init_cache(b, slots), jnp.int32(0),
                                 last_only=True)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    def cond(c):
        step, *_, done, _ = c
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(c):
        step, cache, kv_valid, last, pos, tokens, lengths, done, rng = c
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, pad_id, _select(last, sub, temperature, top_k, greedy, top_p))
        tokens = tokens.at[:, step].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        kv_valid = kv_valid.at[:, p + step].set(True)
        logits, cache = model.decode(tok[:, None], pos[:, None], kv_valid, cache, p + step)
        return step + 1, cache, kv_valid, logits[:, -1], pos + 1, tokens, lengths, done, rng

    init = (jnp.int32(0), cache, kv_valid, logits[:, -1], mask.sum(-1).astype(jnp.int32),
            jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), bool), rng)
    out = jax.lax.while_loop(cond, body, init)
    return Generation(out[5], out[6])


def generate(model: CausalLM, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: Any = None, pad_id: int | None = None, rng: jax.Array | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after left-padded prompts ``input_ids [b, p]``.

    Args:
      temperature: ``0`` means greedy (argmax); otherwise sample from
        ``softmax(logits / temperature)`` (traced: changing it does not recompile).
      top_k: keep only the ``top_k`` most likely tokens when sampling (``1`` is greedy).
      top_p: nucleus sampling: keep only the most likely tokens whose probabilities (after
        ``top_k``) sum to at least ``top_p``, in ``(0, 1]``; ``None`` or ``1`` keeps all (traced:
        changing it does not recompile).
      stop_ids: token ids that end a row (kept in the output); ``None`` uses the config's
        ``eos_token_id``; ``()`` disables stopping. The loop ends early once every row stopped.
      pad_id: filler after a row stopped; defaults to ``pad_token_id``, else the first stop id, else 0.
      rng: PRNG key for sampling (default ``jax.random.key(0)``).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, prompt_len], got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    if not isinstance(attention_mask, jax.core.Tracer) and not bool(np.all(np.asarray(attention_mask)[:, -1])):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 for every row")
    cfg = model.config
    stop_ids = cfg.stop_token_ids if stop_ids is None else (
        (int(stop_ids),) if np.ndim(stop_ids) == 0 else tuple(int(s) for s in stop_ids))
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    greedy = temperature == 0 or top_k == 1
    if not greedy and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [1, {cfg.vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    nucleus = None if greedy or top_p is None or float(top_p) == 1.0 else jnp.float32(top_p)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, input_ids, attention_mask,
                     jax.random.key(0) if rng is None else rng, jnp.float32(temperature or 1.0), nucleus,
                     max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy,
                     stop_ids=stop_ids, pad_id=int(pad_id))
