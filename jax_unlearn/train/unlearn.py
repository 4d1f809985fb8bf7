"""One unlearning run over a run folder: `unlearn`, a loop over named parts.

`unlearn` validates everything before it writes (`check_run`, the output folder, the recorded
fingerprint: `jax_unlearn.train.folder`), builds the run's step (`build_run`), resumes from the
newest checkpoint (`jax_unlearn.train.checkpoints`), then drives `run_steps` with its hooks:
metrics (`jax_unlearn.train.metrics`), checkpoints, evaluations and selection
(`jax_unlearn.train.selection`), the non-finite guard (`jax_unlearn.train.guard`) and signals;
and exports (`jax_unlearn.train.export`). Forget-anchored epochs (`jax_unlearn.data.PairedBatches`)
make the data of step ``t`` a function of ``t`` alone, so a resumed run sees exactly the batches
an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jax_unlearn import fingerprint as fpr
from jax_unlearn import sharding as sh
from jax_unlearn import step as st
from jax_unlearn.config import (
    ConfigError,
    LoraConfig,
    TrainConfig,
    build_objective,
    build_schedule,
    build_tx,
    check,
    step_config,
)
from jax_unlearn.data import Dataset, PairedBatches
from jax_unlearn.token_math import ALT

from .checkpoints import Checkpointer, restore_newest, saved, tree_spec
from .export import export_adapter, export_model
from .folder import (
    ADAPTER_DIR,
    BEST_DIR,
    BEST_FILE,
    EXPORT_DIR,
    METRICS_FILE,
    STOPPED_FILE,
    ResumeCheck,
    ResumeError,
    check_output_dir,
    check_record_names,
    check_resume,
    length_key,
    read_json,
    total_steps,
    write_run_folder,
)
from .guard import NonFiniteGuard
from .loop import Every, StopFlag, run_steps
from .metrics import MetricsLog
from .selection import Evaluations, Selection

log = logging.getLogger("jax_unlearn.train")


@dataclasses.dataclass
class RunResult:
    """What `unlearn` did (``continued_from``: the recorded length when ``max_steps`` or
    ``epochs`` was changed to continue the run, else None). ``model`` is the exported state:
    the selected one with ``select.metric``, else the last. ``evaluation``: the results of the
    run's final evaluation when the caller made one (`jax_unlearn.run.execute`)."""

    model: nnx.Module
    steps_done: int
    total_steps: int
    interrupted: bool
    resumed_from: int | None
    export_dir: Path | None
    continued_from: int | None = None
    selected_step: int | None = None  # the exported state's step when select.metric chose it
    stopped_early: bool = False  # stop_when ended the run
    evaluation: dict | None = None


def check_run(cfg: TrainConfig, model_config: Any, forget: Dataset, retain: Dataset,
              sources: dict[str, str] | None = None) -> tuple[int, Any]:
    """The checks of a run that need its data and the model's `ModelConfig`; writes nothing.

    Returns ``(total steps, mesh)``. Raises `ConfigError` naming the key: a value out of range
    (`jax_unlearn.config.check`), a batch larger than the forget set, rows longer than the
    model's positions or token ids outside its vocabulary, warmup steps not fewer than the run's,
    a mesh the devices or the batch do not divide; `DataError` for sets that cannot be batched.
    ``sources`` (``"forget"`` / ``"retain"`` -> where the set came from, e.g. its file and
    tokenizer) is named in the errors about a set.
    """
    check(cfg)
    where = lambda name: f" ({sources[name]})" if sources and name in sources else ""
    n_forget = len(forget["input_ids"]) if "input_ids" in forget else 0
    if 0 < n_forget < cfg.batch_size:
        raise ConfigError(f"'batch_size' is {cfg.batch_size}, more than the forget set's {n_forget} rows"
                          f"{where('forget')}; use batch_size <= {n_forget} or more forget data")
    total = total_steps(cfg, PairedBatches(forget, retain, cfg.batch_size, cfg.seed).steps_per_epoch)
    alternates = build_objective(cfg.objective, model_config.hidden_size).alternates
    if alternates is not None and ALT + "input_ids" not in forget:
        raise ConfigError(f"objective {cfg.objective.name!r} needs the forget set's alternate answers (columns "
                          f"'{ALT}input_ids', '{ALT}attention_mask', '{ALT}labels': jax_unlearn.data.load_alternates"
                          f"{', from data.idk' if alternates == 'idk' else ''})")
    positions = model_config.max_position_embeddings
    sets = [("forget", forget, "input_ids"), ("retain", retain, "input_ids")]
    for name, rows, key in sets + ([("forget", forget, ALT + "input_ids")] if ALT + "input_ids" in forget else []):
        ids = np.asarray(rows[key])
        if ids.shape[1] > positions:
            raise ConfigError(f"the {name} rows hold {ids.shape[1]} tokens, more than the model's "
                              f"max_position_embeddings={positions}; use data.max_length <= {positions}")
        if ids.size and (int(ids.max()) >= model_config.vocab_size or int(ids.min()) < 0):
            raise ConfigError(f"the {name} set{where(name)} holds token id {int(ids.max())}, outside the model's "
                              f"vocab_size={model_config.vocab_size}: the tokenizer does not belong to this model "
                              "(set model.tokenizer to the model's own)")
    if total <= 0:
        raise ConfigError(f"nothing to do: max_steps={cfg.max_steps}, epochs={cfg.epochs}")
    if cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps >= total:
        raise ConfigError(f"'optim.warmup_steps' is {cfg.optim.warmup_steps}, not fewer than the run's {total} steps")
    return total, check_mesh(cfg)


