"""``metrics.jsonl``: one row per logged step, read from the device one log step late.

A row holds the step's metrics (both losses, the combiner's diagnostics), the learning rate the
optimizer used, tokens per second since the previous row, and with ``optim.skip_nonfinite`` the
number of skipped updates. The values of step ``t`` are queued (their copy to the host started)
and written at the next log step, after step ``t + 1`` was dispatched: with ``log_every=1`` the
host reads step ``t`` while the device runs step ``t + 1``, so the device never waits for the
host. `MetricsLog.flush` writes what is queued (before a checkpoint, an evaluation row and at
the end), so the file stays in step order and every checkpointed step has its row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _learning_rate(opt_state: Any) -> Any:
    """The learning rate the optimizer used last (an ``inject_hyperparams`` state's), or None."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        if "learning_rate" in getattr(node, "hyperparams", {}):
            return node.hyperparams["learning_rate"]
    return None


def _short(x: Any) -> float:
    """A float32 value as the shortest decimal that reads back to it (``1e-05``, not
    ``9.999999747378752e-06``)."""
    return float(str(np.float32(x)))


class MetricsLog:
    """The rows of one run (see the module docstring); ``path`` None writes nothing (processes
    other than 0). ``fetch`` reads device values (``jax.device_get``; a test may watch it)."""

    def __init__(self, path: Path | None, schedule: Any, skip_nonfinite: bool, bar: Any = None,
                 fetch: Callable[[Any], Any] = jax.device_get):
        self.path, self.schedule, self.skip, self.bar, self.fetch = path, schedule, skip_nonfinite, bar, fetch
        self.pending: list[tuple[dict, dict]] = []  # (device values, host values) per queued row
        self.tokens, self.since = 0, time.perf_counter()

    def count(self, tokens: int) -> None:
        """Adds the tokens of a dispatched step (for tokens/s)."""
        self.tokens += tokens

    def log(self, done: int, state: Any, metrics: dict) -> bool:
        """The hook of a log step: writes the queued rows, then queues step ``done``'s."""
        self.flush()
        now = time.perf_counter()
        device = dict(metrics)
        # copies of the state's values: the next step donates the state (and deletes its buffers)
        lr = _learning_rate(state.opt_state)
        device["lr"] = jnp.copy(lr) if lr is not None else (
            self.schedule(done - 1) if callable(self.schedule) else self.schedule)
        if self.skip:
            device["skipped_updates"] = jnp.copy(optax.tree_utils.tree_get(state.opt_state, "total_notfinite"))
        for value in jax.tree.leaves(device):
            if hasattr(value, "copy_to_host_async"):
                value.copy_to_host_async()
        self.pending.append((device, {"step": done, "tokens_per_s": self.tokens / max(now - self.since, 1e-9)}))
        self.tokens, self.since = 0, now
        return False

    def flush(self) -> None:
        """Reads and writes every queued row."""
        rows = []
        for device, host in self.pending:
            values = self.fetch(device)
            row = {k: float(v) for k, v in values.items() if k not in ("lr", "skipped_updates")}
            row["lr"] = _short(values["lr"])
            if "skipped_updates" in values:
                row["skipped_updates"] = int(values["skipped_updates"])
            rows.append(row | host)
        self.pending.clear()
        self._append(rows)
        if rows and self.bar is not None:
            self.bar.set_postfix(forget=f"{rows[-1]['forget_loss']:.3f}", retain=f"{rows[-1]['retain_loss']:.3f}")

    def write(self, row: dict) -> None:
        """Writes ``row`` (e.g. an evaluation's) after the queued rows."""
        self.flush()
        self._append([row])

    def _append(self, rows: list[dict]) -> None:
        if rows and self.path is not None:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
