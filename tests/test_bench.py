"""The embedded benchmark: world generator, tokenizer, probes, pretraining cache, runs, sweep
summaries, the report, and `jax-unlearn demo` / `sweep` end to end at tiny size."""

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from ties import TIE_TOL

from jax_unlearn import cli
from jax_unlearn.bench import config as bc
from jax_unlearn.bench import evaluate as bench_eval
from jax_unlearn.bench import pretrain as pt
from jax_unlearn.bench import report, sweep
from jax_unlearn.bench.runs import Runner
from jax_unlearn.bench.tokens import PAD, SEQ, probe_rows, text_rows
from jax_unlearn.bench.world import (
    ATTRIBUTES,
    GENERAL,
    PARAPHRASES,
    QUESTIONS,
    STATEMENTS,
    VALUES,
    WorldConfig,
    make_world,
)
from jax_unlearn.config import CombinerConfig, ConfigError, ObjectiveConfig, load_config
from jax_unlearn.token_math import IGNORE

TINY_WORLD = WorldConfig(people=24, forget=4, retain=10, unseen=4, first_names=6, last_names=6)
TINY_MODEL = bc.ModelSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
TINY_PRE = bc.PretrainConfig(max_steps=800, batch_size=32, lr=1e-2, warmup=20, eval_every=100)
TINY = ["world.people=24", "world.forget=4", "world.retain=10", "world.unseen=4", "world.first_names=6",
        "world.last_names=6", "model.hidden=32", "model.layers=2", "model.heads=2", "model.kv_heads=1",
        "model.intermediate=64", "pretrain.max_steps=800", "pretrain.batch_size=32", "pretrain.lr=1e-2",
        "pretrain.warmup=20", "pretrain.eval_every=100", "grid.values=[4e-3,2e-3]", "grid.steps=6",
        "grid.evals=3", "batch_size=8", "robustness.quantize=[int4]"]  # one scheme: fewer compilations
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return pt.pretrained(TINY_WORLD, TINY_MODEL, TINY_PRE, cache)


# ----------------------------------------------------------------------------- world


def test_world_is_deterministic_and_splits_as_configured():
    a, b = make_world(WorldConfig(seed=3)), make_world(WorldConfig(seed=3))
    assert a == b
    assert make_world(WorldConfig(seed=4)).people != a.people
    cfg = a.config
    sizes = {s: len(a.persons(s)) for s in ("forget", "retain", "heldout", "unseen")}
    assert sizes == {"forget": cfg.forget, "retain": cfg.retain, "heldout": cfg.people - cfg.forget - cfg.retain,
                     "unseen": cfg.unseen}
    assert len({p.name for p in a.people}) == len(a.people)  # distinct names
    forget_tokens = {t for p in a.persons("forget") for t in (p.first, p.last)}
    for p in a.people:
        assert p.neighbour == (p.split == "heldout" and bool({p.first, p.last} & forget_tokens))
    kinds = {p.neighbour for p in a.persons("heldout")}
    assert kinds == {True, False}  # the default world has both kinds of held-out people


def test_families_share_birth_city_and_occupation():
    w = make_world(WorldConfig(family_share=1.0))
    by_family = {}
    for p in w.people:
        by_family.setdefault(p.last, set()).add((p.facts["city"], p.facts["occupation"]))
    assert all(len(v) == 1 for v in by_family.values())


def test_texts_and_probes_cover_every_fact_and_keep_unseen_people_out_of_pretraining():
    w = make_world(TINY_WORLD)
    pre = w.pretraining_texts()
    unseen = w.persons("unseen")
    assert not any(p.name in t for p in unseen for t in pre)
    for p in w.persons("forget"):
        texts = w.person_texts(p)
        assert len(texts) == 3 * len(ATTRIBUTES) and all(t in pre for t in texts)
        assert all(any(t.endswith(" " + p.facts[a]) for t in texts) for a in ATTRIBUTES)
    probes = w.probes()
    assert len(probes) == len(w.people) * len(ATTRIBUTES) + len(w.general_facts)
    assert {pr.group for pr in probes} >= {"forget", "retain", "unseen", "general"}
    assert {rel for rel, _, _ in w.general_facts} == set(GENERAL)
    # general facts are about the same cities and animals the people's facts name
    assert {s for rel, s, _ in w.general_facts if rel in ("country", "food", "sound")} == (
        set(VALUES["city"]) | set(VALUES["pet"]))


