"""The unlearning loop: the only place with side effects (checkpoints, logs, signals).

Forget-anchored epochs: each epoch visits the forget set in a seeded permutation, one batch
of ``batch_size`` rows per step, and pairs it with ``batch_size`` retain rows drawn by a
generator seeded with ``(seed, step)``, so the data of step ``t`` depends on ``t`` alone and
a resumed run sees exactly the batches an uninterrupted run would.

Orbax checkpoints (``OUT/checkpoints/<step>``) hold the trainable parameters, the optimizer
state, the step, the data position and the RNG key; the newest readable one is restored on
start. A checkpoint that cannot be read is moved to ``OUT/checkpoints.unreadable/`` with a
warning (nothing is deleted) and the previous one is used. SIGTERM or SIGINT finishes the
current step, saves and returns. At the end the model is exported with ``save_hf`` to
``OUT/model``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

import jax_unlearn as ju
from jax_unlearn import objectives as obj
from jax_unlearn.data import Dataset, PairedBatches
from jax_unlearn import sharding as sh
from jax_unlearn import step as st

log = logging.getLogger("jax_unlearn.train")



# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and a decay schedule, after global-norm clipping."""

    lr: float = 1e-5
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class CombinerConfig:
    """Which combiner heads the chain: ``weighted_sum``, ``pcgrad`` or ``sago``."""

    name: Literal["weighted_sum", "pcgrad", "sago"] = "sago"
    alpha: float = 1.0
    gamma: float = 1.0
    scope: Literal["module", "global"] = "module"
    agree: Literal["forget", "sum"] = "forget"
    diagnostics: bool = True


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective: ``grad_ascent``, ``grad_diff``, ``npo``, ``simnpo`` or ``rmu``."""

    name: Literal["grad_ascent", "grad_diff", "npo", "simnpo", "rmu"] = "grad_diff"
    retain: Literal["nll", "kl"] = "nll"
    beta: float = 0.1
    delta: float = 0.0
    layer: int = 7
    steering: float = 2.0
    trainable: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One unlearning run."""

    output_dir: str
    batch_size: int = 8
    micro_batches: int = 1
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    seed: int = 0
    save_every: int = 50
    keep: int = 2
    log_every: int = 1
    mode: Literal["combined", "naive"] = "combined"
    export: bool = True
    progress: bool = True
    mesh: sh.MeshConfig = sh.MeshConfig()
    optim: OptimConfig = OptimConfig()
    combiner: CombinerConfig = CombinerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()


def build_objective(cfg: ObjectiveConfig, hidden_size: int) -> obj.Objective:
    if cfg.name == "grad_ascent":
        return obj.grad_ascent()
    if cfg.name == "grad_diff":
        return obj.grad_diff(cfg.retain)
    if cfg.name == "npo":
        return obj.npo(cfg.beta, cfg.retain)
    if cfg.name == "simnpo":
        return obj.simnpo(cfg.beta, cfg.delta, cfg.retain)
    if cfg.name == "rmu":
        kw = {} if cfg.trainable is None else {"trainable": cfg.trainable}
        return obj.rmu(hidden_size, cfg.layer, cfg.steering, cfg.seed, **kw)
    raise ValueError(f"objective.name={cfg.name!r} is not supported; expected one of "
                     "('grad_ascent', 'grad_diff', 'npo', 'simnpo', 'rmu')")


def build_combiner(cfg: CombinerConfig) -> optax.GradientTransformation:
    if cfg.name == "weighted_sum":
        return ju.weighted_sum(cfg.alpha, cfg.gamma, diagnostics=cfg.diagnostics)
    if cfg.name == "pcgrad":
        return ju.pcgrad(cfg.alpha, cfg.gamma, scope=cfg.scope, diagnostics=cfg.diagnostics)
    if cfg.name == "sago":
        return ju.sago(cfg.alpha, cfg.gamma, agree=cfg.agree, diagnostics=cfg.diagnostics)
    raise ValueError(f"combiner.name={cfg.name!r} is not supported; expected one of ('weighted_sum', 'pcgrad', 'sago')")


