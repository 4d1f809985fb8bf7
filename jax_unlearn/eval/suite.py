"""An evaluation suite over files: multiple choice, QA probes, MIA and perplexity, run on any model.

`EvalSuite` reads and validates its files once (a typo is found before training, not after) and
evaluates a model with the functions of `jax_unlearn.eval`. `EvalSuite.run` returns the nested,
JSON-ready results that ``jax-unlearn eval`` prints; `flatten` turns them into the flat metric
names that runs log every N steps and select checkpoints by:

    mc/<file stem>/accuracy         multiple-choice accuracy (harness MMLU/WMDP format)
    qa/<file stem>/rouge_l_recall   RWKU-style QA, greedy answers, ROUGE-L recall
    mia_auroc/<attack>              loss, zlib, min_k, min_k_plus_plus (forget vs holdout texts)
    perplexity/<file stem>          token-weighted perplexity of a text file

With robustness attacks set (`jax_unlearn.eval.robustness`), the final evaluation (`run`'s
``attacks=True``, not the evaluations during a run) adds ``robustness``: the same metrics of
the model fine-tuned on ``relearn`` (``relearn_benign``) texts, of each ``quantize`` scheme,
and the ``paraphrase_mc`` / ``paraphrase_qa`` files' metrics, flattened as
``<attack>/<metric>``: ``relearn/mc/wmdp_bio/accuracy``, ``int4/mc/wmdp_bio/accuracy``,
``paraphrase/qa/rwku_para/rouge_l_recall``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from jax_unlearn import data

from .mia import ATTACKS, mia_auroc
from .multiple_choice import build_prompts, evaluate_multiple_choice
from .perplexity import perplexity
from .qa import evaluate_qa
from .robustness import RelearnConfig, Relearner, parse_scheme, quantize_model


def _stem(path: str) -> str:
    return Path(path).stem


@dataclasses.dataclass(frozen=True)
class EvalSuite:
    """Files to evaluate on and how (the ``eval`` section of a run config).

    ``num_fewshot`` solved examples from the multiple-choice file ``fewshot`` (e.g. the dev
    split; examples of the question's subject first when the file has subjects) precede each
    ``mc`` question.

    Raises `jax_unlearn.data.DataError` / ``FileNotFoundError`` naming the file (and key) when a
    file is missing or malformed, two files of one kind share a stem (and so a metric name), or
    ``num_fewshot`` asks for more examples than ``fewshot`` holds (or for some without it); `run`
    raises `DataError` naming the file whose items cannot be evaluated.
    """

    mc: tuple[str, ...] = ()
    qa: tuple[str, ...] = ()
    mia_forget: str | None = None
    mia_holdout: str | None = None
    perplexity: tuple[str, ...] = ()
    num_fewshot: int = 0
    subject: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 32
    fewshot: str | None = None
    relearn: str | None = None  # texts (part of the forget set) to fine-tune a copy on, then evaluate it
    relearn_benign: str | None = None  # benign texts (retain / general) to fine-tune a copy on
    relearn_steps: int = 10
    relearn_lr: float = 1e-5
    relearn_batch_size: int = 4
    relearn_max_length: int = 128
    relearn_seed: int = 0
    quantize: tuple[str, ...] = ()  # int8, int4 (per channel), int4_g128 (per group of 128 inputs), ...
    paraphrase_mc: tuple[str, ...] = ()  # the forget facts asked in templates never used in training
    paraphrase_qa: tuple[str, ...] = ()

    @classmethod
    def of(cls, source: Any) -> EvalSuite:
        """The suite whose settings are ``source``'s attributes of the same names (a run config's
        ``eval`` section, ``jax-unlearn eval``'s arguments); lists become tuples."""
        values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def __post_init__(self):
        if (self.mia_forget is None) != (self.mia_holdout is None):
            raise data.DataError("'eval.mia_forget' and 'eval.mia_holdout' go together: set both or neither")
        for key in ("mc", "qa", "perplexity"):
            paths = getattr(self, key)
            stems = [_stem(p) for p in paths]
            dup = next((s for s in stems if stems.count(s) > 1), None)
            if dup is not None:
                raise data.DataError(f"'eval.{key}' names two files called {dup!r}; their metrics would share a "
                                     "name (rename one)")
        if self.num_fewshot and self.fewshot is None:
            raise data.DataError(f"'eval.num_fewshot' is {self.num_fewshot}, but no file of solved examples is given: "
                                 "set 'eval.fewshot' (jax-unlearn eval: --fewshot) to a multiple-choice file, e.g. "
                                 "the dev split")
        self._check_attacks()
        read = {"mc": [(p, data.read_multiple_choice) for p in self.mc], "qa": [(p, data.read_qa) for p in self.qa],
                "relearn": [(p, data.read_texts) for p in (self.relearn, self.relearn_benign) if p is not None],
                "paraphrase_mc": [(p, data.read_multiple_choice) for p in self.paraphrase_mc],
                "paraphrase_qa": [(p, data.read_qa) for p in self.paraphrase_qa],
                "fewshot": [(p, data.read_multiple_choice) for p in (self.fewshot,) if p is not None],
                "perplexity": [(p, data.read_texts) for p in self.perplexity],
                "mia": [(p, data.read_texts) for p in (self.mia_forget, self.mia_holdout) if p is not None]}
        records = {}
        for key, items in read.items():
            for path, reader in items:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"'eval.{key}': file {path} does not exist")
                records[path] = reader(path)
        object.__setattr__(self, "_records", records)
        for path in self.mc:  # the prompts need no model: an impossible few-shot setting shows now
            with _naming("mc", path):
                build_prompts(records[path], num_fewshot=self.num_fewshot, fewshot=self._shots(), subject=self.subject)

    def _check_attacks(self) -> None:
        """Raises `DataError` naming the key of a robustness setting that cannot run."""
        for key in ("relearn_steps", "relearn_batch_size", "relearn_max_length"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise data.DataError(f"'eval.{key}' must be an integer >= 1, got {v!r}")
        try:
            RelearnConfig(self.relearn_steps, self.relearn_lr, self.relearn_batch_size, self.relearn_seed)
        except ValueError as err:
            raise data.DataError(f"'eval.relearn_lr': {err}") from None
        for scheme in self.quantize:
            try:
                parse_scheme(scheme)
            except ValueError as err:
                raise data.DataError(f"'eval.quantize': {err}") from None
        for key in ("paraphrase_mc", "paraphrase_qa"):
            stems = [_stem(p) for p in getattr(self, key)]
            dup = next((s for s in stems if stems.count(s) > 1), None)
            if dup is not None:
                raise data.DataError(f"'eval.{key}' names two files called {dup!r}; their metrics would share a name")
        if self.attacks_enabled() and not (self.mc or self.qa or self.mia_forget or self.perplexity
                                           or self.paraphrase_mc or self.paraphrase_qa):
            raise data.DataError("the robustness attacks ('eval.relearn', 'eval.quantize', ...) re-run the evaluation's "
                                 "metrics: give 'eval.mc', 'eval.qa', 'eval.perplexity' or 'eval.mia_forget' too")

    def attacks_enabled(self) -> bool:
        return bool(self.relearn or self.relearn_benign or self.quantize or self.paraphrase_mc or self.paraphrase_qa)

    def _shots(self) -> list | None:
        return None if self.fewshot is None else self._records[self.fewshot]

    def enabled(self) -> bool:
        return bool(self.mc or self.qa or self.mia_forget or self.perplexity)

    def metric_names(self) -> tuple[str, ...]:
        """The flat names `flatten` gives this suite's results."""
        return metric_names(self.mc, self.qa, self.mia_forget is not None, self.perplexity)

    def run(self, model: Any, tokenizer: Any, attacks: bool = True) -> dict:
        """Nested JSON-ready results: ``multiple_choice``, ``qa`` and ``perplexity`` per file,
        ``mia_auroc`` per attack and, with ``attacks`` and robustness settings, ``robustness``
        (`run_attacks`)."""
        out = self._run_metrics(model, tokenizer)
        if attacks and self.attacks_enabled():
            out["robustness"] = self.run_attacks(model, tokenizer)
        return out

    def run_attacks(self, model: Any, tokenizer: Any) -> dict:
        """``{attack: results}``: this suite's metrics of the model fine-tuned on ``relearn``
        (``"relearn"``) and ``relearn_benign`` (``"relearn_benign"``) texts, of each quantized copy
        (``"int8"``, ``"int4_g128"``, ...), and the metrics of the paraphrase files
        (``"paraphrase"``). ``model`` is unchanged."""
        out: dict[str, Any] = {}
        relearner = Relearner(RelearnConfig(self.relearn_steps, self.relearn_lr, self.relearn_batch_size,
                                            self.relearn_seed))
        for key, path in (("relearn", self.relearn), ("relearn_benign", self.relearn_benign)):
            if path is not None:
                with _naming(key, path):
                    rows = data.tokenize_texts(self._records[path], tokenizer, self.relearn_max_length, name=key)
                    out[key] = self._run_metrics(relearner(model, rows, name=key), tokenizer)
        for scheme in self.quantize:
            out[parse_scheme(scheme).name] = self._run_metrics(quantize_model(model, scheme), tokenizer)
        if self.paraphrase_mc or self.paraphrase_qa:
            para = dataclasses.replace(self, mc=self.paraphrase_mc, qa=self.paraphrase_qa, mia_forget=None,
                                       mia_holdout=None, perplexity=(), relearn=None, relearn_benign=None, quantize=(),
                                       paraphrase_mc=(), paraphrase_qa=())
            out["paraphrase"] = para._run_metrics(model, tokenizer)
        return out

    def _run_metrics(self, model: Any, tokenizer: Any) -> dict:
        r = self._records
        out: dict[str, Any] = {}
        if self.mc:
            out["multiple_choice"] = {}
            for path in self.mc:
                with _naming("mc", path):
                    res = evaluate_multiple_choice(model, tokenizer, r[path], num_fewshot=self.num_fewshot,
                                                   fewshot=self._shots(), subject=self.subject,
                                                   batch_size=self.batch_size)
                out["multiple_choice"][str(path)] = {"accuracy": float(res.accuracy), "n": int(len(res.answers)),
                                                     "by_subject": {k: float(v) for k, v in res.by_subject.items()}}
        if self.qa:
            out["qa"] = {}
            for path in self.qa:
                with _naming("qa", path):
                    res = evaluate_qa(model, tokenizer, r[path], batch_size=self.batch_size,
                                      max_new_tokens=self.max_new_tokens)
                out["qa"][str(path)] = {"rouge_l_recall": float(res.rouge_l_recall), "n": int(len(res.scores)),
                                        "by_level": {k: float(v) for k, v in res.by_level.items()}}
        if self.mia_forget is not None:
            with _naming("mia_forget / eval.mia_holdout", f"{self.mia_forget} / {self.mia_holdout}"):
                scores = mia_auroc(model, tokenizer, r[self.mia_forget], r[self.mia_holdout],
                                   batch_size=self.batch_size)
            out["mia_auroc"] = {k: float(v) for k, v in scores.items()}
        if self.perplexity:
            out["perplexity"] = {}
            for path in self.perplexity:
                with _naming("perplexity", path):
                    res = perplexity(model, tokenizer, r[path], batch_size=self.batch_size)
                out["perplexity"][str(path)] = {"perplexity": float(res.perplexity), "tokens": int(res.num_tokens)}
        return out


@contextlib.contextmanager
def _naming(key: str, path: str):
    """Turns a ValueError about a file's items (an empty text, too few few-shot examples, ...) into
    a `DataError` naming the key and the file."""
    try:
        yield
    except data.DataError:
        raise
    except ValueError as err:
        raise data.DataError(f"'eval.{key}' {path}: {err}") from None


def metric_names(mc=(), qa=(), mia: bool = False, perplexity=()) -> tuple[str, ...]:
    """The flat metric names of an evaluation of these files (see the module docstring)."""
    names = [f"mc/{_stem(p)}/accuracy" for p in mc] + [f"qa/{_stem(p)}/rouge_l_recall" for p in qa]
    if mia:
        names += [f"mia_auroc/{a}" for a in ATTACKS]
    return tuple(names + [f"perplexity/{_stem(p)}" for p in perplexity])


def flatten(results: dict) -> dict[str, float]:
    """`EvalSuite.run`'s results under their flat metric names (see the module docstring)."""
    flat: dict[str, float] = {}
    for path, r in results.get("multiple_choice", {}).items():
        flat[f"mc/{_stem(path)}/accuracy"] = r["accuracy"]
    for path, r in results.get("qa", {}).items():
        flat[f"qa/{_stem(path)}/rouge_l_recall"] = r["rouge_l_recall"]
    for attack, v in results.get("mia_auroc", {}).items():
        flat[f"mia_auroc/{attack}"] = v
    for path, r in results.get("perplexity", {}).items():
        flat[f"perplexity/{_stem(path)}"] = r["perplexity"]
    for attack, r in results.get("robustness", {}).items():
        flat.update({f"{attack}/{k}": v for k, v in flatten(r).items()})
    return flat
