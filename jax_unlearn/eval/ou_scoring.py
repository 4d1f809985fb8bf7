"""open-unlearning's rows and the model-side statistics of its TOFU/MUSE metrics, batched.

Tokenisation follows locuslab/open-unlearning ``src/data/utils.py`` (``d3d7cf9``):

* a QA row (`qa_row`, ``preprocess_chat_instance``): the prompt is the template around the
  question (few-shot pairs first); ``ids = tok(prompt + answer)`` with special tokens, cut at
  ``max_length`` (512), plus EOS when it does not end with one; the label tokens are the ids
  after ``len(tok(prompt))`` (answer + EOS). With ``PromptTemplate(apply_chat_template=True)``
  both come from ``tokenizer.apply_chat_template`` instead.
* a completion row (`completion_row`, ``preprocess_pretraining_instance``): ``ids =
  tok(prefix [+ " "] + text)`` cut at ``len(tok(prefix)) + max_length`` (2048); no loss on the
  first ``max(len(tok(prefix)), 1)`` tokens; no EOS is added.

A `Row` keeps ``context`` (the ids before the first label token), ``target`` (the label
tokens), ``prompt`` (what generation starts from: ``tok(prompt)``, or ``tok(prefix)``) and
``ground_truth`` (open-unlearning's ROUGE reference: the decoded labels with the decoded prompt
removed, stripped).

`row_statistics` scores many rows in one batched pass (`scoring.token_statistics`);
`generations` answers many prompts in batches (`generation.generate_text`, greedy);
`grad_norms` runs `jax_unlearn.step.per_example_grad_norms` batch by batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_unlearn.data import DataError, pad_rows

from . import scoring
from .generation import generate_text


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """open-unlearning's ``template_args`` (``configs/model/*.yaml``).

    The default is its Llama-2 / MUSE template (``configs/model/Llama-2-7b-hf.yaml``):
    ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per few-shot pair, then ``"Question: {q}\\nAnswer: "``.
    ``apply_chat_template=True`` renders ``[system?, user, assistant, ...]`` with the tokenizer's
    chat template (their instruct models), passing ``date_string`` when set.
    """

    user_start_tag: str = "Question: "
    user_end_tag: str = "\n"
    asst_start_tag: str = "Answer: "
    asst_end_tag: str = "\n\n"
    system_prompt_with_special_tokens: str | None = None
    apply_chat_template: bool = False
    system_prompt: str | None = None
    date_string: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptTemplate:
        """From open-unlearning's ``template_args`` mapping (unknown keys refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown template keys {unknown}; expected some of {sorted(names)}")
        return cls(**dict(d))

    def wrap(self, questions: Sequence[str], answers: Sequence[str]) -> str:
        """The non-chat prompt: system prefix, solved pairs, then the last question (its answer unused)."""
        out = self.system_prompt_with_special_tokens or ""
        for q, a in zip(questions[:-1], answers[:-1]):
            out += self.user_start_tag + q + self.user_end_tag + self.asst_start_tag + a + self.asst_end_tag
        return out + self.user_start_tag + questions[-1] + self.user_end_tag + self.asst_start_tag


DEFAULT_TEMPLATE = PromptTemplate()


def read_template(path: str | os.PathLike) -> PromptTemplate:
    """A `PromptTemplate` from a YAML or JSON file holding open-unlearning's ``template_args``
    mapping (e.g. copied from its ``configs/model/<model>.yaml``); `DataError` naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"template file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"template file {path} is not YAML/JSON: {' '.join(str(err).split())}") from None
    spec = spec.get("template_args", spec) if isinstance(spec, Mapping) else spec
    if not isinstance(spec, Mapping):
        raise DataError(f"template file {path}: expected a mapping of template_args, got {type(spec).__name__}")
    try:
        return PromptTemplate.from_dict(spec)
    except (TypeError, ValueError) as err:
        raise DataError(f"template file {path}: {err}") from None


@dataclasses.dataclass(frozen=True)
class Row:
    """One scored / generated row (see the module docstring)."""

    context: tuple[int, ...]
    target: tuple[int, ...]
    prompt: tuple[int, ...]
    ground_truth: str


def _ids(value: Any) -> list[int]:
    """Token ids from a tokenizer call or ``apply_chat_template`` (a list or a mapping)."""
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        value = value["input_ids"]
    if value and isinstance(value[0], (list, tuple)):  # a batch of one
        value = value[0]
    return [int(x) for x in value]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True)


def qa_row(tokenizer: Any, question: str, answer: str, *, template: PromptTemplate = DEFAULT_TEMPLATE,
           fewshot: Sequence[tuple[str, str]] = (), max_length: int = 512) -> Row:
    """open-unlearning's QA row of ``question``/``answer`` after the solved ``fewshot`` pairs."""
    questions = [q for q, _ in fewshot] + [question]
    answers = [a for _, a in fewshot] + [answer]
    if template.apply_chat_template:
        chat = [{"role": "system", "content": template.system_prompt}] if template.system_prompt else []
        for q, a in zip(questions, answers):
            chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        date = {"date_string": template.date_string} if template.date_string is not None else {}
        whole = _ids(tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, **date))
        prompt = _ids(tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True, **date))
    else:
        wrapped = template.wrap(questions, answers)
        whole = _ids(tokenizer(wrapped + answer, add_special_tokens=True, max_length=max_length, truncation=True))
        prompt = _ids(tokenizer(wrapped, add_special_tokens=True, max_length=max_length, truncation=True))
    if tokenizer.eos_token_id is not None and (not whole or whole[-1] != tokenizer.eos_token_id):
        whole = whole + [int(tokenizer.eos_token_id)]
    n = len(prompt)
    truth = _decode(tokenizer, whole).replace(_decode(tokenizer, prompt), "").strip()
    return Row(tuple(whole[:n]), tuple(whole[n:]), tuple(prompt), truth)


