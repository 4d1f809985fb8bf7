"""lm-evaluation-harness adapter: run harness tasks on our Flax model (needs the ``eval`` extra).

>>> from jax_unlearn.eval.lm_eval_adapter import JaxLM
>>> lm = JaxLM(model, tokenizer, batch_size=32)                          # doctest: +SKIP
>>> lm_eval.simple_evaluate(model=lm, tasks=["mmlu"], num_fewshot=5)   # doctest: +SKIP

Importing this module registers the model name ``"jax_unlearn"`` with the harness, so
``simple_evaluate(model="jax_unlearn", model_args="pretrained=PATH,dtype=bfloat16")`` works
after the import. lm-eval 0.4.13 has no plugin (entry-point) discovery of models, so its own
``lm_eval`` command cannot find the name by itself: ``jax-unlearn lm-eval --model-path PATH
--tasks ...`` imports this module and then runs the harness's CLI with every other argument.

The model arguments are those of the harness's ``hf`` backend where they apply, with the same
meaning, so a ``JaxLM`` run reproduces an ``hf`` run of the same folder:

* ``add_bos_token``: ``None`` (default) keeps the tokenizer's own special tokens (a LLaMA
  tokenizer prepends BOS); ``True``/``False`` force them on/off for every request type --
  contexts of ``loglikelihood``, the texts of ``loglikelihood_rolling`` and the prompts of
  ``generate_until``. A string that already starts with the BOS string never gets a second
  one. Like ``hf``, a tokenizer loaded from a folder is loaded with ``add_bos_token``.
* ``prefix_token_id``: the token an empty context (and a rolling text) is conditioned on;
  default BOS, else EOS.
* ``max_length`` (default ``max_position_embeddings``), ``truncation`` (generation prompts are
  first cut to the tokenizer's ``model_max_length`` from the right, as the ``hf`` backend's
  tokenizer call does), ``tokenizer`` (an object or a folder), ``use_fast_tokenizer``,
  ``trust_remote_code`` (tokenizer loading), ``dtype`` (``"auto"``: the folder's config dtype).
* ``batch_size`` (``"auto"``/``"auto:N"`` mean 16), ``max_batch_size``, ``device`` and
  ``logits_cache`` are accepted and change nothing (JAX places the arrays; results are the same).

Requests are served by `jax_unlearn.eval.scoring` (batched, jitted, fixed padded shapes):

* ``loglikelihood``: the harness's own context/continuation split (`TemplateLM`) with our
  ``tok_encode``; ``sum log p(continuation | context)`` and whether it is the greedy continuation.
* ``loglikelihood_rolling``: ``sum_t log p(x_t | x_<t)`` of ``tok_encode(text)`` after the prefix
  token, over disjoint rolling windows of ``max_length`` tokens (`perplexity.text_loglikelihoods`).
  With BOS added (the default for LLaMA tokenizers) the BOS is scored too, as ``hf`` does.
* ``generate_until``: the harness's generation options (normalised by its own
  ``normalize_gen_kwargs``): ``until``, ``max_gen_toks`` or its aliases ``max_new_tokens``,
  ``max_tokens``, ``max_completion_tokens``, ``do_sample``, ``temperature``, ``top_k``,
  ``top_p``, ``num_beams`` (1 only: beam search is not implemented) and ``seed`` (ours: the
  sampling PRNG seed, default 0). Greedy unless ``do_sample``; sampling needs ``temperature > 0``
  (as in transformers) and, where ``top_k``/``top_p`` are not given, uses the model folder's
  ``generation_config.json`` values, else transformers' defaults (``top_k=50``, ``top_p=1``).
  Generation stops at EOS or a token containing an ``until`` string; the text is cut before
  the first ``until`` string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from . import scoring
from .generation import generate_text
from .perplexity import text_loglikelihoods
from .tokens import encode, encode_many, prefix_token_id

MAX_TOKEN_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GEN_KWARGS = ("until", *MAX_TOKEN_ALIASES, "do_sample", "temperature", "top_k", "top_p", "num_beams", "seed")
SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0}  # transformers' GenerationConfig defaults


def _as_bool(value: Any, name: str = "value") -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name}: expected true/false, got {value!r}")


def _config_dtype(path: Path) -> str:
    """The dtype named in ``config.json`` (``dtype`` or ``torch_dtype``), else float32."""
    config = json.loads((path / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _sampling_defaults(path: Path | None) -> dict[str, Any]:
    """``top_k``/``top_p`` for sampling when a request gives none: the folder's
    ``generation_config.json`` where it sets them, else transformers' defaults."""
    defaults = dict(SAMPLING_DEFAULTS)
    file = None if path is None else path / "generation_config.json"
    if file is not None and file.is_file():
        saved = json.loads(file.read_text())
        defaults.update({k: saved[k] for k in defaults if saved.get(k) is not None})
    return defaults


