"""The ``jax-unlearn`` command line: ``demo``, ``sweep``, ``unlearn``, ``eval``, ``export`` and ``lm-eval``.

    jax-unlearn demo --out demo_out
    jax-unlearn sweep configs/demo.yaml worlds=[0,1,2,3] --out sweep_out
    jax-unlearn unlearn configs/wmdp/graddiff_sago_bio.yaml model.path=/ckpt/zephyr-7b-beta \\
        data.forget=bio_forget.jsonl data.retain=wikitext.jsonl output_dir=runs/gd_sago_bio
    jax-unlearn eval --model runs/gd_sago_bio/model --mc wmdp_bio.jsonl --mc mmlu.jsonl --out eval.json
    jax-unlearn export --checkpoint runs/gd_sago_bio --out exported/
    jax-unlearn lm-eval --model-path exported/ --tasks mmlu --num_fewshot 5 --batch_size 32

Errors in the config, the data or a checkpoint print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "jax-unlearn"
CONFIG_NAME = "config.yaml"  # the resolved config, written into every run folder


class CLIError(Exception):
    """A usage error reported as one line."""


# ----------------------------------------------------------------------------- helpers


def _dtype(name: str | None):
    import jax.numpy as jnp

    return None if name is None else jnp.dtype(name)


def _load_model(path: str, dtype: str = "float32", **options):
    from jax_unlearn.models import load_hf

    if not (Path(path) / "config.json").is_file():
        raise CLIError(f"{path} is not a Hugging Face model folder (no config.json)")
    options = dict(options)
    if options.get("compute_dtype") is not None:
        options["compute_dtype"] = _dtype(options["compute_dtype"])
    return load_hf(path, dtype=_dtype(dtype), **options)


def _load_tokenizer(path: str):
    """``data.load_tokenizer``; a missing folder raises FileNotFoundError naming it, which
    `main` prints as a one-line error."""
    from jax_unlearn.data import load_tokenizer

    return load_tokenizer(path)


def evaluate(model: Any, tokenizer: Any, *, mc: Sequence[str] = (), qa: Sequence[str] = (),
             mia_forget: str | None = None, mia_holdout: str | None = None, num_fewshot: int = 0,
             subject: str | None = None, batch_size: int = 8, max_new_tokens: int = 32) -> dict:
    """Multiple-choice accuracy per ``mc`` file, ROUGE-L recall per ``qa`` file and MIA AUROC
    between ``mia_forget`` and ``mia_holdout`` texts, as a JSON-ready dict."""
    from jax_unlearn import data
    from jax_unlearn import eval as ev

    results: dict[str, Any] = {}
    if mc:
        results["multiple_choice"] = {}
        for path in mc:
            r = ev.evaluate_multiple_choice(model, tokenizer, data.read_multiple_choice(path), num_fewshot=num_fewshot,
                                            subject=subject, batch_size=batch_size)
            results["multiple_choice"][str(path)] = {"accuracy": float(r.accuracy), "n": int(len(r.answers)),
                                                     "by_subject": {k: float(v) for k, v in r.by_subject.items()}}
    if qa:
        results["qa"] = {}
        for path in qa:
            r = ev.evaluate_qa(model, tokenizer, data.read_qa(path), batch_size=batch_size,
                               max_new_tokens=max_new_tokens)
            results["qa"][str(path)] = {"rouge_l_recall": float(r.rouge_l_recall), "n": int(len(r.scores)),
                                        "by_level": {k: float(v) for k, v in r.by_level.items()}}
    if mia_forget is not None:
        scores = ev.mia_auroc(model, tokenizer, data.read_texts(mia_forget, name="MIA forget"),
                              data.read_texts(mia_holdout, name="MIA holdout"), batch_size=batch_size)
        results["mia_auroc"] = {k: float(v) for k, v in scores.items()}
    return results


def format_table(results: dict) -> str:
    """``results`` of `evaluate` as a two-column text table."""
    rows = []
    for path, r in results.get("multiple_choice", {}).items():
        rows.append((f"MC accuracy  {path}", f"{r['accuracy']:.4f}  (n={r['n']})"))
        rows += [(f"  subject {s}", f"{a:.4f}") for s, a in sorted(r["by_subject"].items())]
    for path, r in results.get("qa", {}).items():
        rows.append((f"QA ROUGE-L recall  {path}", f"{r['rouge_l_recall']:.4f}  (n={r['n']})"))
        rows += [(f"  level {lv}", f"{v:.4f}") for lv, v in sorted(r["by_level"].items())]
    for attack, v in results.get("mia_auroc", {}).items():
        rows.append((f"MIA AUROC  {attack}", f"{v:.4f}"))
    if not rows:
        return "(no results)"
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 24)
    return "\n".join([f"{'metric':<{width}}  value", line] + [f"{k:<{width}}  {v}" for k, v in rows])


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- commands


def cmd_unlearn(args: argparse.Namespace) -> int:
    from jax_unlearn import sharding

    sharding.maybe_initialize_distributed()  # multi-host: before any other JAX call
    import jax

    from jax_unlearn import data, train
    from jax_unlearn.run_config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.output_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(to_yaml(cfg))
    tok = _load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    model = _load_model(cfg.model.path, cfg.model.dtype, **cfg.model.options())
    d = cfg.data
    forget, retain = data.load_unlearning_sets(d.forget, d.retain, tok, d.max_length, mode=d.mode,
                                               forget_format=d.forget_format, retain_format=d.retain_format,
                                               options=data.TokenizeOptions(chunk_bos=d.chunk_bos))
    print(f"forget: {forget['input_ids'].shape[0]} rows, retain: {retain['input_ids'].shape[0]} rows "
          f"of {forget['input_ids'].shape[1]} tokens")
    result = train.unlearn(model, forget, retain, cfg.train_config(), tokenizer=tok)
    if result.interrupted:
        print(f"interrupted after step {result.steps_done}/{result.total_steps}; checkpoints in "
              f"{out / 'checkpoints'}; rerun the same command to resume")
        return 0
    print(f"done: {result.steps_done}/{result.total_steps} steps"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""))
    print(f"metrics: {out / 'metrics.jsonl'}")
    if result.export_dir is not None:
        print(f"model: {result.export_dir}")
    if cfg.eval.enabled() and jax.process_index() == 0:
        e = cfg.eval
        results = evaluate(result.model, tok, mc=e.mc, qa=e.qa, mia_forget=e.mia_forget, mia_holdout=e.mia_holdout,
                           num_fewshot=e.num_fewshot, subject=e.subject, batch_size=e.batch_size,
                           max_new_tokens=e.max_new_tokens)
        print(format_table(results))
        _write_json(out / "eval.json", {"model": str(result.export_dir or out), **results})
        print(f"evaluation: {out / 'eval.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if not (args.mc or args.qa or args.mia_forget or args.mia_holdout):
        raise CLIError("eval: nothing to evaluate; give --mc, --qa or --mia-forget with --mia-holdout")
    if (args.mia_forget is None) != (args.mia_holdout is None):
        raise CLIError("eval: --mia-forget and --mia-holdout go together")
    for path in [*args.mc, *args.qa, *filter(None, [args.mia_forget, args.mia_holdout])]:
        if not Path(path).is_file():
            raise CLIError(f"eval: file {path} does not exist")
    tok = _load_tokenizer(args.tokenizer or args.model)
    model = _load_model(args.model, args.dtype)
    results = evaluate(model, tok, mc=args.mc, qa=args.qa, mia_forget=args.mia_forget, mia_holdout=args.mia_holdout,
                       num_fewshot=args.num_fewshot, subject=args.subject, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens)
    print(format_table(results))
    if args.out:
        _write_json(Path(args.out), {"model": str(args.model), **results})
        print(f"results: {args.out}")
    return 0


def restore_run(run_dir: Path, model_path: str | None = None):
    """The model of the newest checkpoint of a ``jax-unlearn unlearn`` run folder, with its
    tokenizer and step: ``(model, tokenizer, step)``.

    The checkpoint holds only what training changed; the rest comes from the starting model
    named in the run's ``config.yaml`` (or ``model_path``).
    """
    from jax_unlearn import train
    from jax_unlearn.run_config import load_config

    config_file = run_dir / CONFIG_NAME
    if not config_file.is_file():
        raise CLIError(f"export: {config_file} does not exist; --checkpoint takes the output_dir of a "
                       "'jax-unlearn unlearn' run")
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise CLIError(f"export: {ckpt_dir} holds no checkpoint")
    overrides = [] if model_path is None else [f"model.path={model_path}"]
    cfg = load_config(config_file, overrides)
    tok = _load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    model = _load_model(cfg.model.path, cfg.model.dtype, **cfg.model.options())
    restored = train.restore_latest(model, cfg.train_config())
    if restored is None:
        raise CLIError(f"export: no readable checkpoint in {ckpt_dir}")
    model, step = restored
    return model, tok, step


def cmd_export(args: argparse.Namespace) -> int:
    from jax_unlearn import train

    run_dir, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"export: {out} is not empty; pass --overwrite to replace it")
    model, tok, step = restore_run(run_dir, args.model)
    path = train.export_model(model, out, tok, overwrite=True)
    if path is not None:
        print(f"exported step {step} of {run_dir} to {path}")
    return 0


LM_EVAL_DESCRIPTION = """\
    Run the lm-evaluation-harness's own command line ('lm-eval run') on a Hugging Face folder
    served by this library's JAX model (jax_unlearn.eval.JaxLM, the harness model
    'jax_unlearn'): every argument but --model-path goes to the harness unchanged,
    e.g. --tasks, --num_fewshot, --batch_size, --limit, --include_path, --gen_kwargs,
    --output_path, --log_samples, and --model_args for JaxLM's options (dtype=bfloat16,
    add_bos_token=true, max_length=..., prefix_token_id=...; see 'pydoc
    jax_unlearn.eval.lm_eval_adapter'). 'jax-unlearn lm-eval ls tasks' and 'validate' pass
    through as well. The harness's own 'lm_eval --model jax_unlearn' cannot find the model:
    lm-eval 0.4.13 discovers no third-party models, so this command imports the adapter first.

      jax-unlearn lm-eval --model-path exported/ --tasks mmlu --num_fewshot 5 --batch_size 32
      jax-unlearn lm-eval --model-path exported/ --model_args dtype=bfloat16 \\
          --tasks my_task --include_path my_tasks/ --output_path results/"""


def _lm_eval_parser() -> argparse.ArgumentParser:
    """Our own options of ``lm-eval`` (the rest belongs to the harness): exact names only, so a
    harness option such as ``--model_args`` is never read as an abbreviation of ours."""
    p = argparse.ArgumentParser(prog=f"{PROG} lm-eval", allow_abbrev=False, add_help=False,
                                formatter_class=_formatter, description=textwrap.dedent(LM_EVAL_DESCRIPTION),
                                epilog="The harness's options ('lm-eval run --help') follow.")
    p.add_argument("--model-path", metavar="DIR", help="Hugging Face model folder (its model_args pretrained=)")
    p.add_argument("--model", "-M", dest="harness_model", metavar="NAME",
                   help="the harness model: always jax_unlearn (set by this command)")
    p.add_argument("-h", "--help", action="store_true", help="this help, then the harness's")
    return p


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """``lm-eval run --model jax_unlearn --model_args pretrained=DIR ARGS...`` in this process,
    after importing `jax_unlearn.eval.lm_eval_adapter` (which registers the model name)."""
    parser = _lm_eval_parser()
    ours, rest = parser.parse_known_args(args.harness_args)
    subcommand = rest[0] if rest and rest[0] in ("run", "ls", "validate") else "run"
    rest = rest[1:] if rest and rest[0] == subcommand else rest
    if ours.help:
        print(parser.format_help())
        rest = ["--help"]
    elif subcommand == "run":
        if ours.harness_model not in (None, "jax_unlearn"):
            raise CLIError(f"lm-eval: --model {ours.harness_model}: this command runs the harness on the "
                           "'jax_unlearn' model; use lm_eval itself for other backends")
        if ours.model_path is None and not any("pretrained" in a for a in rest):
            raise CLIError("lm-eval: give the model folder with --model-path DIR")
        if ours.model_path is not None and not (Path(ours.model_path) / "config.json").is_file():
            raise CLIError(f"lm-eval: {ours.model_path} is not a Hugging Face model folder (no config.json)")
    try:
        from lm_eval.__main__ import cli_evaluate

        import jax_unlearn.eval.lm_eval_adapter  # noqa: F401 - registers "jax_unlearn" with the harness
    except ImportError as err:
        raise CLIError(f"lm-eval needs lm-evaluation-harness: pip install 'jax-unlearn[eval]' ({err})") from err
    argv = ["lm-eval", subcommand]
    if subcommand == "run" and not ours.help:
        argv += ["--model", "jax_unlearn"]
        if ours.model_path is not None:
            argv += ["--model_args", f"pretrained={ours.model_path}"]
    saved, sys.argv = sys.argv, argv + rest  # the harness's CLI reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as done:  # the harness's argparse (--help, usage errors) exits
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    finally:
        sys.argv = saved
    return 0


# ----------------------------------------------------------------------------- parser


def _bench(cfg, out: Path, cache: str | None, progress: bool) -> int:
    """Runs a benchmark sweep, prints its table and writes results.json and pareto.png into ``out``
    (both written complete or not at all: a failed run leaves earlier results in place)."""
    from jax_unlearn.bench.report import format_table as bench_table
    from jax_unlearn.bench.report import plot_pareto
    from jax_unlearn.bench.sweep import run_sweep

    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    results = run_sweep(cfg, Path(cache) if cache else None, progress=progress)
    for w in results["worlds"]:
        p = w["pretrain"]
        print(f"world {w['seed']}: model {'reused from' if w['cached'] else 'pretrained into'} {w['path']} "
              f"({p['steps']} steps; forget {p['forget_acc']:.2f}, retain {p['retain_acc']:.2f}, "
              f"held-out {p['heldout_acc']:.2f}, general {p['general_acc']:.2f}, unseen {p['unseen_acc']:.2f})")
        g = w["gold"]
        print(f"world {w['seed']}: gold model {'reused from' if g['cached'] else 'retrained into'} {g['path']} "
              f"({g['pretrain']['steps']} steps without the forget people; forget {g['forget_acc']:.2f}, "
              f"retain {g['retain_acc']:.2f}, held-out {g['retain_heldout_acc']:.2f}, general {g['general_acc']:.2f})")
    print(bench_table(results))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".pareto.png.tmp.png"
    try:
        plot_pareto(results, tmp)
        _write_json(out / "results.json", results)
        tmp.replace(out / "pareto.png")
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{len(results['runs'])} runs in {results['seconds']:.0f} s; results: {out / 'results.json'}, "
          f"plot: {out / 'pareto.png'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``demo`` (config optional: the built-in defaults) and ``sweep`` (config required)."""
    from jax_unlearn.bench.config import BenchConfig
    from jax_unlearn.run_config import load_config

    cfg = load_config(args.config, args.overrides, schema=BenchConfig)
    return _bench(cfg, Path(args.out), args.cache, not args.no_progress)


