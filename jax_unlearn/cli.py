"""The ``jax-unlearn`` command line: ``demo``, ``sweep``, ``unlearn``, ``eval``, ``export``, ``lm-eval`` and ``plan``.

    jax-unlearn demo --out demo_out
    jax-unlearn sweep configs/demo.yaml worlds=[0,1,2,3] --out sweep_out
    jax-unlearn unlearn configs/wmdp/graddiff_sago_bio.yaml model.path=/ckpt/zephyr-7b-beta \\
        data.forget=bio_forget.jsonl data.retain=wikitext.jsonl output_dir=runs/gd_sago_bio
    jax-unlearn eval --model runs/gd_sago_bio/model --mc wmdp_bio.jsonl --mc mmlu.jsonl --out eval.json
    jax-unlearn export --checkpoint runs/gd_sago_bio --out exported/
    jax-unlearn lm-eval --model-path exported/ --tasks mmlu --num_fewshot 5 --batch_size 32
    jax-unlearn plan configs/wmdp/graddiff_sago_bio.yaml --target tpu:v5p:2x2x2 --shape mistral-7b

Exit status: 0 done; 1 the run failed (a non-finite step, an I/O error, an unexpected error);
2 a usage or input error (command line, config, model folder, tokenizer, data files, output
folder, a run folder holding another run), reported before anything was written; 75 (EX_TEMPFAIL)
interrupted by SIGTERM/SIGINT after saving a checkpoint: rerun the same command to resume;
130 Ctrl-C outside the training loop (which saves first). Every error prints one short message naming the file,
key, tensor or value and what was expected; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "jax-unlearn"
EXIT_FAILURE = 1  # the run failed (non-finite step, I/O, unexpected error)
EXIT_USAGE = 2  # command line, config or input error, found before anything was written
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: SIGTERM/SIGINT, a checkpoint was saved; rerun to resume
EXIT_SIGINT = 130  # Ctrl-C outside the training loop


class CLIError(Exception):
    """A usage error reported as one line."""


# ----------------------------------------------------------------------------- helpers


def _load_model(path: str, dtype: str = "float32", peft: str | None = None):
    """The model in folder ``path`` on the default device, plus the PEFT adapter in folder ``peft``."""
    import jax.numpy as jnp

    from jax_unlearn.models import load_hf

    return load_hf(path, dtype=jnp.dtype(dtype), peft=peft)


def _check_writable(path: Path, what: str, folder: bool) -> None:
    """Raises CLIError when ``path`` (a folder, or a file with ``folder=False``) cannot be
    written (`jax_unlearn.train.unwritable`)."""
    from jax_unlearn.train import unwritable

    problem = unwritable(path, what, folder)
    if problem:
        raise CLIError(problem)


def format_table(results: dict) -> str:
    """Results of `jax_unlearn.eval.suite.EvalSuite.run` as a two-column text table (the
    robustness attacks' results under their attack's name)."""
    rows = _table_rows(results)
    for attack, r in results.get("robustness", {}).items():
        rows += [(f"[{attack}] {k}", v) for k, v in _table_rows(r)]
    return rows


def _table_rows(results: dict) -> list[tuple[str, str]]:
    rows = []
    for path, r in results.get("multiple_choice", {}).items():
        rows.append((f"MC accuracy  {path}", f"{r['accuracy']:.4f}  (n={r['n']})"))
        rows += [(f"  subject {s}", f"{a:.4f}") for s, a in sorted(r["by_subject"].items())]
    for path, r in results.get("qa", {}).items():
        rows.append((f"QA ROUGE-L recall  {path}", f"{r['rouge_l_recall']:.4f}  (n={r['n']})"))
        rows += [(f"  level {lv}", f"{v:.4f}") for lv, v in sorted(r["by_level"].items())]
    for attack, v in results.get("mia_auroc", {}).items():
        rows.append((f"MIA AUROC  {attack}", f"{v:.4f}"))
    for path, r in results.get("perplexity", {}).items():
        rows.append((f"perplexity  {path}", f"{r['perplexity']:.4f}  ({r['tokens']} tokens)"))
    return rows


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- commands


def cmd_unlearn(args: argparse.Namespace) -> int:
    """`jax_unlearn.run.prepare` (validates and loads everything, writes nothing), then
    `jax_unlearn.run.execute`; prints what they did."""
    from jax_unlearn import run
    from jax_unlearn.config import load_config
    from jax_unlearn.train import length_key

    prepared = run.prepare(load_config(args.config, args.overrides), restart=args.restart)
    cfg, forget, retain = prepared.cfg, prepared.forget, prepared.retain
    print(f"forget: {forget['input_ids'].shape[0]} rows, retain: {retain['input_ids'].shape[0]} rows "
          f"of {forget['input_ids'].shape[1]} tokens")
    out = Path(cfg.output_dir)
    if prepared.restarted is not None:
        print(f"{prepared.restarted} holds another run; --restart: this run goes to {out} "
              f"(pass output_dir={out} to resume it later)")
    result = run.execute(prepared)
    if result.continued_from is not None:
        print(f"continued: the run had {result.continued_from} steps, {length_key(cfg)} now gives "
              f"{result.total_steps}")
    if result.interrupted:
        print(f"interrupted after step {result.steps_done}/{result.total_steps}; checkpoints in "
              f"{out / 'checkpoints'}; rerun the same command to resume (exit status {EXIT_INTERRUPTED})")
        return EXIT_INTERRUPTED
    print(f"done: {result.steps_done}/{result.total_steps} steps"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else "")
          + (f"; stop_when {cfg.stop_when.metric} was met" if result.stopped_early else ""))
    if result.selected_step is not None:
        print(f"exported the evaluated step with the best {cfg.select.metric} ({cfg.select.mode}): "
              f"step {result.selected_step}")
    print(f"metrics: {out / 'metrics.jsonl'}")
    if result.export_dir is not None:
        print(f"model: {result.export_dir}" + (" (adapters merged)" if cfg.lora.rank is not None else ""))
        if cfg.lora.rank is not None and (out / "adapter").is_dir():
            print(f"adapter: {out / 'adapter'} (PEFT LoRA over {cfg.model.path})")
    if result.evaluation is not None:
        print(format_table(result.evaluation))
        print(f"evaluation: {out / run.EVAL_FILE}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """`jax_unlearn.plan.plan_run` on the config and target; prints its table (and writes JSON)."""
    from jax_unlearn import plan

    plan.compile_only()  # before JAX starts a backend
    target = plan.parse_target(args.target)
    if target.platform == "cpu":
        plan.request_cpu_devices(target.count)  # before JAX's CPU backend starts
    if args.memory is not None:
        target = target.with_memory(int(args.memory * 2**30))
    if args.json:
        _check_writable(Path(args.json), "--json", folder=False)
    cfg = plan.load_plan_config(args.config, args.overrides, shape=args.shape)
    print(f"compiling the run's step for {target.text} (no device is used; large models take minutes) ...",
          flush=True)
    result = plan.plan_run(cfg, target, args.shape, search=args.search_batch, naive=args.naive,
                           combiner=args.combiner)
    print(plan.format_plan(result))
    if args.json:
        _write_json(Path(args.json), plan.plan_dict(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jax_unlearn.data import load_tokenizer
    from jax_unlearn.eval.robustness import parse_scheme
    from jax_unlearn.eval.suite import EvalSuite

    if not (args.mc or args.qa or args.mia_forget or args.mia_holdout or args.perplexity or args.paraphrase_mc
            or args.paraphrase_qa or args.tofu or args.muse):
        raise CLIError("eval: nothing to evaluate; give --mc, --qa, --perplexity, --mia-forget with --mia-holdout, "
                       "--tofu or --muse"
                       + (" (the robustness attacks re-run those metrics)" if args.relearn or args.relearn_benign
                          or args.quantize else ""))
    if (args.retain_logs or args.template) and not (args.tofu or args.muse):
        raise CLIError("eval: --retain-logs and --template apply to --tofu / --muse; neither is given")
    for scheme in args.quantize:
        try:
            parse_scheme(scheme)
        except ValueError as err:
            raise CLIError(f"eval: --quantize {scheme}: {err}") from None
    if (args.mia_forget is None) != (args.mia_holdout is None):
        raise CLIError("eval: --mia-forget and --mia-holdout go together")
    for path in [*args.mc, *args.qa, *args.perplexity, *args.paraphrase_mc, *args.paraphrase_qa,
                 *filter(None, [args.mia_forget, args.mia_holdout, args.relearn, args.relearn_benign,
                                args.retain_logs, args.template])]:
        if not Path(path).is_file():
            raise CLIError(f"eval: file {path} does not exist")
    if args.peft is not None and not Path(args.peft).is_dir():
        raise CLIError(f"eval: --peft {args.peft} is not a folder (expected a PEFT LoRA adapter folder)")
    if args.out:
        _check_writable(Path(args.out), "eval: --out", folder=False)
    if args.num_fewshot and not args.mc:
        raise CLIError(f"eval: --num-fewshot {args.num_fewshot} applies to --mc files; none is given")
    for flag, source in (("--tofu", args.tofu), ("--muse", args.muse)):
        if source and not source.startswith("hub:") and not Path(source).is_dir():
            raise CLIError(f"eval: {flag} {source} is not a folder (expected the benchmark's files, or hub:NAME)")
    suite = EvalSuite.of(args)
    benchmarks = _benchmarks(args)  # reads the TOFU/MUSE files and the template first: a typo shows now
    tok = load_tokenizer(args.tokenizer or args.model)
    model = _load_model(args.model, args.dtype, peft=args.peft)
    asked = args.mc or args.qa or args.mia_forget or args.perplexity or args.paraphrase_mc or args.paraphrase_qa
    results = suite.run(model, tok) if asked else {}
    if results:
        print(format_table(results))
    for name, (evaluate, table) in benchmarks.items():
        results[name] = evaluate(model, tok)
        print(table(results[name]))
    if args.out:
        _write_json(Path(args.out), {"model": str(args.model), **({"peft": str(args.peft)} if args.peft else {}),
                                     **results})
        print(f"results: {args.out}")
    return 0


def _benchmarks(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """``{"tofu"|"muse": (evaluate(model, tokenizer) -> result, table(result) -> text)}`` for the
    benchmarks asked for, their files read now (`jax_unlearn.eval.tofu`, `jax_unlearn.eval.muse`)."""
    import functools

    from jax_unlearn.eval import muse, tofu
    from jax_unlearn.eval.ou_scoring import DEFAULT_TEMPLATE, read_template

    template = read_template(args.template) if args.template else DEFAULT_TEMPLATE
    out = {}
    if args.tofu:
        data = tofu.load_tofu(args.tofu, forget_split=args.tofu_split)
        out["tofu"] = (functools.partial(tofu.evaluate_tofu, data=data, retain_logs=args.retain_logs,
                                         template=template, truth_ratio_definition=args.truth_ratio,
                                         batch_size=args.batch_size), tofu.format_tofu_table)
    if args.muse:
        data = muse.load_muse(args.muse)
        out["muse"] = (functools.partial(muse.evaluate_muse, data=data, retain_logs=args.retain_logs,
                                         template=template, batch_size=args.batch_size), muse.format_muse_table)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from jax_unlearn import run

    done = run.export(Path(args.checkpoint), Path(args.out), peft=None if args.peft is None else Path(args.peft),
                      model_path=args.model, overwrite=args.overwrite)
    if done.model_dir is not None:
        print(f"exported step {done.step} of {args.checkpoint} to {done.model_dir}"
              + (" (adapters merged)" if done.merged else ""))
    if done.adapter_dir is not None:
        print(f"exported its LoRA adapter to {done.adapter_dir} (PEFT, over {done.base_model})")
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
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """``lm-eval run --model jax_unlearn --model_args pretrained=DIR ARGS...`` in this process,
    after importing `jax_unlearn.eval.lm_eval_adapter` (which registers the model name)."""
    parser = _lm_eval_parser()
    ours, rest = parser.parse_known_args(args.harness_args)
    args.debug = args.debug or ours.debug
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
        if ours.model_path is not None:
            from jax_unlearn.models import check_hf

            check_hf(ours.model_path)  # config.json and tensor headers, named errors before the harness starts
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
    except ValueError as err:  # the harness's input errors, raised before any model is built
        if str(err).startswith("Tasks not found"):
            raise CLIError(f"lm-eval: {err} (list the known tasks with 'jax-unlearn lm-eval ls tasks'; local task "
                           "folders need --include_path)") from None
        raise
    finally:
        sys.argv = saved
    return 0


# ----------------------------------------------------------------------------- parser


def _bench(cfg, out: Path, cache: str | None, progress: bool) -> int:
    """Runs a benchmark sweep, prints its table and writes results.json and pareto.png into ``out``
    (both written complete or not at all: a failed run leaves earlier results in place). The
    finished worlds go to ``out/partial.json`` after each; a run of the same config resumes from it."""
    from jax_unlearn.bench.report import format_table as bench_table
    from jax_unlearn.bench.report import plot_pareto
    from jax_unlearn.bench.sweep import run_sweep

    _check_writable(out, "--out", folder=True)
    if cache:
        _check_writable(Path(cache), "--cache", folder=True)
    done = _interrupted(cfg, out / PARTIAL)
    if done is not None:
        print(f"resuming: world(s) {', '.join(str(w['seed']) for w in done['worlds'])} done, "
              f"read from {out / PARTIAL}")
    results = run_sweep(cfg, Path(cache) if cache else None, progress=progress, done=done,
                        checkpoint=lambda part: _write_json(out / PARTIAL, part))
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
    (out / PARTIAL).unlink(missing_ok=True)  # its worlds are in results.json now
    print(f"{len(results['runs'])} runs, {results['seconds']:.0f} s in all (models included); "
          f"results: {out / 'results.json'}, "
          f"plot: {out / 'pareto.png'}")
    return 0


#: the finished worlds of a sweep in progress, in its --out folder (written after each world)
PARTIAL = "partial.json"


def _interrupted(cfg, path: Path) -> dict | None:
    """The `jax_unlearn.bench.sweep.partial` dict at ``path`` when it records the same sweep as
    ``cfg`` (its worlds may differ), else None when there is none; CLIError when it records another
    config (resuming would mix two sweeps; the file is left as it is)."""
    import dataclasses

    from jax_unlearn.bench.sweep import config_differences

    if not path.exists():
        return None
    part = _read_results(path)
    diff = config_differences(dataclasses.asdict(cfg), part["config"])
    if diff:
        raise CLIError(f"{path}: an interrupted sweep of another config (differs in {', '.join(diff)}); resume it "
                       "with its own config and overrides, or give another --out")
    return part


def _read_results(path: Path) -> dict:
    """A demo's or sweep's results.json (or a sweep's partial.json), with named errors."""
    if not path.is_file():
        raise CLIError(f"{path}: no such file (give the results.json that 'jax-unlearn demo' or 'sweep' wrote)")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"{path}: not a JSON file ({err})") from None
    keys = ("config", "worlds", "runs") if isinstance(results, dict) and results.get("partial") else \
        ("config", "worlds", "runs", "gold", "summary", "summary_by_world", "paired")
    missing = [k for k in keys if not isinstance(results, dict) or k not in results]
    if missing:
        raise CLIError(f"{path}: not the results.json of a demo or sweep (no {', '.join(repr(k) for k in missing)})")
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    """``demo`` (config optional: the built-in defaults) and ``sweep`` (config required)."""
    from jax_unlearn.bench.config import BenchConfig
    from jax_unlearn.config import load_config

    cfg = load_config(args.config, args.overrides, schema=BenchConfig)
    return _bench(cfg, Path(args.out), args.cache, not args.no_progress)


