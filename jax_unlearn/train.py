"""The training loop: the only place with side effects (checkpoints, logs, signals).

`run_steps` is the loop itself (steps, hooks every N steps, a progress bar); `unlearn` (the
``jax-unlearn unlearn`` run) and the embedded benchmark's pretraining and trajectories drive
their steps through it.

`unlearn` runs forget-anchored epochs (`jax_unlearn.data.PairedBatches`): the data of step
``t`` depends on ``t`` alone, so a resumed run sees exactly the batches an uninterrupted run
would. A run directory ``OUT`` holds:

- ``fingerprint.json``: what defines the run (`jax_unlearn.fingerprint`) and its length;
- ``checkpoints/<step>``: Orbax checkpoints of the trainable parameters, the optimizer state,
  the step and the data position;
- ``metrics.jsonl``: one line per logged step; ``model/``: the exported model (`save_hf`);
- whatever the caller records beside them (``jax-unlearn unlearn`` writes ``config.yaml``).

Validate, then write: `unlearn` checks the config's ranges, the data against the batch size
and the model, the mesh, the output folder and the fingerprint recorded in ``OUT`` (a rerun
resumes only the same run: `check_resume`) before it writes anything. Raising ``max_steps``
(or ``epochs``) continues a run; lowering it below the steps taken is refused.

Checkpoints: the newest readable one is restored on start. One that cannot be read is moved
to ``OUT/checkpoints.unreadable/`` with a warning (nothing is deleted) and the previous one is
used; one that reads but does not fit the model or optimizer (other tree, shapes or dtypes)
is an error (`ResumeError`), not corruption, and stays where it is. Metrics of steps after the
restored checkpoint (they are recomputed) move from ``metrics.jsonl`` to
``metrics.superseded.jsonl``. SIGTERM or SIGINT finishes the current step, saves and returns.
At the end the model is exported with ``save_hf`` to ``OUT/model``.

Non-finite guard: after every step a small jitted function folds the step's losses (and the
update's norm, when the combiner's diagnostics are on) into a device-side record of the first
non-finite step, so no step waits for the host. The record is read where the loop syncs
anyway: at log steps and before every checkpoint; a checkpoint or export also checks that
every parameter is finite. A non-finite step stops the run with `NonFiniteError` (naming the
step and its losses) and nothing after it is saved or exported: the newest checkpoint is the
last finite state. With ``optim.skip_nonfinite=N`` the optimizer skips non-finite updates
(``optax.apply_if_finite``) and the run stops only after more than ``N`` in a row.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
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

log = logging.getLogger("jax_unlearn.train")

FINGERPRINT_FILE = "fingerprint.json"
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"  # metrics of steps recomputed after a resume
BEST_DIR, BEST_FILE = "best", "best.json"  # the selected state (select.metric) and what selected it
STOPPED_FILE = "stopped.json"  # where and why stop_when ended the run


class ResumeError(ConfigError):
    """The output folder holds another run (other fingerprint, more steps than asked for, or a
    checkpoint that does not fit): nothing was changed in it."""


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss, update or parameter; the run stopped before saving it.

    Attributes:
      step: the first non-finite step (1-based, as in ``metrics.jsonl``).
      values: its watched metrics (``forget_loss``, ``retain_loss``, ...), or empty when only the
        parameters were found non-finite.
    """

    def __init__(self, message: str, step: int, values: dict[str, float]):
        super().__init__(message)
        self.step, self.values = step, values


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class Every:
    """A hook of `run_steps`: ``fn(done, state, metrics)`` after every ``n`` steps and after the
    last one; it returns True to stop the loop (``metrics`` are the last step's, on device)."""

    n: int
    fn: Callable[[int, Any, dict], bool | None]


def run_steps(step_fn: Callable, state: Any, batches: Callable[[int], Sequence[Any]], start: int, total: int,
              hooks: Sequence[Every] = (), bar: Any = None) -> tuple[Any, int, bool]:
    """Runs steps ``start .. total-1``: ``state, metrics = step_fn(state, *batches(t))``.

    After step ``t`` (``done = t + 1`` steps), each hook with ``done % n == 0`` or
    ``done == total`` runs in order; if one returns True the loop stops after the remaining
    hooks of that step. ``bar`` (a tqdm) advances one per step.

    Returns:
      ``(state, steps done, stopped early)``.
    """
    done = start
    for t in range(start, total):
        state, metrics = step_fn(state, *batches(t))
        done = t + 1
        stop = False
        for hook in hooks:
            if done % hook.n == 0 or done == total:
                stop = bool(hook.fn(done, state, metrics)) or stop
        if bar is not None:
            bar.update(1)
        if stop:
            return state, done, done < total
    return state, done, False


