"""TOFU (Maini et al. 2024) as open-unlearning evaluates it: readers and the benchmark table.

Files (locuslab/TOFU's release; each ``NAME.json`` holds JSON lines, see
`jax_unlearn.eval.benchmark_files` for the other layouts):

* ``forget01|05|10``, ``holdout01|05|10``, ``retain90|95|99``, ``full``: ``question``, ``answer``;
* ``forget01|05|10_perturbed``, ``retain_perturbed``: also ``paraphrased_answer`` (a string),
  ``perturbed_answer`` (a list of strings) and optionally ``paraphrased_question``;
* ``real_authors_perturbed``, ``world_facts_perturbed`` (what open-unlearning evaluates; the
  plain ``real_authors``/``world_facts`` are read with the same fields): ``question``,
  ``answer``, ``perturbed_answer`` (a list) -- multiple-choice-like: the answer against its
  perturbed alternatives;
* ``idk.jsonl`` (open-unlearning's "I don't know" responses): one response per line.

`evaluate_tofu` computes open-unlearning's ``configs/eval/tofu.yaml`` table (see its docstring
and ``docs/reference.md``, section "TOFU and MUSE metrics").
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_unlearn.data import DataError

from . import benchmark_files as bf
from . import open_unlearning as ou
from .ou_scoring import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    Row,
    attack_scores,
    by_index,
    describe_logs,
    format_table,
    generations,
    grad_norms,
    load_retain_logs,
    mean_of,
    mia_results,
    qa_row,
    retain_auc,
    retain_truth_ratios,
    row_statistics,
)

HUB_NAME = "locuslab/TOFU"
#: open-unlearning's ``configs/eval/tofu.yaml``: the metrics its TOFU evaluation reports.
DEFAULT_METRICS = ("forget_truth_ratio", "forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
                   "privleak", "extraction_strength")
METRICS = DEFAULT_METRICS + ("exact_memorization", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob",
                             "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference",
                             "mia_gradnorm")
_PERTURBED = re.compile(r"^(forget\d+|retain)_perturbed$")
_OPTIONS = re.compile(r"^(real_authors|world_facts)(_perturbed)?$")


@dataclasses.dataclass(frozen=True, slots=True)
class TofuItem:
    """A TOFU row: ``question``, ``answer`` and, in the perturbed splits, ``paraphrased_answer``,
    ``perturbed_answers`` and ``paraphrased_question``."""

    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None


def required_fields(split: str) -> tuple[str, ...]:
    """Fields a split's rows must have beyond ``question`` and ``answer``."""
    if _PERTURBED.match(split):
        return ("paraphrased_answer", "perturbed_answer")
    if _OPTIONS.match(split):
        return ("perturbed_answer",)
    return ()


def as_tofu_item(row: Any, where: str, require: Sequence[str] = ()) -> TofuItem:
    """A `TofuItem` from a row, `DataError` naming ``where`` and the field otherwise."""
    need = ["a non-empty string 'question'", "a string 'answer'"]
    if "paraphrased_answer" in require:
        need.append("a string 'paraphrased_answer'")
    if "perturbed_answer" in require:
        need.append("a non-empty list of strings 'perturbed_answer'")
    expected = "a TOFU row with " + ", ".join(need[:-1]) + " and " + need[-1]
    question = bf.string(where, row, "question", expected, nonempty=True)
    answer = bf.string(where, row, "answer", expected)
    para = pert = pq = None
    if "paraphrased_answer" in require or (isinstance(row, Mapping) and row.get("paraphrased_answer") is not None):
        para = bf.string(where, row, "paraphrased_answer", expected)
    if "perturbed_answer" in require or (isinstance(row, Mapping) and row.get("perturbed_answer") is not None):
        pert = bf.strings(where, row, "perturbed_answer", expected)
    if isinstance(row, Mapping) and row.get("paraphrased_question") is not None:
        pq = bf.string(where, row, "paraphrased_question", expected + " (and an optional string 'paraphrased_question')")
    return TofuItem(question, answer, para, pert or (), pq)


