"""Export: the run's model as a Hugging Face folder (`export_model`) and a LoRA run's adapter as a
PEFT folder (`export_adapter`), written by process 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jax_unlearn import sharding as sh

log = logging.getLogger("jax_unlearn.train")


def gathered_on_process_0(model: nnx.Module, what: Any = ...) -> nnx.Module | None:
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

    model = gathered_on_process_0(model, nnx.LoRAParam)  # the adapters alone: save_peft reads nothing else
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

    model = gathered_on_process_0(model)
    if model is None:
        return None
    if not overwrite and path.exists() and any(path.iterdir()):
        log.info("%s already holds the model of this finished run; leaving it", path)
        return path
    save_hf(model, path, tokenizer, overwrite=True)
    return path
