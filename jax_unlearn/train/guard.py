"""The non-finite guard: a device-side record of the first non-finite step, read without stalling.

After every step a small jitted function folds the step's watched metrics (both losses, and the
update's norm when the combiner's diagnostics are on; the gradient's norm in naive mode) into a
record ``(first non-finite step or 0, its values)`` that stays on the device. The loop reads it
where it syncs anyway: one step late at log steps (`NonFiniteGuard.failed` with ``lagged``: the
record as of the previous step, so the newest step keeps running), and in full before every
checkpoint (`state_finite`, which also checks every parameter). With ``optim.skip_nonfinite=N``
the optimizer skips non-finite updates and the record marks the step where more than ``N`` came
in a row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_unlearn import sharding as sh
from jax_unlearn.config import TrainConfig

from .folder import checkpoint_steps


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


def watched(cfg: TrainConfig) -> tuple[str, ...]:
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
def all_finite(tree) -> jax.Array:
    """Whether every inexact leaf of ``tree`` is finite (a scalar bool on the device)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


class NonFiniteGuard:
    """Watches a run's steps (see the module docstring); ``failure`` holds the first non-finite
    step and its values once read."""

    def __init__(self, cfg: TrainConfig, mesh: Any):
        self.cfg, self.watched, self.skip = cfg, watched(cfg), cfg.optim.skip_nonfinite
        self._watch = _watch_fn(self.skip)
        replicated = sh.replicated(mesh)
        self.record = jax.device_put((jnp.zeros((), jnp.int32), jnp.zeros((len(self.watched),), jnp.float32)),
                                     replicated)
        self._previous = self.record
        self._zero = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        self.failure: dict = {}

    def guarded(self, step_fn):
        """``step_fn`` followed by `after_step`."""
        def step(state, *batches):
            state, metrics = step_fn(state, *batches)
            self.after_step(state, metrics)
            return state, metrics

        return step

    def after_step(self, state: Any, metrics: dict) -> None:
        """Folds the step's watched metrics into the record (dispatched; nothing waits)."""
        in_a_row = optax.tree_utils.tree_get(state.opt_state, "notfinite_count") if self.skip else self._zero
        self._previous = self.record
        self.record = self._watch(self.record, state.step, [metrics[k] for k in self.watched], in_a_row)

    def failed(self, lagged: bool = False) -> bool:
        """Reads the record (``lagged``: as of the step before the newest, which does not wait for
        the newest step); True once a non-finite step was seen."""
        if not self.failure:
            first, values = jax.device_get(self._previous if lagged else self.record)
            if int(first):
                self.failure.update(step=int(first), values={k: float(v) for k, v in zip(self.watched, values)})
        return bool(self.failure)

    def state_finite(self, done: int, state: Any) -> bool:
        """False (and ``failure`` set) when a step so far or a parameter of ``state`` is not finite."""
        if self.failed():
            return False
        if not bool(all_finite(state.params)):
            self.failure.update(step=done, values={})
            return False
        return True

    def error(self, run_dir: Path) -> NonFiniteError:
        """The error that stops the run: the step, its values, the last finite checkpoint, what to try."""
        cfg, step, values = self.cfg, self.failure["step"], self.failure["values"]
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        if not values:
            what = f"after step {step} the parameters are not finite (the watched losses were)"
        elif cfg.optim.skip_nonfinite:
            what = (f"step {step}: more than optim.skip_nonfinite={cfg.optim.skip_nonfinite} non-finite updates in "
                    f"a row ({shown})")
        else:
            what = f"step {step}: non-finite loss or update ({shown})"
        steps = checkpoint_steps(run_dir)
        kept = (f"the newest checkpoint, step {steps[-1]} in {run_dir / 'checkpoints'}, is the last finite state"
                if steps else "no checkpoint was written")
        hint = ("lower optim.lr" if cfg.optim.skip_nonfinite else
                "lower optim.lr or set optim.skip_nonfinite=N to skip up to N non-finite updates in a row")
        message = (f"{what}; the run stopped without saving or exporting anything after it ({kept}); {hint} "
                   f"(optim.lr={cfg.optim.lr:g}) and start a new output_dir")
        return NonFiniteError(message, step, values)
