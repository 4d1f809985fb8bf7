"""The training loop: the only place with side effects (checkpoints, logs, signals, export).

`run_steps` is the loop itself (steps, hooks every N steps, a progress bar); `unlearn` (one run
over a run folder) and the embedded benchmark's pretraining and trajectories drive their steps
through it. The parts, one module each:

- `loop`: `run_steps`, `Every`, `StopFlag` (SIGTERM/SIGINT finish the step, save and return);
- `folder`: the run folder's files, `check_output_dir`, `check_resume` (a rerun resumes only the
  same run: `jax_unlearn.fingerprint`), `write_run_folder`, `rewind_log`;
- `checkpoints`: Orbax checkpoints of what training changes, `restore_newest` (an unreadable
  checkpoint moved to ``OUT/checkpoints.unreadable/``, never deleted; one of another
  configuration is a `ResumeError`), `Checkpointer`;
- `guard`: the non-finite guard, a device-side record read without stalling; `NonFiniteError`
  names the first non-finite step and the last finite checkpoint;
- `metrics`: ``metrics.jsonl`` rows, read one log step late so the device stays ahead;
- `selection`: evaluations every ``eval.every`` steps, ``select`` and ``stop_when``;
- `export`: ``save_hf`` / ``save_peft`` on process 0;
- `unlearn`: `check_run`, `build_run`, `resume`, `unlearn`, `restore_latest`.

Validate, then write: `unlearn` checks the config's ranges, the data against the batch size
and the model, the mesh, the output folder and the fingerprint recorded in ``OUT`` before it
writes anything. Raising ``max_steps`` (or ``epochs``) continues a run; lowering it below the
steps taken is refused. Metrics of steps after the restored checkpoint (they are recomputed)
move from ``metrics.jsonl`` to ``metrics.superseded.jsonl``. A non-finite step stops the run
and nothing after it is saved or exported; with ``optim.skip_nonfinite=N`` the optimizer skips
non-finite updates (``optax.apply_if_finite``) and the run stops only after more than ``N`` in a row.
"""

from .checkpoints import Checkpointer, restore_newest
from .export import export_adapter, export_model
from .folder import (
    ADAPTER_DIR,
    BEST_DIR,
    BEST_FILE,
    EXPORT_DIR,
    FINGERPRINT_FILE,
    METRICS_FILE,
    STOPPED_FILE,
    SUPERSEDED_FILE,
    ResumeCheck,
    ResumeError,
    check_output_dir,
    check_resume,
    checkpoint_steps,
    length_key,
    read_record,
    total_steps,
    unwritable,
)
from .guard import NonFiniteError, NonFiniteGuard
from .loop import Every, StopFlag, run_steps
from .metrics import MetricsLog
from .selection import Evaluations, Selection
from .unlearn import (
    RunResult,
    build_run,
    check_mesh,
    check_run,
    check_trainable,
    inference,
    restore_latest,
    resume,
    unlearn,
    with_adapters,
)

__all__ = [
    "ADAPTER_DIR", "BEST_DIR", "BEST_FILE", "EXPORT_DIR", "FINGERPRINT_FILE", "METRICS_FILE", "STOPPED_FILE",
    "SUPERSEDED_FILE", "Checkpointer", "Evaluations", "Every", "MetricsLog", "NonFiniteError", "NonFiniteGuard",
    "ResumeCheck", "ResumeError", "RunResult", "Selection", "StopFlag", "build_run", "check_mesh", "check_output_dir",
    "check_resume", "check_run", "check_trainable", "checkpoint_steps", "export_adapter", "export_model", "inference", "length_key",
    "read_record", "restore_latest", "restore_newest", "resume", "run_steps", "total_steps", "unlearn",
    "unwritable", "with_adapters",
]