def completion_row(tokenizer: Any, prefix: str, text: str, *, max_length: int = 2048,
                   insert_space: bool = False) -> Row:
    """open-unlearning's completion row: ``text`` after ``prefix`` (MUSE verbmem: ``insert_space``;
    MUSE privleak: an empty prefix)."""
    whole = _ids(tokenizer(prefix + (" " if insert_space else "") + text, add_special_tokens=True))
    prompt = _ids(tokenizer(prefix, add_special_tokens=True))
    whole = whole[:len(prompt) + max_length]
    n = max(len(prompt), 1)  # never a loss on index 0
    truth = _decode(tokenizer, whole[n:]).replace(_decode(tokenizer, prompt), "").strip()
    return Row(tuple(whole[:n]), tuple(whole[n:]), tuple(prompt), truth)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def row_statistics(model: Any, tokenizer: Any, rows: Sequence[Row], *, moments: bool = False, greedy: bool = False,
                   batch_size: int = 16, context_length: int | None = None) -> list[dict[str, np.ndarray]]:
    """Per row, arrays over its label tokens: ``logp`` (float64), and ``mu``/``var`` (``moments``)
    and ``hit`` (``greedy``) -- one batched pass over all rows (`scoring.token_statistics`)."""
    if not rows:
        return []
    pairs = [(r.context, r.target) for r in rows]
    return scoring.token_statistics(model, pairs, moments=moments, greedy=greedy, batch_size=batch_size,
                                    max_length=context_length, pad_id=_pad_id(tokenizer))


def generations(model: Any, tokenizer: Any, rows: Sequence[Row], *, max_new_tokens: int,
                stopwords: Sequence[str] = (), batch_size: int = 16, context_length: int | None = None) -> list[str]:
    """Greedy continuations of the rows' prompts, decoded without special tokens (with clean-up of
    tokenisation spaces), cut before the first stop word and stripped (open-unlearning's
    ``eval_text_similarity``; generation ends at EOS)."""
    if not rows:
        return []
    texts = generate_text(model, tokenizer, [list(r.prompt) for r in rows], max_new_tokens=max_new_tokens,
                          stop_strings=tuple(stopwords), batch_size=batch_size, max_length=context_length,
                          clean_up_tokenization_spaces=True)
    return [t.strip() for t in texts]


def grad_norms(model: Any, tokenizer: Any, rows: Sequence[Row], *, p: float = 2.0, batch_size: int = 1,
               context_length: int | None = None) -> np.ndarray:
    """``[n]`` GradNorm statistics: per row the mean over parameter tensors of the ``p``-norm of the
    gradient of its token-mean NLL over the label tokens but the last (open-unlearning's
    ``tokenwise_logprobs`` span), by `jax_unlearn.step.per_example_grad_norms`."""
    from jax_unlearn import step  # the only module that takes gradients (docs/architecture.md)

    context_length = scoring.default_max_length(model, context_length)
    pairs = [(r.context, r.target[:-1]) for r in rows]
    seqs, labels = scoring.rows_and_labels(pairs, context_length)
    scoring.check_token_ids(seqs, model)
    pad = _pad_id(tokenizer)
    out = np.zeros(len(rows))
    for idx, length in scoring.plan_batches([len(s) for s in seqs], batch_size):
        fill = np.where(idx >= 0, idx, idx[0])
        ids, mask, lab = pad_rows([seqs[i] for i in fill], length, pad, [labels[i] for i in fill], side="left")
        norms = step.per_example_grad_norms(model, {"input_ids": ids, "attention_mask": mask, "labels": lab}, p=p)
        for j, i in enumerate(idx):
            if i >= 0:
                out[i] = norms[j]
    return out


# ----------------------------------------------------------------------------- shared by the TOFU and MUSE tables
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference", "gradnorm")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def by_index(values: Sequence[Any], key: str | None = "score") -> dict[str, Any]:
    """open-unlearning's ``value_by_index``: ``{"0": {key: v0}, ...}`` (or ``{"0": v0}`` for dicts)."""
    return {str(i): (_jsonable(v) if key is None else {key: _jsonable(v)}) for i, v in enumerate(values)}