# ----------------------------------------------------------------------------- the run folder


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of a run: ``max_steps`` when set, else ``epochs * steps_per_epoch``."""
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def length_key(cfg: TrainConfig) -> str:
    """The key that sets a run's length: ``max_steps`` when set, else ``epochs``."""
    return "max_steps" if cfg.max_steps is not None else "epochs"


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the finished checkpoints in ``run_dir/checkpoints`` (Orbax's unfinished
    ``<step>.orbax-checkpoint-tmp*`` folders excluded), ascending."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def read_record(run_dir: str | Path) -> dict | None:
    """``run_dir/fingerprint.json`` (``{"fingerprint": {...}, "total_steps": N}``), or None."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("fingerprint"), dict) or not isinstance(record.get("total_steps"), int):
            raise ValueError("expected an object with 'fingerprint' and 'total_steps'")
    except (OSError, ValueError, AttributeError) as err:
        raise ResumeError(f"{path} is damaged ({err}); it records which run {run_dir} holds: restore it from a "
                          "copy, or use another output_dir") from None
    return record


def unwritable(path: Path, what: str, folder: bool = True) -> str | None:
    """Why ``path`` (a folder, or with ``folder=False`` a file) could not be written, as a
    message starting with ``what``: something of the other kind in the way, a read-only file, a
    file on the way to it, a folder that may not be written into; None when it can. Writes nothing."""
    if path.exists() and path.is_dir() != folder:
        return f"{what} {path} exists and is not a {'folder' if folder else 'file'}"
    if path.is_file() and not os.access(path, os.W_OK):
        return f"{what} {path}: the file is not writable (permission denied)"
    probe = path if folder else path.parent  # the folder written into: the nearest existing one
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{what} {path} cannot be created: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{what} {path}: cannot write into {probe} (permission denied)"
    return None


def check_output_dir(out: str | Path) -> None:
    """Raises `ConfigError` naming ``output_dir`` when the run could not write there: a file
    in the way, or a folder it may not write into. Writes nothing."""
    out = Path(out)
    problem = unwritable(out, "'output_dir'")
    if problem:
        raise ConfigError(problem)
    for name in ("checkpoints", "model"):
        if (out / name).exists() and not (out / name).is_dir():
            raise ConfigError(f"'output_dir' {out}: {out / name} is in the way (a file where the run keeps a folder)")
    for name in (METRICS_FILE, FINGERPRINT_FILE):
        if (out / name).exists() and not ((out / name).is_file() and os.access(out / name, os.W_OK)):
            raise ConfigError(f"'output_dir' {out}: {out / name} is not a writable file")


@dataclasses.dataclass(frozen=True)
class ResumeCheck:
    """What `check_resume` found: the newest checkpoint's step (None: none) and the run's
    recorded length (None: no ``fingerprint.json``)."""

    newest_step: int | None
    recorded_total: int | None


def check_resume(run_dir: str | Path, fingerprint: dict, total: int, length_key: str = "max_steps") -> ResumeCheck:
    """Checks that ``run_dir`` is empty or holds this same run, and no more steps than ``total``.

    Reads only. Raises `ResumeError` naming the fingerprint keys that differ from the recorded
    ones (`jax_unlearn.fingerprint.differences`), or ``length_key`` when the run already took
    more steps than ``total``.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    steps = checkpoint_steps(run_dir)
    newest = steps[-1] if steps else None
    if record is not None:
        diff = fpr.differences(record["fingerprint"], fingerprint)
        if diff:
            raise ResumeError(f"{run_dir} holds another run; what defines a run differs from its {FINGERPRINT_FILE} "
                              "(recorded -> now):\n  " + "\n  ".join(diff) + "\nResuming would mix two runs and "
                              "nothing was changed: undo these changes, or use another output_dir")
    elif newest is not None:
        log.warning("%s holds checkpoints but no %s (written before runs recorded one): resuming without "
                    "checking that the config is the same", run_dir, FINGERPRINT_FILE)
    elif (run_dir / METRICS_FILE).exists() or (run_dir / "model").exists():
        raise ResumeError(f"{run_dir} holds {METRICS_FILE} or model/ of an earlier run but neither {FINGERPRINT_FILE} "
                          "nor a checkpoint to resume; nothing was changed: use another output_dir")
    if newest is not None and newest > total:
        raise ResumeError(f"'{length_key}' gives {total} steps, but {run_dir} already holds a checkpoint of step "
                          f"{newest}; nothing was changed: raise {length_key} to continue the run (at least {newest} "
                          "steps), or use another output_dir for a shorter run")
    return ResumeCheck(newest, None if record is None else record["total_steps"])


