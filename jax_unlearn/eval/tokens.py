"""Tokenisation shared by every evaluation: the lm-evaluation-harness conventions.

* `encode` is the harness's ``tok_encode``: the tokenizer's own special tokens (a LLaMA
  tokenizer prepends BOS) or those asked for, except that a string already starting with the
  BOS string is never given a second one.
* `encode_pair` is the harness's context/continuation split: trailing whitespace of the
  context moves to the continuation, ``context + continuation`` is encoded as a whole and
  the continuation is what follows ``len(encode(context))`` tokens; an empty context becomes
  the prefix token (BOS, else EOS). `encode_many` and `encode_pairs` do the same for many
  strings in batched tokenizer calls.
* `stop_token_ids` lists the ids whose decoded text contains a stop string (e.g. a newline),
  so generation can end on any token that would be cut anyway.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

_STOP_CACHE: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def prefix_token_id(tokenizer: Any) -> int:
    """The token a text is conditioned on when nothing precedes it: BOS, else EOS."""
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither bos_token_id nor eos_token_id; one is needed as "
                     "the context of a text that starts the sequence")


def _special_flag(tokenizer: Any, text: str, add_special_tokens: bool | None) -> bool | None:
    """``add_special_tokens`` for ``text``: ``False`` if it already starts with the BOS string."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string to tokenize, got {type(text).__name__}")
    bos = getattr(tokenizer, "bos_token", None)
    if add_special_tokens is not False and isinstance(bos, str) and bos and text.startswith(bos):
        return False
    return None if add_special_tokens is None else bool(add_special_tokens)


def encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of ``text``; ``add_special_tokens=None`` keeps the tokenizer's default; no
    special tokens are added to a text that already starts with the BOS string."""
    return encode_many(tokenizer, [text], add_special_tokens)[0]


def encode_many(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool | None = None) -> list[list[int]]:
    """`encode` of each text, in one batched tokenizer call per special-token setting."""
    flags = [_special_flag(tokenizer, t, add_special_tokens) for t in texts]
    out: list[list[int]] = [[] for _ in texts]
    for flag in (None, True, False):
        idx = [i for i, f in enumerate(flags) if f is flag]
        if idx:
            kwargs = {} if flag is None else {"add_special_tokens": flag}
            ids = tokenizer([texts[i] for i in idx], **kwargs)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = [int(x) for x in row]
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_special_tokens: bool | None = None) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` split as the harness does for causal models."""
    return encode_pairs(tokenizer, [(context, continuation)], add_special_tokens)[0]


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]],
                 add_special_tokens: bool | None = None) -> list[tuple[list[int], list[int]]]:
    """`encode_pair` of each ``(context, continuation)``, tokenised in batches (each distinct
    context once)."""
    out: list[tuple[list[int], list[int]] | None] = [None] * len(pairs)
    split, wholes, contexts = [], [], {}
    for i, (context, continuation) in enumerate(pairs):
        if context == "":
            cont = encode(tokenizer, continuation, add_special_tokens=False)
            prefix = prefix_token_id(tokenizer)
            out[i] = (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
            continue
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        split.append((i, context))
        wholes.append(context + continuation)
        contexts.setdefault(context, len(contexts))
    whole_ids = encode_many(tokenizer, wholes, add_special_tokens)
    ctx_ids = encode_many(tokenizer, list(contexts), add_special_tokens)
    for (i, context), whole in zip(split, whole_ids):
        ctx = ctx_ids[contexts[context]]
        out[i] = (list(ctx), whole[len(ctx):])
    return out  # type: ignore[return-value]


def stop_token_ids(tokenizer: Any, stop_strings: Sequence[str], extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Sorted ids of every vocabulary token whose decoded text contains one of ``stop_strings``,
    plus ``extra`` (e.g. EOS ids). Cached per tokenizer and stop set."""
    key = tuple(sorted(set(stop_strings)))
    found: tuple[int, ...] = ()
    if key:
        try:
            cache = _STOP_CACHE.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable: no cache
            cache = {}
        if key not in cache:
            size = len(tokenizer)
            texts = tokenizer.batch_decode([[i] for i in range(size)])
            cache[key] = tuple(i for i, t in enumerate(texts) if any(s in t for s in key))
        found = cache[key]
    return tuple(sorted(set(found) | {int(e) for e in extra}))


def newline_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the tokens that decode to text containing ``"\\n"`` (``"\\n"``, ``"<0x0A>"``, ``"Ċ"``, ``".\\n"``...)."""
    return stop_token_ids(tokenizer, ["\n"])


def eos_token_ids(tokenizer: Any, model: Any = None) -> tuple[int, ...]:
    """The tokenizer's EOS id together with the model config's ``eos_token_id`` (one or several)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "stop_token_ids"):
        ids.update(int(i) for i in cfg.stop_token_ids)
    return tuple(sorted(ids))
