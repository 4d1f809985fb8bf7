"""`jax-unlearn` end to end on a tiny local model: unlearn -> eval -> export, plus config errors."""

import json

import numpy as np
import pytest
from cli_fixtures import make_workspace

from jax_unlearn import cli


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Hugging Face model folder (with tokenizer), data files and a run config."""
    return make_workspace(tmp_path_factory.mktemp("cli"))


def test_evaluation_during_the_run_selects_the_exported_step(workspace, tmp_path, capsys):
    """eval.every writes eval rows; select.metric exports the best evaluated step; an unknown
    metric name is a config error before anything is written."""
    from jax_unlearn.models import load_hf

    root, run = workspace, tmp_path / "evalrun"
    args = ["unlearn", str(root / "run.yaml"), f"output_dir={run}", "max_steps=4", "eval.every=2",
            f"eval.perplexity=[{root / 'forget.jsonl'}]", f"eval.mc=[{root / 'mc.jsonl'}]",
            "select.metric=perplexity/forget", "select.mode=min"]
    assert cli.main([*args[:-2], "select.metric=perplexity/nope"]) == 2
    err = capsys.readouterr().err
    assert "'select.metric' is 'perplexity/nope', which the eval section does not produce" in err
    assert "perplexity/forget" in err and not run.exists()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/perplexity/forget" in r}
    assert sorted(evals) == [0, 2, 4] and all("eval/mc/mc/accuracy" in r for r in evals.values())
    best = min((2, 4), key=lambda s: (evals[s]["eval/perplexity/forget"], s))
    assert json.loads((run / "best.json").read_text())["step"] == best
    assert f"best perplexity/forget (min): step {best}" in out
    from jax_unlearn import data
    from jax_unlearn import eval as ev

    ppl = ev.perplexity(load_hf(run / "model"), data.load_tokenizer(run / "model"), data.read_texts(root / "forget.jsonl"))
    assert ppl.perplexity == pytest.approx(evals[best]["eval/perplexity/forget"], rel=1e-5)


def test_unlearn_eval_export_end_to_end(workspace, capsys):
    from jax_unlearn.models import load_hf

    root = workspace
    run = root / "run"
    assert cli.main(["unlearn", str(root / "run.yaml"), "combiner.name=sago", "objective.name=npo",
                     "objective.beta=0.5", f"eval.mc=[{root / 'mc.jsonl'}]"]) == 0
    out = capsys.readouterr().out
    assert f"model: {run / 'model'}" in out and "3/3 steps" in out
    assert (run / "model" / "config.json").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    saved = (run / "config.yaml").read_text()
    assert "name: sago" in saved and "name: npo" in saved and "beta: 0.5" in saved
    assert json.loads((run / "eval.json").read_text())["multiple_choice"][str(root / "mc.jsonl")]["n"] == 2

    # eval: table on stdout, JSON file
    res_path = root / "results.json"
    assert cli.main(["eval", "--model", str(run / "model"), "--mc", str(root / "mc.jsonl"), "--qa", str(root / "qa.jsonl"),
                     "--mia-forget", str(root / "forget.jsonl"), "--mia-holdout", str(root / "holdout.jsonl"),
                     "--out", str(res_path)]) == 0
    out = capsys.readouterr().out
    assert "MC accuracy" in out and "QA ROUGE-L recall" in out and "MIA AUROC" in out
    res = json.loads(res_path.read_text())
    mc = res["multiple_choice"][str(root / "mc.jsonl")]
    assert mc["n"] == 2 and mc["by_subject"].keys() == {"biology"}
    qa = res["qa"][str(root / "qa.jsonl")]
    assert qa["n"] == 2 and set(qa["by_level"]) == {"1", "2"}
    # the command reports exactly what the library computes on the exported folder
    from jax_unlearn import data
    from jax_unlearn import eval as ev

    model, tok = load_hf(run / "model"), data.load_tokenizer(run / "model")
    mcs = data.read_multiple_choice(root / "mc.jsonl")
    assert mc["accuracy"] == ev.evaluate_multiple_choice(model, tok, mcs, batch_size=8).accuracy  # the CLI's batch
    assert res["mia_auroc"] == pytest.approx(ev.mia_auroc(model, tok, data.read_texts(root / "forget.jsonl"),
                                                          data.read_texts(root / "holdout.jsonl"), batch_size=8))

    # export: the newest checkpoint (step 3) equals the model the run exported
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(root / "exported")]) == 0
    assert "exported step 3" in capsys.readouterr().out
    exported, final = load_hf(root / "exported"), load_hf(run / "model")
    assert (root / "exported" / "tokenizer.json").is_file()
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(final(ids)), rtol=1e-6, atol=1e-6)
    base = load_hf(root / "base")
    assert not np.allclose(np.asarray(base(ids)), np.asarray(final(ids)))
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(root / "exported")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("override, names", [
    ("optim.lrr=1e-5", ["optim.lrr", "allowed keys", "lr, schedule"]),
    ("bogus=1", ["bogus", "allowed keys", "output_dir"]),
    ("batch_size=eight", ["batch_size", "an integer"]),
    ("optim.lr=fast", ["optim.lr", "a number"]),
    ("combiner.name=adam", ["combiner.name", "weighted_sum", "pcgrad", "sago"]),
    ("objective.retain=mse", ["objective.retain", "nll", "kl"]),
    ("model.dtype=int8", ["model.dtype", "bfloat16"]),
    ("optim=3", ["optim", "is a section"]),
    ("optim.lr", ["optim.lr", "KEY=VALUE"]),
])
def test_unlearn_rejects_bad_overrides_naming_the_key(workspace, capsys, override, names):
    assert cli.main(["unlearn", str(workspace / "run.yaml"), override]) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, (name, err)


def test_unlearn_rejects_missing_config_file_and_unknown_key_in_file(tmp_path, capsys):
    assert cli.main(["unlearn", str(tmp_path / "nope.yaml")]) == 2
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 1e-5\n")
    assert cli.main(["unlearn", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "bad.yaml") in err and "optim.learning_rate" in err


def test_literal_check_does_not_rely_on_omegaconf():
    import dataclasses

    from jax_unlearn import config as rc

    cfg = rc.load_config(None, ["output_dir=o", "model.path=m", "data.forget=f", "data.retain=r"])
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, schedule="step"))
    with pytest.raises(rc.ConfigError, match=r"'optim.schedule' is 'step'; expected one of 'constant'"):
        rc.loading._check_literals(bad)
    with pytest.raises(ValueError, match=r"combiner.name='adam' is not supported"):  # names: the registry's check
        dataclasses.replace(cfg.combiner, name="adam")


def test_eval_and_export_usage_errors(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path), "--mc", str(tmp_path / "mc.jsonl")]) == 2
    assert "mc.jsonl does not exist" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err


def test_eval_out_replaces_an_existing_results_file(workspace, tmp_path, capsys):
    """--out names a file: an earlier results file is replaced, a folder in its place is refused."""
    out = tmp_path / "results.json"
    out.write_text("{}")
    args = ["eval", "--model", str(workspace / "base"), "--mc", str(workspace / "mc.jsonl"), "--out"]
    assert cli.main([*args, str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["multiple_choice"][str(workspace / "mc.jsonl")]["n"] == 2
    assert cli.main([*args, str(tmp_path)]) == 2
    assert "exists and is not a file" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "sweep", "unlearn", "eval", "export", "plan"):
        assert command in out
    for command in ("demo", "sweep", "unlearn", "eval", "export", "plan"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "usage: jax-unlearn " + command in capsys.readouterr().out


def test_demo_and_sweep_help_state_the_benchmark_as_it_is(capsys):
    """The help texts name the gold-matched bar and the fixed bar with the config's own values, and
    the statistics the sweep reports (no stale fixed-bar-only text, no hard-coded timings)."""
    from jax_unlearn.bench.config import BenchConfig

    demo = BenchConfig()
    texts = {}
    for command in ("demo", "sweep"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
    assert f"gold_tolerance={demo.gold_tolerance:g}" in texts["demo"]
    assert f"forget_threshold={demo.forget_threshold:g}" in texts["demo"]
    assert "gold model" in texts["demo"] and "forget quality" in texts["demo"] and "PrivLeak" in texts["demo"]
    assert "gold-matched bar" in texts["sweep"] and "95% t-interval" in texts["sweep"]
    for text in texts.values():
        assert "~3.5" not in text and "<= 0.10" not in text