def _read_json(path: Path) -> dict | None:
    """A small JSON record of the run folder, or None when absent."""
    return json.loads(path.read_text()) if path.is_file() else None


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary sibling, then renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- checkpoints


class _StopFlag:
    """SIGTERM/SIGINT handler: ask the loop to stop after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signum
        log.warning("received %s: finishing the current step, then saving", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )


def _reader(directory: Path) -> ocp.CheckpointManager:
    """A manager that only reads (creates, cleans and deletes nothing)."""
    absl = logging.getLogger("absl")  # Orbax warns that a read-only manager is read-only
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False),
        )
    finally:
        absl.setLevel(level)


def _saved(state: st.TrainState) -> dict:
    """What a checkpoint holds: only what training changes (frozen parts come from the model)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _tree_spec(tree: Any) -> dict[str, list]:
    """``name -> [shape, dtype]`` of every array of a checkpoint's tree (recorded in its ``meta``,
    so a restore can tell a checkpoint of another configuration from a corrupt one)."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): [list(x.shape), jnp.dtype(x.dtype).name]
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mismatch(expected: dict, found: dict) -> list[str]:
    """Where a checkpoint's recorded `_tree_spec` (``found``) differs from this run's (``expected``)."""
    out = [f"{k}: not in the checkpoint" for k in expected if k not in found]
    out += [f"{k}: in the checkpoint, not in this run" for k in found if k not in expected]
    for k, (shape, dtype) in expected.items():
        if k in found and [list(found[k][0]), found[k][1]] != [shape, dtype]:
            out.append(f"{k}: {tuple(found[k][0])} {found[k][1]} in the checkpoint, {tuple(shape)} {dtype} in this run")
    return out


def _recorded_tree(reader: ocp.CheckpointManager, directory: Path, step: int) -> dict[str, list]:
    """The `_tree_spec` a checkpoint was saved with: from its ``meta``, or (checkpoints written
    before ``meta`` recorded it) from Orbax's array metadata. Raises when neither can be read."""
    meta = reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if isinstance(meta, dict) and isinstance(meta.get("tree"), dict):
        return meta["tree"]
    handler = ocp.StandardCheckpointHandler()
    try:
        arrays = handler.metadata((directory / str(step)).absolute() / "state")
    finally:
        handler.close()
    flat = ocp.tree.to_flat_dict(getattr(arrays, "tree", arrays))
    return {".".join(map(str, k)): [list(v.shape), jnp.dtype(v.dtype).name] for k, v in flat.items()
            if getattr(v, "shape", None) is not None}


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:200]}"


def _restore_latest(directory: Path, target: dict, shardings: dict | None, move_aside: bool):
    """Restores the newest readable checkpoint of ``directory``: ``(tree, meta)`` or ``(None, None)``.

    A checkpoint whose metadata or data cannot be read is corrupt: with ``move_aside`` it is moved
    to ``<directory>.unreadable/<step>.<time>`` (never deleted), else skipped and left as it is;
    then the previous one is tried. A readable checkpoint that does not fit ``target`` raises
    `ResumeError` and nothing is moved.
    """
    if not directory.is_dir():
        return None, None
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target,
        shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, target),
    )
    expected = _tree_spec(abstract)
    skipped: set[int] = set()
    while True:
        reader = _reader(directory)
        steps = sorted((s for s in reader.all_steps() if s not in skipped), reverse=True)
        if not steps:
            reader.close()
            return None, None
        step = steps[0]
        try:
            diff = _mismatch(expected, _recorded_tree(reader, directory, step))
        except Exception as err:  # noqa: BLE001 - a meta file that cannot be read means "unreadable"
            problem = _describe(err)  # not the exception: its frames would keep Orbax's pending reads alive
        else:
            if diff:
                reader.close()
                raise ResumeError(
                    f"checkpoint {directory / str(step)} is readable but does not fit this run's model and optimizer "
                    f"(it was written by another configuration; nothing was moved): " + "; ".join(diff[:4])
                    + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "") + "; use another output_dir")
            try:
                restored = reader.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                reader.close()
                return restored.state, restored.meta
            except Exception as err:  # noqa: BLE001 - data that cannot be read means "unreadable"
                problem = _describe(err)
        reader.close()
        if not move_aside:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one (nothing is moved)",
                        directory / str(step), problem)
            skipped.add(step)
            continue
        aside = directory.parent / f"{directory.name}.unreadable" / f"{step}.{int(time.time())}"
        log.warning("checkpoint %s is unreadable (%s); moving it to %s and trying the previous one",
                    directory / str(step), problem, aside)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(directory / str(step)), str(aside))
        if jax.process_count() > 1:  # every host sees the move before listing again
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jax_unlearn: checkpoint {step} moved aside")


