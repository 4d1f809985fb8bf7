"""The training loop: the only place with side effects (checkpoints, logs, signals).

`run_steps` is the loop itself (steps, hooks every N steps, a progress bar); `unlearn` (the
``jax-unlearn unlearn`` run) and the embedded benchmark's pretraining and trajectories drive
their steps through it.

`unlearn` runs forget-anchored epochs (`jax_unlearn.data.PairedBatches`): the data of step
``t`` depends on ``t`` alone, so a resumed run sees exactly the batches an uninterrupted run
would. Orbax checkpoints (``OUT/checkpoints/<step>``) hold the trainable parameters, the
optimizer state, the step and the data position; the newest readable one is restored on start.
A checkpoint that cannot be read is moved to ``OUT/checkpoints.unreadable/`` with a warning
(nothing is deleted) and the previous one is used. SIGTERM or SIGINT finishes the current
step, saves and returns. At the end the model is exported with ``save_hf`` to ``OUT/model``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from jax_unlearn import sharding as sh
from jax_unlearn import step as st
from jax_unlearn.config import TrainConfig, build_objective, build_schedule, build_tx, step_config
from jax_unlearn.data import Dataset, PairedBatches

log = logging.getLogger("jax_unlearn.train")


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


# ----------------------------------------------------------------------------- data


def _global_batch(batch: dict, sharding) -> dict:
    """Host batch -> global arrays; every process holds the full batch and supplies its shards."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


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


