"""The loop itself: steps, hooks every N steps, and SIGTERM/SIGINT turned into a clean stop."""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("jax_unlearn.train")


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
    hooks of that step. ``bar`` (a tqdm) advances one per step. Nothing here waits for the
    device: a step is dispatched as soon as the previous step's hooks return.

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


class StopFlag:
    """SIGTERM/SIGINT handler (a context manager): ``signal`` is set when one arrived, so the
    loop can finish the current step, save and return instead of dying mid-write."""

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
