"""Export: the run's model as a Hugging Face folder (`export_model`) and a LoRA run's adapter as a
PEFT folder (`export_adapter`), written by process 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

log = logging.getLogger("jax_unlearn.train")


def _keep_existing(path: Path, overwrite: bool) -> bool:
    """Whether a finished run's export in ``path`` stays as it is, as process 0 sees it (every
    process follows that decision, so all take part in the same gathers or none)."""
    keep = not overwrite and path.exists() and any(path.iterdir())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        keep = bool(multihost_utils.broadcast_one_to_all(np.asarray(keep)))
    return keep


def export_adapter(model: nnx.Module, path: Path, base_model: str | None, overwrite: bool) -> Path | None:
    """A LoRA model's adapters as a PEFT folder (`jax_unlearn.models.save_peft`), written by
    process 0 (the path; None on the others); an existing one is replaced only with ``overwrite``."""
    from jax_unlearn.models import save_peft

    if _keep_existing(path, overwrite):
        return path if jax.process_index() == 0 else None
    return save_peft(model, path, base_model_name_or_path=base_model, overwrite=True)


def export_model(model: nnx.Module, path: Path, tokenizer: Any, overwrite: bool) -> Path | None:
    """``save_hf``: every process takes part (each tensor gathered to the hosts in turn, never the
    whole model onto a device), process 0 writes and gets the path (None on the others). An
    existing export is replaced (atomically, by ``save_hf``) only with ``overwrite``."""
    from jax_unlearn.models import save_hf

    if _keep_existing(path, overwrite):
        if jax.process_index() == 0:
            log.info("%s already holds the model of this finished run; leaving it", path)
            return path
        return None
    return save_hf(model, path, tokenizer, overwrite=True)