def read_tofu_split(source: str | os.PathLike, split: str | None = None) -> list[TofuItem]:
    """The rows of one TOFU split.

    Args:
      source: the split's file (``split`` defaults to its name: ``forget10_perturbed.json``), a
        folder holding it (``split`` required) or ``"hub:locuslab/TOFU"`` (``split`` required,
        through the optional ``datasets`` package).
      split: ``forget01``, ``forget10_perturbed``, ``holdout10``, ``retain90``,
        ``retain_perturbed``, ``real_authors[_perturbed]``, ``world_facts[_perturbed]``, ``full``...;
        it decides the fields required (`required_fields`).

    Raises `DataError` naming the file, row and field of a malformed row, or an empty split.
    """
    if bf.is_hub(source):
        if split is None:
            raise ValueError(f"reading {source} needs the split name (e.g. split='forget10_perturbed')")
        rows, where = bf.hub_rows(source[len(bf.HUB_PREFIX):], split, "train"), f"{source} [{split}]"
    else:
        path = Path(source)
        if path.is_dir():
            if split is None:
                raise ValueError(f"{path} is a folder: name the split to read (e.g. split='forget10_perturbed')")
            files = bf.find_split(path, split)
        else:
            files = [path]
            split = split or path.stem
        rows, where = bf.rows(files), str(files[0])
    require = required_fields(split)
    return bf.nonempty([as_tofu_item(row, loc, require) for loc, row in rows], f"{where} (TOFU split {split!r})")


def read_idk(source: str | os.PathLike) -> list[str]:
    """open-unlearning's "I don't know" responses (``data/idk.jsonl``): one per line, stripped,
    blank lines skipped (they read the raw lines; a JSON string line is kept as written)."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file of idk responses")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    out = [line.strip() for line in lines if line.strip()]
    if not out:
        raise DataError(f"{path}: expected one idk response per line, found none")
    return out


def holdout_for(forget_split: str) -> str:
    """``forget10`` -> ``holdout10`` (open-unlearning's pairing)."""
    m = re.fullmatch(r"forget(\d+)", forget_split)
    if not m:
        raise ValueError(f"forget_split={forget_split!r}: expected forget01, forget05 or forget10 (or pass holdout_split)")
    return f"holdout{m.group(1)}"


@dataclasses.dataclass(frozen=True)
class TofuData:
    """The TOFU splits one evaluation reads (``None``: not read).

    ``forget``: ``{forget_split}_perturbed`` (or the plain ``{forget_split}`` when no metric needs
    paraphrased / perturbed answers and the perturbed file is absent); ``holdout``:
    ``{holdout_split}``; ``retain``: ``retain_perturbed``; ``real_authors`` and ``world_facts``:
    their ``_perturbed`` splits.
    """

    forget: list[TofuItem]
    holdout: list[TofuItem] | None = None
    retain: list[TofuItem] | None = None
    real_authors: list[TofuItem] | None = None
    world_facts: list[TofuItem] | None = None
    forget_split: str = "forget10"
    holdout_split: str = "holdout10"
    source: str = ""


def _needs(metrics: Sequence[str]) -> dict[str, bool]:
    return {"perturbed": any(m in metrics for m in ("forget_truth_ratio", "forget_quality", "forget_Q_A_PARA_Prob",
                                                    "forget_Q_A_PERT_Prob")),
            "holdout": "privleak" in metrics or any(m.startswith("mia_") for m in metrics),
            "utility": "model_utility" in metrics}


def load_tofu(source: str | os.PathLike, *, forget_split: str = "forget10", holdout_split: str | None = None,
              metrics: Sequence[str] = DEFAULT_METRICS) -> TofuData:
    """Read the splits that ``metrics`` need from a folder of TOFU files or ``"hub:locuslab/TOFU"``."""
    holdout_split = holdout_split or holdout_for(forget_split)
    need = _needs(check_metrics(metrics))
    hub = bf.is_hub(source)
    if not hub and not Path(source).is_dir():
        raise FileNotFoundError(f"{source}: no such TOFU folder (expected the files of locuslab/TOFU, e.g. "
                                f"{forget_split}_perturbed.json)")

    def read(split):
        return read_tofu_split(source, split)

    forget_name = f"{forget_split}_perturbed"
    if not need["perturbed"] and not hub:
        try:
            bf.find_split(source, forget_name)
        except DataError:
            forget_name = forget_split
    return TofuData(
        forget=read(forget_name),
        holdout=read(holdout_split) if need["holdout"] else None,
        retain=read("retain_perturbed") if need["utility"] else None,
        real_authors=read("real_authors_perturbed") if need["utility"] else None,
        world_facts=read("world_facts_perturbed") if need["utility"] else None,
        forget_split=forget_split, holdout_split=holdout_split, source=str(source))


def check_metrics(metrics: Sequence[str], allowed: Sequence[str] = METRICS) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in allowed]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {list(allowed)}")
    if not metrics:
        raise ValueError("no metric to evaluate")
    return tuple(dict.fromkeys(metrics))


