"""The application layer: a run config becomes a run. ``jax-unlearn unlearn`` is `prepare` then
`execute`, and so is the same run from Python::

    from jax_unlearn import config, run
    cfg = config.load_config("configs/wmdp/graddiff_sago_bio.yaml",
                             ["model.path=/ckpt/zephyr-7b-beta", "data.forget=bio.jsonl",
                              "data.retain=wiki.jsonl", "output_dir=runs/gd_sago_bio"])
    result = run.execute(run.prepare(cfg))

`prepare` validates and loads everything a run needs (the output folder, the model folder and
its fit, the tokenizer, the data, the eval files, the fingerprint and the resume decision) and
writes nothing; `execute` trains (`jax_unlearn.train.unlearn`), evaluates, selects and exports.
`restore` and `export` serve ``jax-unlearn export``: the newest checkpoint of a run folder, on
top of its starting model, as a Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flax import nnx

from jax_unlearn import data, sharding, train
from jax_unlearn import fingerprint as fpr
from jax_unlearn.config import (
    ConfigError,
    RunConfig,
    build_objective,
    check_model_fit,
    data_template,
    load_config,
    to_yaml,
)
from jax_unlearn.models import ModelOptions, check_hf, load_hf

CONFIG_NAME = "config.yaml"  # the resolved config, written into every run folder
EVAL_FILE = "eval.json"  # the final evaluation of a run with an eval section


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything a validated run needs; nothing of it is written yet.

    Attributes:
      cfg: the run's config (``output_dir`` is ``OUT/restart-N`` when `prepare` restarted).
      model: the starting model, each tensor on its shards of the run's mesh.
      tokenizer: the model's tokenizer (saved beside the exported model).
      forget, retain: the tokenised sets ``[N, max_length]``.
      total_steps: the run's length in optimizer steps.
      suite: the eval section's `jax_unlearn.eval.suite.EvalSuite` (files read), or None.
      identity: fingerprint keys of the data section (file digests and settings).
      resume: what the run folder holds (its newest checkpoint and recorded length).
      restarted: the folder that held another run when `prepare` chose ``OUT/restart-N``, else None.
    """

    cfg: RunConfig
    model: nnx.Module
    tokenizer: Any
    forget: data.Dataset
    retain: data.Dataset
    total_steps: int
    suite: Any
    identity: dict
    resume: train.ResumeCheck
    restarted: Path | None = None


def model_options(cfg: RunConfig) -> ModelOptions:
    """The `ModelOptions` of the ``model`` section (dtype names -> dtypes)."""
    import jax.numpy as jnp

    m = cfg.model
    return ModelOptions(param_dtype=jnp.dtype(m.dtype), compute_dtype=None if m.compute_dtype is None else
                        jnp.dtype(m.compute_dtype), attention_impl=m.attention_impl, scan_layers=m.scan_layers,
                        remat_policy=m.remat_policy)


def load_model(cfg: RunConfig, peft: str | None = None) -> nnx.Module:
    """The ``model`` section's folder, each tensor read straight onto its shards of the run's mesh
    (no device ever holds the whole model), plus the PEFT adapter in folder ``peft``."""
    o = model_options(cfg)
    return load_hf(cfg.model.path, dtype=o.param_dtype, shardings=sharding.make_mesh(cfg.mesh), peft=peft,
                   compute_dtype=o.compute_dtype, attention_impl=o.attention_impl, scan_layers=o.scan_layers,
                   remat_policy=o.remat_policy)


def _identity(cfg: RunConfig) -> dict:
    """The fingerprint keys of the data section: each file's SHA-256 and every other key."""
    d = cfg.data
    idk = {} if d.idk is None else {"data.idk.file": fpr.file_digest(d.idk)}
    return {"data.forget.file": fpr.file_digest(d.forget), "data.retain.file": fpr.file_digest(d.retain), **idk,
            **{f"data.{k}": v for k, v in dataclasses.asdict(d).items() if k not in ("forget", "retain", "idk")}}