def _saved(state: st.TrainState) -> dict:
    """What a checkpoint holds: only what training changes (frozen parts come from the model)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _restore_latest(directory: Path, keep: int, target: dict, shardings: dict | None):
    """Restores the newest readable checkpoint; unreadable ones are moved aside, never deleted.

    Returns ``(manager, restored tree or None, meta or None)``.
    """
    mngr = _manager(directory, keep)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target,
        shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, target),
    )
    while (steps := sorted(mngr.all_steps(), reverse=True)):
        step = steps[0]
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            return mngr, restored.state, restored.meta
        except Exception as err:  # noqa: BLE001 - any failure to read means "unreadable"
            aside = directory.parent / f"{directory.name}.unreadable" / f"{step}.{int(time.time())}"
            log.warning("checkpoint %s is unreadable (%s: %s); moving it to %s and trying the previous one",
                        directory / str(step), type(err).__name__, str(err)[:200], aside)
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(directory / str(step)), str(aside))
            if jax.process_count() > 1:  # every host sees the move before listing again
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"jax_unlearn: checkpoint {step} moved aside")
            mngr.close()
            mngr = _manager(directory, keep)
    return mngr, None, None


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunResult:
    """What `unlearn` did."""

    model: nnx.Module
    steps_done: int
    total_steps: int
    interrupted: bool
    resumed_from: int | None
    export_dir: Path | None


def unlearn(model: nnx.Module, forget: Dataset, retain: Dataset, cfg: TrainConfig, tokenizer: Any = None) -> RunResult:
    """Unlearns ``forget`` while keeping ``retain``; resumes from ``cfg.output_dir`` if it holds checkpoints.

    Args:
      model: the starting model (a `jax_unlearn.models.CausalLM`); it stays usable.
      forget, retain: token arrays ``input_ids``, ``attention_mask``, ``labels``, each ``[N, seq]``.
      cfg: the run (`jax_unlearn.config.TrainConfig`).
      tokenizer: saved beside the exported model when given.

    Returns:
      A `RunResult` with the unlearned model.
    """
    out = Path(cfg.output_dir)
    export_dir = out / "model"
    data = PairedBatches(forget, retain, cfg.batch_size, cfg.seed)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * data.steps_per_epoch
    if total <= 0:
        raise ValueError(f"nothing to do: max_steps={cfg.max_steps}, epochs={cfg.epochs}")
    if cfg.batch_size % cfg.micro_batches:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by micro_batches={cfg.micro_batches}")
    schedule = build_schedule(cfg.optim, total)
    tx = build_tx(cfg, total)
    objective = build_objective(cfg.objective, model.config.hidden_size)
    defs, state = st.init_state(model, tx, objective)

    mesh = sh.make_mesh(cfg.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the mesh's data x fsdp = {shards} "
                         "batch shards (set mesh.data / mesh.fsdp / mesh.tensor)")
    shardings = sh.train_state_shardings(state, mesh, tx)
    state = jax.device_put(state, shardings)
    batch_sharding = sh.batch_sharding(mesh)
    step_fn = st.make_two_grad_step(defs, objective, tx, step_config(cfg), shardings, batch_sharding)

    mngr, restored, meta = _restore_latest(out / "checkpoints", cfg.keep, _saved(state), _saved(shardings))
    resumed_from = None
    if restored is not None:
        state = state._replace(**restored)
        resumed_from = int(state.step)
        if tuple(meta["position"]) != data.position(resumed_from):
            raise ValueError(f"checkpoint {resumed_from} was written with another data layout "
                             f"(position {meta['position']} vs {list(data.position(resumed_from))}); "
                             "batch_size or the data changed: use a new output_dir")
        log.info("resumed from step %d", resumed_from)
    start = int(state.step)

    metrics_path = out / "metrics.jsonl"
    is_main = jax.process_index() == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(metrics_path, start)

    tokens = {"n": 0, "since": time.perf_counter()}

    def batches(t: int):
        fb, rb = data(t)
        tokens["n"] += int(fb["attention_mask"].sum() + rb["attention_mask"].sum()) if "attention_mask" in fb else 0
        return _global_batch(fb, batch_sharding), _global_batch(rb, batch_sharding)

    def log_metrics(done: int, state, metrics) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        lr = schedule(done - 1) if callable(schedule) else schedule
        metrics.update(step=done, lr=float(lr), tokens_per_s=tokens["n"] / max(now - tokens["since"], 1e-9))
        tokens.update(n=0, since=now)
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(forget=f"{metrics['forget_loss']:.3f}", retain=f"{metrics['retain_loss']:.3f}")

    def save(done: int, state, metrics=None) -> None:
        meta = {"position": list(data.position(done)), "total_steps": total}
        mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(_saved(state)),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()

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

        hooks = [Every(cfg.log_every, log_metrics), Every(cfg.save_every, save), Every(1, on_signal)]
        state, done, interrupted = run_steps(step_fn, state, batches, start, total, hooks, bar)
    bar.close()
    mngr.close()

    trained = st.merge_model(defs, state, copy=False)  # no step follows: sharing the buffers is safe
    exported = None
    if cfg.export and not interrupted:  # re-export only when this call trained further
        exported = export_model(trained, export_dir, tokenizer, overwrite=start < total)
    return RunResult(trained, int(state.step), total, interrupted, resumed_from, exported)


def restore_latest(model: nnx.Module, cfg: TrainConfig) -> tuple[nnx.Module, int] | None:
    """The model of the newest readable checkpoint in ``cfg.output_dir`` and its step (None if none).

    ``model`` is the run's starting model: checkpoints hold only what training changes.
    """
    # The schedule's length does not change the optimizer state's layout.
    tx = build_tx(cfg, max(cfg.max_steps or 1, 1))
    defs, state = st.init_state(model, tx, build_objective(cfg.objective, model.config.hidden_size), copy=False)
    shardings = sh.train_state_shardings(state, sh.make_mesh(cfg.mesh), tx)
    state = jax.device_put(state, shardings)
    mngr, restored, _ = _restore_latest(Path(cfg.output_dir) / "checkpoints", cfg.keep, _saved(state), _saved(shardings))
    mngr.close()
    if restored is None:
        return None
    state = state._replace(**restored)
    return st.merge_model(defs, state, copy=False), int(state.step)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the metrics of steps ``<= step`` (later ones are recomputed after a resume)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def export_model(model: nnx.Module, path: Path, tokenizer: Any, overwrite: bool) -> Path | None:
    """``save_hf`` on process 0 after gathering every parameter to it. An existing export is
    replaced (atomically, by ``save_hf``) only with ``overwrite``."""
    from jax_unlearn.models import save_hf

    if jax.process_count() > 1:
        graphdef, state = nnx.split(model)
        state = jax.jit(lambda s: s, out_shardings=sh.replicated(sh.make_mesh(sh.MeshConfig(fsdp=-1))))(state)
        model = nnx.merge(graphdef, state)
    if jax.process_index() != 0:
        return None
    if not overwrite and path.exists() and any(path.iterdir()):
        log.info("%s already holds the model of this finished run; leaving it", path)
        return path
    save_hf(model, path, tokenizer, overwrite=True)
    return path