def mean_of(values: Sequence[Any]) -> float | None:
    """Mean of the values that are not None (open-unlearning drops them), each first averaged
    over its own entries (``aggregate_to_1D``); None when nothing is left."""
    kept = [float(np.mean(v)) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def mia_results(attack: str, forget: Sequence[float], holdout: Sequence[float]) -> dict[str, Any]:
    """open-unlearning's MIA result: per set ``agg_value`` (mean score) and ``value_by_index``,
    and ``auc`` = ``agg_value`` (`open_unlearning.mia_auc`)."""
    from .open_unlearning import mia_auc

    auc = mia_auc(forget, holdout)
    return {"forget": {"agg_value": float(np.mean(forget)), "value_by_index": by_index(forget)},
            "holdout": {"agg_value": float(np.mean(holdout)), "value_by_index": by_index(holdout)},
            "auc": auc, "agg_value": auc}


def attack_scores(attack: str, tokenizer: Any, rows: Sequence[Row], stats: Sequence[Mapping[str, np.ndarray]], *,
                  k: float, ref_stats: Sequence[Mapping[str, np.ndarray]] | None = None,
                  norms: np.ndarray | None = None) -> list[float]:
    """Each row's score under ``attack`` (see `jax_unlearn.eval.open_unlearning`)."""
    from . import open_unlearning as ou

    if attack == "loss":
        return [ou.loss_score(s["logp"]) for s in stats]
    if attack == "zlib":
        return [ou.zlib_score(s["logp"], tokenizer.decode(list(r.target), skip_special_tokens=True))
                for r, s in zip(rows, stats)]
    if attack == "min_k":
        return [ou.min_k_score(s["logp"], k) for s in stats]
    if attack == "min_k_plus_plus":
        return [ou.min_k_plus_plus_score(s["logp"], s["mu"], s["var"], k) for s in stats]
    if attack == "reference":
        return [ou.reference_score(s["logp"], r["logp"]) for s, r in zip(stats, ref_stats)]
    if attack == "gradnorm":
        return [float(v) for v in norms]
    raise ValueError(f"unknown attack {attack!r}; expected one of {list(MIA_ATTACKS)}")


def load_retain_logs(source: Any) -> dict[str, Any]:
    """The retain model's logs for forget quality / privleak: open-unlearning's ``TOFU_EVAL.json`` /
    ``MUSE_EVAL.json`` (a path or its loaded dict), or a result of `evaluate_tofu` /
    `evaluate_muse` (whose ``"logs"`` have that layout)."""
    import json
    from pathlib import Path

    from jax_unlearn.data import DataError

    if source is None:
        return {}
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such retain-model log file")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); expected open-unlearning's "
                            "*_EVAL.json or a jax-unlearn TOFU/MUSE result") from None
        if not isinstance(source, Mapping):
            raise DataError(f"{path}: expected a JSON object of metric logs")
    logs = source.get("logs", source)
    if not isinstance(logs, Mapping):
        raise DataError("retain logs: expected a mapping of metric name -> {'agg_value', ...}")
    return dict(logs)


def retain_truth_ratios(logs: Mapping[str, Any]) -> np.ndarray | None:
    """``forget_truth_ratio.value_by_index[*].score`` of the retain model's logs (None if absent)."""
    from jax_unlearn.data import DataError

    entry = logs.get("forget_truth_ratio")
    if entry is None:
        return None
    try:
        values = entry["value_by_index"]
        return np.array([v["score"] for v in values.values()], np.float64)
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError("retain logs: 'forget_truth_ratio' must hold 'value_by_index': {index: {'score': x}} "
                        f"({err!r})") from None


def retain_auc(logs: Mapping[str, Any], metric: str = "mia_min_k") -> float | None:
    """``{metric}.agg_value`` of the retain model's logs (its MIA AUC; None if absent)."""
    from jax_unlearn.data import DataError

    entry = logs.get(metric)
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or not isinstance(entry.get("agg_value"), (int, float)):
        raise DataError(f"retain logs: '{metric}' must hold a numeric 'agg_value'")
    return float(entry["agg_value"])


def format_table(title: str, summary: Mapping[str, Any], extra: Mapping[str, Any] = ()) -> str:
    """``title`` then one ``name  value`` line per metric (4 decimals; ``n/a`` for None)."""
    items = list(summary.items()) + list(dict(extra).items())
    width = max((len(k) for k, _ in items), default=0)
    lines = [title, "-" * max(len(title), width + 12)]
    for k, v in items:
        text = "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"{k.ljust(width)}  {text.rjust(10)}")
    return "\n".join(lines)


def describe_logs(logs: Any) -> str | None:
    """How retain logs were given, for a result's settings: their path, ``"given"`` or None."""
    import os

    if logs is None:
        return None
    return str(logs) if isinstance(logs, (str, os.PathLike)) else "given"