def _restart_dir(out: Path, fingerprint: dict, total: int, length_key: str) -> Path:
    """The first ``out/restart-N`` that is new or holds this same run."""
    for k in range(1, 10_000):
        sub = out / f"restart-{k}"
        if not sub.exists():
            return sub
        try:
            train.check_resume(sub, fingerprint, total, length_key, partial=True)
            return sub
        except train.ResumeError:
            continue
    raise ConfigError(f"no free restart-N sub-directory in {out}")


def _qa_encoder(cfg: RunConfig, tokenizer: Any):
    """With ``data.template``: a QA pair's ``(prompt ids, answer ids)`` as open-unlearning's rows; else None."""
    template = data_template(cfg)
    if template is None:
        return None
    from jax_unlearn.eval.ou_scoring import qa_row

    def encoder(question: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        row = qa_row(tokenizer, question, answer, template=template, max_length=cfg.data.max_length)
        return row.context, row.target

    return encoder


def _load_sets(cfg: RunConfig, tokenizer: Any, hidden_size: int) -> tuple[data.Dataset, data.Dataset]:
    """The tokenised sets (with ``data.template`` QA pairs are open-unlearning's rows); the forget
    set with DPO's alternate answers (``alt_*`` columns) when the objective prefers them
    (``data.idk`` for ``idk_dpo``, the records' ``alternate`` for ``dpo``)."""
    d = cfg.data
    alternates = build_objective(cfg.objective, hidden_size).alternates
    if alternates == "idk" and d.idk is None:
        raise ConfigError(f"objective {cfg.objective.name!r} needs 'data.idk': a file of \"I don't know\" "
                          "responses, one per line")
    if d.idk is not None and alternates != "idk":
        raise ConfigError(f"'data.idk' applies to objective 'idk_dpo' only, not {cfg.objective.name!r}; remove it")
    options = data.TokenizeOptions(chunk_bos=d.chunk_bos, qa_encoder=_qa_encoder(cfg, tokenizer))
    forget, retain = data.load_unlearning_sets(d.forget, d.retain, tokenizer, d.max_length, mode=d.mode,
                                               forget_format=d.forget_format, retain_format=d.retain_format,
                                               options=options)
    if alternates is not None:
        forget = {**forget, **data.load_alternates(d.forget, tokenizer, d.max_length, idk=d.idk, seed=cfg.seed,
                                                   options=options)}
    return forget, retain


def prepare(cfg: RunConfig, *, restart: bool = False) -> Prepared:
    """Validates and loads everything of a run; writes nothing.

    In order: the output folder, the model folder (``config.json`` and tensor headers, no data
    read) and the run's fit to it, the tokenizer, the data sets, the checks that need the data
    (`jax_unlearn.train.check_run`), the eval files, and the run folder's recorded fingerprint.
    When ``output_dir`` holds another run, `ResumeError` names the keys that differ; with
    ``restart`` the run goes to the first ``output_dir/restart-N`` that is new or holds this run.
    Only then is the model loaded (sharded).

    Raises:
      ConfigError (``ResumeError`` among them), DataError, CheckpointError, FileNotFoundError:
        an input that cannot work, named (file, key, tensor); nothing was written.
    """
    sharding.maybe_initialize_distributed()  # multi-host: before any other JAX call
    train.check_output_dir(cfg.output_dir)
    model_cfg = check_hf(cfg.model.path)
    check_model_fit(cfg, model_cfg)
    tok_path = cfg.model.tokenizer or cfg.model.path
    tokenizer = data.load_tokenizer(tok_path)
    forget, retain = _load_sets(cfg, tokenizer, model_cfg.hidden_size)
    d = cfg.data
    sources = {name: f"data.{name}={path} tokenised by {tok_path} with data.max_length={d.max_length}, "
                     f"data.mode={d.mode}" for name, path in (("forget", d.forget), ("retain", d.retain))}
    tcfg = cfg.train_config()
    total, _ = train.check_run(tcfg, model_cfg, forget, retain, sources)
    train.check_trainable(model_cfg, model_options(cfg), tcfg)
    suite = cfg.eval.suite() if cfg.eval.enabled() else None  # reads the eval files: a typo shows now
    identity = _identity(cfg)
    early = fpr.run_fingerprint(tcfg, model_cfg, model_options(cfg), forget, retain, extra=identity)
    out, key, restarted = Path(cfg.output_dir), train.length_key(tcfg), None
    try:
        found = train.check_resume(out, early, total, key, partial=True)
    except train.ResumeError as err:
        if not restart:
            raise train.ResumeError(f"{err}, or pass --restart to run in a new sub-directory of it") from None
        restarted, out = out, _restart_dir(out, early, total, key)
        train.check_output_dir(out)
        cfg = dataclasses.replace(cfg, output_dir=str(out))
        found = train.check_resume(out, early, total, key, partial=True)
    return Prepared(cfg, load_model(cfg), tokenizer, forget, retain, total, suite, identity, found, restarted)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def execute(prepared: Prepared) -> train.RunResult:
    """Runs a prepared run: trains (`jax_unlearn.train.unlearn`, which writes ``config.yaml`` and
    ``fingerprint.json`` only once its own checks passed), evaluates during the run with
    ``eval.every``, exports the selected or last state, and evaluates the exported model into
    ``OUT/eval.json`` (its results in ``RunResult.evaluation``). An interrupted run evaluates nothing.
    Across several processes every process runs it (the evaluation is a sharded forward on all of
    them, each gets the results) and process 0 writes ``eval.json``.
    The prepared model's buffers become the run's state (each weight is held once): ``prepared``
    cannot be executed twice."""
    import jax

    from jax_unlearn.eval.suite import flatten

    p, cfg = prepared, prepared.cfg
    during = None if cfg.eval.every is None else (lambda m: flatten(p.suite.run(m, p.tokenizer, attacks=False)))
    result = train.unlearn(p.model, p.forget, p.retain, cfg.train_config(), tokenizer=p.tokenizer,
                           identity=p.identity, record={CONFIG_NAME: to_yaml(cfg)}, evaluate=during,
                           eval_every=cfg.eval.every, base_model=cfg.model.path, donate_model=True)
    if p.suite is None or result.interrupted:
        return result
    results = p.suite.run(result.model, p.tokenizer)  # every process takes part (sharded forward)
    if jax.process_index() == 0:
        _write_json(Path(cfg.output_dir) / EVAL_FILE, {"model": str(result.export_dir or cfg.output_dir), **results})
    return dataclasses.replace(result, evaluation=results)


# ----------------------------------------------------------------------------- export


def run_config_file(run_dir: Path) -> Path:
    """``RUN_DIR/config.yaml`` of a run folder holding checkpoints; raises `ConfigError` otherwise."""
    config_file = run_dir / CONFIG_NAME
    if not config_file.is_file():
        raise ConfigError(f"{config_file} does not exist; --checkpoint takes the output_dir of a "
                          "'jax-unlearn unlearn' run")
    if not train.checkpoint_steps(run_dir):
        raise ConfigError(f"{run_dir / 'checkpoints'} holds no checkpoint")
    return config_file


def restore(run_dir: Path, model_path: str | None = None) -> tuple[nnx.Module, Any, int, RunConfig]:
    """The model of the newest checkpoint of a ``jax-unlearn unlearn`` run folder: ``(model,
    tokenizer, step, the run's config)``.

    The checkpoint holds only what training changed; the rest comes from the starting model
    named in the run's ``config.yaml`` (or ``model_path``), which must match the model recorded
    in the run's fingerprint (its config.json and a checksum of its weights). Reads only: the
    run folder may have been moved or copied, and nothing in it changes (an unreadable newest
    checkpoint is skipped, not moved).
    """
    cfg = load_config(run_config_file(run_dir))
    if model_path is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(model_path)))
    # this folder, on this machine's devices (the run's recorded output_dir and mesh may not apply)
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir), mesh=sharding.MeshConfig())
    try:
        model_cfg = check_hf(cfg.model.path)
    except FileNotFoundError as err:
        hint = "" if model_path is not None else "; if the starting model moved, pass --model DIR"
        raise ConfigError(f"the run's starting model: {err}{hint}") from None
    record = train.read_record(run_dir)
    recorded = {} if record is None else record["fingerprint"]

    def refuse(diff: list[str]) -> None:
        raise ConfigError(f"{cfg.model.path} is not the model {run_dir} started from (recorded -> this model):\n  "
                          + "\n  ".join(diff) + "\npass --model with the run's starting model")

    diff = fpr.differences(recorded, fpr.model_keys(model_cfg, model_options(cfg)), partial=True)
    if diff:
        refuse(diff)
    tokenizer = data.load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    model = load_model(cfg)
    diff = fpr.differences(recorded, {"model.weights": fpr.params_checksum(model)}, partial=True)
    if diff:
        refuse(diff)
    restored = train.restore_latest(model, cfg.train_config(), run_dir)
    if restored is None:
        raise ConfigError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    return restored[0], tokenizer, restored[1], cfg


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.absolute().resolve(), folder.absolute().resolve()
    return path == folder or folder in path.parents


