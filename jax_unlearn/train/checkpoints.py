"""Orbax checkpoints of a run: what they hold, writing them, and restoring the newest readable one.

A checkpoint holds only what training changes (`saved`: the step, the trainable parameters and
the optimizer state; frozen weights come from the starting model) and a ``meta`` record (the
data position, the run's length and the tree's names, shapes and dtypes). Restoring
(`restore_newest`) tells a checkpoint of another configuration (an error: `ResumeError`, nothing
moved) from an unreadable one (moved aside to ``checkpoints.unreadable/`` and the previous one
tried, or only skipped when reading another's folder).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jax_unlearn import step as st

from .folder import ResumeError

log = logging.getLogger("jax_unlearn.train")


def manager(directory: Path, keep: int) -> ocp.CheckpointManager:
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


def saved(state: st.TrainState) -> dict:
    """What a checkpoint holds: only what training changes (frozen parts come from the model)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def tree_spec(tree: Any) -> dict[str, list]:
    """``name -> [shape, dtype]`` of every array of a checkpoint's tree (recorded in its ``meta``,
    so a restore can tell a checkpoint of another configuration from a corrupt one)."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): [list(x.shape), jnp.dtype(x.dtype).name]
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mismatch(expected: dict, found: dict) -> list[str]:
    """Where a checkpoint's recorded `tree_spec` (``found``) differs from this run's (``expected``)."""
    out = [f"{k}: not in the checkpoint" for k in expected if k not in found]
    out += [f"{k}: in the checkpoint, not in this run" for k in found if k not in expected]
    for k, (shape, dtype) in expected.items():
        if k in found and [list(found[k][0]), found[k][1]] != [shape, dtype]:
            out.append(f"{k}: {tuple(found[k][0])} {found[k][1]} in the checkpoint, {tuple(shape)} {dtype} in this run")
    return out


def _recorded_tree(reader: ocp.CheckpointManager, directory: Path, step: int) -> dict[str, list]:
    """The `tree_spec` a checkpoint was saved with: from its ``meta``, or (checkpoints written
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


def restore_newest(directory: Path, target: dict, shardings: dict | None, move_aside: bool):
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
    expected = tree_spec(abstract)
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


class Checkpointer:
    """Saves a run's state every ``save_every`` steps into ``run_dir/checkpoints`` (keeping the
    newest ``keep``), each with its data position; a state `guard` finds non-finite is never saved."""

    def __init__(self, run_dir: Path, keep: int, position, total: int, spec: dict, guard: Any, before=None):
        self.mngr = manager(run_dir / "checkpoints", keep)
        self.position, self.total, self.spec, self.guard, self.before = position, total, spec, guard, before

    def save(self, done: int, state: st.TrainState, metrics: Any = None) -> bool:
        """The hook: True (stop the run) when the state is not finite, which is then not saved."""
        if not self.guard.state_finite(done, state):
            return True
        if self.before is not None:
            self.before()  # e.g. the metrics rows up to this step, so a resume finds them all
        meta = {"position": list(self.position(done)), "total_steps": self.total, "tree": self.spec}
        self.mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(saved(state)),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
        self.mngr.wait_until_finished()
        return False

    def close(self) -> None:
        self.mngr.close()