def _bench_args(p: argparse.ArgumentParser, out_default: str | None) -> None:
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                   help="overrides, e.g. worlds=[0,1,2] grid.values=[2e-3,1e-3] objectives=[grad_diff]")
    if out_default is None:
        p.add_argument("--out", required=True, metavar="DIR", help="folder for results.json and pareto.png")
    else:
        p.add_argument("--out", default=out_default, metavar="DIR",
                       help=f"folder for results.json and pareto.png (default {out_default})")
    p.add_argument("--cache", metavar="DIR", help="model cache (default $JAX_UNLEARN_CACHE or ~/.cache/jax_unlearn)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _names() -> dict[str, str]:
    """Names the help texts list, read from the registries and the config schemas."""
    import dataclasses

    from jax_unlearn.bench.config import BenchConfig
    from jax_unlearn.combiners import COMBINERS
    from jax_unlearn.objectives import OBJECTIVES
    from jax_unlearn.run_config import RunConfig

    demo = BenchConfig()
    hints = typing.get_type_hints(RunConfig)
    sections = [f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]
    return {"combiners": ", ".join(COMBINERS.names()), "objectives": ", ".join(OBJECTIVES.names()),
            "demo_combiners": ", ".join(demo.combiners), "demo_objectives": ", ".join(demo.objectives),
            "sections": ", ".join(sections),
            "top": ", ".join(f.name for f in dataclasses.fields(RunConfig) if f.name not in sections)}


def build_parser() -> argparse.ArgumentParser:
    from jax_unlearn.run_config import DTYPES

    n = _names()
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_formatter,
        description=textwrap.dedent(f"""\
            Machine unlearning for LLMs in JAX: the forget and retain gradients are combined by
            a combiner ({n['combiners']}) so that updates do not work against retention.
            Objectives: {n['objectives']}.

            commands:
              demo     see the method work in minutes on a CPU: pretrain (or reuse) a tiny LLaMA on
                       a world of invented people, unlearn 10% of them with {n['demo_objectives']},
                       each combined by {n['demo_combiners']} over a learning-rate grid;
                       prints a table, writes results.json and pareto.png
              sweep    the same benchmark over a grid of one hyperparameter (lr, alpha, gamma, beta,
                       delta), optionally replicated over several worlds with paired differences
              unlearn  run a YAML config (configs/) with key=value overrides; writes checkpoints,
                       metrics.jsonl and the unlearned Hugging Face model into output_dir/model
              eval     multiple-choice accuracy, QA ROUGE-L recall and MIA AUROC of a model folder
              export   write the newest checkpoint of an unlearn run as a Hugging Face folder
              lm-eval  the lm-evaluation-harness's own CLI on a model folder (tasks, few-shot,
                       batch size, ... as in 'lm-eval run'), served by the JAX model

            Run 'jax-unlearn COMMAND --help' for the options of a command."""))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "demo", formatter_class=_formatter, help="the embedded benchmark, end to end (minutes on a CPU)",
        description=textwrap.dedent(f"""\
            Build (first run: about 1.5 min of the ~3.5 on 2 CPU cores) or reuse the cached model: a
            0.27M-parameter LLaMA pretrained on a seeded world of invented people (names,
            birth cities, occupations, pets, ...) and general facts about the same places and
            animals. Then unlearn the forget people with {n['demo_objectives']}, each combined by
            {n['demo_combiners']} at three learning rates (lower rates run
            proportionally more steps), evaluate forget / retain / held-out / general accuracy
            and MIA AUROC along every run, print the best run of each method with forget
            accuracy <= 0.10 and write OUT/results.json and OUT/pareto.png.

            The settings are those of configs/demo.yaml; change any with KEY=VALUE overrides
            or --config FILE (same keys as 'sweep')."""))
    p.add_argument("--config", metavar="FILE", help="benchmark config (default: the built-in demo config)")
    _bench_args(p, "demo_out")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sweep", formatter_class=_formatter, help="benchmark grid over combiners and one hyperparameter",
        description=textwrap.dedent("""\
            Run the embedded benchmark over every objective x combiner x value of grid.param
            (lr, alpha, gamma, beta or delta) on each world seed in 'worlds' (each world's
            model is pretrained once and cached). Prints the Pareto table (best held-out
            retain accuracy with forget accuracy <= forget_threshold, means over worlds) and,
            with several worlds, the paired per-world differences between combiners with a
            Wilcoxon signed-rank test; writes OUT/results.json and OUT/pareto.png.

            Keys (see configs/demo.yaml): world.*, model.*, pretrain.*, grid.param,
            grid.values, grid.steps, grid.evals, objectives, combiners, worlds, lr, alpha,
            gamma, beta, delta, batch_size, forget_threshold, seed."""))
    p.add_argument("config", metavar="CONFIG", help="benchmark YAML config, e.g. configs/demo.yaml")
    _bench_args(p, None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "unlearn", formatter_class=_formatter, help="run an unlearning config",
        description=textwrap.dedent(f"""\
            Load the model, tokenizer and data named in CONFIG, unlearn, export the model to
            OUTPUT_DIR/model and (if the config's eval section names files) evaluate it.
            Rerunning the same command resumes from the newest checkpoint in OUTPUT_DIR.

            Overrides are dotted KEY=VALUE pairs applied after the file, values parsed as YAML:
              model.path=/ckpt/zephyr-7b-beta data.forget=bio.jsonl data.retain=wiki.jsonl
              optim.lr=1e-5 combiner.name=pcgrad combiner.scope=global max_steps=100
            Sections: {n['sections']}; top-level keys:
            {n['top']}.
            combiner.name: {n['combiners']}; objective.name: {n['objectives']}.
            An unknown key or a wrong value is an error that names the key and what it allows."""))
    p.add_argument("config", metavar="CONFIG", help="YAML run config (see configs/)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="overrides, e.g. optim.lr=1e-5")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser(
        "eval", formatter_class=_formatter, help="evaluate a Hugging Face model folder",
        description=textwrap.dedent("""\
            Evaluate a model folder: multiple-choice accuracy (--mc, records with question,
            choices, answer), QA ROUGE-L recall (--qa, records with question, answer, level) and
            membership-inference AUROC between forget and holdout texts. Prints a table and
            writes JSON with --out."""))
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: --model)")
    p.add_argument("--mc", action="append", default=[], metavar="FILE", help="multiple-choice file (repeatable)")
    p.add_argument("--qa", action="append", default=[], metavar="FILE", help="QA probe file (repeatable)")
    p.add_argument("--mia-forget", metavar="FILE", help="texts the model should have forgotten")
    p.add_argument("--mia-holdout", metavar="FILE", help="texts the model never saw")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples for --mc (default 0)")
    p.add_argument("--subject", help="subject for --mc questions without one (e.g. biology)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget for --qa (default 32)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="parameter dtype (default float32)")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export", formatter_class=_formatter, help="export a run's newest checkpoint as a Hugging Face folder",
        description=textwrap.dedent("""\
            Restore the newest readable Orbax checkpoint of an unlearn run (RUN_DIR/checkpoints,
            e.g. of an interrupted run) on top of the starting model named in RUN_DIR/config.yaml
            and save it as a Hugging Face folder with the tokenizer."""))
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="output_dir of an unlearn run")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--model", metavar="DIR", help="starting model folder, if it moved since the run")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

    # the harness's arguments pass through untouched: no option prefix here, cmd_lm_eval parses ours
    p = sub.add_parser("lm-eval", prefix_chars="+", add_help=False,
                       help="the lm-evaluation-harness CLI on a model folder ('lm-eval --help')")
    p.add_argument("harness_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jax-unlearn`` console script; returns the exit status."""
    from jax_unlearn.data import DataError
    from jax_unlearn.models import CheckpointError
    from jax_unlearn.run_config import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option (argparse stops a positional list at options)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CLIError, ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