def check_trainable(model_config: Any, options: Any, cfg: TrainConfig) -> None:
    """Raises `ConfigError` when a run would train no parameter: ``objective.trainable`` (RMU's
    regex) matching none (with ``lora``: no adapted module), or a subset of layers asked of a
    ``scan_layers`` model. The model is built abstractly (``nnx.eval_shape``): nothing is allocated."""
    if cfg.objective.trainable is None and cfg.objective.name != "rmu":
        return
    from jax_unlearn.models import CausalLM

    abstract = nnx.eval_shape(lambda: with_adapters(CausalLM(model_config, options, rngs=nnx.Rngs(0)), cfg.lora)[0])
    try:
        st.split_model(abstract, build_objective(cfg.objective, model_config.hidden_size),
                       None if cfg.lora.rank is None else nnx.LoRAParam)
    except ValueError as err:
        raise ConfigError(f"'objective.trainable': {err}") from None


def check_mesh(cfg: TrainConfig) -> Any:
    """The run's mesh over this machine's devices; raises `ConfigError` when the devices or the
    batch do not divide it (every device holds rows of every micro-batch)."""
    try:
        mesh = sh.make_mesh(cfg.mesh)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the mesh's data x fsdp = {shards} "
                          "batch shards (set mesh.data / mesh.fsdp / mesh.tensor)")
    if cfg.batch_size % (shards * cfg.micro_batches):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by micro_batches={cfg.micro_batches} x "
                          f"the mesh's data x fsdp = {shards} batch shards, so that each micro-batch splits "
                          "evenly over the devices")
    return mesh


def with_adapters(model: nnx.Module, lora: LoraConfig, mesh: Any = None) -> tuple[nnx.Module, Any]:
    """``(model, train filter)`` of a run: with ``lora.rank`` the model with fresh adapters
    (sharing the base weights, placed on ``mesh``; in train mode when it has dropout) and
    ``nnx.LoRAParam``, else ``(model, None)`` (every parameter, or the objective's subset, trains)."""
    if lora.rank is None:
        return model, None
    from jax_unlearn.models import add_lora

    targets = "all-linear" if list(lora.targets) == ["all-linear"] else tuple(lora.targets)
    adapted = add_lora(model, lora.rank, lora.alpha, targets, lora.dropout, lora.seed, shardings=mesh)
    if lora.dropout:
        adapted.train()
    return adapted, nnx.LoRAParam


def inference(model: nnx.Module) -> nnx.Module:
    """``model`` in eval mode (no dropout) for evaluation and export."""
    model.eval()
    return model


@dataclasses.dataclass
class Run:
    """A run's built parts: its optax chain and schedule, data, the split model and sharded
    state, and the jitted two-gradient step."""

    cfg: TrainConfig
    mesh: Any
    schedule: Any
    data: PairedBatches
    defs: st.ModelDef
    state: st.TrainState
    shardings: st.TrainState
    step: Callable
    batch_sharding: Any

    def batches(self, t: int, log: MetricsLog | None = None):
        """Step ``t``'s forget and retain batches as global arrays (their tokens counted into ``log``)."""
        fb, rb = self.data(t)
        if log is not None and "attention_mask" in fb:
            log.count(int(fb["attention_mask"].sum() + rb["attention_mask"].sum()))
        return st.global_batch(fb, self.batch_sharding), st.global_batch(rb, self.batch_sharding)

    def model_of(self, state: st.TrainState) -> nnx.Module:
        """The state's model in eval mode, sharing the state's buffers (valid until the next step)."""
        return inference(st.merge_model(self.defs, state, copy=False))


