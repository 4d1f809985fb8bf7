"""lm-evaluation-harness adapter: run harness tasks on our Flax model (needs the ``eval`` extra).

>>> from jax_unlearn.eval.lm_eval_adapter import JaxLM
>>> lm = JaxLM(model, tokenizer, batch_size=32)                          # doctest: +SKIP
>>> lm_eval.simple_evaluate(model=lm, tasks=["mmlu"], num_fewshot=5)   # doctest: +SKIP

or by name, ``lm_eval --model jax_unlearn --model_args pretrained=PATH,dtype=bfloat16``.

Requests are served by `jax_unlearn.eval.scoring` (batched, jitted, fixed padded shapes):

* ``loglikelihood``: the harness's own context/continuation split (`TemplateLM`) with our
  ``tok_encode``; ``sum log p(continuation | context)`` and whether it is the greedy continuation.
* ``loglikelihood_rolling``: ``sum_t log p(x_t | x_<t)`` of the whole text after the prefix
  token (BOS, else EOS), over disjoint rolling windows of ``max_length`` tokens.
* ``generate_until``: greedy (or ``do_sample`` with ``temperature``) generation of up to
  ``max_gen_toks`` tokens, stopped at EOS or a token containing an ``until`` string, the text
  cut before the first ``until`` string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from . import scoring
from .generation import generate_text
from .perplexity import text_loglikelihoods
from .tokens import encode, prefix_token_id

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "seed")


def _as_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true/false, got {value!r}")


@register_model("jax_unlearn")
class JaxLM(TemplateLM):
    """A `jax_unlearn.models.CausalLM` plus a Hugging Face tokenizer as an lm-eval ``LM``.

    Args:
      model: a loaded `CausalLM`, or a local Hugging Face folder (also as ``pretrained=``).
      tokenizer: a Hugging Face tokenizer; default: loaded from the model folder.
      dtype: parameter dtype when loading from a folder.
      batch_size: rows per jitted call (``"auto"`` or ``"auto:N"`` means 16).
      max_length: model context (default ``max_position_embeddings``).
      max_gen_toks: default generation budget when a task gives none.
      add_bos_token: ``None`` keeps the tokenizer's default special tokens.
      device, max_batch_size: accepted for harness compatibility and ignored (JAX places arrays).
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, pretrained: str | Path | None = None,
                 dtype: str = "float32", batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | str | None = None, device: Any = None,
                 max_batch_size: Any = None):
        super().__init__()
        del device, max_batch_size
        if model is None and pretrained is None:
            raise ValueError("JaxLM needs a model: a CausalLM, or a Hugging Face folder as model= or pretrained=")
        source = pretrained if model is None else model
        if isinstance(source, (str, Path)):
            import jax.numpy as jnp

            from jax_unlearn.models import load_hf

            path = Path(source)
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is not a local Hugging Face model folder (no config.json)")
            model = load_hf(path, dtype=jnp.dtype(dtype))
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer is None:
            raise ValueError("JaxLM needs the model's tokenizer (tokenizer=...)")
        if not hasattr(model, "config") or not callable(model):
            raise ValueError(f"model must be a jax_unlearn.models.CausalLM, got {type(model).__name__}")
        self.model, self.tokenizer = model, tokenizer
        auto = batch_size is None or str(batch_size).startswith("auto")  # "auto" / "auto:N": no probing here
        self.batch_size = 16 if auto else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_length = scoring.default_max_length(model, None if max_length is None else int(max_length))
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    # ------------------------------------------------------------------ tokenizer facts
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids (the harness's ``tok_encode``: no second BOS on a string that starts with one)."""
        flag = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = encode(self.tokenizer, string, flag)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation), context_ids, continuation_ids)`` triples."""
        if not requests:
            return []
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        logp, greedy = scoring.continuation_logprobs(self.model, pairs, batch_size=self.batch_size,
                                                     max_length=self.max_length, pad_id=self.pad_id)
        out = [(float(lp), bool(g)) for lp, g in zip(logp, greedy)]
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not requests:
            return []
        texts = [req.args[0] for req in requests]
        logp, _ = text_loglikelihoods(self.model, self.tokenizer, texts, batch_size=self.batch_size,
                                      max_length=self.max_length)
        out = [float(x) for x in logp]
        for req, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), answer)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, dict] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            key, opts = self._generation_settings(gen_kwargs)
            groups.setdefault(key, []).append(i)
            settings[key] = opts
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            opts = settings[key]
            texts = generate_text(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                                  batch_size=self.batch_size, max_length=self.max_length,
                                  add_special_tokens=self.add_bos_token, **opts)
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out

    def _generation_settings(self, gen_kwargs: dict | None) -> tuple[tuple, dict]:
        gen_kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"unsupported generation arguments {unknown}; JaxLM supports {list(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"'until' must be a string or a list of strings, got {until!r}")
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        do_sample = _as_bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0) if do_sample else 0.0
        opts = dict(max_new_tokens=max_new, stop_strings=tuple(until), temperature=temperature,
                    seed=int(gen_kwargs.get("seed", 0) or 0))
        return (tuple(until), max_new, temperature, opts["seed"]), opts
