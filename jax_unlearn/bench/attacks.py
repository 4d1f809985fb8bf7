"""The robustness attacks (`jax_unlearn.eval.robustness`) on the benchmark's models.

For a model (an unlearned run's selected point, the gold model, the pretrained model) `Attacks`
measures, on the greedy next-token accuracy of single-token answers:

- ``relearn_unseen_before``: forget accuracy on the *unseen* half of the forget people
  (`jax_unlearn.bench.world.World.forget_halves`) before any attack;
- ``relearn_forget_acc``: the same after fine-tuning a copy on every text of the other half
  (``robustness.relearn_steps`` AdamW steps of ``relearn_batch_size`` rows at ``relearn_lr``),
  and ``relearn_recovered`` = `recovered_fraction` with the pretrained model's accuracy on the
  unseen half as the original;
- ``relearn_benign_forget_acc`` / ``relearn_benign_recovered``: the same after fine-tuning on
  retain people's texts only (no forget fact);
- ``{scheme}_forget_acc`` and ``{scheme}_retain_heldout_acc`` for each quantization scheme
  (``int8``, ``int4``, ``int4_g128``, ...): all forget people, and the held-out people (is the
  quantized model still a model?);
- ``paraphrase_forget_acc`` / ``paraphrase_retain_heldout_acc``: the forget (held-out) people's
  facts asked in the held-out templates `jax_unlearn.bench.world.PARAPHRASES`;
  ``paraphrase_context_*``: the same after a sentence stating another fact of the person.

The gold model goes through the same attacks: its numbers are the floor, what a model that
never learned the forget people scores under the same attack.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_unlearn.bench.config import RobustnessSection
from jax_unlearn.bench.tokens import ProbeRows, probe_rows, text_rows
from jax_unlearn.bench.world import World
from jax_unlearn.eval import answer_accuracy
from jax_unlearn.eval.robustness import RelearnConfig, Relearner, parse_scheme, quantize_model, recovered_fraction

#: the robustness metrics of a model (keys of `Attacks.__call__`'s result, beside the per-scheme ones)
RELEARN_KEYS = ("relearn_unseen_before", "relearn_forget_acc", "relearn_recovered", "relearn_benign_forget_acc",
                "relearn_benign_recovered")
PARAPHRASE_KEYS = ("paraphrase_forget_acc", "paraphrase_retain_heldout_acc", "paraphrase_context_forget_acc",
                   "paraphrase_context_retain_heldout_acc")


def robustness_keys(section: RobustnessSection) -> tuple[str, ...]:
    """Every key `Attacks` reports under ``section`` (``()`` when it is off)."""
    if not section.enabled:
        return ()
    quant = tuple(f"{parse_scheme(s).name}_{k}" for s in section.quantize for k in ("forget_acc", "retain_heldout_acc"))
    return RELEARN_KEYS + quant + PARAPHRASE_KEYS


@dataclasses.dataclass(frozen=True)
class AttackData:
    """Token rows of the attacks on one world: LM rows to relearn on (``relearn``: the first
    forget half's texts, ``benign``: the retain people's texts), probes of the unseen half
    (``unseen``), every probe (``probes``), and paraphrased probes without and with context."""

    relearn: dict[str, np.ndarray]
    benign: dict[str, np.ndarray]
    unseen: ProbeRows
    probes: ProbeRows
    paraphrase: ProbeRows
    paraphrase_context: ProbeRows


def attack_data(world: World, tok) -> AttackData:
    """The rows of `AttackData` for ``world`` and its tokenizer ``tok``."""
    seen, unseen = world.forget_halves()
    people = [p for p in world.people if p.split != "unseen"]
    return AttackData(relearn=text_rows(tok, [t for p in seen for t in world.person_texts(p)], name="relearn"),
                      benign=text_rows(tok, world.texts("retain"), name="benign relearn"),
                      unseen=probe_rows(tok, world.person_probes(unseen)),
                      probes=probe_rows(tok, world.probes()),
                      paraphrase=probe_rows(tok, world.paraphrase_probes(persons=people)),
                      paraphrase_context=probe_rows(tok, world.paraphrase_probes(context=True, persons=people)))


def group_accuracy(model, rows: ProbeRows, group: str) -> float | None:
    """Greedy accuracy of the probes of ``group`` (``"heldout"``: both held-out kinds; ``None``
    without such probes), the whole context kept (``max_length`` = the longest context)."""
    sel = np.char.startswith(rows.group.astype(str), group) if group == "heldout" else rows.group == group
    if not sel.any():
        return None
    contexts = [c for c, s in zip(rows.contexts, sel) if s]
    result = answer_accuracy(model, contexts, rows.answer[sel], batch_size=256,
                             max_length=max(len(c) for c in contexts))
    return result.accuracy


class Attacks:
    """Runs every attack of ``section`` on a model; the relearning step compiles once per model
    structure. ``original``: the pretrained model's accuracy on the unseen half (for the
    recovered fractions; set with `set_original`)."""

    def __init__(self, section: RobustnessSection, data: AttackData):
        self.section, self.data = section, data
        self.relearner = Relearner(RelearnConfig(steps=section.relearn_steps, lr=section.relearn_lr,
                                                 batch_size=section.relearn_batch_size, seed=section.seed))
        self.original: float | None = None

    def set_original(self, pretrained_model) -> None:
        self.original = group_accuracy(pretrained_model, self.data.unseen, "forget")

    def __call__(self, model) -> dict[str, float | None]:
        d, out = self.data, {}
        before = group_accuracy(model, d.unseen, "forget")
        out["relearn_unseen_before"] = before
        for key, rows in (("relearn", d.relearn), ("relearn_benign", d.benign)):
            after = group_accuracy(self.relearner(model, rows, name=key), d.unseen, "forget")
            out[f"{key}_forget_acc"] = after
            out[f"{key}_recovered"] = recovered_fraction(after, before, self.original,
                                                         min_gap=1.0 / len(d.unseen.answer))
        for scheme in self.section.quantize:
            q = quantize_model(model, scheme)
            name = parse_scheme(scheme).name
            out[f"{name}_forget_acc"] = group_accuracy(q, d.probes, "forget")
            out[f"{name}_retain_heldout_acc"] = group_accuracy(q, d.probes, "heldout")
        for key, rows in (("paraphrase", d.paraphrase), ("paraphrase_context", d.paraphrase_context)):
            out[f"{key}_forget_acc"] = group_accuracy(model, rows, "forget")
            out[f"{key}_retain_heldout_acc"] = group_accuracy(model, rows, "heldout")
        return out