def build_run(model: nnx.Module, forget: Dataset, retain: Dataset, cfg: TrainConfig, total: int, mesh: Any,
              donate_model: bool = False) -> Run:
    """The run's parts (see `Run`): the chain over ``total`` steps, NPO's precomputed reference
    log-probs when asked for, LoRA adapters, and the state and optimizer state made sharded,
    under jit, so no device holds the whole model. ``model`` stays usable (the state gets copies
    of its weights), unless ``donate_model``: then its buffers become the state's (each weight is
    held once; ``model`` must not be used afterwards)."""
    tx = build_tx(cfg, total)
    objective = build_objective(cfg.objective, model.config.hidden_size)
    batch_sharding = sh.batch_sharding(mesh)
    if cfg.objective.reference == "precompute":  # NPO's reference log-probs, once, from the start model
        forget = st.add_reference_logprobs(model, forget, batch_size=cfg.batch_size,
                                           logit_chunk=cfg.objective.logit_chunk, sharding=batch_sharding)
    trained_model, train_filter = with_adapters(model, cfg.lora, mesh)
    defs, state = st.init_state(trained_model, tx, objective, copy=not donate_model, train=train_filter,
                                shardings=functools.partial(sh.train_state_shardings, mesh=mesh, tx=tx))
    shardings = sh.train_state_shardings(state, mesh, tx)
    step = st.make_two_grad_step(defs, objective, tx, step_config(cfg, model.options), shardings,
                                 batch_sharding)
    return Run(cfg, mesh, build_schedule(cfg.optim, total), PairedBatches(forget, retain, cfg.batch_size, cfg.seed),
               defs, state, shardings, step, batch_sharding)


def resume(run: Run, out: Path) -> tuple[st.TrainState, int | None]:
    """The state of the newest readable checkpoint in ``out`` (an unreadable one moved aside),
    or the fresh state; and the step it resumed from (None: a fresh start)."""
    restored, meta = restore_newest(out / "checkpoints", saved(run.state), saved(run.shardings), move_aside=True)
    if restored is None:
        return run.state, None
    state = run.state._replace(**restored)
    step = int(state.step)
    if tuple(meta["position"]) != run.data.position(step):
        raise ResumeError(f"checkpoint {step} was written with another data layout (position {meta['position']} "
                          f"vs {list(run.data.position(step))}); batch_size or the data changed: use a new output_dir")
    log.info("resumed from step %d", step)
    return state, step


def _run_length(out: Path, found: ResumeCheck, cfg: TrainConfig, start: int, total: int) -> tuple[int, int | None]:
    """``(steps of the run, the recorded length it continues from or None)``: a run that
    ``stop_when`` already ended at ``start`` stays ended."""
    stopped = read_json(out / STOPPED_FILE)
    if stopped is not None and stopped.get("step") == start:
        total = start
    if found.recorded_total is None or found.recorded_total == total:
        return total, None
    rebuilt = cfg.optim.schedule != "constant" or (cfg.optim.warmup_steps is None and cfg.optim.warmup_ratio > 0)
    log.warning("%s changed: the run was %d steps, now %d; continuing from step %d%s", length_key(cfg),
                found.recorded_total, total, start, "; the learning-rate schedule is rebuilt over the new length "
                "(steps already taken keep their rates)" if rebuilt else "")
    return total, found.recorded_total


def _check_evaluation(cfg: TrainConfig, evaluate: Callable | None, eval_every: int | None) -> None:
    if (cfg.select.metric or cfg.stop_when.metric) and (evaluate is None or not eval_every):
        raise ConfigError("'select.metric' and 'stop_when.metric' need evaluations during the run: set "
                          "'eval.every' and the files to evaluate")
    if eval_every is not None and (not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every <= 0):
        raise ConfigError(f"'eval.every' is {eval_every!r}; expected an integer > 0 or null")