def test_paraphrases_are_held_out_templates_in_the_tokenizers_words_and_forget_halves_split():
    w = make_world(TINY_WORLD)
    trained = {t for ts in STATEMENTS.values() for t in ts} | set(QUESTIONS.values()) | {g[1] for g in GENERAL.values()}
    assert set(PARAPHRASES) == set(ATTRIBUTES) and not set(PARAPHRASES.values()) & trained
    texts = w.all_texts()
    plain, context = w.paraphrase_probes(), w.paraphrase_probes(context=True)
    assert len(plain) == len(context) == len(w.people) * len(ATTRIBUTES)
    for probe in plain + context:  # no training text asks this question (nor contains the prompt)
        question = probe.prompt[probe.prompt.index("Q :"):]
        assert not any(question in t for t in texts)
    vocab = {word for t in texts for word in t.split()}  # the word-level tokenizer's words
    assert all(word in vocab for p in context for word in p.prompt.split())
    for p, c in zip(plain, context):  # the context states another fact of the same person, then the question
        assert c.prompt.endswith(p.prompt) and c.answer == p.answer and c.subject == p.subject
        assert c.prompt[:-len(p.prompt)].strip() in texts and c.prompt.startswith(p.subject)
    # the world itself is unchanged: probes and texts do not include paraphrases
    assert not {p.prompt for p in plain} & {p.prompt for p in w.probes()}
    seen, unseen = w.forget_halves()
    assert (len(seen), len(unseen)) == (TINY_WORLD.forget // 2, TINY_WORLD.forget - TINY_WORLD.forget // 2)
    assert sorted(p.name for p in seen + unseen) == sorted(p.name for p in w.persons("forget"))
    assert w.forget_halves() == (seen, unseen)  # deterministic
    worlds = [make_world(dataclasses.replace(TINY_WORLD, forget=10, retain=8, seed=k)) for k in range(4)]
    assert any([p.name for p in v.forget_halves()[0]] != [p.name for p in v.persons("forget")[:5]] for v in worlds)
    assert w.person_probes(unseen) == [p for p in w.probes() if p.subject in {q.name for q in unseen}]
    with pytest.raises(ValueError, match="world.forget >= 2"):
        make_world(dataclasses.replace(TINY_WORLD, forget=1)).forget_halves()


def test_default_world_has_at_least_100_probes_per_group():
    """One probe is at most one point of any group's accuracy."""
    from collections import Counter

    counts = Counter(p.group for p in make_world(WorldConfig()).probes())
    assert set(counts) == {"forget", "retain", "heldout_neighbour", "heldout_other", "unseen", "general"}
    assert min(counts.values()) >= 100, counts


@pytest.mark.parametrize("kwargs, match", [
    (dict(forget=100, retain=100), "no held-out people"),
    (dict(unseen=0), "world.unseen"),
    (dict(first_names=3, last_names=3), "cannot name"),
    (dict(family_share=1.5), "family_share"),
])
def test_world_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


# ----------------------------------------------------------------------------- tokens and probes


def test_tokenizer_rows_and_probe_positions(tiny):
    tok, w = tiny.tokenizer, tiny.world
    rows = text_rows(tok, w.texts("forget"))
    assert rows["input_ids"].shape == (len(w.texts("forget")), SEQ)
    pad = rows["attention_mask"] == 0
    assert np.all(rows["labels"][pad] == IGNORE) and np.all(rows["input_ids"][pad] == PAD)
    probes = w.probes()
    pr = probe_rows(tok, probes)
    for ctx, answer, p in zip(pr.contexts, pr.answer, probes):  # <s> prompt, then the one answer token
        assert tok(f"{p.prompt} {p.answer}")["input_ids"] == [*ctx, answer] and ctx[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens([int(a) for a in pr.answer]) == [p.answer for p in probes]
    with pytest.raises(ValueError, match=r"rows are longer than max_length=4 tokens"):
        text_rows(tok, w.texts("forget")[:1], 4)


def test_evaluate_matches_unpadded_forward_and_pairwise_auroc(tiny):
    model, w = tiny.model, tiny.world
    pr = probe_rows(tiny.tokenizer, w.probes())
    correct, nll = bench_eval.probe_predictions(model, pr, batch_size=32)  # several left-padded batches
    rng, decisive = np.random.default_rng(0), 0
    for i in rng.choice(len(pr.answer), size=10, replace=False):
        ids = np.asarray(pr.contexts[i])[None]
        logits = np.asarray(model(ids))[0, -1]
        logp = logits - np.logaddexp.reduce(logits)
        others = np.delete(logits, pr.answer[i])
        margin = logits[pr.answer[i]] - others.max()  # > 0: the answer is the greedy token
        if abs(margin) > TIE_TOL * max(1.0, abs(logits).max()):  # a near-tie may go either way
            assert correct[i] == (margin > 0)
            decisive += 1
        np.testing.assert_allclose(nll[i], -logp[pr.answer[i]], rtol=1e-4, atol=1e-5)
    assert decisive >= 8
    # evaluate() scores in batches of 256: the same computation as below, so equal on this machine
    correct, nll = bench_eval.probe_predictions(model, pr)
    out = bench_eval.evaluate(model, pr)
    for g in ("forget", "retain", "general", "heldout_neighbour", "heldout_other"):
        sel = pr.group == g
        if sel.any():
            assert out[f"{g}_acc"] == pytest.approx(correct[sel].mean())
    person = lambda g: [nll[pr.subject == s].mean() for s in dict.fromkeys(pr.subject[pr.group == g])]
    f, u = person("forget"), person("unseen")
    pairs = [(x > y) + 0.5 * (x == y) for x in u for y in f]
    assert out["mia_auroc"] == pytest.approx(np.mean(pairs))


# ----------------------------------------------------------------------------- pretraining cache


def test_pretraining_learns_the_world_and_is_cached(tiny, cache):
    info = tiny.info
    assert not tiny.cached and tiny.path.parent == cache / "bench"
    # facts are learnt (far above the unseen people's accuracy, which only priors explain)
    assert min(info["forget_acc"], info["retain_acc"], info["heldout_acc"]) >= 0.8 > info["unseen_acc"] + 0.3
    again = pt.pretrained(TINY_WORLD, TINY_MODEL, TINY_PRE, cache)
    assert again.cached and again.path == tiny.path and again.info["steps"] == info["steps"]
    from flax import nnx

    for a, b in zip(jax.tree.leaves(nnx.state(tiny.model)), jax.tree.leaves(nnx.state(again.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the folder is a Hugging Face checkpoint whose tokenizer encodes exactly like ours
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny.path))
    for text in tiny.world.all_texts()[::7]:
        assert hf(text)["input_ids"] == tiny.tokenizer(text)["input_ids"] == again.tokenizer(text)["input_ids"]
    other = pt.cache_key(dataclasses.replace(TINY_WORLD, seed=1), TINY_MODEL, TINY_PRE)
    assert other != pt.cache_key(TINY_WORLD, TINY_MODEL, TINY_PRE)


def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pt, "save_hf", boom)
    small = dataclasses.replace(TINY_PRE, max_steps=2, warmup=1, eval_every=1)
    with pytest.raises(RuntimeError, match="disk full"):
        pt.pretrained(TINY_WORLD, TINY_MODEL, small, tmp_path)
    assert list((tmp_path / "bench").iterdir()) == []


# ----------------------------------------------------------------------------- runs


def test_runner_trajectory_points_equal_shorter_runs_and_reuse_one_compiled_step(tiny):
    w, tok = tiny.world, tiny.tokenizer
    forget, retain = text_rows(tok, w.texts("forget")), text_rows(tok, w.texts("retain"))
    probes = probe_rows(tok, w.probes())
    r = Runner(tiny.model, ObjectiveConfig(name="grad_diff"), CombinerConfig(name="sago"))
    long = r.run(forget, retain, probes, lr=4e-3, steps=8, eval_every=4, batch_size=8, seed=0)
    short = r.run(forget, retain, probes, lr=4e-3, steps=4, eval_every=4, batch_size=8, seed=0)
    slow = r.run(forget, retain, probes, lr=1e-4, steps=4, eval_every=4, batch_size=8, seed=0)
    assert [p["step"] for p in long.points] == [0, 4, 8]
    assert long.points[1] == short.points[1]  # constant lr: stopping at step 4 is the 4-step run
    assert slow.points[1] != short.points[1]  # ... and the learning rate does reach the optimizer
    assert r.step._cache_size() == 1  # every learning rate ran the same compiled step
    assert long.points[2]["forget_acc"] < long.points[0]["forget_acc"]  # gradient ascent forgets
    assert 0.0 < long.points[1]["conflict_fraction"] < 1.0  # real gradients: some coordinates conflict, not all
    # the step time: none for the trajectory that compiled the step, then a positive time that
    # leaves out the evaluations (a step is a small part of the trajectory's seconds)
    assert long.seconds_per_step is None
    assert 0.0 < short.seconds_per_step and 4 * short.seconds_per_step < short.seconds


def test_world_alternates_change_only_the_value_and_keep_the_world(tiny):
    """DPO's preferred answers on the world: one per forget text, the same text with its value
    replaced (an in-vocabulary "I don't know", or another value of the attribute), drawn from a
    stream of their own: the world's texts, and so its tokenizer and models, are unchanged."""
    w, tok = tiny.world, tiny.tokenizer
    again = make_world(TINY_WORLD)
    assert again.texts("forget") == w.texts("forget") and again.probes() == w.probes()
    texts = w.texts("forget")
    for kind in ("idk", "records"):
        alt = w.alternate_texts("forget", kind)
        assert alt == again.alternate_texts("forget", kind) and len(alt) == len(texts)
        for a, t in zip(alt, texts):
            head = t.rsplit(" ", 2)[0] if t.endswith(" .") else t.rsplit(" ", 1)[0]  # the text before its value
            assert a.startswith(head + " ") and a != t
        assert len(set(alt)) > len(set(texts)) // 2  # drawn per text, not one constant answer
        rows = text_rows(tok, alt, name="alternate")
        assert not np.any(rows["input_ids"] == tok.unk_token_id)  # every word is in the world's vocabulary
    assert set(bc.bench_objectives()) >= {"dpo", "idk_dpo", "undial", "wga", "satimp", "ce_u", "pdu"}


def test_idk_dpo_forgets_on_the_world(tiny):
    w, tok = tiny.world, tiny.tokenizer
    forget, retain = text_rows(tok, w.texts("forget")), text_rows(tok, w.texts("retain"))
    forget = {**forget, **{"alt_" + k: v for k, v in text_rows(tok, w.alternate_texts("forget", "idk")).items()}}
    r = Runner(tiny.model, ObjectiveConfig(name="idk_dpo", beta=1.0), CombinerConfig(name="sago"))
    assert r.obj.alternates == "idk"
    traj = r.run(forget, retain, probe_rows(tok, w.probes()), lr=4e-3, steps=8, eval_every=8, batch_size=8, seed=0)
    assert traj.points[-1]["forget_acc"] < traj.points[0]["forget_acc"]
    assert np.isfinite(traj.points[-1]["forget_loss"]) and np.isfinite(traj.points[-1]["retain_loss"])


def test_runner_with_lora_trains_only_the_adapters(tiny):
    """``lora.rank``: the compiled step's state holds the adapters alone, the pretrained model is
    untouched, and the adapters (at a LoRA-sized learning rate) do forget."""
    from jax_unlearn.config import LoraConfig
    from jax_unlearn.models import lora_config

    w, tok = tiny.world, tiny.tokenizer
    forget, retain = text_rows(tok, w.texts("forget")), text_rows(tok, w.texts("retain"))
    probes = probe_rows(tok, w.probes())
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(tiny.model, nnx.Param))]
    r = Runner(tiny.model, ObjectiveConfig(name="grad_diff"), CombinerConfig(name="sago"),
               LoraConfig(rank=4, alpha=8.0, targets=["all-linear"]))
    assert lora_config(r.model).rank == 4 and lora_config(tiny.model) is None
    traj = r.run(forget, retain, probes, lr=2e-2, steps=8, eval_every=8, batch_size=8, seed=0)
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(tiny.model, nnx.Param))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert traj.points[1]["forget_acc"] < traj.points[0]["forget_acc"]