def check_export(run_dir: Path, out: Path, peft: Path | None = None, overwrite: bool = False) -> RunConfig:
    """The checks of `export` that read nothing but the run's config; returns that config.
    Raises `ConfigError` naming the flag: a folder that cannot be written, is not empty (without
    ``overwrite``) or lies inside the run folder, ``--peft`` for a run without adapters."""
    cfg = load_config(run_config_file(run_dir))
    if peft is not None and cfg.lora.rank is None:
        raise ConfigError(f"--peft: {run_dir} is not a LoRA run ({run_dir / CONFIG_NAME} sets no lora.rank); "
                          "it has no adapter to write")
    if peft is not None and (_inside(peft, out) or _inside(out, peft)):
        raise ConfigError(f"--peft {peft} and --out {out} must be separate folders")
    for flag, folder in [("--out", out)] + ([("--peft", peft)] if peft is not None else []):
        problem = train.unwritable(folder, flag, folder=True)
        if problem:
            raise ConfigError(problem)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise ConfigError(f"{flag} {folder} is not empty; pass --overwrite to replace it")
        if run_dir.is_dir() and _inside(folder, run_dir):
            raise ConfigError(f"{flag} {folder} lies inside the run folder {run_dir}, which export never "
                              "changes; choose a folder outside it")
    return cfg


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export` wrote: the step, the model folder and the adapter folder (None: not asked
    for, or not this process's to write)."""

    step: int
    model_dir: Path | None
    adapter_dir: Path | None
    merged: bool  # the model carried LoRA adapters, merged into its weights
    base_model: str  # the starting model the adapter applies to


def export(run_dir: Path, out: Path, *, peft: Path | None = None, model_path: str | None = None,
           overwrite: bool = False) -> Exported:
    """Writes the newest checkpoint of a run folder (`restore`) as a Hugging Face folder ``out``
    (and a LoRA run's adapter alone as a PEFT folder ``peft``); checks first (`check_export`)."""
    cfg = check_export(run_dir, out, peft, overwrite)
    model, tokenizer, step, _ = restore(run_dir, model_path)
    model_dir = train.export_model(model, out, tokenizer, overwrite=True)
    adapter_dir, base = None, model_path or cfg.model.path
    if peft is not None:
        adapter_dir = train.export_adapter(model, peft, base, overwrite=True)
    return Exported(step, model_dir, adapter_dir, cfg.lora.rank is not None, base)
