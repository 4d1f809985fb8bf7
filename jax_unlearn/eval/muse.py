"""MUSE (Shi et al. 2024) as open-unlearning evaluates it: readers and the benchmark table.

Files under a MUSE folder (``SUBSET/SPLIT.json``, as muse-bench's GitHub ``data/<corpus>/`` and
its hub subsets; see `jax_unlearn.eval.benchmark_files` for the other layouts):

* ``knowmem/forget_qa``, ``knowmem/retain_qa`` (GitHub: ``retain2_qa``) and their ``_icl``
  few-shot sets: ``question``, ``answer``;
* ``verbmem/forget``: ``prompt``, ``gt`` (the true continuation);
* ``privleak/forget``, ``privleak/holdout`` (and ``retain``/``retain2``, not used by the
  table): texts, as ``{"text": ...}`` rows (hub) or bare JSON strings (GitHub).

`evaluate_muse` computes open-unlearning's ``configs/eval/muse.yaml`` table (see its docstring
and ``docs/reference.md``, section "TOFU and MUSE metrics").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_unlearn.data import DataError, QAPair

from . import benchmark_files as bf
from . import open_unlearning as ou
from .ou_scoring import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    attack_scores,
    by_index,
    completion_row,
    describe_logs,
    format_table,
    generations,
    grad_norms,
    load_retain_logs,
    mean_of,
    mia_results,
    qa_row,
    retain_auc,
    row_statistics,
)
from .tofu import check_metrics

HUB_NAME = "muse-bench/MUSE-News"
#: open-unlearning's ``configs/eval/muse.yaml``: the metrics its MUSE evaluation reports.
DEFAULT_METRICS = ("forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak",
                   "extraction_strength")
METRICS = DEFAULT_METRICS + ("exact_memorization", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus",
                             "mia_reference", "mia_gradnorm")
KNOWMEM_STOPWORDS = ("\n\n", "\nQuestion", "Question:")  # muse_metrics/*_knowmem_ROUGE.yaml


@dataclasses.dataclass(frozen=True, slots=True)
class VerbmemItem:
    """A verbmem row: ``prompt`` and its true continuation ``gt``."""

    prompt: str
    gt: str


def _split_rows(source, subset: str, split: str, *alternatives: str):
    if bf.is_hub(source):
        return bf.hub_rows(source[len(bf.HUB_PREFIX):], subset, split), f"{source} [{subset}/{split}]"
    path = Path(source)
    if path.is_file():
        return bf.rows([path]), str(path)
    files = bf.find_split(path / subset if (path / subset).is_dir() else path, split, *alternatives)
    return bf.rows(files), str(files[0])


def read_muse_qa(source: str | os.PathLike, split: str = "forget_qa", *alternatives: str) -> list[QAPair]:
    """knowmem QA pairs (``question``, ``answer``) from a file, a MUSE folder (``knowmem/{split}``) or
    ``"hub:muse-bench/MUSE-News"``."""
    rows, where = _split_rows(source, "knowmem", split, *alternatives)
    expected = "a MUSE knowmem row with a non-empty string 'question' and a string 'answer'"
    out = [QAPair(bf.string(loc, r, "question", expected, nonempty=True), bf.string(loc, r, "answer", expected))
           for loc, r in rows]
    return bf.nonempty(out, f"{where} (MUSE knowmem {split!r})")


def read_muse_verbmem(source: str | os.PathLike, split: str = "forget") -> list[VerbmemItem]:
    """verbmem rows (``prompt``, ``gt``) from a file, a MUSE folder (``verbmem/{split}``) or the hub."""
    rows, where = _split_rows(source, "verbmem", split)
    expected = "a MUSE verbmem row with a string 'prompt' and a non-empty string 'gt'"
    out = [VerbmemItem(bf.string(loc, r, "prompt", expected), bf.string(loc, r, "gt", expected, nonempty=True))
           for loc, r in rows]
    return bf.nonempty(out, f"{where} (MUSE verbmem {split!r})")


def read_muse_texts(source: str | os.PathLike, split: str = "forget", subset: str = "privleak",
                    *alternatives: str) -> list[str]:
    """privleak (or raw) texts: ``{"text": str}`` rows or bare strings, from a file, a MUSE folder
    (``{subset}/{split}``) or the hub."""
    rows, where = _split_rows(source, subset, split, *alternatives)
    expected = "a MUSE text: a non-empty string, or a row with a non-empty string 'text'"
    out = []
    for loc, r in rows:
        if isinstance(r, str):
            if not r.strip():
                raise DataError(f"{loc}: expected {expected} (the string is empty)")
            out.append(r)
        else:
            out.append(bf.string(loc, r, "text", expected, nonempty=True))
    return bf.nonempty(out, f"{where} (MUSE {subset} {split!r})")


@dataclasses.dataclass(frozen=True)
class MuseData:
    """The MUSE splits one evaluation reads (``None``: not read)."""

    forget_qa: list[QAPair] | None = None
    forget_qa_icl: list[QAPair] | None = None
    retain_qa: list[QAPair] | None = None
    retain_qa_icl: list[QAPair] | None = None
    verbmem: list[VerbmemItem] | None = None
    privleak_forget: list[str] | None = None
    privleak_holdout: list[str] | None = None
    source: str = ""


def _needs(metrics: Sequence[str]) -> dict[str, bool]:
    return {"forget_qa": "forget_knowmem_ROUGE" in metrics, "retain_qa": "retain_knowmem_ROUGE" in metrics,
            "verbmem": any(m in metrics for m in ("forget_verbmem_ROUGE", "extraction_strength", "exact_memorization")),
            "privleak": "privleak" in metrics or any(m.startswith("mia_") for m in metrics)}


def load_muse(source: str | os.PathLike, *, metrics: Sequence[str] = DEFAULT_METRICS) -> MuseData:
    """Read the splits ``metrics`` need from a MUSE folder or ``"hub:muse-bench/MUSE-News"`` (or -Books)."""
    need = _needs(check_metrics(metrics, METRICS))
    if not bf.is_hub(source) and not Path(source).is_dir():
        raise FileNotFoundError(f"{source}: no such MUSE folder (expected knowmem/, verbmem/ and privleak/ files)")
    hub = bf.is_hub(source)
    return MuseData(
        forget_qa=read_muse_qa(source, "forget_qa") if need["forget_qa"] else None,
        forget_qa_icl=read_muse_qa(source, "forget_qa_icl") if need["forget_qa"] else None,
        retain_qa=read_muse_qa(source, "retain_qa", *(() if hub else ("retain2_qa",))) if need["retain_qa"] else None,
        retain_qa_icl=(read_muse_qa(source, "retain_qa_icl", *(() if hub else ("retain2_qa_icl",)))
                       if need["retain_qa"] else None),
        verbmem=read_muse_verbmem(source) if need["verbmem"] else None,
        privleak_forget=read_muse_texts(source, "forget") if need["privleak"] else None,
        privleak_holdout=read_muse_texts(source, "holdout") if need["privleak"] else None,
        source=str(source))


def evaluate_muse(model: Any, tokenizer: Any, data: MuseData | str | os.PathLike, *,
                  metrics: Sequence[str] = DEFAULT_METRICS, retain_logs: Any = None, reference_model: Any = None,
                  template: PromptTemplate = DEFAULT_TEMPLATE, es_definition: str = "open_unlearning",
                  k: float = 0.4, gradnorm_p: float = 2.0, knowmem_max_new_tokens: int = 32,
                  verbmem_max_new_tokens: int = 128, use_stemmer: bool = True, qa_max_length: int = 512,
                  text_max_length: int = 2048, batch_size: int = 8, context_length: int | None = None) -> dict[str, Any]:
    """open-unlearning's MUSE evaluation of ``model`` (a `CausalLM`): a JSON-ready dict.

    Args:
      data: a `MuseData`, a MUSE folder, or ``"hub:muse-bench/MUSE-News"`` (or ``MUSE-Books``).
      metrics: names from `METRICS`; default `DEFAULT_METRICS` (open-unlearning's muse.yaml).
      retain_logs: the retain model's logs (open-unlearning's ``MUSE_EVAL.json`` or this function's
        result on the retain model): its ``mia_min_k`` AUC is privleak's reference (0.5 without).
      reference_model: the reference model of ``mia_reference``.
      template: the prompt template of the knowmem questions (default: open-unlearning's
        Llama-2 template, ``"Question: {q}\\nAnswer: "``, MUSE's own prompt).
      es_definition, k, gradnorm_p, use_stemmer: as in `evaluate_tofu`.
      knowmem_max_new_tokens (32, cut at `KNOWMEM_STOPWORDS`), verbmem_max_new_tokens (128):
        greedy tokens per answer / continuation.
      qa_max_length (512), text_max_length (2048): open-unlearning's tokenisation cuts of a
        knowmem row and of a verbmem / privleak text.
      batch_size, context_length: as in `evaluate_tofu`.

    Returns:
      ``{"benchmark": "MUSE", "summary": {metric: value}, "logs": {...}, "settings": {...}}`` in the
      layout of `evaluate_tofu`'s result. ROUGE values are ROUGE-L F1 (open-unlearning's
      ``rouge_type: rougeL_f1`` for MUSE).
    """
    metrics = check_metrics(metrics, METRICS)
    ou.check_choice(es_definition, ou.EXTRACTION_STRENGTH_DEFINITIONS, "es_definition")
    if gradnorm_p not in ou.GRADNORM_P:
        raise ValueError(f"gradnorm_p must be 1, 2 or inf, got {gradnorm_p!r}")
    if "mia_reference" in metrics and reference_model is None:
        raise ValueError("the metric 'mia_reference' needs reference_model= (e.g. the retain model)")
    if not isinstance(data, MuseData):
        data = load_muse(data, metrics=metrics)
    need = _needs(metrics)
    parts = {"forget_qa": ("forget_qa", "forget_qa_icl"), "retain_qa": ("retain_qa", "retain_qa_icl"),
             "verbmem": ("verbmem",), "privleak": ("privleak_forget", "privleak_holdout")}
    for flag, names in parts.items():
        for name in names:
            if need[flag] and getattr(data, name) is None:
                raise DataError(f"the MuseData has no {name!r} set, which the metrics {list(metrics)} need")
    retain = load_retain_logs(retain_logs)
    logs: dict[str, Any] = {}

    def knowmem_rows(items, icl):
        shots = [(s.question, s.answer) for s in icl]
        return [qa_row(tokenizer, it.question, it.answer, template=template, fewshot=shots, max_length=qa_max_length)
                for it in items]

    def rouge_log(rows, texts):
        scores = [{**ou.rouge_scores(gen, r.ground_truth, use_stemmer),
                   "input": tokenizer.decode(list(r.prompt), skip_special_tokens=True, clean_up_tokenization_spaces=True),
                   "ground_truth": r.ground_truth, "generation": gen} for r, gen in zip(rows, texts)]
        return {"agg_value": float(np.mean([s["rougeL_f1"] for s in scores])), "value_by_index": by_index(scores, None)}

    gen_kw = dict(batch_size=batch_size, context_length=context_length)
    for flag, name, items, icl in (("forget_qa", "forget_knowmem_ROUGE", data.forget_qa, data.forget_qa_icl),
                                   ("retain_qa", "retain_knowmem_ROUGE", data.retain_qa, data.retain_qa_icl)):
        if need[flag]:
            rows = knowmem_rows(items, icl)
            texts = generations(model, tokenizer, rows, max_new_tokens=knowmem_max_new_tokens,
                                stopwords=KNOWMEM_STOPWORDS, **gen_kw)
            logs[name] = rouge_log(rows, texts)
    verb_rows = ([completion_row(tokenizer, it.prompt, it.gt, max_length=text_max_length, insert_space=True)
                  for it in data.verbmem] if need["verbmem"] else [])
    if "forget_verbmem_ROUGE" in metrics:
        texts = generations(model, tokenizer, verb_rows, max_new_tokens=verbmem_max_new_tokens, **gen_kw)
        logs["forget_verbmem_ROUGE"] = rouge_log(verb_rows, texts)

    mia = [m[4:] for m in metrics if m.startswith("mia_")]
    if "privleak" in metrics and "min_k" not in mia:
        mia.append("min_k")
    greedy = "extraction_strength" in metrics or "exact_memorization" in metrics
    mia_rows = []
    if mia:
        mia_rows = [completion_row(tokenizer, "", t, max_length=text_max_length)
                    for t in data.privleak_forget + data.privleak_holdout]
    scored = (verb_rows if greedy else []) + mia_rows
    stats = row_statistics(model, tokenizer, scored, moments="min_k_plus_plus" in mia, greedy=greedy,
                           batch_size=batch_size, context_length=context_length)
    if greedy:
        hits = [s["hit"] for s in stats[:len(verb_rows)]]
        if "extraction_strength" in metrics:
            es = [ou.extraction_strength(h, es_definition) for h in hits]
            logs["extraction_strength"] = {"agg_value": float(np.mean(es)), "value_by_index": by_index(es)}
        if "exact_memorization" in metrics:
            em = [ou.exact_memorization(h) for h in hits]
            logs["exact_memorization"] = {"agg_value": mean_of(em), "value_by_index": by_index(em)}
    if mia:
        mia_stats = stats[len(scored) - len(mia_rows):]
        n_f = len(data.privleak_forget)
        ref_stats = norms = None
        if "reference" in mia:
            ref_stats = row_statistics(reference_model, tokenizer, mia_rows, batch_size=batch_size,
                                       context_length=context_length)
        if "gradnorm" in mia:
            norms = grad_norms(model, tokenizer, mia_rows, p=gradnorm_p, batch_size=batch_size,
                               context_length=context_length)
        for attack in mia:
            scores = attack_scores(attack, tokenizer, mia_rows, mia_stats, k=k, ref_stats=ref_stats, norms=norms)
            logs[f"mia_{attack}"] = mia_results(attack, scores[:n_f], scores[n_f:])
    if "privleak" in metrics:
        logs["privleak"] = {"agg_value": ou.privleak(logs["mia_min_k"]["agg_value"], retain_auc(retain))}

    return {"benchmark": "MUSE", "summary": {m: logs[m]["agg_value"] for m in metrics}, "logs": logs,
            "settings": {"source": data.source, "template": dataclasses.asdict(template), "es_definition": es_definition,
                         "k": k, "gradnorm_p": gradnorm_p, "knowmem_max_new_tokens": knowmem_max_new_tokens,
                         "verbmem_max_new_tokens": verbmem_max_new_tokens, "use_stemmer": use_stemmer,
                         "qa_max_length": qa_max_length, "text_max_length": text_max_length,
                         "retain_logs": describe_logs(retain_logs)}}


def format_muse_table(result: Mapping[str, Any]) -> str:
    """The summary of an `evaluate_muse` result as aligned text lines."""
    return format_table("MUSE", result["summary"])