# ----------------------------------------------------------------------------- sweep logic


def _run(o, c, steps, f, h, g=0.5, world=0, fq=None):
    return {"world": world, "objective": o, "combiner": c, "lr": 1e-3, "steps": steps, "forget_acc": f,
            "retain_acc": 0.9, "retain_heldout_acc": h, "heldout_neighbour_acc": h, "heldout_other_acc": h,
            "general_acc": g, "mia_auroc": 0.5, "forget_quality": fq, "privleak": 0.0, "retain_heldout_rel": h,
            "general_rel": g}


def test_best_run_respects_the_threshold_and_breaks_ties():
    runs = [_run("grad_diff", "sago", 10, 0.30, 0.99, fq=0.2), _run("grad_diff", "sago", 20, 0.10, 0.70, fq=0.9),
            _run("grad_diff", "sago", 30, 0.05, 0.70, g=0.9, fq=0.01), _run("grad_diff", "sago", 40, 0.00, 0.60)]
    assert sweep.best_run(runs, 0.10)["steps"] == 30  # 0.99 forgot too little; tie on held-out -> general
    assert sweep.best_run(runs, 0.0)["steps"] == 40
    assert sweep.best_run(runs[:1], 0.10) is None
    assert sweep.best_run(runs, None)["steps"] == 20  # threshold None: the highest forget quality