# ----------------------------------------------------------------------------- non-finite guard


def _watched(cfg: TrainConfig) -> tuple[str, ...]:
    """Metrics whose non-finite value stops the run: both losses, and the update's (or the
    naive mode's gradient's) norm when the step computes it."""
    if cfg.mode == "naive":
        return ("forget_loss", "retain_loss", "grad_norm")
    return ("forget_loss", "retain_loss") + (("update_norm",) if cfg.combiner.diagnostics else ())


def _watch_fn(skip: int):
    """``watch(record, step, values, skipped_in_a_row) -> record``: the first non-finite step and
    its values, ``(int32 step or 0, float32 [k])``, kept on the device."""

    @jax.jit
    def watch(record, step, values, in_a_row):
        first, kept = record
        values = jnp.stack([jnp.asarray(v, jnp.float32) for v in values])
        bad = in_a_row > skip if skip else ~jnp.all(jnp.isfinite(values))
        fresh = (first == 0) & bad
        return jnp.where(fresh, step, first), jnp.where(fresh, values, kept)

    return watch


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def _nonfinite_message(failure: dict, cfg: TrainConfig, run_dir: Path) -> str:
    step, values = failure["step"], failure["values"]
    shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    if not values:
        what = f"after step {step} the parameters are not finite (the watched losses were)"
    elif cfg.optim.skip_nonfinite:
        what = (f"step {step}: more than optim.skip_nonfinite={cfg.optim.skip_nonfinite} non-finite updates in a "
                f"row ({shown})")
    else:
        what = f"step {step}: non-finite loss or update ({shown})"
    steps = checkpoint_steps(run_dir)
    kept = (f"the newest checkpoint, step {steps[-1]} in {run_dir / 'checkpoints'}, is the last finite state"
            if steps else "no checkpoint was written")
    hint = ("lower optim.lr" if cfg.optim.skip_nonfinite else
            "lower optim.lr or set optim.skip_nonfinite=N to skip up to N non-finite updates in a row")
    return (f"{what}; the run stopped without saving or exporting anything after it ({kept}); {hint} "
            f"(optim.lr={cfg.optim.lr:g}) and start a new output_dir")


# ----------------------------------------------------------------------------- the loop


ADAPTER_DIR = "adapter"  # the PEFT adapter of a LoRA run, beside the merged model


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


def _inference(model: nnx.Module) -> nnx.Module:
    """``model`` in eval mode (no dropout) for evaluation and export."""
    model.eval()
    return model


class Selection:
    """Evaluations during a run: `select` keeps the best evaluated step, `stop_when` ends the run.

    ``evaluate(model) -> {metric: value}`` runs every ``every`` steps; each result is one
    ``metrics.jsonl`` row ``{"step", "eval/<metric>": value, ...}``. A step whose ``select.metric``
    beats every earlier evaluated step (strictly: ties keep the earlier) is the selected one.
    """

    def __init__(self, cfg: TrainConfig, evaluate: Callable[[Any], dict[str, float]], every: int,
                 recorded: dict | None):
        self.cfg, self.evaluate, self.every = cfg, evaluate, every
        sel = cfg.select
        same = recorded and recorded.get("metric") == sel.metric and recorded.get("mode") == sel.mode
        self.best: dict | None = recorded if same else None

    def _metric(self, results: dict, name: str, key: str) -> float:
        if name not in results:
            raise ConfigError(f"'{key}' is {name!r}, which the evaluation does not produce; it gives "
                              f"{', '.join(sorted(results)) or 'nothing'}")
        return float(results[name])

    def improves(self, results: dict) -> bool:
        sel = self.cfg.select
        if sel.metric is None:
            return False
        value = self._metric(results, sel.metric, "select.metric")
        if self.best is None:
            return True
        return value > self.best["value"] if sel.mode == "max" else value < self.best["value"]

    def stops(self, results: dict) -> bool:
        st = self.cfg.stop_when
        if st.metric is None:
            return False
        value = self._metric(results, st.metric, "stop_when.metric")
        return (st.below is not None and value <= st.below) or (st.above is not None and value >= st.above)