def cmd_report(args: argparse.Namespace) -> int:
    """``report RESULTS...``: the tables of a finished demo or sweep; of several sweeps of one
    config over different worlds (or their partial.json) merged, written to ``--out`` if given."""
    from jax_unlearn.bench.report import format_table as bench_table
    from jax_unlearn.bench.sweep import merge_results

    paths = [Path(p) for p in args.results]
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists():
            raise CLIError(f"--out {out}: exists already; give a new file (nothing is overwritten)")
        _check_writable(out, "--out", folder=False)
    parts = [_read_results(p) for p in paths]
    results = parts[0]
    if len(parts) > 1 or results.get("partial"):
        try:
            results = merge_results(parts, [str(p) for p in paths])
        except ValueError as err:
            raise CLIError(str(err)) from None
    print(bench_table(results))
    if out is not None:
        _write_json(out, results)
        print(f"merged results of {len(results['worlds'])} world(s): {out}")
    return 0


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
    from jax_unlearn.config import RunConfig
    from jax_unlearn.objectives import OBJECTIVES

    demo = BenchConfig()
    hints = typing.get_type_hints(RunConfig)
    sections = [f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]
    return {"combiners": ", ".join(COMBINERS.names()), "objectives": ", ".join(OBJECTIVES.names()),
            "demo_combiners": ", ".join(demo.combiners), "demo_objectives": ", ".join(demo.objectives),
            "gold_tolerance": f"{demo.gold_tolerance:g}", "forget_threshold": f"{demo.forget_threshold:g}",
            "sections": ", ".join(sections),
            "top": ", ".join(f.name for f in dataclasses.fields(RunConfig) if f.name not in sections)}