def test_summary_means_and_paired_differences_over_worlds():
    cfg = bc.BenchConfig(objectives=["grad_diff"], combiners=["weighted_sum", "sago"], worlds=[0, 1, 2])
    held = {0: (0.5, 0.6), 1: (0.4, 0.7), 2: (0.6, 0.65)}
    runs = [_run("grad_diff", c, 10, 0.05, held[w][i], world=w)
            for w in held for i, c in enumerate(["weighted_sum", "sago"])]
    by_world = {w: sweep.summarize([r for r in runs if r["world"] == w], cfg, 0.1) for w in held}
    mean = sweep.mean_summary(by_world, cfg)
    assert mean["grad_diff"]["sago"]["retain_heldout_acc"] == pytest.approx(np.mean([0.6, 0.7, 0.65]))
    assert mean["grad_diff"]["sago"]["worlds"] == 3
    paired = sweep.paired_differences(by_world, cfg)["grad_diff"]["sago - weighted_sum"]
    np.testing.assert_allclose(paired["differences"], [0.1, 0.3, 0.05])
    assert paired["positive"] == 3 and paired["mean"] == pytest.approx(0.15)
    from scipy.stats import wilcoxon

    assert paired["wilcoxon_p"] == pytest.approx(wilcoxon([0.1, 0.3, 0.05]).pvalue)
    # the 95% t-interval, written out: mean +- t_{0.975, n-1} * sd / sqrt(n)
    d = np.array([0.1, 0.3, 0.05])
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    np.testing.assert_allclose(paired["ci95"], [d.mean() - half, d.mean() + half], rtol=1e-9)
    # a world where one combiner never forgot enough drops out of the pair
    by_world[1]["grad_diff"]["sago"] = None
    assert sweep.paired_differences(by_world, cfg)["grad_diff"]["sago - weighted_sum"]["n"] == 2
    assert sweep.mean_summary(by_world, cfg)["grad_diff"]["sago"]["worlds"] == 2


def test_gold_matched_criterion_uses_each_worlds_gold_level():
    cfg = bc.BenchConfig(objectives=["grad_diff"], combiners=["sago"], worlds=[0, 1], gold_tolerance=0.02,
                         forget_threshold=0.1)
    worlds = [{"seed": s, "gold": {k: 0.5 for k in sweep.GOLD_KEYS} | {"forget_acc": f}}
              for s, f in ((0, 0.20), (1, 0.30))]
    runs = [_run("grad_diff", "sago", 10, 0.21, 0.8, world=0, fq=0.5), _run("grad_diff", "sago", 20, 0.05, 0.6, world=0),
            _run("grad_diff", "sago", 10, 0.33, 0.9, world=1, fq=0.7), _run("grad_diff", "sago", 20, 0.25, 0.7, world=1)]
    res = sweep.summarize_sweep(cfg, worlds, runs, 1.0)
    per_world = {s: res["summary_by_world"][s]["gold"]["grad_diff"]["sago"]["steps"] for s in (0, 1)}
    assert per_world == {0: 10, 1: 20}  # 0.21 <= 0.20 + 0.02, but 0.33 > 0.30 + 0.02
    assert res["summary"]["gold"]["grad_diff"]["sago"]["retain_heldout_acc"] == pytest.approx(0.75)
    assert res["summary"]["fixed"]["grad_diff"]["sago"]["worlds"] == 1  # only world 0 reached 0.1
    assert res["best_forget_quality"]["grad_diff"]["sago"]["forget_quality"] == pytest.approx(0.6)
    assert res["gold"]["forget_acc"] == pytest.approx(0.25) and set(res["paired"]) == {"gold", "fixed"}


def _sweep_of(worlds_held: dict, **kw) -> dict:
    """A results dict of `summarize_sweep` over hand-made runs: {world: (sum's, sago's held-out)}."""
    cfg = bc.BenchConfig(objectives=["grad_diff"], combiners=["weighted_sum", "sago"], worlds=list(worlds_held), **kw)
    worlds = [{"seed": s, "gold": {k: 0.5 for k in sweep.GOLD_KEYS} | {"forget_acc": 0.05}} for s in worlds_held]
    runs = [_run("grad_diff", c, 10, 0.05, held[i], world=w, fq=held[i] / 2)
            for w, held in worlds_held.items() for i, c in enumerate(["weighted_sum", "sago"])]
    return json.loads(json.dumps(sweep.summarize_sweep(cfg, worlds, runs, float(len(worlds_held)))))