def _train(run: Run, state: st.TrainState, start: int, total: int, out: Path, evaluations: tuple | None):
    """Steps ``start .. total-1`` with the hooks (metrics, checkpoints, evaluations, signals);
    returns ``(state, steps done, interrupted, the Evaluations or None)``. Raises `NonFiniteError`."""
    cfg, is_main = run.cfg, jax.process_index() == 0
    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and is_main), desc="unlearn", unit="step")
    guard = NonFiniteGuard(cfg, run.mesh)
    metrics = MetricsLog(out / METRICS_FILE if is_main else None, run.schedule, bool(cfg.optim.skip_nonfinite), bar)
    ckpt = Checkpointer(out, cfg.keep, run.data.position, total, tree_spec(saved(state)), guard, before=metrics.flush)
    hooks = [Every(cfg.log_every, lambda done, s, m: metrics.log(done, s, m) or guard.failed(lagged=True)),
             Every(cfg.save_every, ckpt.save)]
    evals = None
    if evaluations is not None:
        evaluate, every, first = evaluations
        evals = Evaluations(Selection(cfg, read_json(out / BEST_FILE)), evaluate, run.model_of, out, metrics, ckpt,
                            tree_spec(saved(state)), bar)
        if first is not None:
            evals(0, state, results=first)  # the starting model's row
        hooks.append(Every(every, evals))
    with StopFlag() as stop:
        def on_signal(done: int, s: st.TrainState, m: dict) -> bool:
            if stop.signal is None:
                return False
            if done % cfg.log_every and done != total:  # this step's row, then its checkpoint
                metrics.log(done, s, m)
            if done % cfg.save_every and done != total:
                ckpt.save(done, s)
            return True

        hooks.append(Every(1, on_signal))
        try:
            state, done, stopped = run_steps(guard.guarded(run.step), state, lambda t: run.batches(t, metrics), start,
                                             total, hooks, bar)
            metrics.flush()
        finally:
            bar.close()
            ckpt.close()
    if guard.failed() or guard.failure:
        if evals is not None:
            evals.close()
        raise guard.error(out)
    return state, done, stopped and not (evals is not None and evals.stopped), evals


def _selected_state(run: Run, state: st.TrainState, evals: Evaluations | None, out: Path) -> tuple[Any, int | None]:
    """The state to export: the evaluated step ``select`` chose (restored from ``out/best``), else ``state``."""
    best = None if evals is None else evals.selection.best
    selected = None if best is None else best["step"]
    if selected is not None and selected != int(state.step):
        restored, _ = restore_newest(out / BEST_DIR, saved(state), saved(run.shardings), move_aside=False)
        if restored is None or int(restored["step"]) != selected:
            raise ResumeError(f"{out / BEST_DIR} does not hold the selected step {selected} ({out / BEST_FILE}); "
                              "the best state cannot be exported")
        state = state._replace(**restored)
    if evals is not None:
        evals.close()
    return state, selected


