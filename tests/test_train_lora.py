"""LoRA unlearning through `train.unlearn` (the API) and `jax-unlearn unlearn / export / eval`
(the CLI): every objective x combiner trains the adapters alone, the exports load in
transformers (merged) and peft (adapter) with our logits, and bad `lora:` settings are refused."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from step_fixtures import make_batch, tiny_model

from jax_unlearn import cli, config, train
from jax_unlearn.models import lora_config, without_lora

RMU = {"layer": 1, "steering": 4.0, "trainable": r"layers\.[01]\.mlp\.down_proj"}
# the paper's combiners; a combiner acts on the gradients only, so what reaches the adapters does not
# depend on the objective it is paired with (tests/test_step.py crosses objectives and combiners)
PAPER_COMBINERS = ("weighted_sum", "pcgrad", "sago")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _data():
    forget = {k: np.asarray(v) for k, v in make_batch(11, rows=16).items()}
    retain = {k: np.asarray(v) for k, v in make_batch(12, rows=16).items()}
    return forget, retain


def _cfg(out, objective: str, combiner: str, **objective_settings) -> config.TrainConfig:
    settings = {**(RMU if objective == "rmu" else {}), **objective_settings}
    return config.TrainConfig(
        output_dir=str(out), batch_size=8, max_steps=2, save_every=10, progress=False, export=False,
        optim=config.OptimConfig(lr=0.05, schedule="constant"),
        combiner=config.CombinerConfig(name=combiner),
        objective=config.ObjectiveConfig(name=objective, **settings),
        lora=config.LoraConfig(rank=2, alpha=4.0, targets=TARGETS))


def _flat(model, kind) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


# the objectives of the paper, and UNDIAL for the field's (tests/test_objectives_grid.py runs them all
# with every combiner; LoRA changes only what trains and what the reference is, which UNDIAL's teacher covers)
LORA_OBJECTIVES = ("grad_ascent", "grad_diff", "npo", "simnpo", "rmu", "undial")


@pytest.mark.parametrize("objective, combiner", [(o, "sago") for o in LORA_OBJECTIVES]
                         + [("grad_diff", c) for c in PAPER_COMBINERS if c != "sago"])
def test_every_objective_and_combiner_trains_only_the_adapters(objective, combiner, tmp_path):
    """Every objective (with SAGO) and every paper combiner (with GradDiff): the base weights come
    back bit for bit, the adapters moved (for RMU those of the modules it names, and no others),
    and every logged loss is finite."""
    forget, retain = _data()
    base = _flat(tiny_model(), nnx.Param)
    out = tmp_path / combiner
    result = train.unlearn(tiny_model(), forget, retain, _cfg(out, objective, combiner))
    assert result.steps_done == 2
    assert lora_config(result.model) is not None
    frozen = _flat(without_lora(result.model), nnx.Param)
    assert frozen.keys() == base.keys()
    for name, w in base.items():
        assert np.array_equal(frozen[name], w), (objective, combiner, name)
    moved = {n for n, b in _flat(result.model, nnx.LoRAParam).items() if n.endswith("lora_b") and np.any(b)}
    expected = {f"layers.{i}.{m}_lora.lora_b" for i in range(3)
                for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    if objective == "rmu":
        expected = {n for n in expected if n.endswith("mlp.down_proj_lora.lora_b") and n[7] in "01"}
    assert moved == expected, (objective, combiner)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["forget_loss"]) and np.isfinite(r["retain_loss"])
                                  for r in rows), rows


def test_npo_reference_is_the_base_model_held_once(tmp_path):
    """NPO over adapters: the resident reference is an adapter-sized copy (the base weights are
    shared), and the precomputed reference gives the same first-step losses."""
    from jax_unlearn import step as st
    from jax_unlearn.config import build_objective, build_tx

    cfg = _cfg(tmp_path / "resident", "npo", "sago", beta=0.5)
    model, flt = train.with_adapters(tiny_model(), cfg.lora)
    _, state = st.init_state(model, build_tx(cfg, 2), build_objective(cfg.objective, 16), train=flt)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    assert nbytes(state.ref) == nbytes(state.params) == nbytes(nnx.state(model, nnx.LoRAParam))
    assert nbytes(state.ref) < nbytes(state.frozen) / 10

    forget, retain = _data()
    logs = {}
    for reference in ("resident", "precompute"):
        out = tmp_path / reference
        c = _cfg(out, "npo", "sago", beta=0.5, reference=reference)
        train.unlearn(tiny_model(), forget, retain, c)
        logs[reference] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    eps = float(jnp.finfo(jnp.float32).eps)
    for key in ("forget_loss", "retain_loss"):
        a, b = logs["resident"][key], logs["precompute"][key]
        assert abs(a - b) <= 64 * eps * max(abs(a), 1.0), (key, a, b)


def test_dropout_draws_fresh_masks_per_step_and_resumes_the_same(tmp_path):
    """With dropout, a run cut after step 1 and resumed ends bit-identical to one run straight
    through (the masks depend on the step alone), and differs from a run without dropout."""
    forget, retain = _data()

    def run(out, steps, dropout):
        cfg = _cfg(out, "grad_diff", "sago")
        cfg = dataclasses.replace(cfg, max_steps=steps, save_every=1,
                             lora=config.LoraConfig(rank=2, alpha=4.0, targets=["all-linear"], dropout=dropout))
        return _flat(train.unlearn(tiny_model(), forget, retain, cfg).model, nnx.LoRAParam)

    straight = run(tmp_path / "a", 3, 0.5)
    run(tmp_path / "b", 1, 0.5)
    resumed = run(tmp_path / "b", 3, 0.5)
    plain = run(tmp_path / "c", 3, 0.0)
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
    assert any(not np.allclose(straight[k], plain[k]) for k in straight)


@pytest.mark.parametrize("override,message", [
    ("lora.rank=0", "'lora.rank' is 0"),
    ("lora.alpha=-1", "'lora.alpha' is -1"),
    ("lora.dropout=1.0", "'lora.dropout' is 1.0"),
    ("lora.targets=[q_proj,qkv]", "'lora.targets'"),
    ("lora.targets=[]", "'lora.targets'"),
    ("lora.targets=[all-linear,q_proj]", "'lora.targets'"),
])
def test_bad_lora_settings_are_refused_naming_the_key(override, message, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"output_dir: {tmp_path / 'run'}\nmodel:\n  path: {tmp_path}\n"
                                       f"data:\n  forget: f.jsonl\n  retain: r.jsonl\n")
    assert cli.main(["unlearn", str(tmp_path / "run.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from cli_fixtures import make_workspace

    return make_workspace(tmp_path_factory.mktemp("lora_cli"))


def _torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("objective", [o for o in LORA_OBJECTIVES if o != "undial"])
def test_lora_unlearn_from_the_cli_exports_merged_and_peft_with_equal_logits(objective, workspace, tmp_path, capsys):
    """``unlearn`` with ``lora.rank`` writes the merged model (transformers: our logits) and the
    adapter (peft over the base model: our logits); ``export --peft`` writes both again from the
    checkpoint; ``eval --peft`` evaluates base + adapter as the merged folder. Each objective trains
    its own adapters (RMU: a subset); the combiner changes no part of the export, so the CLI runs
    with SAGO (every objective x combiner trains through the API above)."""
    combiner = "sago"
    import transformers
    from hf_fixtures import rel_err
    from peft import PeftModel

    from jax_unlearn.models import load_hf

    root, run = workspace, tmp_path / "run"
    rmu = ["objective.layer=1", "objective.steering=4.0", r"objective.trainable=layers\.1\.mlp\.down_proj"]
    args = ["unlearn", str(root / "run.yaml"), f"output_dir={run}", f"objective.name={objective}",
            f"combiner.name={combiner}", "optim.lr=0.05", "lora.rank=2", "lora.alpha=4",
            "lora.targets=[q_proj,v_proj,down_proj]", *(rmu if objective == "rmu" else [])]
    assert cli.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"adapter: {run / 'adapter'}" in out and "(adapters merged)" in out

    ids = np.asarray([[5, 9, 17, 3, 22, 8], [11, 4, 30, 2, 7, 19]], np.int32)
    ours = np.asarray(load_hf(root / "base", peft=run / "adapter")(ids))
    base = np.asarray(load_hf(root / "base")(ids))
    assert rel_err(ours, base) > 1e-3  # the adapters changed the model
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert rel_err(_torch_logits(merged, ids), ours) <= 1e-4
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()
    peft_model = PeftModel.from_pretrained(hf_base, run / "adapter").eval()
    assert rel_err(_torch_logits(peft_model, ids), ours) <= 1e-4

    if (objective, combiner) != ("grad_diff", "sago"):
        return
    exported, adapter = tmp_path / "exported", tmp_path / "adapter"
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(exported), "--peft", str(adapter)]) == 0
    assert f"exported its LoRA adapter to {adapter}" in capsys.readouterr().out
    again = np.asarray(load_hf(root / "base", peft=adapter)(ids))
    np.testing.assert_array_equal(again, ours)  # same machine, same checkpoint: bit for bit
    assert rel_err(np.asarray(load_hf(exported)(ids)), ours) <= 1e-5
    results = {}
    for name, model_args in (("peft", ["--model", str(root / "base"), "--peft", str(adapter)]),
                             ("merged", ["--model", str(run / "model")])):
        assert cli.main(["eval", *model_args, "--perplexity", str(root / "forget.jsonl"),
                         "--out", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    ppl = lambda r: next(iter(r["perplexity"].values()))["perplexity"]
    assert ppl(results["peft"]) == pytest.approx(ppl(results["merged"]), rel=1e-4)
    assert results["peft"]["peft"] == str(adapter)


def test_lora_cli_errors(workspace, tmp_path, capsys):
    """--peft on a run without adapters, an --eval --peft folder that is not an adapter."""
    root, run = workspace, tmp_path / "full"
    assert cli.main(["unlearn", str(root / "run.yaml"), f"output_dir={run}", "max_steps=1"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "e"),
                     "--peft", str(tmp_path / "a")]) == 2
    assert "is not a LoRA run" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "a").exists()
    assert cli.main(["eval", "--model", str(root / "base"), "--peft", str(run / "model"),
                     "--perplexity", str(root / "forget.jsonl")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