def test_sweeps_of_different_worlds_merge_into_the_sweep_of_all(tmp_path, capsys):
    held = {0: (0.5, 0.6), 1: (0.4, 0.7), 2: (0.6, 0.65), 3: (0.55, 0.5)}
    whole = _sweep_of(held)
    a, b = _sweep_of({k: held[k] for k in (0, 1)}), _sweep_of({k: held[k] for k in (2, 3)})
    merged = sweep.merge_results([a, b], ["a.json", "b.json"])
    merged = json.loads(json.dumps(merged))
    for key in ("summary", "summary_by_world", "paired", "best_forget_quality", "gold", "runs", "worlds"):
        assert merged[key] == whole[key], key
    assert merged["config"]["worlds"] == [0, 1, 2, 3] and merged["seconds"] == 4.0
    # the CLI: several files merge (and --out writes the merged file, never over an existing one)
    for name, res in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(res))
    out = tmp_path / "all.json"
    assert cli.main(["report", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sago - weighted_sum" in printed and "merged results of 4 world(s)" in printed
    assert json.loads(out.read_text())["paired"] == whole["paired"]
    saved = out.read_bytes()
    assert cli.main(["report", str(tmp_path / "a.json"), "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err and out.read_bytes() == saved
    # the same world twice, or another config: named errors
    assert cli.main(["report", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 2
    assert "a.json: world 0 is also in" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps(_sweep_of({5: (0.5, 0.5)}, gold_tolerance=0.2)))
    assert cli.main(["report", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "c.json: a sweep of another config than" in err and "(differs in gold_tolerance)" in err


def test_forget_quality_privleak_and_relative_retention_against_gold(tiny, cache):
    """Each metric from independently computed inputs: the answer probabilities from a plain
    forward pass per probe, the KS p-value checked on samples whose exact value is known."""
    import jax
    import jax.numpy as jnp

    gold_model = pt.pretrained(TINY_WORLD, TINY_MODEL, TINY_PRE, cache, gold=True)
    assert gold_model.path != tiny.path and not gold_model.info.get("forget_acc", 0) > 0.8
    probes = probe_rows(tiny.tokenizer, tiny.world.probes())
    gold = bench_eval.gold_reference(gold_model.model, probes)
    out = bench_eval.evaluate(tiny.model, probes, gold)
    forget = np.flatnonzero(probes.group == "forget")

    def answer_p(model):  # p(answer | context) of each forget probe, one unpadded forward each
        return np.array([float(jax.nn.softmax(model(jnp.asarray([probes.contexts[i]]))[0, -1])[probes.answer[i]])
                         for i in forget])

    p_model, p_gold = answer_p(tiny.model), answer_p(gold_model.model)
    np.testing.assert_allclose(gold.forget_p, p_gold, rtol=1e-5, atol=1e-7)  # float32, batched vs one by one
    # the KS p-value: two samples of 5 with every value of one above the other (D = 1) have the exact
    # two-sided p-value 2 / C(10, 5); identical samples 1; a non-finite sample (a diverged run) none
    assert bench_eval.forget_quality(np.arange(5.0), np.arange(5.0) + 10) == pytest.approx(2 / 252)
    assert bench_eval.forget_quality(np.arange(5.0), np.arange(5.0)) == 1.0
    assert bench_eval.forget_quality(np.array([np.nan, 1.0]), np.arange(2.0)) is None
    assert out["forget_quality"] == pytest.approx(bench_eval.forget_quality(p_model, p_gold), rel=1e-6)
    assert out["forget_quality"] < 0.05  # the pretrained model knows the forget people; gold does not
    assert out["privleak"] == pytest.approx((out["mia_auroc"] - gold.metrics["mia_auroc"]) / gold.metrics["mia_auroc"])
    assert out["heldout_rel"] == pytest.approx(out["heldout_acc"] / gold.metrics["heldout_acc"])
    assert out["forget_acc"] > gold.metrics["forget_acc"] + 0.3  # the pretrained model knows them; gold does not
    same = bench_eval.evaluate(gold_model.model, probes, gold)
    assert same["forget_quality"] == 1.0 and same["privleak"] == 0.0  # gold against itself


def test_lower_learning_rates_get_proportionally_more_steps():
    cfg = bc.BenchConfig()
    assert [cfg.schedule(v)[:2] for v in (4e-3, 2e-3, 1e-3)] == [(4e-3, 40), (2e-3, 80), (1e-3, 160)]
    assert cfg.schedule(1e-3)[2] == 20
    uneven = load_config(None, ["grid.values=[3e-3,2e-3]"], schema=bc.BenchConfig)
    assert uneven.schedule(2e-3) == (2e-3, 60, 8)  # evaluated at 8, 16, ..., 56 and 60: 8 times
    beta = load_config(None, ["grid.param=beta", "grid.values=[0.5,1.0]", "lr=5e-4"], schema=bc.BenchConfig)
    assert beta.schedule(0.5) == (5e-4, 40, 5)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(0.0, 0.2), (0.1, 0.5), (0.2, 0.4), (0.3, 0.9), (0.3, 0.1)]
    assert report.pareto_front(pts) == [(0.0, 0.2), (0.1, 0.5), (0.3, 0.9)]


# ----------------------------------------------------------------------------- config


def test_demo_yaml_is_the_built_in_demo_config():
    assert load_config(CONFIGS / "demo.yaml", schema=bc.BenchConfig) == load_config(None, schema=bc.BenchConfig)


def test_the_ranking_configs_run_every_combiner_and_the_variants_on_the_demo_grid():
    from jax_unlearn.combiners import COMBINERS

    demo = load_config(None, schema=bc.BenchConfig)
    zoo = load_config(CONFIGS / "zoo.yaml", schema=bc.BenchConfig)
    assert list(zoo.combiners) == list(COMBINERS.names())
    variants = load_config(CONFIGS / "zoo_variants.yaml", schema=bc.BenchConfig)
    assert {"weighted_sum", "sago"} <= set(variants.combiners) and set(variants.variants) <= set(variants.combiners)
    assert variants.variant("sago_k2") == ({"name": "sago"}, 2)
    for cfg in (zoo, variants):  # the demo's grid and judging otherwise
        assert dataclasses.replace(cfg, combiners=demo.combiners, variants={}) == demo
    field = load_config(CONFIGS / "field_objectives.yaml", schema=bc.BenchConfig)  # issue 26's objectives
    assert set(field.objectives).isdisjoint(demo.objectives) and field.combiners == demo.combiners
    assert set(field.objectives) | set(demo.objectives) | {"grad_ascent", "npo"} == set(bc.bench_objectives())
    assert dataclasses.replace(field, objectives=demo.objectives, robustness=demo.robustness, tofu=demo.tofu) == demo


@pytest.mark.parametrize("override, names", [
    ("grid.parm=lr", "unknown key 'grid.parm'"),
    ("combiners=[sago,adam]", "'combiners' has 'adam'; allowed values: weighted_sum, pcgrad, sago"),
    ("grid.param=momentum", "grid.param"),
    ("batch_size=many", "batch_size"),
    ("world.forget=150", "no held-out people"),
    ("worlds=[]", "'worlds' is empty"),
    ("pretrain.warmup=7000", "pretrain.warmup=7000 must lie in"),
    ("model.heads=3", "model.hidden=64 must divide by model.heads=3"),
    ("worlds=[1,1]", "'worlds' must be distinct non-negative seeds"),
    ("beta=0", "'beta' must be > 0"),
    ("lr=-1e-3", "'lr' must be > 0"),
    ("batch_size=2000", "'batch_size'=2000 exceeds the 300 forget rows"),
    ("world.first_names=6", "needs held-out people both sharing and not sharing a name"),
    ("objectives=[rmu]", "'objectives' has 'rmu', which the benchmark does not run: RMU steers one layer"),
    ("gold_tolerance=2", "'gold_tolerance' must lie in [0, 1], got 2"),
    ("lora.rank=0", "'lora.rank' is 0"),
    ("lora.targets=[qkv]", "'lora.targets' is ['qkv']"),
    ("robustness.quantize=[int4,fp8]", "robustness.quantize: quantization scheme 'fp8'"),
    ("robustness.relearn_steps=0", "robustness.relearn_steps must be an integer >= 1"),
    ("robustness.relearn_lr=0", "robustness.relearn_lr must be a finite number > 0"),
    ("robustness.relearn_batch_size=200", "'robustness.relearn_batch_size'=200 exceeds the 150 rows"),
    ("world.forget=1 batch_size=8", "world.forget=1 needs to be >= 2"),
    ("variants.k.combiner=sago variants.k.forget_every=0", "'variants.k': 'forget_every' is 0"),
    ("variants.k.combiner=nope", "'variants.k' needs 'combiner': one of weighted_sum"),
    ("variants.k.combiner=sago variants.k.c=0.5", "'variants.k': 'combiner.c' does not apply to combiner 'sago'"),
    ("variants.sago.combiner=pcgrad", "'variants.sago': a variant label must not be a registered combiner's name"),
    ("variants.k.combiner=sago variants.k.speed=2", "'variants.k' has 'speed'; allowed keys: combiner, forget_every"),
    ("combiners=[sago,k]", "'combiners' has 'k'; allowed values"),
])
def test_bench_config_errors_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, override.split(), schema=bc.BenchConfig)


# ----------------------------------------------------------------------------- robustness attacks


def _gradient_ascent(model, rows, steps, lr):
    """``steps`` Adam steps that *raise* the NLL of ``rows``: shallow unlearning."""
    import optax

    from jax_unlearn import step as st
    from jax_unlearn.data import EpochBatches
    from jax_unlearn.objectives import nll

    def ascent(m, batch, ref=None):
        loss, metrics = nll(m, batch, ref)
        return -loss, metrics

    tx = optax.adam(lr)
    defs, state = st.init_state(model, tx)
    step, data = st.make_step(defs, ascent, tx), EpochBatches(rows, 16, 0)
    for t in range(steps):
        state, _ = step(state, data(t))
    return st.merge_model(defs, state)


def test_relearning_restores_gradient_ascent_but_teaches_the_gold_model_nothing(tiny, cache):
    from jax_unlearn.bench.attacks import Attacks, attack_data, group_accuracy
    from jax_unlearn.eval import answer_accuracy

    gold = pt.pretrained(TINY_WORLD, TINY_MODEL, TINY_PRE, cache, gold=True)
    data = attack_data(tiny.world, tiny.tokenizer)
    section = bc.RobustnessSection(quantize=["int4"])
    attacks = Attacks(section, data)
    attacks.set_original(tiny.model)
    assert attacks.original >= 0.9  # the pretrained model knows the unseen half
    unlearned = _gradient_ascent(tiny.model, text_rows(tiny.tokenizer, tiny.world.texts("forget")), 4, 3e-3)
    hit, floor = attacks(unlearned), attacks(gold.model)
    assert hit["relearn_unseen_before"] <= 0.3 and group_accuracy(unlearned, data.probes, "forget") <= 0.3

    def p_true(model):  # mean p(answer | question) over the unseen half's probes (finer than accuracy)
        return float(np.mean(np.exp(answer_accuracy(model, data.unseen.contexts, data.unseen.answer).logprob)))

    relearned, relearned_gold = attacks.relearner(unlearned, data.relearn), attacks.relearner(gold.model, data.relearn)
    # relearning on one half brings the other half back ...
    assert hit["relearn_forget_acc"] >= hit["relearn_unseen_before"] + 0.1 and hit["relearn_recovered"] > 0
    assert p_true(relearned) >= p_true(unlearned) + 0.1
    # ... while the gold model, which never learned the forget people, gains nothing beyond its prior
    assert floor["relearn_forget_acc"] <= floor["relearn_unseen_before"]
    assert p_true(relearned_gold) <= p_true(gold.model) + 0.02
    assert p_true(relearned) >= p_true(relearned_gold) + 0.1
    assert attacks(gold.model) == floor  # deterministic under the attack's seed
    assert set(floor) == set(sweep.summary_keys(dataclasses.replace(bc.BenchConfig(), robustness=section,
                                                                    tofu=False))) - set(sweep.SUMMARY_KEYS)
    assert floor["int4_retain_heldout_acc"] >= 0.5  # the quantized gold model still answers


# ----------------------------------------------------------------------------- CLI end to end


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, tiny, cache, capsys):
    pt.pretrained(TINY_WORLD, TINY_MODEL, TINY_PRE, cache, gold=True)  # cached (here, or by an earlier test)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--cache", str(cache), "--no-progress", *TINY]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_config(None, TINY, schema=bc.BenchConfig)
    n_points = 0
    for v in cfg.grid.values:
        _, steps, every = cfg.schedule(v)
        n_points += 1 + len(range(every, steps + 1, every)) + (steps % every != 0)
    assert len(results["runs"]) == 2 * 3 * n_points
    assert {(r["objective"], r["combiner"]) for r in results["runs"]} == {
        (o, c) for o in ("grad_diff", "simnpo") for c in ("weighted_sum", "pcgrad", "sago")}
    gold_forget = results["worlds"][0]["gold"]["forget_acc"]
    assert results["gold"]["forget_acc"] == gold_forget and "(gold)" in printed
    bars = {"gold": gold_forget + cfg.gold_tolerance, "fixed": 0.10}
    for criterion, bar in bars.items():
        for o in ("grad_diff", "simnpo"):
            for c in ("weighted_sum", "pcgrad", "sago"):
                s = results["summary"][criterion][o][c]
                mine = [r for r in results["runs"] if r["objective"] == o and r["combiner"] == c]
                best = sweep.best_run(mine, bar)
                if s is None:
                    assert best is None
                    assert re.search(rf"{o}\s+{c}\s+no run reached forget accuracy", printed)
                else:
                    for k in ("forget_acc", "retain_acc", "retain_heldout_acc", "general_acc", "forget_quality",
                              "privleak"):
                        assert s[k] == best[k]
                    assert s["forget_acc"] <= bar + 1e-9
    for r in results["runs"]:  # every evaluation point is judged against the gold model
        assert r["forget_quality"] is not None and r["privleak"] is not None
    starts = [r for r in results["runs"] if r["steps"] == 0]  # each trajectory starts at the pretrained model
    assert len(starts) == 2 * 3 * len(cfg.grid.values)
    assert len({(r["forget_quality"], r["privleak"], r["forget_acc"]) for r in starts}) == 1
    assert starts[0]["forget_quality"] < 0.05 and starts[0]["privleak"] > 0  # it still knows the forget people
    assert "[gold-matched] best held-out" in printed and "[fixed bar] best held-out" in printed
    assert "results.json" in printed
    assert results["worlds"][0]["gold"]["cached"]  # the demo reused the cached gold model
    assert results["worlds"][0]["cached"]  # the tiny model came from the cache fixture
    # the robustness columns: the gold model's floor, and the selected runs' attacks at the gold-matched bar
    from jax_unlearn.bench.attacks import robustness_keys

    keys = robustness_keys(cfg.robustness)
    assert "relearn_forget_acc" in keys and "int4_forget_acc" in keys and "paraphrase_forget_acc" in keys
    assert all(results["gold"][k] is not None or k.endswith("recovered") for k in keys)
    attacked = [s for s in results["summary"]["gold"]["grad_diff"].values() if s is not None]
    attacked += [s for s in results["summary"]["gold"]["simnpo"].values() if s is not None]
    assert attacked and all(s["int4_forget_acc"] is not None and s["relearn_forget_acc"] is not None
                            for s in attacked)
    assert "[robustness, gold-matched]" in printed
    # TOFU's metrics of the selected runs against the gold model, the gold model's own
    assert all(0 <= s[k] <= 1 for s in attacked for k in sweep.TOFU_KEYS)
    assert all(0 < results["gold"][k] <= 1 for k in sweep.TOFU_GOLD_KEYS)
    assert "[TOFU, gold-matched]" in printed


@pytest.mark.slow
def test_sweep_over_worlds_reports_paired_differences_and_a_failed_run_keeps_old_results(tmp_path, tiny, cache, capsys,
                                                                                          monkeypatch):
    out = tmp_path / "sweep"
    cfg_file = tmp_path / "bench.yaml"
    # a variant (SAGO with its forget gradient reused every 2 steps) runs like a registered combiner
    cfg_file.write_text("objectives: [grad_diff]\ncombiners: [weighted_sum, sago_k2]\nworlds: [0, 1]\n"
                        "variants: {sago_k2: {combiner: sago, forget_every: 2}}\n")
    args = ["sweep", str(cfg_file), "--out", str(out), "--cache", str(cache), "--no-progress", *TINY]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [w["seed"] for w in results["worlds"]] == [0, 1]
    assert set(results["summary_by_world"]) == {"0", "1"}
    for criterion in ("gold", "fixed"):
        assert "sago_k2 - weighted_sum" in results["paired"][criterion]["grad_diff"]
        assert f"({criterion} criterion" in printed
    robust = results["paired_robustness"]["gold"]  # the robustness columns' paired differences too
    assert {"relearn_forget_acc", "int4_forget_acc", "paraphrase_forget_acc"} <= set(robust)
    assert "sago_k2 - weighted_sum" in robust["int4_forget_acc"]["grad_diff"]
    assert "Paired differences of int4_forget_acc" in printed
    assert "[ranking, gold-matched]" in printed
    timed = [r for r in results["runs"] if r["seconds_per_step"] is not None]
    assert {r["combiner"] for r in timed} == {"weighted_sum", "sago_k2"} and all(r["seconds_per_step"] > 0 for r in timed)
    # the trajectories that compiled a step (one per world and combiner) carry no time
    assert len({(r["world"], r["combiner"], r["lr"]) for r in results["runs"]} -
               {(r["world"], r["combiner"], r["lr"]) for r in timed}) == 4
    # `report` prints the same tables again from results.json
    assert cli.main(["report", str(out / "results.json")]) == 0
    again = capsys.readouterr().out
    assert again.strip() in printed
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": []}')
    assert cli.main(["report", str(bad)]) == 2
    assert "not the results.json of a demo or sweep (no 'config'" in capsys.readouterr().err
    before = (out / "results.json").read_bytes()
    assert cli.main(["sweep", str(cfg_file), "--out", str(out), "--cache", str(cache), "combiners=[nope]"]) == 2
    assert "allowed values" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    # a run that fails half-way (here: world 1's first trajectory) leaves the earlier results in
    # place, and world 0 in partial.json
    from jax_unlearn.bench import runs as bench_runs

    per_world = 2 * 2  # combiners x grid values
    calls = []
    original = bench_runs.Runner.run

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == per_world + 1:
            raise RuntimeError("killed mid-sweep")
        return original(self, *a, **k)

    monkeypatch.setattr(bench_runs.Runner, "run", failing)
    assert cli.main(args) == 1  # an unexpected error: one line, exit status 1
    assert "error: RuntimeError: killed mid-sweep" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "partial.json", "results.json"]
    part = json.loads((out / "partial.json").read_text())
    assert [w["seed"] for w in part["worlds"]] == [0] and {r["world"] for r in part["runs"]} == {0}
    # another config does not resume from it, and leaves it as it is
    saved = (out / "partial.json").read_bytes()
    assert cli.main([*args, "grid.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "partial.json: an interrupted sweep of another config (differs in grid.steps)" in err
    assert (out / "partial.json").read_bytes() == saved
    # the same command resumes: only world 1 runs, and the results are the uninterrupted run's
    calls.clear()
    assert cli.main(args) == 0
    assert "resuming: world(s) 0 done" in capsys.readouterr().out
    assert len(calls) == per_world
    resumed = json.loads((out / "results.json").read_text())
    first = json.loads(before)

    def untimed(res):
        return [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in res["runs"]]

    assert untimed(resumed) == untimed(first)  # one machine, same seeds: the same numbers
    assert resumed["paired"] == first["paired"] and resumed["summary"] == first["summary"]
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "results.json"]  # partial.json done with


def test_world_tofu_items_and_metrics_against_gold(tiny, cache):
    """TOFU-style items of every fact (paraphrase: the value; perturbed: other values of the
    attribute, from their own seeded stream) and open-unlearning's truth ratio, forget quality and
    model utility against the gold model."""
    from jax_unlearn.bench import tofu_world

    world = tiny.world
    data = tofu_world.tofu_data(world)
    assert tofu_world.tofu_data(make_world(TINY_WORLD)) == data  # deterministic in the world's config
    forget = world.persons("forget")
    assert len(data.forget) == len(forget) * len(ATTRIBUTES) and len(data.world_facts) == len(world.general_facts)
    for item, (p, a) in zip(data.forget, [(p, a) for p in forget for a in ATTRIBUTES]):
        assert item.answer == item.paraphrased_answer == p.facts[a]
        wrong = item.perturbed_answers
        assert len(set(wrong)) == tofu_world.N_PERTURBED and p.facts[a] not in wrong and set(wrong) <= set(VALUES[a])
        assert item.question == f"{QUESTIONS[a].format(n=p.name)}"
    # every row fits the world's 16-token context (else the scoring would cut the answers off)
    tok = tiny.tokenizer
    longest = max(len(tok(f"{it.question} {ans}")["input_ids"]) + 1 for it in data.forget + data.retain
                  + data.real_authors + data.world_facts for ans in (it.paraphrased_answer, *it.perturbed_answers))
    assert longest <= SEQ
    gold_model = pt.pretrained(TINY_WORLD, TINY_MODEL, TINY_PRE, cache, gold=True)
    tofu = tofu_world.WorldTofu.of(world, tiny.tokenizer)
    gold = tofu.result(gold_model.model)
    assert tofu.metrics(gold_model.model, gold)["tofu_forget_quality"] == 1.0  # gold against itself
    out = tofu.metrics(tiny.model, gold)
    assert set(out) == set(tofu_world.COLUMNS.values())
    # the pretrained model prefers the true sentence over the perturbed ones (truth ratio far below
    # 1, closer_to_1_better aggregates min(r, 1/r)); the gold model never learned the forget people
    assert out["tofu_truth_ratio"] < 0.25 * gold["summary"]["forget_truth_ratio"]
    assert out["tofu_forget_quality"] < 0.05
    # model utility: both models keep the retain people, held-out people and general facts (rows end
    # with the answer, as the world's QA lines do: an EOS factor would pull every probability to ~0)
    assert 0.5 < out["tofu_model_utility"] < 1 and 0.5 < gold["summary"]["model_utility"] < 1