def unlearn(model: nnx.Module, forget: Dataset, retain: Dataset, cfg: TrainConfig, tokenizer: Any = None, *,
            identity: dict | None = None, record: dict[str, str] | None = None,
            evaluate: Callable[[nnx.Module], dict[str, float]] | None = None,
            eval_every: int | None = None, base_model: str | None = None, donate_model: bool = False) -> RunResult:
    """Unlearns ``forget`` while keeping ``retain``; resumes the same run from ``cfg.output_dir``.

    Args:
      model: the starting model (a `jax_unlearn.models.CausalLM`); it stays usable: the run's
        state holds copies of its weights, unless ``donate_model``, where the state takes over its
        buffers (each weight is held once during the run) and ``model`` must not be used
        afterwards (`jax_unlearn.run.execute` donates the model it loaded).
      forget, retain: token arrays ``input_ids``, ``attention_mask``, ``labels``, each ``[N, seq]``.
      cfg: the run (`jax_unlearn.config.TrainConfig`).
      tokenizer: saved beside the exported model when given.
      identity: more fingerprint keys (`jax_unlearn.fingerprint.run_fingerprint`'s ``extra``).
      record: files to write into ``output_dir`` once everything is validated (name -> text,
        each written atomically), e.g. ``{"config.yaml": ...}``.
      evaluate, eval_every: ``evaluate(model) -> {metric: value}`` at step 0 and every
        ``eval_every`` steps (e.g. `jax_unlearn.eval.suite.EvalSuite` flattened); its rows go
        into ``metrics.jsonl``, ``cfg.select`` exports the best evaluated step and
        ``cfg.stop_when`` ends the run early, as finished.
      base_model: the starting model's name or folder, recorded in the PEFT adapter a LoRA run
        exports beside the merged model (``output_dir/adapter``).

    Returns:
      A `RunResult` with the unlearned model.

    Raises:
      ConfigError: a key out of range, data that do not fit the batch size or the model, a mesh
        the batch does not divide, an output folder that cannot be written (nothing written).
      ResumeError: ``output_dir`` holds another run or more steps than asked for (nothing written).
      NonFiniteError: a step was not finite; the newest checkpoint is the last finite state.
    """
    out = Path(cfg.output_dir)
    check_record_names(record)
    total, mesh = check_run(cfg, model.config, forget, retain)
    check_trainable(model.config, getattr(model, "options", None), cfg)
    _check_evaluation(cfg, evaluate, eval_every)
    check_output_dir(out)
    fingerprint = fpr.run_fingerprint(cfg, model.config, getattr(model, "options", None), forget, retain,
                                      weights=fpr.params_checksum(model), extra=identity)
    found = check_resume(out, fingerprint, total, length_key(cfg))
    run = build_run(model, forget, retain, cfg, total, mesh, donate_model)
    state, resumed_from = resume(run, out)
    start = int(state.step)
    total, continued_from = _run_length(out, found, cfg, start, total)
    evaluations = None
    if evaluate is not None and eval_every:
        first = None
        if start == 0 and start < total:  # the starting model's row; metric names checked before writing
            first = evaluate(run.model_of(state))  # the fresh state is the starting model (adapters: B = 0)
            Selection(cfg).check(first)
        evaluations = (evaluate, eval_every, first)

    write_run_folder(out, record, fingerprint, total, start)  # everything is validated: from here on the run writes
    state, done, interrupted, evals = _train(run, state, start, total, out, evaluations)
    stopped_early = bool(evals is not None and evals.stopped)
    total = done if stopped_early else total
    state, selected = _selected_state(run, state, evals, out)
    trained = run.model_of(state)  # no step follows: sharing buffers is safe
    exported = None
    if cfg.export and not interrupted:  # re-export only when this call trained further
        exported = export_model(trained, out / EXPORT_DIR, tokenizer, overwrite=start < total)
        if cfg.lora.rank is not None:
            export_adapter(trained, out / ADAPTER_DIR, base_model, overwrite=start < total)
    ended_before = read_json(out / STOPPED_FILE) is not None and total == start and not stopped_early
    return RunResult(trained, done, total, interrupted, resumed_from, exported, continued_from, selected,
                     stopped_early or ended_before)


def restore_latest(model: nnx.Module, cfg: TrainConfig, run_dir: str | Path | None = None
                   ) -> tuple[nnx.Module, int] | None:
    """The model of the newest readable checkpoint of a run folder and its step (None if none).

    ``run_dir`` defaults to ``cfg.output_dir``. ``model`` is the run's starting model:
    checkpoints hold only what training changes, and the returned model shares ``model``'s
    frozen weights (nothing is donated or copied: ``model`` stays usable and unchanged). Reads
    only: an unreadable checkpoint is skipped with a warning (the previous one is used) and
    nothing in the folder changes; one that does not fit ``model`` raises `ResumeError`.
    """
    tx = build_tx(cfg, max(cfg.max_steps or 1, 1))  # the schedule's length does not change the state's layout
    mesh = sh.make_mesh(cfg.mesh)
    model, train_filter = with_adapters(model, cfg.lora, mesh)
    objective = build_objective(cfg.objective, model.config.hidden_size)
    defs, abstract = st.abstract_state(model, tx, objective, train=train_filter)
    shardings = sh.train_state_shardings(abstract, mesh, tx)
    directory = Path(run_dir if run_dir is not None else cfg.output_dir) / "checkpoints"
    restored, _ = restore_newest(directory, saved(abstract), saved(shardings), move_aside=False)
    if restored is None:
        return None
    _, _, frozen, _ = st.split_model(model, objective, train_filter)
    frozen = st.place_on(frozen, shardings.frozen)
    return inference(nnx.merge(defs.graphdef, restored["params"], frozen)), int(restored["step"])
