"""TOFU's metrics in the embedded world: every fact with a paraphrased and perturbed answers, and
open-unlearning's truth ratio, forget quality and model utility against the gold model.

TOFU (Maini et al. 2024) asks each question with its answer, a paraphrased answer and perturbed
(wrong) answers. Here each fact ``(person, attribute, value)`` becomes a `TofuItem`:

- question: the probe's question (``"Q : Where was Arlo Venn born ? A :"``), answer: the value;
- paraphrased answer: the answer itself. The world's answers are one token and its models'
  context is 16 tokens, which the longest question with answer and EOS fills: no rewording fits
  (TOFU's paraphrases keep the model from being scored on its training string; here the training
  string is one word);
- perturbed answers: `N_PERTURBED` other values of the attribute (``"Orvik"``), drawn from a
  generator seeded by ``(world seed, PERTURB_STREAM)``, so drawing them changes nothing else of
  the world (its texts, models and probes stay as they were).

The splits follow TOFU's roles: forget = the forget people, retain = the retain people,
real authors = the held-out people (known from pretraining, in no unlearning loss), world facts =
the general facts (perturbed: other values of the same relation). The truth ratio then compares
the model's probability of the true value with that of wrong values of the same kind. `evaluate_tofu` then computes
open-unlearning's table on them (``jax_unlearn.eval.tofu``: the same code as for TOFU's files),
with the gold model's result as the retain model's logs. Two things differ from TOFU's files: the
answers are one word (the world's answers are one token), and the rows end with the answer, not
with EOS as open-unlearning's do: the world's QA lines end with the bare value and its models
never saw an EOS after one (with it, every probability would carry that near-zero last factor and
model utility, a harmonic mean of probabilities, would read near 0 for every model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jax_unlearn.bench.tokens import SEQ
from jax_unlearn.bench.world import ATTRIBUTES, GENERAL, QUESTIONS, VALUES, World
from jax_unlearn.eval.ou_scoring import PromptTemplate
from jax_unlearn.eval.tofu import TofuData, TofuItem, evaluate_tofu

PERTURB_STREAM = 25  # the perturbed answers' generator: default_rng([world seed, PERTURB_STREAM])
N_PERTURBED = 3
SENTENCE = "{v}"  # the paraphrased answer's form, and the perturbed answers'
#: the world's prompts are ``Q : ... A :``; the answer follows after a space
TEMPLATE = PromptTemplate(user_start_tag="", user_end_tag="", asst_start_tag=" ", asst_end_tag="")
METRICS = ("forget_truth_ratio", "forget_quality", "model_utility")
#: result keys of `WorldTofu.metrics` (beside the demo's own ``forget_quality``, the KS test on
#: answer probabilities)
COLUMNS = {"forget_truth_ratio": "tofu_truth_ratio", "forget_quality": "tofu_forget_quality",
           "model_utility": "tofu_model_utility"}


def _item(question: str, answer: str, others: list[str]) -> TofuItem:
    return TofuItem(question, answer, SENTENCE.format(v=answer), tuple(SENTENCE.format(v=o) for o in others))


def _others(rng: np.random.Generator, pool: list[str], true: str) -> list[str]:
    wrong = sorted(set(pool) - {true})
    return [wrong[i] for i in rng.choice(len(wrong), size=min(N_PERTURBED, len(wrong)), replace=False)]


def tofu_data(world: World) -> TofuData:
    """The world's facts as TOFU items (see the module docstring): forget, retain, real authors
    (held-out people) and world facts (general facts)."""
    rng = np.random.default_rng([world.config.seed, PERTURB_STREAM])

    def people(split: str) -> list[TofuItem]:
        return [_item(QUESTIONS[a].format(n=p.name), p.facts[a], _others(rng, list(VALUES[a]), p.facts[a]))
                for p in world.persons(split) for a in ATTRIBUTES]

    forget, retain, heldout = people("forget"), people("retain"), people("heldout")
    pools: dict[str, list[str]] = {}
    for rel, _, v in world.general_facts:
        pools.setdefault(rel, []).append(v)
    facts = [_item(GENERAL[rel][1].format(s=s), v, _others(rng, pools[rel], v))
             for rel, s, v in world.general_facts]
    return TofuData(forget=forget, retain=retain, real_authors=heldout, world_facts=facts,
                    forget_split="world_forget", holdout_split="", source=f"world {world.config.seed}")


class _WithoutEOS:
    """``tokenizer`` without an EOS token (`jax_unlearn.eval.ou_scoring.qa_row` appends none, greedy
    generation runs ``max_new_tokens``); everything else is the tokenizer's."""

    eos_token_id = None

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


@dataclasses.dataclass(frozen=True)
class WorldTofu:
    """open-unlearning's TOFU metrics of a model of ``world`` (`evaluate_tofu` on `tofu_data`)."""

    tokenizer: Any
    data: TofuData
    batch_size: int = 256
    max_new_tokens: int = 2  # the answer word and what follows it: enough for ROUGE-L of one word

    @classmethod
    def of(cls, world: World, tokenizer: Any) -> WorldTofu:
        return cls(tokenizer, tofu_data(world))

    def result(self, model: Any, gold: dict | None = None) -> dict:
        """`evaluate_tofu`'s result; ``gold`` (the gold model's result) is the retain model's logs."""
        return evaluate_tofu(model, _WithoutEOS(self.tokenizer), self.data, metrics=METRICS, retain_logs=gold, template=TEMPLATE,
                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                             max_length=SEQ)

    def metrics(self, model: Any, gold: dict | None = None) -> dict[str, float | None]:
        """``{tofu_truth_ratio, tofu_forget_quality, tofu_model_utility}`` (forget quality None
        without ``gold``)."""
        summary = self.result(model, gold)["summary"]
        return {COLUMNS[k]: summary[k] for k in METRICS}