class _Batch:
    """Rows collected from several sets, scored in one pass; ``add`` returns their positions."""

    def __init__(self):
        self.rows: list[Row] = []

    def add(self, rows: Sequence[Row]) -> list[int]:
        start = len(self.rows)
        self.rows.extend(rows)
        return list(range(start, len(self.rows)))


def _question(item: TofuItem, key: str, where: str) -> str:
    if key == "question":
        return item.question
    if key == "paraphrased_question":
        if item.paraphrased_question is None:
            raise DataError(f"question_key='paraphrased_question' but a row of {where} has no paraphrased_question")
        return item.paraphrased_question
    raise ValueError(f"question_key={key!r}: expected 'question' or 'paraphrased_question'")


def evaluate_tofu(model: Any, tokenizer: Any, data: TofuData | str | os.PathLike, *,
                  forget_split: str = "forget10", holdout_split: str | None = None,
                  metrics: Sequence[str] = DEFAULT_METRICS, retain_logs: Any = None, reference_model: Any = None,
                  template: PromptTemplate = DEFAULT_TEMPLATE, question_key: str = "question",
                  truth_ratio_definition: str = "open_unlearning", es_definition: str = "open_unlearning",
                  k: float = 0.4, gradnorm_p: float = 2.0, max_new_tokens: int = 200, use_stemmer: bool = True,
                  max_length: int = 512, batch_size: int = 16, context_length: int | None = None) -> dict[str, Any]:
    """open-unlearning's TOFU evaluation of ``model`` (a `CausalLM`): a JSON-ready dict.

    Args:
      model, tokenizer: the model and its Hugging Face tokenizer.
      data: a `TofuData`, a folder of TOFU files, or ``"hub:locuslab/TOFU"``.
      forget_split, holdout_split: ``forget01|05|10`` and its holdout (default ``holdoutNN``).
      metrics: names from `METRICS`; default `DEFAULT_METRICS` (open-unlearning's tofu.yaml).
      retain_logs: the retain model's logs (path or dict; open-unlearning's ``TOFU_EVAL.json`` or a
        result of this function on the retain model): its ``forget_truth_ratio`` values give
        forget quality (``None`` without them, as open-unlearning) and its ``mia_min_k`` AUC the
        privleak reference (0.5 without it).
      reference_model: the reference model of ``mia_reference`` (e.g. the retain model).
      template: the prompt template (`PromptTemplate`; the model's, as in open-unlearning's
        ``configs/model/*.yaml``).
      question_key: ``"question"`` or ``"paraphrased_question"`` for the forget and retain sets.
      truth_ratio_definition: ``"open_unlearning"`` (default) or ``"tofu_paper"``
        (`open_unlearning.truth_ratios`); es_definition: ``"open_unlearning"`` or ``"paper"``.
      k: Min-K% fraction (0.4); gradnorm_p: GradNorm's norm (1, 2 or inf); max_new_tokens: greedy
        tokens per ROUGE answer (200); use_stemmer: ROUGE stemming (open-unlearning: True);
        max_length: tokenisation cut of a QA row (512).
      batch_size: rows per jitted pass; context_length: the model context (default
        ``max_position_embeddings``).

    Returns:
      ``{"benchmark": "TOFU", "forget_split", "holdout_split", "summary": {metric: value},
      "logs": {name: {"agg_value", "value_by_index"?, ...}}, "settings": {...}}``; ``summary``
      holds the requested metrics, ``logs`` everything computed in open-unlearning's
      ``TOFU_EVAL.json`` layout (model utility's nine components included), so a retain
      model's result serves as ``retain_logs``.
    """
    metrics = check_metrics(metrics)
    ou.check_choice(truth_ratio_definition, ou.TRUTH_RATIO_DEFINITIONS, "truth_ratio_definition")
    ou.check_choice(es_definition, ou.EXTRACTION_STRENGTH_DEFINITIONS, "es_definition")
    if gradnorm_p not in ou.GRADNORM_P:
        raise ValueError(f"gradnorm_p must be 1, 2 or inf, got {gradnorm_p!r}")
    if "mia_reference" in metrics and reference_model is None:
        raise ValueError("the metric 'mia_reference' needs reference_model= (e.g. the retain model)")
    if not isinstance(data, TofuData):
        data = load_tofu(data, forget_split=forget_split, holdout_split=holdout_split, metrics=metrics)
    need = _needs(metrics)
    for part, flag in (("holdout", "holdout"), ("retain", "utility"), ("real_authors", "utility"),
                       ("world_facts", "utility")):
        if need[flag] and getattr(data, part) is None:
            raise DataError(f"the TofuData has no {part!r} set, which the metrics {list(metrics)} need")
    if need["perturbed"] and any(not it.perturbed_answers or it.paraphrased_answer is None for it in data.forget):
        raise DataError(f"the forget set ({data.forget_split}) lacks paraphrased/perturbed answers, which the "
                        "truth ratio and forget quality need: read the _perturbed split")
    retain = load_retain_logs(retain_logs)

    def qa(items, key, answer):
        return [qa_row(tokenizer, _question(it, key, "the data"), answer(it), template=template, max_length=max_length)
                for it in items]

    def perturbed(items, key):
        return [[qa_row(tokenizer, _question(it, key, "the data"), a, template=template, max_length=max_length)
                 for a in it.perturbed_answers] for it in items]

    batch, plan = _Batch(), {}
    sets = {"forget": (data.forget, question_key)}
    if need["holdout"]:
        sets["holdout"] = (data.holdout, "question")
    if need["utility"]:
        sets |= {"retain": (data.retain, question_key), "ra": (data.real_authors, "question"),
                 "wf": (data.world_facts, "question")}
    rows: dict[str, Any] = {}
    for name, (items, key) in sets.items():
        rows[name] = qa(items, key, lambda it: it.answer)
        plan[name] = batch.add(rows[name])
    para_sets = (["forget"] if need["perturbed"] else []) + (["retain"] if need["utility"] else [])
    for name in para_sets:
        items, key = sets[name]
        plan[name + "_para"] = batch.add(qa(items, key, lambda it: it.paraphrased_answer))
    for name in para_sets + (["ra", "wf"] if need["utility"] else []):
        items, key = sets[name]
        nested = perturbed(items, key)
        flat = batch.add([r for group in nested for r in group])
        it = iter(flat)
        plan[name + "_pert"] = [[next(it) for _ in group] for group in nested]

    mia = [m[4:] for m in metrics if m.startswith("mia_")]
    if "privleak" in metrics and "min_k" not in mia:
        mia.append("min_k")
    greedy = "extraction_strength" in metrics or "exact_memorization" in metrics
    stats = row_statistics(model, tokenizer, batch.rows, moments="min_k_plus_plus" in mia, greedy=greedy,
                           batch_size=batch_size, context_length=context_length)
    losses = np.array([ou.avg_loss(s["logp"]) for s in stats])
    logs: dict[str, Any] = {}

    def prob_log(idx):
        return {"agg_value": mean_of([np.exp(-losses[i]) for i in idx]),
                "value_by_index": by_index([{"prob": float(np.exp(-losses[i])), "avg_loss": float(losses[i])}
                                            for i in idx], None)}

    def pert_log(groups):
        return {"agg_value": mean_of([np.exp(-losses[g]) for g in groups]),
                "value_by_index": by_index([{"prob": np.exp(-losses[g]).tolist(), "avg_loss": losses[g].tolist()}
                                            for g in groups], None)}

    def truth_ratio_log(correct, wrong, aggregator):
        tr = ou.truth_ratios(losses[correct], [losses[g] for g in wrong], definition=truth_ratio_definition,
                             aggregator=aggregator)
        return {"agg_value": ou.aggregate_truth_ratio(tr, aggregator), "value_by_index": by_index(tr)}

    # generations for ROUGE: every set that needs them, in one batched call
    rouge_sets = (["forget"] if "forget_Q_A_ROUGE" in metrics else []) + (["retain", "ra", "wf"] if need["utility"] else [])
    gen_rows = [r for name in rouge_sets for r in rows[name]]
    texts = iter(generations(model, tokenizer, gen_rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             context_length=context_length))

    def rouge_log(name):
        scores = []
        for r in rows[name]:
            gen = next(texts)
            scores.append({**ou.rouge_scores(gen, r.ground_truth, use_stemmer),
                           "input": tokenizer.decode(list(r.prompt), skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=True),
                           "ground_truth": r.ground_truth, "generation": gen})
        return {"agg_value": float(np.mean([s["rougeL_recall"] for s in scores])), "value_by_index": by_index(scores, None)}

    rouge_logs = {name: rouge_log(name) for name in rouge_sets}

    # forget set
    if "forget_Q_A_Prob" in metrics:
        logs["forget_Q_A_Prob"] = prob_log(plan["forget"])
    if "forget_Q_A_ROUGE" in metrics:
        logs["forget_Q_A_ROUGE"] = rouge_logs["forget"]
    if need["perturbed"]:
        logs["forget_Q_A_PARA_Prob"] = prob_log(plan["forget_para"])
        logs["forget_Q_A_PERT_Prob"] = pert_log(plan["forget_pert"])
        logs["forget_truth_ratio"] = truth_ratio_log(plan["forget_para"], plan["forget_pert"], "closer_to_1_better")
    if "forget_quality" in metrics:
        ref = retain_truth_ratios(retain)
        if ref is None:
            logs["forget_quality"] = {"agg_value": None}
        else:
            own = [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
            fq = ou.forget_quality(own, ref)
            logs["forget_quality"] = {"agg_value": fq["pvalue"], "ks_statistic": fq["statistic"]}
    if greedy:
        hits = [stats[i]["hit"] for i in plan["forget"]]
        if "extraction_strength" in metrics:
            es = [ou.extraction_strength(h, es_definition) for h in hits]
            logs["extraction_strength"] = {"agg_value": float(np.mean(es)), "value_by_index": by_index(es)}
        if "exact_memorization" in metrics:
            em = [ou.exact_memorization(h) for h in hits]
            logs["exact_memorization"] = {"agg_value": mean_of(em), "value_by_index": by_index(em)}

    # model utility
    if need["utility"]:
        comp = {
            "retain_Q_A_Prob": prob_log(plan["retain"]),
            "retain_Q_A_ROUGE": rouge_logs["retain"],
            "retain_Truth_Ratio": truth_ratio_log(plan["retain_para"], plan["retain_pert"], "true_better"),
        }
        for short in ("ra", "wf"):
            logs[f"{short}_Q_A_Prob"] = prob_log(plan[short])
            logs[f"{short}_Q_A_PERT_Prob"] = pert_log(plan[f"{short}_pert"])
            norm = ou.probability_w_options(losses[plan[short]], [losses[g] for g in plan[f"{short}_pert"]])
            comp[f"{short}_Q_A_Prob_normalised"] = {"agg_value": float(np.mean(norm)),
                                                    "value_by_index": by_index(norm, "prob")}
            comp[f"{short}_Q_A_ROUGE"] = rouge_logs[short]
            comp[f"{short}_Truth_Ratio"] = truth_ratio_log(plan[short], plan[f"{short}_pert"], "true_better")
        logs["retain_Q_A_PARA_Prob"] = prob_log(plan["retain_para"])
        logs["retain_Q_A_PERT_Prob"] = pert_log(plan["retain_pert"])
        logs.update(comp)
        logs["model_utility"] = {"agg_value": ou.model_utility({n: comp[n]["agg_value"]
                                                                for n in ou.MODEL_UTILITY_COMPONENTS})}

    # membership inference: forget vs holdout answers
    if mia:
        f_idx, h_idx = plan["forget"], plan["holdout"]
        f_rows, h_rows = rows["forget"], rows["holdout"]
        ref_stats = norms = None
        if "reference" in mia:
            ref_stats = row_statistics(reference_model, tokenizer, f_rows + h_rows, batch_size=batch_size,
                                       context_length=context_length)
        if "gradnorm" in mia:
            norms = grad_norms(model, tokenizer, f_rows + h_rows, p=gradnorm_p, batch_size=batch_size,
                               context_length=context_length)
        for attack in mia:
            scores = attack_scores(attack, tokenizer, f_rows + h_rows, [stats[i] for i in f_idx + h_idx], k=k,
                                   ref_stats=ref_stats, norms=norms)
            logs[f"mia_{attack}"] = mia_results(attack, scores[:len(f_idx)], scores[len(f_idx):])
    if "privleak" in metrics:
        logs["privleak"] = {"agg_value": ou.privleak(logs["mia_min_k"]["agg_value"], retain_auc(retain))}

    return {"benchmark": "TOFU", "forget_split": data.forget_split, "holdout_split": data.holdout_split,
            "summary": {m: logs[m]["agg_value"] for m in metrics},
            "logs": logs,
            "settings": {"source": data.source, "question_key": question_key, "template": dataclasses.asdict(template),
                         "truth_ratio_definition": truth_ratio_definition, "es_definition": es_definition,
                         "k": k, "gradnorm_p": gradnorm_p, "max_new_tokens": max_new_tokens,
                         "use_stemmer": use_stemmer, "max_length": max_length,
                         "retain_logs": describe_logs(retain_logs),
                         "n": {name: len(items) for name, (items, _) in sets.items()}}}


def format_tofu_table(result: Mapping[str, Any]) -> str:
    """The summary of an `evaluate_tofu` result as aligned text lines."""
    title = f"TOFU {result.get('forget_split', '')} (holdout: {result.get('holdout_split', '')})"
    return format_table(title, result["summary"])
