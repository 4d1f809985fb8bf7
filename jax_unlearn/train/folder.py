"""The run folder: what it holds, the checks before a run writes into it, and its small files.

A run folder ``OUT`` holds ``fingerprint.json`` (what defines the run, `jax_unlearn.fingerprint`,
and its length), ``checkpoints/<step>``, ``metrics.jsonl`` (one row per logged step and per
evaluation), ``model/`` (the export), and whatever the caller records beside them
(``jax-unlearn unlearn`` writes ``config.yaml``). Everything here reads only, but
`write_run_folder`, `write_atomic` and `rewind_log`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax

from jax_unlearn import fingerprint as fpr
from jax_unlearn.config import ConfigError, TrainConfig

log = logging.getLogger("jax_unlearn.train")

FINGERPRINT_FILE = "fingerprint.json"
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"  # metrics of steps recomputed after a resume
BEST_DIR, BEST_FILE = "best", "best.json"  # the selected state (select.metric) and what selected it
STOPPED_FILE = "stopped.json"  # where and why stop_when ended the run
EXPORT_DIR = "model"  # the exported Hugging Face model
ADAPTER_DIR = "adapter"  # the PEFT adapter of a LoRA run, beside the merged model
RESERVED = frozenset({FINGERPRINT_FILE, METRICS_FILE, SUPERSEDED_FILE, BEST_FILE, STOPPED_FILE})


class ResumeError(ConfigError):
    """The output folder holds another run (other fingerprint, more steps than asked for, or a
    checkpoint that does not fit): nothing was changed in it."""


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


def check_resume(run_dir: str | Path, fingerprint: dict, total: int, length_key: str = "max_steps", *,
                 partial: bool = False) -> ResumeCheck:
    """Checks that ``run_dir`` is empty or holds this same run, and no more steps than ``total``.

    Reads only. Raises `ResumeError` naming the fingerprint keys that differ from the recorded
    ones (`jax_unlearn.fingerprint.differences`; ``partial``: ``fingerprint`` lacks keys on
    purpose, e.g. ``model.weights`` before the model is loaded), or ``length_key`` when the run
    already took more steps than ``total``.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    steps = checkpoint_steps(run_dir)
    newest = steps[-1] if steps else None
    if record is not None:
        diff = fpr.differences(record["fingerprint"], fingerprint, partial=partial)
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


def read_json(path: Path) -> dict | None:
    """A small JSON record of the run folder, or None when absent."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary sibling, then renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def rewind_log(path: Path, step: int) -> None:
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
    write_atomic(path, "".join(line + "\n" for line in kept))


def check_record_names(record: dict[str, str] | None) -> None:
    """Raises ValueError unless every file the caller records beside the run is a plain file name
    that is not one of the run folder's own (`RESERVED`)."""
    for name in record or {}:
        if Path(name).name != name or name in RESERVED:
            raise ValueError(f"record file name {name!r} must be a plain file name of the caller's own")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jax_unlearn: {name}")


def write_run_folder(out: Path, record: dict[str, str] | None, fingerprint: dict, total: int, start: int) -> None:
    """The first writes of a validated run (process 0; every process waits for them): the
    caller's ``record`` files, ``fingerprint.json``, ``metrics.jsonl`` rewound to ``start``
    (`rewind_log`) and ``checkpoints/``."""
    _barrier("run folder checked")  # every host has read the run folder before process 0 writes into it
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (record or {}).items():
            write_atomic(out / name, text)
        write_atomic(out / FINGERPRINT_FILE, json.dumps({"fingerprint": fingerprint, "total_steps": total},
                                                        indent=1, sort_keys=True) + "\n")
        rewind_log(out / METRICS_FILE, start)
        (out / "checkpoints").mkdir(exist_ok=True)
    _barrier("run folder written")  # every host sees the written folder before going on