@dataclasses.dataclass
class RunResult:
    """What `unlearn` did (``continued_from``: the recorded length when ``max_steps`` or
    ``epochs`` was changed to continue the run, else None). ``model`` is the exported state:
    the selected one with ``select.metric``, else the last."""

    model: nnx.Module
    steps_done: int
    total_steps: int
    interrupted: bool
    resumed_from: int | None
    export_dir: Path | None
    continued_from: int | None = None
    selected_step: int | None = None  # the exported state's step when select.metric chose it
    stopped_early: bool = False  # stop_when ended the run


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
    data = PairedBatches(forget, retain, cfg.batch_size, cfg.seed)
    total = total_steps(cfg, data.steps_per_epoch)
    positions = model_config.max_position_embeddings
    for name, rows in (("forget", forget), ("retain", retain)):
        ids = np.asarray(rows["input_ids"])
        if ids.shape[1] > positions:
            raise ConfigError(f"the {name} rows hold {ids.shape[1]} tokens, more than the model's "
                              f"max_position_embeddings={positions}; use data.max_length <= {positions}")
        if ids.size and (int(ids.max()) >= model_config.vocab_size or int(ids.min()) < 0):
            raise ConfigError(f"the {name} set{where(name)} holds token id {int(ids.max())}, outside the model's vocab_size="
                              f"{model_config.vocab_size}: the tokenizer does not belong to this model "
                              "(set model.tokenizer to the model's own)")
    if total <= 0:
        raise ConfigError(f"nothing to do: max_steps={cfg.max_steps}, epochs={cfg.epochs}")
    if cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps >= total:
        raise ConfigError(f"'optim.warmup_steps' is {cfg.optim.warmup_steps}, not fewer than the run's {total} steps")
    try:
        mesh = sh.make_mesh(cfg.mesh)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the mesh's data x fsdp = {shards} "
                          "batch shards (set mesh.data / mesh.fsdp / mesh.tensor)")
    if cfg.batch_size % (shards * cfg.micro_batches):  # every device holds rows of every micro-batch
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by micro_batches={cfg.micro_batches} x "
                          f"the mesh's data x fsdp = {shards} batch shards, so that each micro-batch splits "
                          "evenly over the devices")
    return total, mesh