@register_model("jax_unlearn")
class JaxLM(TemplateLM):
    """A `jax_unlearn.models.CausalLM` plus a Hugging Face tokenizer as an lm-eval ``LM``.

    Args:
      model: a loaded `CausalLM`, or a local Hugging Face folder (also as ``pretrained=``).
      tokenizer: a Hugging Face tokenizer or its folder; default: loaded from the model folder.
      dtype: parameter dtype when loading from a folder (``"auto"``: the config's).
      batch_size: rows per jitted call (``"auto"`` or ``"auto:N"`` means 16).
      max_length: model context (default ``max_position_embeddings``).
      max_gen_toks: default generation budget when a task gives none.
      add_bos_token, prefix_token_id, truncation, use_fast_tokenizer, trust_remote_code: as in
        the harness's ``hf`` backend (see the module docstring); ``add_bos_token=None`` keeps
        the tokenizer's default special tokens.
      device, max_batch_size, logits_cache: accepted for harness compatibility and ignored.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, pretrained: str | Path | None = None,
                 dtype: str = "float32", batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | str | None = None,
                 prefix_token_id: int | None = None, truncation: bool | str = False,
                 use_fast_tokenizer: bool | str = True, trust_remote_code: bool | str = False,
                 device: Any = None, max_batch_size: Any = None, logits_cache: Any = None):
        super().__init__()
        del device, max_batch_size, logits_cache
        if model is None and pretrained is None:
            raise ValueError("JaxLM needs a model: a CausalLM, or a Hugging Face folder as model= or pretrained=")
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        self.truncation = bool(_as_bool(truncation, "truncation"))
        source = pretrained if model is None else model
        folder = None
        if isinstance(source, (str, Path)):
            import jax.numpy as jnp

            from jax_unlearn.models import load_hf

            folder = Path(source)
            if not (folder / "config.json").is_file():
                raise ValueError(f"{folder} is not a local Hugging Face model folder (no config.json)")
            model = load_hf(folder, dtype=jnp.dtype(_config_dtype(folder) if dtype == "auto" else dtype))
            if tokenizer is None:
                tokenizer = folder
        if isinstance(tokenizer, (str, Path)):
            tokenizer = self._load_tokenizer(Path(tokenizer), _as_bool(use_fast_tokenizer, "use_fast_tokenizer"),
                                             _as_bool(trust_remote_code, "trust_remote_code"))
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
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.sampling_defaults = _sampling_defaults(folder)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    def _load_tokenizer(self, path: Path, use_fast: bool | None, trust_remote_code: bool | None) -> Any:
        """``AutoTokenizer`` from a local folder, with ``add_bos_token`` when set (as ``hf`` loads it)."""
        from transformers import AutoTokenizer

        if not path.is_dir():
            raise ValueError(f"tokenizer folder {path} does not exist")
        kwargs: dict[str, Any] = {"use_fast": bool(use_fast), "trust_remote_code": bool(trust_remote_code)}
        if self.add_bos_token is not None:
            kwargs["add_bos_token"] = self.add_bos_token
        return AutoTokenizer.from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ tokenizer facts
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
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
                                      max_length=self.max_length, add_special_tokens=self.add_bos_token,
                                      prefix=self.prefix_token_id)
        out = [float(x) for x in logp]
        for req, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), answer)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, dict] = {}
        for i, req in enumerate(requests):
            key, opts = self._generation_settings(req.args[1])
            groups.setdefault(key, []).append(i)
            settings[key] = opts
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            texts = generate_text(self.model, self.tokenizer, self._prompt_ids([requests[i].args[0] for i in idx]),
                                  batch_size=self.batch_size, max_length=self.max_length, **settings[key])
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out

    def _prompt_ids(self, contexts: list[str]) -> list[list[int]]:
        """Generation prompts as the ``hf`` backend encodes them (``truncation``: first cut to the
        tokenizer's ``model_max_length``; the left cut to fit the budget is `generate_text`'s)."""
        rows = encode_many(self.tokenizer, contexts, self.add_bos_token)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if self.truncation and isinstance(limit, int) and limit > 0:
            rows = [r[:limit] for r in rows]
        return rows

    def _generation_settings(self, gen_kwargs: dict | None) -> tuple[tuple, dict]:
        """``(group key, generate_text keyword arguments)`` of one request's generation options."""
        gen_kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"unsupported generation arguments {unknown}; JaxLM supports {list(GEN_KWARGS)}")
        if "do_sample" in gen_kwargs:
            gen_kwargs["do_sample"] = _as_bool(gen_kwargs["do_sample"], "do_sample")
        if gen_kwargs.get("temperature") is None:
            gen_kwargs.pop("temperature", None)
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)  # aliases, do_sample/temperature as the harness
        until = kw["until"]
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"'until' must be a string or a list of strings, got {until!r}")
        num_beams = int(kw.get("num_beams") or 1)
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: beam search is not implemented by JaxLM; use num_beams=1 "
                             "(greedy or sampling)")
        temperature, top_k, top_p = 0.0, None, None
        if kw["do_sample"]:
            temperature = float(kw.get("temperature") or 0.0)
            if temperature <= 0:
                raise ValueError(f"do_sample=True needs temperature > 0, got {temperature} (transformers "
                                 "refuses it too); set do_sample=False for greedy decoding")
            top_k = self.sampling_defaults["top_k"] if kw.get("top_k") is None else int(kw["top_k"])
            top_p = self.sampling_defaults["top_p"] if kw.get("top_p") is None else float(kw["top_p"])
            top_k = None if top_k == 0 else min(top_k, self.model.config.vocab_size)  # 0: no top-k cut
            top_p = None if top_p >= 1.0 else top_p
        seed = int(kw.get("seed") or 0)
        opts = {"max_new_tokens": int(kw["max_gen_toks"]), "stop_strings": tuple(until), "temperature": temperature,
                "top_k": top_k, "top_p": top_p, "seed": seed}
        return tuple(opts.values()), opts