def build_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_ratio * total_steps`` steps, then constant, linear or cosine decay to 0."""
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, 0.0, rest)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, rest)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not supported; expected 'constant', 'linear' or 'cosine'")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def build_tx(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``chain(combiner, clip, adamw)``; naive mode drops the combiner."""
    o = cfg.optim
    parts = [] if cfg.mode == "naive" else [build_combiner(cfg.combiner)]
    if o.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*parts)


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
      cfg: the run (`TrainConfig`).
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
    tx = build_tx(cfg, schedule)
    objective = build_objective(cfg.objective, model.config.hidden_size)
    defs, state = st.init_state(model, tx, objective)

    mesh = sh.make_mesh(cfg.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the mesh's data x fsdp = {shards} "
                         "batch shards (set mesh.data / mesh.fsdp / mesh.tensor)")
    shardings = sh.train_state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    batch_sharding = sh.batch_sharding(mesh)
    step_fn = st.make_two_grad_step(defs, objective, tx, st.StepConfig(cfg.micro_batches, cfg.mode), shardings, batch_sharding)

    mngr, restored, meta = _restore_latest(out / "checkpoints", cfg.keep, _saved(state), _saved(shardings))
    rng = jax.random.key_data(jax.random.PRNGKey(cfg.seed))
    resumed_from = None
    if restored is not None:
        state = state._replace(**restored)
        resumed_from = int(state.step)
        rng = np.asarray(meta["rng"], np.uint32)
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

    def save(step: int):
        meta = {"position": list(data.position(step)), "rng": np.asarray(rng).tolist(), "total_steps": total}
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_saved(state)), meta=ocp.args.JsonSave(meta)),
                  force=True)
        mngr.wait_until_finished()

    interrupted = False
    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and is_main), desc="unlearn", unit="step")
    with _StopFlag() as stop:
        t_last, n_tokens = time.perf_counter(), 0
        for step in range(start, total):
            fb, rb = data(step)
            n_tokens += int(fb["attention_mask"].sum() + rb["attention_mask"].sum()) if "attention_mask" in fb else 0
            state, metrics = step_fn(state, _global_batch(fb, batch_sharding), _global_batch(rb, batch_sharding))
            done = step + 1
            if done % cfg.log_every == 0 or done == total or stop.signal is not None:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                metrics.update(step=done, lr=float(schedule(step)), tokens_per_s=n_tokens / max(now - t_last, 1e-9))
                t_last, n_tokens = now, 0
                if is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(forget=f"{metrics['forget_loss']:.3f}", retain=f"{metrics['retain_loss']:.3f}")
            bar.update(1)
            if done % cfg.save_every == 0 or done == total or stop.signal is not None:
                save(done)
            if stop.signal is not None and done < total:
                interrupted = True
                break
    bar.close()
    mngr.close()

    trained = st.merge_model(defs, state)
    exported = None
    if cfg.export and not interrupted:  # re-export only when this call trained further
        exported = export_model(trained, export_dir, tokenizer, overwrite=start < total)
    return RunResult(trained, int(state.step), total, interrupted, resumed_from, exported)


def restore_latest(model: nnx.Module, cfg: TrainConfig) -> tuple[nnx.Module, int] | None:
    """The model of the newest readable checkpoint in ``cfg.output_dir`` and its step (None if none).

    ``model`` is the run's starting model: checkpoints hold only what training changes.
    """
    # The schedule's length does not change the optimizer state's layout.
    tx = build_tx(cfg, build_schedule(cfg.optim, max(cfg.max_steps or 1, 1)))
    defs, state = st.init_state(model, tx, build_objective(cfg.objective, model.config.hidden_size), copy=False)
    shardings = sh.train_state_shardings(state, sh.make_mesh(cfg.mesh))
    state = jax.device_put(state, shardings)
    mngr, restored, _ = _restore_latest(Path(cfg.output_dir) / "checkpoints", cfg.keep, _saved(state), _saved(shardings))
    mngr.close()
    if restored is None:
        return None
    state = state._replace(**restored)
    return st.merge_model(defs, state), int(state.step)


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