def unlearn(model: nnx.Module, forget: Dataset, retain: Dataset, cfg: TrainConfig, tokenizer: Any = None, *,
            identity: dict | None = None, record: dict[str, str] | None = None,
            evaluate: Callable[[nnx.Module], dict[str, float]] | None = None,
            eval_every: int | None = None, base_model: str | None = None) -> RunResult:
    """Unlearns ``forget`` while keeping ``retain``; resumes the same run from ``cfg.output_dir``.

    Args:
      model: the starting model (a `jax_unlearn.models.CausalLM`); it stays usable.
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
    export_dir = out / "model"
    for name in record or {}:
        if Path(name).name != name or name in (FINGERPRINT_FILE, METRICS_FILE, SUPERSEDED_FILE):
            raise ValueError(f"record file name {name!r} must be a plain file name of the caller's own")
    total, mesh = check_run(cfg, model.config, forget, retain)
    if (cfg.select.metric or cfg.stop_when.metric) and (evaluate is None or not eval_every):
        raise ConfigError("'select.metric' and 'stop_when.metric' need evaluations during the run: set "
                          "'eval.every' and the files to evaluate")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every <= 0):
        raise ConfigError(f"'eval.every' is {eval_every!r}; expected an integer > 0 or null")
    check_output_dir(out)
    fingerprint = fpr.run_fingerprint(cfg, model.config, getattr(model, "options", None), forget, retain,
                                      weights=fpr.params_checksum(model), extra=identity)
    found = check_resume(out, fingerprint, total, length_key(cfg))

    schedule = build_schedule(cfg.optim, total)
    tx = build_tx(cfg, total)
    objective = build_objective(cfg.objective, model.config.hidden_size)
    batch_sharding = sh.batch_sharding(mesh)
    if cfg.objective.reference == "precompute":  # NPO's reference log-probs, once, from the start model
        forget = st.add_reference_logprobs(model, forget, batch_size=cfg.batch_size,
                                           logit_chunk=cfg.objective.logit_chunk, sharding=batch_sharding)
    data = PairedBatches(forget, retain, cfg.batch_size, cfg.seed)
    trained_model, train_filter = with_adapters(model, cfg.lora, mesh)
    # the copies and the optimizer state are made sharded, under jit: no device holds the whole model
    defs, state = st.init_state(trained_model, tx, objective, train=train_filter,
                                shardings=functools.partial(sh.train_state_shardings, mesh=mesh, tx=tx))
    shardings = sh.train_state_shardings(state, mesh, tx)
    step_fn = st.make_two_grad_step(defs, objective, tx, step_config(cfg), shardings, batch_sharding)

    restored, meta = _restore_latest(out / "checkpoints", _saved(state), _saved(shardings), move_aside=True)
    resumed_from = None
    if restored is not None:
        state = state._replace(**restored)
        resumed_from = int(state.step)
        if tuple(meta["position"]) != data.position(resumed_from):
            raise ResumeError(f"checkpoint {resumed_from} was written with another data layout "
                              f"(position {meta['position']} vs {list(data.position(resumed_from))}); "
                              "batch_size or the data changed: use a new output_dir")
        log.info("resumed from step %d", resumed_from)
    start = int(state.step)
    stopped_record = _read_json(out / STOPPED_FILE)
    if stopped_record is not None and stopped_record.get("step") == start:  # stop_when already ended this run
        total = start
    continued_from = None
    if found.recorded_total is not None and found.recorded_total != total:
        continued_from = found.recorded_total
        rebuilt = cfg.optim.schedule != "constant" or (cfg.optim.warmup_steps is None and cfg.optim.warmup_ratio > 0)
        log.warning("%s changed: the run was %d steps, now %d; continuing from step %d%s", length_key(cfg),
                    found.recorded_total, total, start,
                    "; the learning-rate schedule is rebuilt over the new length (steps already taken keep "
                    "their rates)" if rebuilt else "")

    first_eval = None
    if evaluate is not None and eval_every and start == 0 and start < total:
        first_eval = evaluate(model)  # the starting model: its row, and the metric names checked before writing
        probe = Selection(cfg, evaluate, eval_every, None)
        probe.improves(first_eval)
        probe.stops(first_eval)

    # ---- everything is validated: from here on the run writes
    metrics_path = out / METRICS_FILE
    is_main = jax.process_index() == 0
    if jax.process_count() > 1:  # every host has read the run folder before process 0 writes into it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jax_unlearn: run folder checked")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (record or {}).items():
            _write_atomic(out / name, text)
        _write_atomic(out / FINGERPRINT_FILE, json.dumps({"fingerprint": fingerprint, "total_steps": total},
                                                         indent=1, sort_keys=True) + "\n")
        _rewind_log(metrics_path, start)
        (out / "checkpoints").mkdir(exist_ok=True)
    if jax.process_count() > 1:  # every host sees the written folder before going on
        multihost_utils.sync_global_devices("jax_unlearn: run folder written")
    mngr = _manager(out / "checkpoints", cfg.keep)
    selection = None if evaluate is None or not eval_every else Selection(
        cfg, evaluate, eval_every, _read_json(out / BEST_FILE))
    best_mngr = _manager(out / BEST_DIR, 1) if cfg.select.metric and selection is not None else None
    stopped_early: dict = {}

    tokens = {"n": 0, "since": time.perf_counter()}

    def batches(t: int):
        fb, rb = data(t)
        tokens["n"] += int(fb["attention_mask"].sum() + rb["attention_mask"].sum()) if "attention_mask" in fb else 0
        return st.global_batch(fb, batch_sharding), st.global_batch(rb, batch_sharding)

    # ---- the non-finite guard: a device-side record of the first non-finite step
    watched, skip = _watched(cfg), cfg.optim.skip_nonfinite
    watch = _watch_fn(skip)
    replicated = sh.replicated(mesh)
    guard = {"record": jax.device_put((jnp.zeros((), jnp.int32), jnp.zeros((len(watched),), jnp.float32)), replicated),
             "zero": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
    failure: dict = {}

    def guarded_step(state, fb, rb):
        state, metrics = step_fn(state, fb, rb)
        in_a_row = optax.tree_utils.tree_get(state.opt_state, "notfinite_count") if skip else guard["zero"]
        guard["record"] = watch(guard["record"], state.step, [metrics[k] for k in watched], in_a_row)
        return state, metrics

    def stopped() -> bool:
        """Reads the record (a sync); True once a non-finite step was seen."""
        if not failure:
            first, values = jax.device_get(guard["record"])
            if int(first):
                failure.update(step=int(first), values={k: float(v) for k, v in zip(watched, values)})
        return bool(failure)

    def finite_state(done: int, state) -> bool:
        if stopped():
            return False
        if not bool(_all_finite(state.params)):
            failure.update(step=done, values={})
            return False
        return True

    def log_metrics(done: int, state, metrics) -> bool:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        lr = schedule(done - 1) if callable(schedule) else schedule
        metrics.update(step=done, lr=float(lr), tokens_per_s=tokens["n"] / max(now - tokens["since"], 1e-9))
        if skip:
            metrics["skipped_updates"] = int(optax.tree_utils.tree_get(state.opt_state, "total_notfinite"))
        tokens.update(n=0, since=now)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(forget=f"{metrics['forget_loss']:.3f}", retain=f"{metrics['retain_loss']:.3f}")
        return stopped()

    spec = _tree_spec(_saved(state))

    def save(done: int, state, metrics=None) -> bool:
        if not finite_state(done, state):  # a non-finite state is never checkpointed
            return True
        meta = {"position": list(data.position(done)), "total_steps": total, "tree": spec}
        mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(_saved(state)),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
        return False

    def evaluation(done: int, state, metrics=None, results: dict | None = None) -> bool:
        """Evaluates the state; keeps it when it is the best so far; True when stop_when is met."""
        if failure or not finite_state(done, state):
            return True
        if results is None:
            results = selection.evaluate(_inference(st.merge_model(defs, state, copy=False)))
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": done, **{f"eval/{k}": float(v) for k, v in results.items()}}) + "\n")
        if done > 0 and selection.improves(results):
            selection.best = {"metric": cfg.select.metric, "mode": cfg.select.mode, "step": done,
                              "value": float(results[cfg.select.metric])}
            best_mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(_saved(state)),
                                                          meta=ocp.args.JsonSave({"tree": spec})), force=True)
            best_mngr.wait_until_finished()
            if is_main:
                _write_atomic(out / BEST_FILE, json.dumps(selection.best, indent=1) + "\n")
        if selection.best is not None:
            bar.set_postfix_str(f"best {cfg.select.metric}={selection.best['value']:.4g} @ {selection.best['step']}")
        if done > 0 and selection.stops(results):
            stopped_early.update(step=done, metric=cfg.stop_when.metric, value=float(results[cfg.stop_when.metric]))
            if done % cfg.save_every and done != total:  # (the save hook ran before this one otherwise)
                save(done, state)
            if is_main:
                _write_atomic(out / STOPPED_FILE, json.dumps(stopped_early, indent=1) + "\n")
            return True
        return False

    if first_eval is not None:
        evaluation(0, state, results=first_eval)  # the starting model's row
    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and is_main), desc="unlearn", unit="step")
    with _StopFlag() as stop:
        def on_signal(done: int, state, metrics) -> bool:
            if stop.signal is None:
                return False
            if done % cfg.log_every and done != total:
                log_metrics(done, state, metrics)
            if done % cfg.save_every and done != total:
                save(done, state)
            return True

        hooks = [Every(cfg.log_every, log_metrics), Every(cfg.save_every, save)]
        if selection is not None:
            hooks.append(Every(eval_every, evaluation))
        hooks.append(Every(1, on_signal))
        state, done, stopped = run_steps(guarded_step, state, batches, start, total, hooks, bar)
    bar.close()
    mngr.close()
    if failure:
        raise NonFiniteError(_nonfinite_message(failure, cfg, out), failure["step"], failure["values"])
    interrupted = stopped and not stopped_early
    if stopped_early:
        total = done

    selected = None if selection is None or selection.best is None else selection.best["step"]
    if selected is not None and selected != int(state.step):  # export the selected state, not the last
        restored, _ = _restore_latest(out / BEST_DIR, _saved(state), _saved(shardings), move_aside=False)
        if restored is None or int(restored["step"]) != selected:
            raise ResumeError(f"{out / BEST_DIR} does not hold the selected step {selected} ({out / BEST_FILE}); "
                              "the best state cannot be exported")
        state = state._replace(**restored)
    if best_mngr is not None:
        best_mngr.close()
    trained = _inference(st.merge_model(defs, state, copy=False))  # no step follows: sharing buffers is safe
    exported = None
    if cfg.export and not interrupted:  # re-export only when this call trained further
        exported = export_model(trained, export_dir, tokenizer, overwrite=start < total)
        if cfg.lora.rank is not None:
            export_adapter(trained, out / ADAPTER_DIR, base_model, overwrite=start < total)
    return RunResult(trained, done, total, interrupted, resumed_from, exported, continued_from, selected,
                     bool(stopped_early) or stopped_record is not None and total == start)


def restore_latest(model: nnx.Module, cfg: TrainConfig, run_dir: str | Path | None = None
                   ) -> tuple[nnx.Module, int] | None:
    """The model of the newest readable checkpoint of a run folder and its step (None if none).

    ``run_dir`` defaults to ``cfg.output_dir``. ``model`` is the run's starting model:
    checkpoints hold only what training changes. Reads only: an unreadable checkpoint is
    skipped with a warning (the previous one is used) and nothing in the folder changes; one
    that does not fit ``model`` raises `ResumeError`.
    """
    # The schedule's length does not change the optimizer state's layout.
    tx = build_tx(cfg, max(cfg.max_steps or 1, 1))
    mesh = sh.make_mesh(cfg.mesh)
    model, train_filter = with_adapters(model, cfg.lora, mesh)
    defs, state = st.init_state(model, tx, build_objective(cfg.objective, model.config.hidden_size), copy=False,
                                train=train_filter,
                                shardings=functools.partial(sh.train_state_shardings, mesh=mesh, tx=tx))
    shardings = sh.train_state_shardings(state, mesh, tx)
    directory = Path(run_dir if run_dir is not None else cfg.output_dir) / "checkpoints"
    restored, _ = _restore_latest(directory, _saved(state), _saved(shardings), move_aside=False)
    if restored is None:
        return None
    state = state._replace(**restored)
    return _inference(st.merge_model(defs, state, copy=False)), int(state.step)


def _rewind_log(path: Path, step: int) -> None:
    """Keeps the metrics of steps ``<= step`` in ``path``; later ones (recomputed after a resume)
    and unreadable lines (a write cut short) move to `SUPERSEDED_FILE` beside it, nothing is lost."""
    if not path.exists():
        return
    kept, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            later = json.loads(line)["step"] > step
        except (ValueError, KeyError, TypeError):
            later = True
        (moved if later else kept).append(line)
    if not moved:
        return
    with open(path.with_name(SUPERSEDED_FILE), "a") as f:
        f.write("".join(line + "\n" for line in moved))
    _write_atomic(path, "".join(line + "\n" for line in kept))


def _gathered_on_process_0(model: nnx.Module, what: Any = ...) -> nnx.Module | None:
    """``model`` with the variables ``what`` selects (an NNX filter; default all) gathered onto
    every process (multi-process runs), on process 0; else None."""
    if jax.process_count() > 1:
        graphdef, part, rest = nnx.split(model, what, ...)
        part = jax.jit(lambda s: s, out_shardings=sh.replicated(sh.make_mesh(sh.MeshConfig(fsdp=-1))))(part)
        model = nnx.merge(graphdef, part, rest)
    return model if jax.process_index() == 0 else None


def export_adapter(model: nnx.Module, path: Path, base_model: str | None, overwrite: bool) -> Path | None:
    """A LoRA model's adapters as a PEFT folder (`jax_unlearn.models.save_peft`) on process 0;
    an existing one is replaced only with ``overwrite``."""
    from jax_unlearn.models import save_peft

    model = _gathered_on_process_0(model, nnx.LoRAParam)  # the adapters alone: save_peft reads nothing else
    if model is None:
        return None
    if not overwrite and path.exists() and any(path.iterdir()):
        return path
    save_peft(model, path, base_model_name_or_path=base_model, overwrite=True)
    return path


def export_model(model: nnx.Module, path: Path, tokenizer: Any, overwrite: bool) -> Path | None:
    """``save_hf`` on process 0 after gathering every parameter to it. An existing export is
    replaced (atomically, by ``save_hf``) only with ``overwrite``."""
    from jax_unlearn.models import save_hf

    model = _gathered_on_process_0(model)
    if model is None:
        return None
    if not overwrite and path.exists() and any(path.iterdir()):
        log.info("%s already holds the model of this finished run; leaving it", path)
        return path
    save_hf(model, path, tokenizer, overwrite=True)
    return path