def _int_at_least(least: int):
    """An argparse type: an integer >= ``least`` (the error names the option and the bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


EPILOG = textwrap.dedent(f"""\
    exit status: 0 done, {EXIT_FAILURE} failed (non-finite step, I/O, unexpected error), {EXIT_USAGE} usage or input
    error (nothing written), {EXIT_INTERRUPTED} interrupted by SIGTERM/SIGINT with a checkpoint saved (rerun to
    resume), {EXIT_SIGINT} Ctrl-C outside the training loop; --debug prints the traceback of an error.""")


def build_parser() -> argparse.ArgumentParser:
    from jax_unlearn.config import DTYPES
    from jax_unlearn.plan.shapes import SHAPES
    from jax_unlearn.plan.targets import EXTRA as PLAN_EXTRA

    SHAPE_NAMES = ", ".join(SHAPES)  # noqa: N806

    n = _names()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_formatter, epilog=EPILOG,
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
              plan     compile a run's step for a TPU pod or NVIDIA GPUs from this machine:
                       per-device memory, fits or not, the largest batch, a time estimate

            Run 'jax-unlearn COMMAND --help' for the options of a command."""))
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "demo", formatter_class=_formatter, parents=[common], epilog=EPILOG,
        help="the embedded benchmark, end to end (minutes on a CPU)",
        description=textwrap.dedent(f"""\
            Build (first run, a few minutes on 2 CPU cores: docs/benchmarks.md) or reuse the
            cached models: a 0.27M-parameter LLaMA pretrained on a seeded world of invented
            people (names, birth cities, occupations, pets, ...) and general facts about the same
            places and animals, and its gold model, retrained without the forget people (exact
            unlearning). Then unlearn the forget people with {n['demo_objectives']}, each
            combined by {n['demo_combiners']} at three learning rates (lower rates run
            proportionally more steps), evaluate forget / retain / held-out / general accuracy,
            MIA AUROC, forget quality (KS test against the gold model) and PrivLeak along every
            run, print the best run of each method at the gold-matched bar (forget accuracy at
            most the gold model's + gold_tolerance={n['gold_tolerance']}) and at the fixed bar
            (forget_threshold={n['forget_threshold']}), and write OUT/results.json and OUT/pareto.png.

            The settings are those of configs/demo.yaml; change any with KEY=VALUE overrides
            or --config FILE (same keys as 'sweep')."""))
    p.add_argument("--config", metavar="FILE", help="benchmark config (default: the built-in demo config)")
    _bench_args(p, "demo_out")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sweep", formatter_class=_formatter, parents=[common], epilog=EPILOG,
        help="benchmark grid over combiners and one hyperparameter",
        description=textwrap.dedent("""\
            Run the embedded benchmark over every objective x combiner x value of grid.param
            (lr, alpha, gamma, beta or delta) on each world seed in 'worlds' (each world's
            model and gold model are trained once and cached). Prints the tables at the
            gold-matched bar (forget accuracy at most each world's gold model's +
            gold_tolerance) and at the fixed bar (forget_threshold): the best held-out retain
            accuracy of each method, means over worlds; with several worlds, the paired
            per-world differences between combiners with their mean, a 95% t-interval and a
            Wilcoxon signed-rank test. Writes OUT/results.json and OUT/pareto.png.

            With several worlds also the ranking: each combiner's mean, its paired difference
            to weighted_sum and to sago, the worlds where it is the best, its time per step
            (configs/zoo.yaml runs every registered combiner).

            After each world the finished worlds go to OUT/partial.json: the same command run
            again resumes an interrupted sweep from there. Sweeps of different worlds (run on
            several machines) merge with 'jax-unlearn report A/results.json B/results.json'.

            Keys (see configs/demo.yaml): world.*, model.*, pretrain.*, grid.param,
            grid.values, grid.steps, grid.evals, objectives, combiners, variants, worlds, lr,
            alpha, gamma, beta, delta, batch_size, gold_tolerance, forget_threshold, seed."""))
    p.add_argument("config", metavar="CONFIG", help="benchmark YAML config, e.g. configs/demo.yaml")
    _bench_args(p, None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "report", formatter_class=_formatter, parents=[common], epilog=EPILOG,
        help="print a demo's or sweep's tables again from its results.json",
        description=textwrap.dedent("""\
            Print the tables of a finished 'demo' or 'sweep' (summaries, robustness, TOFU, the
            ranking and the paired differences) from its results.json, without running anything.
            Several results files of one config over different worlds (e.g. sweeps run on
            several machines, worlds=[0,1,2,3] and worlds=[4,5,6,7]) are merged: every summary
            and paired difference is computed again over all their worlds. A sweep's
            partial.json (its finished worlds, written after each) reads like a results file."""))
    p.add_argument("results", metavar="RESULTS", nargs="+",
                   help="results.json of 'jax-unlearn demo' or 'sweep'; several (sweeps of one config over "
                        "different worlds, or the partial.json of one in progress) are merged")
    p.add_argument("--out", metavar="FILE", help="write the merged results to FILE (a new file)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "unlearn", formatter_class=_formatter, parents=[common], epilog=EPILOG,
        help="run an unlearning config",
        description=textwrap.dedent(f"""\
            Load the model, tokenizer and data named in CONFIG, unlearn, export the model to
            OUTPUT_DIR/model and (if the config's eval section names files) evaluate it.
            Everything is checked before anything is written: the config, OUTPUT_DIR, the model
            folder, the tokenizer and the data files. OUTPUT_DIR records the run's fingerprint
            (fingerprint.json: model config and weights checksum, data hashes, objective,
            combiner, optimizer, seed, batch layout); rerunning the same command resumes from the
            newest checkpoint, a changed config is refused naming the keys that differ (--restart
            runs it in OUTPUT_DIR/restart-N instead), and a larger max_steps continues the run.

            Overrides are dotted KEY=VALUE pairs applied after the file, values parsed as YAML:
              model.path=/ckpt/zephyr-7b-beta data.forget=bio.jsonl data.retain=wiki.jsonl
              optim.lr=1e-5 combiner.name=pcgrad combiner.scope=global max_steps=100
            Sections: {n['sections']}; top-level keys:
            {n['top']}.
            combiner.name: {n['combiners']}; objective.name: {n['objectives']}.
            An unknown key or a wrong value is an error that names the key and what it allows."""))
    p.add_argument("config", metavar="CONFIG", help="YAML run config (see configs/)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="overrides, e.g. optim.lr=1e-5")
    p.add_argument("--restart", action="store_true",
                   help="if OUTPUT_DIR holds another run, run in OUTPUT_DIR/restart-N (the first new one, or "
                        "one holding this run) instead of refusing; nothing in OUTPUT_DIR is changed")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser(
        "eval", formatter_class=_formatter, parents=[common], epilog=EPILOG,
        help="evaluate a Hugging Face model folder",
        description=textwrap.dedent("""\
            Evaluate a model folder: multiple-choice accuracy (--mc, records with question,
            choices, answer), QA ROUGE-L recall (--qa, records with question, answer, level) and
            membership-inference AUROC between forget and holdout texts, and open-unlearning's
            TOFU (--tofu) and MUSE (--muse) tables. Prints a table and writes JSON with --out."""))
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: --model)")
    p.add_argument("--mc", action="append", default=[], metavar="FILE", help="multiple-choice file (repeatable)")
    p.add_argument("--qa", action="append", default=[], metavar="FILE", help="QA probe file (repeatable)")
    p.add_argument("--perplexity", action="append", default=[], metavar="FILE",
                   help="text file (.txt, or .jsonl/.json with text records) for perplexity (repeatable)")
    p.add_argument("--mia-forget", metavar="FILE", help="texts the model should have forgotten")
    p.add_argument("--mia-holdout", metavar="FILE", help="texts the model never saw")
    p.add_argument("--num-fewshot", type=_int_at_least(0), default=0,
                   help="solved examples from --fewshot before each --mc question (default 0)")
    p.add_argument("--fewshot", metavar="FILE", help="multiple-choice file of solved examples (e.g. the dev split)")
    p.add_argument("--subject", help="subject for --mc questions without one (e.g. biology)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="rows per forward pass (default 8)")
    g = p.add_argument_group("robustness attacks (each re-runs the metrics above on an attacked copy of the model)")
    g.add_argument("--relearn", metavar="FILE", help="texts (part of the forget set) to fine-tune a copy on")
    g.add_argument("--relearn-benign", metavar="FILE", help="benign texts (retain / general) to fine-tune a copy on")
    g.add_argument("--relearn-steps", type=_int_at_least(1), default=10, help="fine-tuning steps (default 10)")
    g.add_argument("--relearn-lr", type=_positive_float, default=1e-5, help="Adam learning rate (default 1e-5)")
    g.add_argument("--relearn-batch-size", type=_int_at_least(1), default=4, help="rows per step (default 4)")
    g.add_argument("--relearn-max-length", type=_int_at_least(1), default=128,
                   help="tokens per fine-tuning row (longer texts are cut; default 128)")
    g.add_argument("--relearn-seed", type=int, default=0, help="data order (default 0)")
    g.add_argument("--quantize", action="append", default=[], metavar="SCHEME",
                   help="round-to-nearest weight-only quantization of the linear layers: int8, int4 (per channel), "
                        "int4_g128 (per group of 128 inputs), ... (repeatable)")
    g.add_argument("--paraphrase-mc", action="append", default=[], metavar="FILE",
                   help="multiple-choice file asking the forget facts in templates never trained on (repeatable)")
    g.add_argument("--paraphrase-qa", action="append", default=[], metavar="FILE",
                   help="QA probe file asking the forget facts in templates never trained on (repeatable)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=32,
                   help="generation budget for --qa (default 32)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="parameter dtype (default float32)")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON")
    p.add_argument("--peft", metavar="DIR", help="PEFT LoRA adapter folder to add onto --model")
    p.add_argument("--tofu", metavar="DIR", help="TOFU files (locuslab/TOFU's forget10.json, ...; or "
                   "hub:locuslab/TOFU with 'datasets'): open-unlearning's TOFU table")
    p.add_argument("--tofu-split", default="forget10", choices=["forget01", "forget05", "forget10"],
                   help="TOFU forget split (its holdout split follows; default forget10)")
    p.add_argument("--truth-ratio", default="open_unlearning", choices=["open_unlearning", "tofu_paper"],
                   help="truth-ratio definition (default: open-unlearning's code; docs/reference.md)")
    p.add_argument("--muse", metavar="DIR", help="MUSE files (muse-bench/MUSE-News or -Books layout; or "
                   "hub:muse-bench/MUSE-News): open-unlearning's MUSE table")
    p.add_argument("--retain-logs", metavar="FILE", help="the retain model's TOFU_EVAL.json / MUSE_EVAL.json (or "
                   "this command's --out on it): forget quality and privleak need it")
    p.add_argument("--template", metavar="FILE", help="the model's prompt template: open-unlearning's template_args "
                   "as YAML/JSON (its configs/model/<model>.yaml); default 'Question: ...\\nAnswer: '")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export", formatter_class=_formatter, parents=[common], epilog=EPILOG,
        help="export a run's newest checkpoint as a Hugging Face folder",
        description=textwrap.dedent("""\
            Restore the newest readable Orbax checkpoint of an unlearn run (RUN_DIR/checkpoints,
            e.g. of an interrupted run) on top of the starting model named in RUN_DIR/config.yaml
            (or --model) and save it as a Hugging Face folder with the tokenizer. RUN_DIR may have
            been moved or copied; nothing in it changes. A starting model that does not match
            the run's fingerprint (config.json, weights checksum) is refused."""))
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="output_dir of an unlearn run")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--model", metavar="DIR", help="starting model folder, if it moved since the run")
    p.add_argument("--peft", metavar="DIR", help="LoRA runs: also write the adapter alone as a PEFT folder here")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and --peft)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "plan", formatter_class=_formatter, parents=[common], epilog=EPILOG,
        help="compile a run's step for a TPU pod, NVIDIA GPUs or host devices: per-device memory",
        description=textwrap.dedent(f"""\
            Compile the step of the run CONFIG (YAML + KEY=VALUE overrides, as 'unlearn' reads it)
            for a target, without the hardware and without allocating anything, and print per
            device: parameters, frozen weights, optimizer state, reference, batches, the two
            gradients, activations and other temporaries, the peak against the chip's memory, a
            fits / does not fit verdict, a roofline time ESTIMATE from the compiler's FLOPs and
            bytes (never a measurement), and what the run holds besides the step.

            Targets: tpu:CHIP:TOPOLOGY (CHIP v4, v5e, v5p, v6e; e.g. tpu:v5p:2x2x2 = 8 chips,
            tpu:v5e:16x16 = 256), gpu:h100[:N], gpu:h200[:N], gpu:SPEC.txtpb[:N] (an XLA
            GpuTargetConfigProto), cpu:N (XLA:CPU host devices). TPU and GPU targets need
            the compilers: {PLAN_EXTRA}.
            The model is the config's model.path folder (config.json only), or --shape
            ({SHAPE_NAMES}) when the folder is not on this machine.

              jax-unlearn plan configs/wmdp/graddiff_sago_bio.yaml --target tpu:v5p:2x2x2 --shape mistral-7b
              jax-unlearn plan configs/wmdp/npo_sago_bio.yaml model.scan_layers=true \\
                  model.remat_policy=full --target gpu:h100 --shape 1b --naive"""))
    p.add_argument("config", metavar="CONFIG", help="YAML run config (see configs/)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="overrides, e.g. batch_size=64")
    p.add_argument("--target", required=True, metavar="T", help="tpu:v5p:2x2x2, gpu:h100[:N], cpu:8, ...")
    p.add_argument("--shape", metavar="S", help=f"a named model shape instead of model.path: {SHAPE_NAMES}")
    p.add_argument("--memory", type=float, metavar="GIB", help="per-device memory to plan against (default: the chip's)")
    p.add_argument("--search-batch", action="store_true",
                   help="also find the largest per-device batch that fits (doubling, then bisection; a compile each)")
    p.add_argument("--naive", action="store_true",
                   help="also compile the one-backward step at the same shape: this step's peak / naive")
    p.add_argument("--combiner", action="store_true",
                   help="also compile the combiner's update alone: bytes accessed against its floor")
    p.add_argument("--json", metavar="FILE", help="write the plan as JSON")
    p.set_defaults(func=cmd_plan)

    # the harness's arguments pass through untouched: no option prefix here, cmd_lm_eval parses ours
    p = sub.add_parser("lm-eval", prefix_chars="+", add_help=False,
                       help="the lm-evaluation-harness CLI on a model folder ('lm-eval --help')")
    p.add_argument("harness_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
    return parser


def _exit_status(err: BaseException) -> tuple[int, str]:
    """``(exit status, message)`` of an error: inputs and usage -> 2, a failed run -> 1."""
    from jax_unlearn.config import ConfigError
    from jax_unlearn.data import DataError
    from jax_unlearn.models import CheckpointError
    from jax_unlearn.train import NonFiniteError

    if isinstance(err, NonFiniteError):
        return EXIT_FAILURE, str(err)
    if isinstance(err, (CLIError, ConfigError, DataError, CheckpointError, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError, FileExistsError, PermissionError)):
        return EXIT_USAGE, str(err)
    if isinstance(err, OSError):
        return EXIT_FAILURE, str(err)
    text = " ".join(str(err).split())
    return EXIT_FAILURE, f"{type(err).__name__}: {text[:500]} (rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jax-unlearn`` console script; returns the exit status (see the
    module docstring: 0, 1 failed, 2 usage or input error, 75 interrupted and resumable)."""
    # transformers without torch (the demo extra) announces "PyTorch was not found ..." on import;
    # the CLI uses only its tokenizers and configs
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option (argparse stops a positional list at options)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO lines
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Exception as err:  # noqa: BLE001 - every failure becomes a message and an exit status
        status, message = _exit_status(err)
        message = message.removeprefix(f"{args.command}: ")  # the line starts with the command already
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
